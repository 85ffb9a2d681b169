"""What should the product's re-ranker learn from? ``ranking.label_source`` compared with the GNN fixed.

"valid" (the default): the valid events of 80% of the users who have one; "fold": a held-out fold of train instead
(the GNN refitted on the rest of train; more users when train is large, one more GNN fit); "valid+fold": both.
Every variant chooses its tree count on, and reports, the same valid users (``ranking.cv_folds``), whose fold
groups are left out wherever they are held out.

For each dataset: fit the ``Recommender`` once (label_source "valid"), then refit only the ranker per variant
(``Recommender.refit_ranker``) and evaluate on test (RecBole definitions, train + valid masked) next to the GNN
order. Datasets: the demo catalog seeds (``kgrec demo``'s data, CLIP heads aligned with ``fit-clip``) and, with
``--ml100k DIR`` (RecBole atomic files, e.g. ``../shared/data/ml-100k-kg``), MovieLens-100k with its own split.

    .venv/bin/python -m benchmarks.bench_ranker_labels [--seeds 0,1,2] [--ml100k ../shared/data/ml-100k-kg]

Writes ``benchmarks/results/ranker_labels.json`` and prints a table.
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

from benchmarks.bench_ranker_leaves import demo_dataset

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("valid", "fold", "valid+fold")


def run(name: str, ds_dir: Path, clip: str | None, key: str = "label_source",
        variants: tuple[Any, ...] = SOURCES) -> list[dict[str, Any]]:
    """Fit once, then refit only the ranker with ``ranking.<key>`` set to each of ``variants``; one row each."""
    from kgrec.config import Config
    from kgrec.data.schema import Dataset
    from kgrec.pipeline import Recommender

    cfg = Config()
    if clip:
        cfg.encoders.clip_checkpoint = clip
    ds = Dataset.open(ds_dir)
    rec = Recommender.fit(ds, cfg, progress=False)
    rows = []
    for value in variants:
        out = rec.refit_ranker(cfg.ranking.model_copy(update={key: value}), dataset=ds)
        rep, test = out["ranker_training"] or {}, out["test"]
        rows.append({
            "dataset": name, key: value, "ranker_fit_s": round(out["timings"]["train_ranker_s"], 2),
            "train_groups_by_source": rep.get("train_groups_by_source", {"heldout": rep.get("train_groups")}),
            "valid_groups": rep.get("valid_groups"), "best_iteration": rep.get("best_iteration"),
            "valid_ndcg@20_ranker": rep.get("valid_ndcg@20_ranker"),
            "valid_ndcg@20_retrieval": rep.get("valid_ndcg@20_retrieval"), "fold": rep.get("fold"),
            "gnn": {k: test["gnn"][k] for k in ("recall@20", "ndcg@20")},
            "gnn+ranker": {k: test["gnn+ranker"][k] for k in ("recall@20", "ndcg@20")} if "gnn+ranker" in test else None,
        })
    return rows


def table(rows: list[dict[str, Any]], key: str = "label_source") -> str:
    head = {"label_source": "learns from"}.get(key, key)
    lines = [f"| dataset | {head} | groups | valid NDCG@20 ranker / retrieval | test R@20 / N@20 GNN | "
             "GNN + ranker | ranker / GNN (R, N) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g, k = r["gnn"], r["gnn+ranker"]
        value = r[key]
        if isinstance(value, list):  # a list setting (extra_features): its length
            value = f"{len(value)} columns" if value else "none"
        groups = " + ".join(f"{v} {n}" for n, v in r["train_groups_by_source"].items())
        valid = f"{r['valid_ndcg@20_ranker']:.4f} / {r['valid_ndcg@20_retrieval']:.4f}" if r["valid_ndcg@20_ranker"] else "–"
        if k is None:
            lines.append(f"| {r['dataset']} | {value} | {groups} | {valid} | "
                         f"{g['recall@20']:.4f} / {g['ndcg@20']:.4f} | no ranker | – |")
            continue
        lines.append(f"| {r['dataset']} | {value} | {groups} | {valid} | {g['recall@20']:.4f} / "
                     f"{g['ndcg@20']:.4f} | {k['recall@20']:.4f} / {k['ndcg@20']:.4f} | "
                     f"{k['recall@20'] / g['recall@20']:.3f} / {k['ndcg@20'] / g['ndcg@20']:.3f} |")
    return "\n".join(lines)


def arguments(doc: str, seeds: str) -> argparse.Namespace:
    """The command line both ranker benchmarks take (demo seeds, catalog size, ml-100k files, output folder)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--seeds", default=seeds, help="demo-catalog seeds, comma-separated ('' for none)")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--ml100k", type=Path, default=None, help="RecBole atomic files of ml-100k (ingested here)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args()


