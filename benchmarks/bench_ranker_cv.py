"""How should the product's re-ranker choose its tree count? ``ranking.cv_folds`` compared with the GNN fixed.

0: early stopping on 20% of the valid users, the ranker learns from the other 80% (the earlier default); 5 (the
default): 5-fold cross-validation over the users picks the tree count (best iteration of the fold-mean NDCG@20
curve) and one ranker learns from every user. The stopping point then no longer rests on ~45 demo users.

For each dataset: fit the ``Recommender`` once, then refit only the ranker per setting
(``Recommender.refit_ranker``) and evaluate on test (RecBole definitions, train + valid masked) next to the GNN
order. Datasets: demo catalog seeds (default 3-7, the ones the default was decided on; 0-2 were looked at while
building it) and, with ``--ml100k DIR`` (RecBole atomic files, e.g. ``../shared/data/ml-100k-kg``), MovieLens-100k.

    .venv/bin/python -m benchmarks.bench_ranker_cv [--seeds 3,4,5,6,7] [--ml100k ../shared/data/ml-100k-kg]

Writes ``benchmarks/results/ranker_cv.json`` and prints a table.
"""
from __future__ import annotations

import numpy as np

from benchmarks.bench_ranker_labels import compare, demo_mean_ratio, write

SETTINGS = (0, 5)


def main() -> None:
    key = "cv_folds"
    a, rows, t0 = compare(__doc__, "3,4,5,6,7", key, SETTINGS)
    summary = {}
    for v in SETTINGS:
        mine = [r for r in rows if r[key] == v and r["gnn+ranker"] and r["dataset"].startswith("demo")]
        if not mine:
            continue
        summary[str(v)] = {"demo_mean_ratio": demo_mean_ratio(mine),
                           "demo_mean_ranker_fit_s": float(np.mean([r["ranker_fit_s"] for r in mine]))}
        print(f"cv_folds {v}: demo catalogs' mean test ratio to the GNN order ((R@20 + N@20) / 2) "
              f"{summary[str(v)]['demo_mean_ratio']:.3f}; ranker fit {summary[str(v)]['demo_mean_ranker_fit_s']:.2f} s")
    write(a, "ranker_cv", rows, summary, t0)


if __name__ == "__main__":
    main()
