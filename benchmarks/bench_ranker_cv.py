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

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_ranker_labels import demo_dataset, run, table

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = (0, 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="3,4,5,6,7", help="demo-catalog seeds, comma-separated ('' for none)")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--ml100k", type=Path, default=None, help="RecBole atomic files of ml-100k (ingested here)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    key = "cv_folds"
    with tempfile.TemporaryDirectory(prefix="kgrec-cv-") as tmp:
        work = Path(tmp)
        for s in (int(x) for x in a.seeds.split(",") if x.strip()):
            rows += run(f"demo {s}", *demo_dataset(s, a.items, a.users, work), key=key, variants=SETTINGS)
            print(table(rows[-len(SETTINGS):], key), flush=True)
        if a.ml100k is not None:
            from kgrec.data.ingest import ingest

            ingest(a.ml100k, work / "ml100k", progress=False)
            rows += run("ml-100k", work / "ml100k", None, key=key, variants=SETTINGS)
    print(table(rows, key))
    summary = {}
    for v in SETTINGS:
        mine = [r for r in rows if r[key] == v and r["gnn+ranker"] and r["dataset"].startswith("demo")]
        if not mine:
            continue
        ratio = [(r["gnn+ranker"]["recall@20"] / r["gnn"]["recall@20"] + r["gnn+ranker"]["ndcg@20"] / r["gnn"]["ndcg@20"])
                 / 2 for r in mine]
        summary[str(v)] = {"demo_mean_ratio": float(np.mean(ratio)),
                           "demo_mean_ranker_fit_s": float(np.mean([r["ranker_fit_s"] for r in mine]))}
        print(f"cv_folds {v}: demo catalogs' mean test ratio to the GNN order ((R@20 + N@20) / 2) "
              f"{summary[str(v)]['demo_mean_ratio']:.3f}; ranker fit {summary[str(v)]['demo_mean_ranker_fit_s']:.2f} s")
    a.out.mkdir(parents=True, exist_ok=True)
    args = f"--seeds {a.seeds}" + (f" --ml100k {a.ml100k}" if a.ml100k else "")
    out = {"command": f"python -m benchmarks.bench_ranker_cv {args}", "machine": platform.platform(),
           "wall_s": round(time.perf_counter() - t0, 1), "rows": rows, "summary": summary}
    (a.out / "ranker_cv.json").write_text(json.dumps(out, indent=2, default=float), encoding="utf-8")
    print(f"wrote {a.out / 'ranker_cv.json'} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