def collect(a: argparse.Namespace, key: str, variants: tuple[Any, ...]) -> list[dict[str, Any]]:
    """``run`` on every demo seed of ``a`` (each printed as it finishes) and on ml-100k when given."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kgrec-ranker-") as tmp:
        work = Path(tmp)
        for s in (int(x) for x in a.seeds.split(",") if x.strip()):
            rows += run(f"demo {s}", *demo_dataset(s, a.items, a.users, work), key=key, variants=variants)
            print(table(rows[-len(variants):], key), flush=True)
        if a.ml100k is not None:
            from kgrec.data.ingest import ingest

            ingest(a.ml100k, work / "ml100k", progress=False)
            rows += run("ml-100k", work / "ml100k", None, key=key, variants=variants)
    print(table(rows, key))
    return rows


def compare(doc: str, seeds: str, key: str, variants: tuple[Any, ...]
            ) -> tuple[argparse.Namespace, list[dict[str, Any]], float]:
    """A ranker benchmark's run: its command line (``doc``, default demo ``seeds``), then ``collect`` over the
    ``ranking.<key>`` variants. Returns (arguments, rows, start time)."""
    a = arguments(doc, seeds)
    t0 = time.perf_counter()
    return a, collect(a, key, variants), t0


def demo_mean_ratio(rows: list[dict[str, Any]]) -> float | None:
    """Mean over the demo-catalog rows with a ranker of the test ratio to the GNN order, (R@20 + N@20) / 2."""
    demo = [r for r in rows if r["gnn+ranker"] and r["dataset"].startswith("demo")]
    if not demo:
        return None
    return float(np.mean([(r["gnn+ranker"]["recall@20"] / r["gnn"]["recall@20"]
                           + r["gnn+ranker"]["ndcg@20"] / r["gnn"]["ndcg@20"]) / 2 for r in demo]))


def write(a: argparse.Namespace, name: str, rows: list[dict[str, Any]], summary: dict[str, Any], t0: float,
          module: str | None = None) -> None:
    """``benchmarks/results/<name>.json``: command, machine, wall time, rows and summary (``module``: the
    benchmark's module when it is not ``bench_<name>``, with its leading arguments)."""
    a.out.mkdir(parents=True, exist_ok=True)
    args = f"--seeds {a.seeds}" + (f" --ml100k {a.ml100k}" if a.ml100k else "")
    out = {"command": f"python -m benchmarks.{module or 'bench_' + name} {args}", "machine": platform.platform(),
           "wall_s": round(time.perf_counter() - t0, 1), "rows": rows, "summary": summary}
    (a.out / f"{name}.json").write_text(json.dumps(out, indent=2, default=float), encoding="utf-8")
    print(f"wrote {a.out / (name + '.json')} ({out['wall_s']} s)")


def main() -> None:
    a, rows, t0 = compare(__doc__, "0,1,2", "label_source", SOURCES)
    summary = {}
    for src in SOURCES:
        mine = [r for r in rows if r["label_source"] == src and r["gnn+ranker"]]
        summary[src] = {
            "mean_ratio_recall@20": float(np.mean([r["gnn+ranker"]["recall@20"] / r["gnn"]["recall@20"] for r in mine])),
            "mean_ratio_ndcg@20": float(np.mean([r["gnn+ranker"]["ndcg@20"] / r["gnn"]["ndcg@20"] for r in mine])),
            "mean_valid_gain": float(np.mean([r["valid_ndcg@20_ranker"] - r["valid_ndcg@20_retrieval"] for r in mine])),
        }
        print(f"{src}: mean test ranker / GNN Recall@20 {summary[src]['mean_ratio_recall@20']:.3f}, NDCG@20 "
              f"{summary[src]['mean_ratio_ndcg@20']:.3f}; mean valid NDCG@20 gain {summary[src]['mean_valid_gain']:+.4f}")
    write(a, "ranker_labels", rows, summary, t0)


if __name__ == "__main__":
    main()
