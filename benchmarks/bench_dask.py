"""Speed-up of 2 Dask workers over 1 on text encoding and on ranking-feature building.

Question: on this machine (2 cores), does the Dask engine turn the second core into throughput? Each worker is a
process with one thread (and one torch thread); the single-process baseline runs the same code with one thread.
Setup (starting the cluster, loading the model on each worker, shipping the ranking context) is timed
separately from the steady-state work; each timed step is warmed up once and the best of ``--repeats`` is kept.

* encoding: all-MiniLM-L6-v2 (the packaged real model) on ``--items`` item texts of the synthetic catalog;
* features: ``FeatureBuilder`` on ``--users`` users x ``--candidates`` candidates of a generated shop
  (``tests/ranking/world.py``), partitions of ``--users-per-partition`` users.

Run: ``.venv/bin/python -m benchmarks.bench_dask [--items 2000] [--users 4000]``; writes
``benchmarks/results/dask.json``. The machine is shared: the load average before and after is recorded, and the
ratios (not the absolute times) are the result.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dask.json"
logger = logging.getLogger("bench_dask")


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def item_texts(n: int, seed: int = 0) -> list[str]:
    import pyarrow.parquet as pq

    from encoders.items import item_text
    from kgrec.data.synthetic import generate_catalog

    with tempfile.TemporaryDirectory() as d:
        generate_catalog(d, n_items=n, n_users=max(10, n // 10), seed=seed, images=False, fmt="parquet")
        return [item_text(r) for r in pq.read_table(Path(d) / "items.parquet").to_pylist()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--shop-items", type=int, default=3000)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--users-per-partition", type=int, default=500)
    p.add_argument("--text-partition", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    sys.path.insert(0, str(ROOT))
    from kgrec.distributed.dask_jobs import (
        FEATURE_PLUGIN, FeatureBuilderPlugin, TextEncoderSpec, build_features_dask, dask_client, encode_texts_dask,
    )
    from ranking.features import FeatureBuilder
    from ranking.ranker import top_candidates
    from tests.ranking.world import context_from_world, make_world

    load_before = os.getloadavg()
    texts = item_texts(args.items)
    world = make_world(n_users=args.users, n_items=args.shop_items, seed=1, test_events=4)
    ctx = context_from_world(world)
    cand, _ = top_candidates(ctx.user_vectors, ctx.item_vectors, args.candidates, exclude=ctx.interactions["purchase"])
    users = np.arange(ctx.num_users)
    spec = TextEncoderSpec(device="cpu", torch_threads=1)

    # --- single process, one thread
    torch.set_num_threads(1)
    t = time.perf_counter()
    enc = spec.build()
    local_setup = time.perf_counter() - t
    enc.encode(texts[:128])
    local_encode = _best(lambda: enc.encode(texts), args.repeats)
    builder = FeatureBuilder(ctx)
    builder.build(users[:200], cand[:200])
    local_features = _best(lambda: builder.build(users, cand), args.repeats)
    ref_vec = enc.encode(texts)
    ref_X = builder.build(users, cand).X
    rows = [{"engine": "local (1 process, 1 thread)", "workers": 0, "encode_setup_s": local_setup,
             "encode_s": local_encode, "features_s": local_features}]

    for w in args.workers:
        t = time.perf_counter()
        with dask_client(n_workers=w, threads_per_worker=1, memory_limit="4GiB") as client:
            cluster_s = time.perf_counter() - t
            t = time.perf_counter()
            vec, _ = encode_texts_dask(client, texts[:128], spec, partition_size=args.text_partition)
            setup_s = time.perf_counter() - t  # model load on every worker + a small warm-up batch
            encode_s = _best(lambda: encode_texts_dask(client, texts, spec, partition_size=args.text_partition), args.repeats)
            vec, _ = encode_texts_dask(client, texts, spec, partition_size=args.text_partition)
            t = time.perf_counter()
            client.register_plugin(FeatureBuilderPlugin(ctx), name=FEATURE_PLUGIN)
            ship_s = time.perf_counter() - t
            build_features_dask(client, ctx, users[:200], cand[:200], register=False)
            features_s = _best(lambda: build_features_dask(client, ctx, users, cand, register=False,
                                                           users_per_partition=args.users_per_partition), args.repeats)
            X = build_features_dask(client, ctx, users, cand, register=False,
                                    users_per_partition=args.users_per_partition).X
        rows.append({"engine": f"dask LocalCluster", "workers": w, "cluster_start_s": cluster_s,
                     "encode_setup_s": setup_s, "encode_s": encode_s, "context_ship_s": ship_s,
                     "features_s": features_s,
                     "max_abs_diff_vectors": float(np.abs(vec - ref_vec).max()),
                     "features_identical": bool(np.array_equal(np.nan_to_num(X), np.nan_to_num(ref_X)))})

    by_w = {r["workers"]: r for r in rows}
    speedup = {}
    if 1 in by_w and 2 in by_w:
        speedup = {"encode_2_over_1": by_w[1]["encode_s"] / by_w[2]["encode_s"],
                   "features_2_over_1": by_w[1]["features_s"] / by_w[2]["features_s"]}
    result = {
        "benchmark": "dask",
        "created": datetime.now(timezone.utc).isoformat(),
        "command": "python -m benchmarks.bench_dask " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "workload": {"texts": len(texts), "text_model": "packaged:all-MiniLM-L6-v2", "users": int(ctx.num_users),
                     "items": int(ctx.num_items), "candidates": args.candidates, "feature_rows": int(ref_X.shape[0]),
                     "features": int(ref_X.shape[1])},
        "rows": rows,
        "speedup": speedup,
        "throughput": {f"encode_items_per_s_{r['workers']}w": len(texts) / r["encode_s"] for r in rows}
        | {f"feature_rows_per_s_{r['workers']}w": ref_X.shape[0] / r["features_s"] for r in rows},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{'engine':<30}{'workers':>8}{'encode s':>10}{'items/s':>10}{'features s':>12}{'rows/s':>12}")
    for r in rows:
        print(f"{r['engine']:<30}{r['workers']:>8}{r['encode_s']:>10.2f}{len(texts) / r['encode_s']:>10.0f}"
              f"{r['features_s']:>12.2f}{ref_X.shape[0] / r['features_s']:>12.0f}")
    if speedup:
        print(f"speed-up 2 workers over 1: encoding x{speedup['encode_2_over_1']:.2f}, "
              f"features x{speedup['features_2_over_1']:.2f}  (load average {load_before[0]:.1f} -> "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus)")
    return result


if __name__ == "__main__":
    main()
