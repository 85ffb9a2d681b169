"""The zero-setup embedded graph store (``kg.embedded_store.EmbeddedStore``, networkx) loaded with the whole 1M-item
knowledge graph on one machine: load time, CPU time, peak RSS (sampled every 0.1 s), counts equal to the column-wise
graph of ``bench_scale`` and to what Neo4j imported, and the GraphStore queries the explanations use
(``paths``, ``neighbours``) at that size.

Dataset: ``--dataset`` (default /tmp/kgrec_scale/ds, made by ``bench_scale --keep``). The run is its own process
(``bench_scale`` holds the encoders, the trainer and the features at the same time: the embedded store's ~0.8 KB per
relationship would not fit beside them, so that benchmark builds the column-wise graph instead).
A guard aborts the run (exit 3) before the process passes ``--abort-gib`` (default 22 GiB) of resident memory.

Run: ``flock /tmp/kgrec_bench.lock .venv/bin/python -m benchmarks.bench_embedded_store``
Writes ``benchmarks/results/embedded_store_1m.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "embedded_store_1m.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import psutil

    from kg.embedded_store import EmbeddedStore
    from kgrec.data.schema import Dataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=Path, default=Path("/tmp/kgrec_scale/ds"))
    ap.add_argument("--abort-gib", type=float, default=22.0)
    ap.add_argument("--queries", type=int, default=20, help="user -> purchased item path queries to time")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not (args.dataset / "manifest.json").is_file():
        raise SystemExit(f"{args.dataset} is not a dataset: run `python -m benchmarks.bench_scale --keep` first")

    proc = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            rss = proc.memory_info().rss
            peak[0] = max(peak[0], rss)
            if rss > args.abort_gib * 2**30:
                print(f"ABORT: resident memory {rss / 2**30:.1f} GiB passed --abort-gib {args.abort_gib}", flush=True)
                os._exit(3)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    ds = Dataset.open(args.dataset)
    store = EmbeddedStore(None)
    store.load(ds)
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    counts = store.counts()
    relationships = store.graph.number_of_edges()
    # the explanation queries: a user's neighbours, then paths user -> an item another user bought (<= 3 hops,
    # as for a recommended item)
    import pyarrow.parquet as pq  # only the purchase rows: the whole events table beside the graph costs ~2 GiB

    purchases = pq.read_table(args.dataset / "events.parquet", columns=["user_id", "item_id", "type"],
                              filters=[("type", "==", "purchase")]).to_pandas()
    purchases = purchases[["user_id", "item_id"]].drop_duplicates("user_id")
    sample = purchases.sample(n=min(args.queries, len(purchases)), random_state=0)
    users, items = sample["user_id"].astype(str).tolist(), sample["item_id"].astype(str).tolist()
    items = items[1:] + items[:1]
    path_ms, found, neigh_ms = [], [], []
    for user, item in zip(users, items):
        t = time.perf_counter()
        store.neighbours(("User", user))
        neigh_ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        found.append(len(store.paths(("User", user), ("Item", item), max_hops=3, limit=10)))
        path_ms.append((time.perf_counter() - t) * 1e3)
    stop.set()
    result = {
        "benchmark": "embedded_store_1m", "created": datetime.now(timezone.utc).isoformat(),
        "command": "python -m benchmarks.bench_embedded_store", "dataset": str(args.dataset),
        "dataset_counts": {k: v for k, v in ds.manifest.get("counts", {}).items()},
        "load_s": round(load_s, 1), "load_cpu_s": round(load_cpu, 1), "peak_rss_gib": round(peak[0] / 2**30, 2),
        "rss_after_load_gib": round(proc.memory_info().rss / 2**30, 2),
        "nodes": store.graph.number_of_nodes(), "relationships": relationships,
        "bytes_per_relationship": round(peak[0] / max(relationships, 1)), "counts": counts,
        "path_queries": len(path_ms), "paths_found": found,
        "path_query_ms_p50": round(float(sorted(path_ms)[len(path_ms) // 2]), 1) if path_ms else None,
        "path_query_ms_max": round(max(path_ms), 1) if path_ms else None,
        "neighbours_ms_p50": round(float(sorted(neigh_ms)[len(neigh_ms) // 2]), 2) if neigh_ms else None,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print("| what | value |\n|---|---|")
    for k in ("relationships", "nodes", "load_s", "load_cpu_s", "peak_rss_gib", "bytes_per_relationship",
              "path_query_ms_p50", "path_query_ms_max", "neighbours_ms_p50"):
        print(f"| {k} | {result[k]} |")
    return result


if __name__ == "__main__":
    main()
