"""Does the LightGBM re-ranker beat the GNN retrieval order it re-ranks? Test Recall@20 / NDCG@20 of the demo
pipeline with the ranker's tree size (``ranking.num_leaves``) varied, the GNN fixed.

For each demo-catalog seed: generate and ingest the catalog (``kgrec demo``'s data, CLIP heads aligned with
``fit-clip`` unless ``--no-fit-clip``), fit the ``Recommender`` once, then refit only the ranker per
``num_leaves`` (same candidates, same valid labels, features from the train history) and evaluate on test
(RecBole definitions, train + valid masked) next to the GNN order. The ranker learns from few labels here
(~220 users with a valid event among their 200 candidates, ~1.4 positives each), which is where large trees
overfit: the reason the default is 7 leaves.

    .venv/bin/python -m benchmarks.bench_ranker_leaves [--seeds 0,1 --leaves 7,15,31]

Writes ``benchmarks/results/ranker_leaves.json`` and ``benchmarks/results/ranker_leaves.png``.
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

RESULTS = Path(__file__).resolve().parent / "results"


def demo_dataset(seed: int, items: int, users: int, work: Path, fit_clip: bool = True) -> tuple[Path, str | None]:
    """The demo catalog of ``seed`` generated and ingested under ``work``, and its fit-clip checkpoint (None
    without ``fit_clip``): what the ranker benchmarks fit on."""
    from kgrec.config import Config
    from kgrec.data.ingest import ingest
    from kgrec.data.schema import Dataset
    from kgrec.data.synthetic import generate_catalog

    raw, ds_dir = work / f"raw{seed}", work / f"dataset{seed}"
    generate_catalog(raw, n_items=items, n_users=users, seed=seed, images=True, progress=False)
    ingest(raw, ds_dir, config=Config().data, progress=False)
    if not fit_clip:
        return ds_dir, None
    from encoders.fit_clip import fit_clip as fit

    fit(Dataset.open(ds_dir), work / f"clip{seed}")
    return ds_dir, str(work / f"clip{seed}")


def run_seed(seed: int, leaves: list[int], items: int, users: int, fit_clip: bool, work: Path) -> list[dict[str, Any]]:
    from kgrec.config import Config
    from kgrec.data.schema import Dataset
    from kgrec.pipeline import Recommender

    ds_dir, clip = demo_dataset(seed, items, users, work, fit_clip)
    ds = Dataset.open(ds_dir)
    cfg = Config()
    if clip:
        cfg.encoders.clip_checkpoint = clip
    cfg.ranking.num_leaves = leaves[0]
    t0 = time.perf_counter()
    rec = Recommender.fit(ds_dir, cfg)
    fit_s = time.perf_counter() - t0
    rows = []
    for j, n in enumerate(leaves):
        if j == 0:  # the ranker Recommender.fit trained and evaluated with leaves[0]
            ranker_s, test = rec.metrics["timings"]["train_ranker_s"], rec.metrics["test"]
        else:
            out = rec.refit_ranker(cfg.ranking.model_copy(update={"num_leaves": n}), dataset=ds)
            ranker_s, test = out["timings"]["train_ranker_s"], out["test"]
        report = rec.metrics.get("ranker_training", {}) if rec.ranker is not None else {}
        rows.append({
            "seed": seed, "num_leaves": n, "pipeline_fit_s": round(fit_s, 1), "ranker_fit_s": round(ranker_s, 2),
            "ranker_groups": report.get("train_groups"), "best_iteration": report.get("best_iteration"),
            "valid_ndcg@20_ranker": report.get("valid_ndcg@20_ranker"),
            "valid_ndcg@20_retrieval": report.get("valid_ndcg@20_retrieval"),
            "gnn": {k: test["gnn"][k] for k in ("recall@20", "ndcg@20")},
            "gnn+ranker": {k: test["gnn+ranker"][k] for k in ("recall@20", "ndcg@20")} if "gnn+ranker" in test else None,
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| catalog seed | leaves | ranker best iter | GNN R@20 / N@20 | GNN + ranker R@20 / N@20 | ranker / GNN (R, N) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        g, k = r["gnn"], r["gnn+ranker"]
        if k is None:
            lines.append(f"| {r['seed']} | {r['num_leaves']} | – | {g['recall@20']:.4f} / {g['ndcg@20']:.4f} | no ranker | – |")
            continue
        lines.append(f"| {r['seed']} | {r['num_leaves']} | {r['best_iteration']} | {g['recall@20']:.4f} / {g['ndcg@20']:.4f} | "
                     f"{k['recall@20']:.4f} / {k['ndcg@20']:.4f} | {k['recall@20'] / g['recall@20']:.3f} / "
                     f"{k['ndcg@20'] / g['ndcg@20']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    leaves = sorted({r["num_leaves"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    width = 0.8 / (len(leaves) + 1)
    for j, s in enumerate(seeds):
        sr = {r["num_leaves"]: r for r in rows if r["seed"] == s}
        base = sr[leaves[0]]["gnn"]["recall@20"]
        ax.bar(j, base, width, color="0.6", label="GNN order" if j == 0 else None)
        for m, n in enumerate(leaves):
            v = sr[n]["gnn+ranker"]["recall@20"] if sr[n]["gnn+ranker"] else 0.0
            ax.bar(j + (m + 1) * width, v, width, color=plt.cm.viridis(m / max(1, len(leaves) - 1)),
                   label=f"ranker, {n} leaves" if j == 0 else None)
    ax.set_xticks([j + width * len(leaves) / 2 for j in range(len(seeds))], [f"catalog seed {s}" for s in seeds])
    ax.set_ylabel("test Recall@20")
    ax.set_title("Re-ranker vs the retrieval order it re-ranks (demo catalog)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1", help="demo-catalog seeds, comma-separated")
    ap.add_argument("--leaves", default="7,15,31", help="ranking.num_leaves values, comma-separated")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--no-fit-clip", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    leaves = [int(x) for x in a.leaves.split(",")]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kgrec-leaves-") as tmp:
        for s in (int(x) for x in a.seeds.split(",")):
            rows += run_seed(s, leaves, a.items, a.users, not a.no_fit_clip, Path(tmp))
    print(table(rows))
    a.out.mkdir(parents=True, exist_ok=True)
    out = {"command": "python -m benchmarks.bench_ranker_leaves " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k in ("seeds", "leaves")),
           "machine": platform.platform(), "wall_s": round(time.perf_counter() - t0, 1), "rows": rows,
           "mean_ratio_recall@20": {str(n): float(np.mean([r["gnn+ranker"]["recall@20"] / r["gnn"]["recall@20"]
                                                           for r in rows if r["num_leaves"] == n and r["gnn+ranker"]]))
                                    for n in leaves}}
    (a.out / "ranker_leaves.json").write_text(json.dumps(out, indent=2, default=float), encoding="utf-8")
    plot(rows, a.out / "ranker_leaves.png")
    print(f"wrote {a.out / 'ranker_leaves.json'} and ranker_leaves.png ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
