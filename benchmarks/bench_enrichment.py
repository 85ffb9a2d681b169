"""Catalog enrichment vs the truth the demo generator keeps: attribute-inference accuracy and coverage per attribute
at several confidence thresholds, calibration (ECE, reliability plot), and duplicate precision/recall.

The demo catalog (``kgrec.data.synthetic``, default 1,000 items, seed 0) removes ~15 % of the colour and material
values from the listings (``truth/missing_attributes.csv``) and re-lists ~2 % of the items with other titles
(``truth/duplicates.csv``). Its titles and descriptions name colour and material in words, so the literal text
source alone solves it; three variants show what the other sources do:

- ``all``: every source (text mentions, classifier + kNN on attribute-free MiniLM text + CLIP image vectors,
  CLIP zero-shot, KG votes);
- ``no_text_mentions``: the literal text source left out;
- ``image_kg``: no text at all (no mentions, zero text vectors): CLIP image vectors + zero-shot + KG votes.

Encoders: packaged MiniLM (text) and the packaged EfficientNet-Lite0 CLIP image tower at 64 px (the demo images'
size); its projection heads are untrained unless ``--clip-checkpoint`` names a ``kgrec encoders fit-clip`` output,
so the zero-shot source is near chance by default (the stacker learns to ignore it; its accuracy is reported).

    .venv/bin/python -m benchmarks.bench_enrichment [--items 1000 --seed 0 --threshold 0.8]

Writes ``benchmarks/results/enrichment.json`` and ``benchmarks/results/enrichment.reliability.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = (0.5, 0.8, 0.9, 0.95)


def _truth_metrics(records: pd.DataFrame, truth: pd.DataFrame, thresholds: tuple[float, ...]) -> dict[str, Any]:
    """Per attribute and threshold: accuracy of the values at/above it vs the truth, and coverage of the truth."""
    attrs = records[records["kind"] == "attribute"].merge(truth, on=["item_id", "name"], how="left",
                                                          suffixes=("", "_true"))
    out: dict[str, Any] = {}
    for name in sorted(truth["name"].unique()):
        n_missing = int((truth["name"] == name).sum())
        a = attrs[attrs["name"] == name]
        rows = {}
        for t in thresholds:
            kept = a[a["confidence"] >= t]
            rows[str(t)] = {
                "accuracy": round(float((kept["value"] == kept["value_true"]).mean()), 4) if len(kept) else None,
                "coverage": round(len(kept) / max(1, n_missing), 4),
                "n": int(len(kept)),
            }
        out[name] = {"n_missing": n_missing, "by_threshold": rows,
                     "accuracy_all": round(float((a["value"] == a["value_true"]).mean()), 4) if len(a) else None}
    return out


def _duplicate_metrics(records: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    planted = {tuple(sorted(p)) for p in zip(truth["item_id"], truth["duplicate_of"])}
    d = records[records["type"] == "DUPLICATE_OF"]
    found = {tuple(sorted(p)) for p in zip(d["src"], d["dst"])}
    tp = len(found & planted)
    return {"planted": len(planted), "found": len(found), "true_positives": tp,
            "precision": round(tp / max(1, len(found)), 4), "recall": round(tp / max(1, len(planted)), 4)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.8, help="the write threshold reported as 'chosen'")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--clip-checkpoint", type=Path, default=None, help="a fit-clip output (aligned CLIP)")
    ap.add_argument("--workdir", type=Path, default=None, help="catalog + embedding cache (kept when given)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from encoders.clip import ClipEncoder
    from encoders.items import ItemEmbeddings, encode_dataset
    from encoders.text import TextEncoder
    from kgrec.config import EnrichmentConfig
    from kgrec.data.ingest import ingest
    from kgrec.data.schema import Dataset
    from kgrec.data.synthetic import generate_catalog
    from kgrec.enrichment import enrich
    from kgrec.enrichment.calibration import ReliabilityCurve, plot_reliability

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-enrich-"))
    timings: dict[str, float] = {}
    try:
        raw, root = work / "raw", work / "dataset"
        t = time.perf_counter()
        if not (root / "manifest.json").is_file():
            generate_catalog(raw, n_items=args.items, n_users=args.users, seed=args.seed, images=True)
            ingest(raw, root)
        ds = Dataset.open(root)
        timings["catalog_s"] = time.perf_counter() - t

        t = time.perf_counter()
        text_enc = TextEncoder(device="cpu")
        clip = (ClipEncoder(checkpoint=args.clip_checkpoint, device="cpu") if args.clip_checkpoint
                else ClipEncoder(device="cpu", image_size=args.image_size, seed=0))
        emb = encode_dataset(ds, text_enc, clip, work / "cache")
        timings["encode_s"] = time.perf_counter() - t

        truth_attr = pd.read_csv(root / "truth" / "missing_attributes.csv", dtype=str)
        truth_dup = pd.read_csv(root / "truth" / "duplicates.csv", dtype=str)
        no_text = ItemEmbeddings(emb.item_ids, np.zeros_like(emb.text), emb.image, emb.clip_text, emb.status,
                                 emb.reason, emb.model_ids)
        variants = {
            "all": (emb, text_enc, EnrichmentConfig()),
            "no_text_mentions": (emb, text_enc, EnrichmentConfig(exclude_sources=["text"])),
            "image_kg": (no_text, None, EnrichmentConfig(exclude_sources=["text"])),
        }
        results: dict[str, Any] = {}
        curves: dict[str, ReliabilityCurve] = {}
        for name, (e, te, cfg) in variants.items():
            t = time.perf_counter()
            # threshold 0: every inferred value comes back with its confidence, then each threshold is applied here
            rep = enrich(ds, e, None, clip_encoder=clip, text_encoder=te, threshold=0.0, dry_run=True, config=cfg)
            seconds = time.perf_counter() - t
            per_attr = _truth_metrics(rep.records, truth_attr, THRESHOLDS)
            for attr, a in rep.attributes.items():
                if a.get("skipped") or attr not in per_attr:
                    continue
                per_attr[attr]["held_out"] = {k: a[k] for k in ("n_labelled", "stacked_accuracy", "chance_accuracy",
                                                                "ece", "source_accuracy", "reliability")}
                curve = _curve_from(rep, attr)
                if curve is not None:
                    curves[f"{name}/{attr}"] = curve
            results[name] = {"attributes": per_attr, "seconds": round(seconds, 2),
                             "duplicates": _duplicate_metrics(rep.records, truth_dup),
                             "duplicate_thresholds": rep.duplicates["thresholds"],
                             "similar_to": rep.similar["n"], "complements": rep.complements["n"]}
        args.out.mkdir(parents=True, exist_ok=True)
        png = plot_reliability(curves, args.out / "enrichment.reliability.png", threshold=args.threshold,
                               title=f"Held-out known values, demo catalog ({args.items} items, seed {args.seed})")
        payload = {
            "benchmark": "enrichment",
            "catalog": {"items": args.items, "users": args.users, "seed": args.seed,
                        "missing_values": int(len(truth_attr)), "planted_duplicates": int(len(truth_dup))},
            "encoders": {"text": text_enc.model_id, "clip": clip.model_id, "image_size": args.image_size,
                         "clip_aligned": bool(args.clip_checkpoint)},
            "chosen_threshold": args.threshold,
            "variants": results,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "reliability_png": str(png.relative_to(args.out.parent)) if png.is_relative_to(args.out.parent) else str(png),
            "config": EnrichmentConfig().model_dump(mode="json"),
        }
        from kgrec.data.schema import atomic_write_json

        atomic_write_json(args.out / "enrichment.json", payload)
        print(_table(payload))
        print(f"\nwrote {args.out / 'enrichment.json'} and {png}")
        return payload
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _curve_from(report: Any, attr: str) -> Any:
    from kgrec.enrichment.calibration import ReliabilityCurve

    rel = report.attributes[attr].get("reliability")
    if rel is None:
        return None
    return ReliabilityCurve(np.array(rel["bin_confidence"]), np.array(rel["bin_accuracy"]),
                            np.array(rel["bin_count"]), rel["ece"])


def _table(payload: dict[str, Any]) -> str:
    t = payload["chosen_threshold"]
    lines = [f"Enrichment on the demo catalog ({payload['catalog']['items']} items, seed {payload['catalog']['seed']}); "
             f"truth = values removed by the generator; threshold {t}",
             "",
             "| variant | attribute | missing | held-out acc | chance | ECE | acc@T (truth) | coverage@T | acc@0.5 | cov@0.5 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in payload["variants"].items():
        for attr, a in r["attributes"].items():
            h = a.get("held_out", {})
            bt, b5 = a["by_threshold"][str(t)], a["by_threshold"]["0.5"]
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            lines.append(f"| {v} | {attr} | {a['n_missing']} | {fmt(h.get('stacked_accuracy'))} | "
                         f"{fmt(h.get('chance_accuracy'))} | {fmt(h.get('ece'))} | {fmt(bt['accuracy'])} | "
                         f"{fmt(bt['coverage'])} | {fmt(b5['accuracy'])} | {fmt(b5['coverage'])} |")
    lines += ["", "| variant | source accuracies on held-out known values (colour / material) |", "|---|---|"]
    for v, r in payload["variants"].items():
        parts = []
        for attr in ("colour", "material"):
            sa = r["attributes"].get(attr, {}).get("held_out", {}).get("source_accuracy", {})
            parts.append(attr + ": " + ", ".join(f"{k} {x:.2f}" for k, x in sorted(sa.items())))
        lines.append(f"| {v} | {' ; '.join(parts)} |")
    d = payload["variants"]["all"]["duplicates"]
    lines += ["", f"duplicates (all sources): {d['found']} found, {d['true_positives']} of {d['planted']} planted -> "
                  f"precision {d['precision']:.3f}, recall {d['recall']:.3f}; thresholds "
                  f"{payload['variants']['all']['duplicate_thresholds']}",
              f"SIMILAR_TO {payload['variants']['all']['similar_to']}, COMPLEMENTS "
              f"{payload['variants']['all']['complements']}; timings {payload['timings_s']}, per variant "
              + ", ".join(f"{k} {v['seconds']} s" for k, v in payload["variants"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
