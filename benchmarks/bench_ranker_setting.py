"""One re-ranker setting compared on demo catalogs (and ml-100k) with the GNN fixed: ``ranking.<KEY>`` per value.

For each dataset: fit the ``Recommender`` once, refit only the ranker per value (``Recommender.refit_ranker``),
evaluate on test (RecBole definitions, train + valid masked) next to the GNN order. The summary is the demo
catalogs' mean test ratio to the GNN order, (Recall@20 + NDCG@20) / 2, per value. Values are parsed as int, float
or text.

    .venv/bin/python -m benchmarks.bench_ranker_setting min_child_samples 20,50,100 --seeds 13,14,15,16,17 \
        [--ml100k ../shared/data/ml-100k-kg]

Writes ``benchmarks/results/ranker_setting_<KEY>.json`` and prints a table. Used for ``min_child_samples`` and
``num_candidates`` (the README's benchmarks table has the decisions).
"""
from __future__ import annotations

import sys

from benchmarks.bench_ranker_labels import compare, demo_mean_ratio, write


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python -m benchmarks.bench_ranker_setting KEY VALUES [--seeds ...] [--ml100k DIR]")
    key, values = sys.argv[1], tuple(_value(v) for v in sys.argv[2].split(","))
    del sys.argv[1:3]  # the rest is the ranker benchmarks' common command line
    a, rows, t0 = compare(__doc__, "13,14,15,16,17", key, values)
    summary = {}
    for v in values:
        mine = [r for r in rows if r[key] == v]
        ml = [r for r in mine if r["dataset"] == "ml-100k" and r["gnn+ranker"]]
        summary[str(v)] = {"demo_mean_ratio": demo_mean_ratio(mine),
                           "ml100k_recall@20": ml[0]["gnn+ranker"]["recall@20"] if ml else None}
        print(f"{key} {v}: demo mean test ratio to the GNN order ((R@20 + N@20) / 2) {summary[str(v)]['demo_mean_ratio']}"
              + (f"; ml-100k Recall@20 {summary[str(v)]['ml100k_recall@20']:.4f}" if ml else ""))
    write(a, f"ranker_setting_{key}", rows, summary, t0,
          module=f"bench_ranker_setting {key} {','.join(str(v) for v in values)}")


if __name__ == "__main__":
    main()
