"""Encoder benchmarks: speed against sentence-transformers, image throughput, cache hits, and fit quality.

Run: ``.venv/bin/python -m benchmarks.bench_encoders [--quick] [--skip-fit]``. Uses the demo catalog (generated
into ``benchmarks/out/demo`` when missing), prints tables and writes ``benchmarks/results/encoders.json``.

Sections:
  text_throughput   TextEncoder.encode vs SentenceTransformer.encode, same packaged MiniLM, texts, device and
                    batch size; warm-up then median of repeats; also the max |difference| of the vectors.
  image_throughput  ClipEncoder.encode_images on demo image files at 224 and 128 px.
  cache             encode_dataset on the demo catalog: cold (empty cache) vs warm (all hits) items/s.
  effnet_padding    efficientnet_lite0 vs tf_efficientnet_lite0 with the packaged weights on real photos.
  effnet_probe      pretrained vs random EfficientNet-Lite0 features on demo categories (kNN + linear probe).
  fit_clip/fit_text held-out quality before/after fine-tuning.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
RESULT = ROOT / "results" / "encoders.json"


def median_rate(fn: Callable[[], Any], n_items: int, repeats: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"median_s": med, "items_per_s": n_items / med, "runs_s": times}


def demo_dataset(n_items: int):
    from kgrec.data.ingest import ingest
    from kgrec.data.schema import Dataset
    from kgrec.data.synthetic import generate_catalog

    root = OUT / f"demo-{n_items}"
    if not (root / "dataset" / "manifest.json").is_file():
        generate_catalog(root / "raw", n_items=n_items, n_users=max(50, n_items // 3), seed=0, images=True)
        ingest(root / "raw", root / "dataset")
    return Dataset.open(root / "dataset")


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {title}")
    if not rows:
        return
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    width = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(width[c]) for c in cols))


def bench_text(ds, repeats: int, n_texts: int) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from encoders.items import item_text
    from encoders.text import TextEncoder, packaged_minilm_dir

    texts = [item_text(r) for r in ds.table("items").to_pylist()][:n_texts]
    ours = TextEncoder(device="cpu", batch_size=64, max_length=128)
    st = SentenceTransformer(str(packaged_minilm_dir()), device="cpu")
    st.max_seq_length = 128
    a = ours.encode(texts)
    b = st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    # interleave the two so machine-load drift hits both alike
    r_ours, r_st = [], []
    for _ in range(repeats):
        r_st.append(median_rate(lambda: st.encode(texts, batch_size=64, normalize_embeddings=True), len(texts), 1, 0))
        r_ours.append(median_rate(lambda: ours.encode(texts), len(texts), 1, 0))
    ours_rate = statistics.median(r["items_per_s"] for r in r_ours)
    st_rate = statistics.median(r["items_per_s"] for r in r_st)
    return {"texts": len(texts), "mean_chars": float(np.mean([len(t) for t in texts])), "device": "cpu",
            "torch_threads": torch.get_num_threads(), "repeats": repeats,
            "kgrec_items_per_s": ours_rate, "sentence_transformers_items_per_s": st_rate,
            "ratio": ours_rate / st_rate, "max_abs_diff_vs_st": float(np.abs(a - b).max())}


def bench_images(ds, repeats: int, n_images: int) -> list[dict[str, Any]]:
    from encoders.clip import ClipEncoder

    paths = [ds.image_path(r["image"]) for r in ds.table("items").to_pylist() if r["image"]][:n_images]
    rows = []
    for size in (224, 128):
        enc = ClipEncoder(device="cpu", batch_size=64, image_size=size)
        r = median_rate(lambda: enc.encode_images(paths), len(paths), repeats)
        rows.append({"image_size": size, "images": len(paths), "items_per_s": r["items_per_s"], "median_s": r["median_s"]})
    return rows


def bench_cache(ds, tmp: Path) -> dict[str, Any]:
    import shutil

    from encoders.clip import ClipEncoder
    from encoders.items import encode_dataset
    from encoders.text import TextEncoder

    cache = tmp / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    text, clip = TextEncoder(device="cpu"), ClipEncoder(device="cpu", image_size=128)
    _ = text.model_id, clip.model_id  # fingerprints once, outside the timings
    n = ds.table("items").num_rows
    t = time.perf_counter()
    encode_dataset(ds, text, clip, cache)
    cold = time.perf_counter() - t
    warm_runs = []
    for _ in range(3):
        t = time.perf_counter()
        encode_dataset(ds, text, clip, cache)
        warm_runs.append(time.perf_counter() - t)
    warm = statistics.median(warm_runs)
    return {"items": n, "cold_s": cold, "warm_s": warm, "cold_items_per_s": n / cold, "warm_items_per_s": n / warm,
            "speedup": cold / warm}


def bench_padding() -> list[dict[str, Any]]:
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from encoders.effnet import IMAGE_MEAN, IMAGE_STD, VARIANTS, build_efficientnet_lite0

    torch.manual_seed(0)
    imgs = [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg (palace), flower.jpg (daisy)
    aug = T.Compose([T.RandomResizedCrop(224, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(IMAGE_MEAN, IMAGE_STD)])
    xs = torch.stack([aug(im) for im in imgs for _ in range(30)])
    ys = torch.tensor([698] * 30 + [985] * 30)  # ImageNet "palace", "daisy"
    rows = []
    for v in VARIANTS:
        m = build_efficientnet_lite0(v)
        with torch.inference_mode():
            lp = m(xs).log_softmax(-1)
        nll = -lp[torch.arange(60), ys]
        acc = (lp.argmax(-1) == ys).float()
        rows.append({"variant": v, "top1_palace": float(acc[:30].mean()), "top1_daisy": float(acc[30:].mean()),
                     "nll_palace": float(nll[:30].mean()), "nll_daisy": float(nll[30:].mean())})
    return rows


def bench_probe(ds) -> list[dict[str, Any]]:
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from encoders.effnet import IMAGE_MEAN, build_efficientnet_lite0
    from encoders.images import load_image

    rows_ = [r for r in ds.table("items").to_pylist() if r["image"]][:600]
    x = torch.stack([torch.from_numpy(np.asarray(load_image(ds.image_path(r["image"])).image.resize((128, 128)),
                                                 dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1) for r in rows_])
    labels = np.array([r["category"] for r in rows_])
    colours = np.array([json.loads(r["attributes"] or "{}").get("colour", "?") for r in rows_])
    out = []
    torch.manual_seed(0)
    for name, pre in (("pretrained", True), ("random", False)):
        m = build_efficientnet_lite0(pretrained=pre, num_classes=0)
        with torch.inference_mode():
            f = torch.cat([m(x[i:i + 100]) for i in range(0, len(x), 100)]).numpy()
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        sim = f @ f.T
        np.fill_diagonal(sim, -np.inf)
        knn = float((labels[sim.argmax(1)] == labels).mean())
        sim[colours[:, None] == colours[None, :]] = -np.inf
        knn_cross = float((labels[sim.argmax(1)] == labels).mean())
        probe = float(cross_val_score(LogisticRegression(max_iter=2000), f, labels, cv=5).mean())
        out.append({"weights": name, "items": len(rows_), "knn1_acc": knn, "knn1_other_colour_acc": knn_cross,
                    "linear_probe_acc_5fold": probe, "chance_majority": float(max(np.unique(labels, return_counts=True)[1]) / len(labels))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and repeats")
    parser.add_argument("--skip-fit", action="store_true", help="skip fit-clip / fit-text (keeps earlier results)")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--dataset", type=Path, default=None, help="use this dataset instead of generating the demo")
    parser.add_argument("--fit-dirs", type=Path, nargs="*", default=None,
                        help="instead of training: read metrics.json of earlier fit-clip / fit-text output dirs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    OUT.mkdir(parents=True, exist_ok=True)
    if args.dataset is not None:
        from kgrec.data.schema import Dataset

        ds = Dataset.open(args.dataset)
    else:
        ds = demo_dataset(args.items)
    repeats = 3 if args.quick else 5
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    results: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.is_available(), "load_avg_at_start": os.getloadavg()},
        "command": "python -m benchmarks.bench_encoders " + " ".join(__import__("sys").argv[1:]),
        "dataset": str(ds), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results["effnet_padding"] = bench_padding()
    print_table("EfficientNet-Lite0 padding variant (packaged weights, 30 crops of 2 real photos)", results["effnet_padding"])
    results["effnet_probe"] = bench_probe(ds)
    print_table("EfficientNet-Lite0 features on demo categories: pretrained vs random", results["effnet_probe"])
    results["text_throughput"] = bench_text(ds, repeats, 500 if args.quick else 1000)
    print_table("text: kgrec TextEncoder vs sentence-transformers (CPU, same model/texts/batch)", [results["text_throughput"]])
    results["image_throughput"] = bench_images(ds, max(1, repeats - 2), 128 if args.quick else 256)
    print_table("images: ClipEncoder.encode_images (CPU)", results["image_throughput"])
    results["cache"] = bench_cache(ds, OUT)
    print_table("encode_dataset: cold vs warm cache (text + CLIP text + image)", [results["cache"]])
    if args.fit_dirs:
        from encoders.fit_clip import summary_table as clip_table
        from encoders.fit_text import summary_table as text_table

        results["fit_clip"], results["fit_text"] = {}, {}
        for d in args.fit_dirs:
            saved = json.loads((d / "metrics.json").read_text())
            m = saved["metrics"]
            if (d / "clip_config.json").is_file():
                fit = json.loads((d / "clip_config.json").read_text())["fit"]
                key = f"top_blocks={fit['top_blocks']}"
                results["fit_clip"][key] = {"table": clip_table(m), "seconds": m["seconds"], "timings": m.get("timings"),
                                            "best_val_loss": m["best_val_loss"], "epochs_run": m["epochs_run"],
                                            "config": fit, "from": str(d)}
                print_table(f"fit-clip heads, {key} ({m['seconds']:.0f} s, from {d})", clip_table(m))
            else:
                fit = json.loads((d / "fit_text_config.json").read_text())["fit"]
                results["fit_text"] = {"table": text_table(m), "seconds": m["seconds"],
                                       "train_seconds": m["train_seconds"], "epochs_run": m["epochs_run"],
                                       "config": fit, "from": str(d)}
                print_table(f"fit-text ({m['seconds']:.0f} s, from {d})", text_table(m))
    elif args.skip_fit:
        for key in ("fit_clip", "fit_text"):
            if key in previous:
                results[key] = previous[key]
    else:
        from encoders.fit_clip import FitClipConfig, fit_clip
        from encoders.fit_clip import summary_table as clip_table
        from encoders.fit_text import FitTextConfig, fit_text
        from encoders.fit_text import summary_table as text_table

        results["fit_clip"] = {}
        for top in (0, 1):
            r = fit_clip(ds, OUT / f"clip-top{top}", FitClipConfig(device="cpu", top_blocks=top, epochs=30))
            results["fit_clip"][f"top_blocks={top}"] = {"table": clip_table(r.metrics), "seconds": r.seconds,
                                                         "timings": r.metrics["timings"],
                                                         "best_val_loss": r.metrics["best_val_loss"],
                                                         "epochs_run": r.metrics["epochs_run"]}
            print_table(f"fit-clip heads, top_blocks={top} ({r.seconds:.0f} s)", clip_table(r.metrics))
        r = fit_text(ds, OUT / "text", FitTextConfig(device="cpu"))
        results["fit_text"] = {"table": text_table(r.metrics), "seconds": r.seconds,
                               "train_seconds": r.metrics["train_seconds"], "epochs_run": r.metrics["epochs_run"]}
        print_table(f"fit-text ({r.seconds:.0f} s)", text_table(r.metrics))
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nwrote {RESULT}")


if __name__ == "__main__":
    main()
