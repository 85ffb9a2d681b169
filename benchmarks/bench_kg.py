"""Knowledge-graph load and export speed, both stores.

Questions:
  1. Relationships per second into Neo4j for a batched ``UNWIND $rows MERGE`` load of >= 1,000,000 relationships,
     against one transaction per relationship (per-row MERGE) on a sample of the same rows: the ratio (goal >= 20x).
  2. ``to_hetero_data()`` time for that graph, Neo4j (streamed in batches) and the embedded networkx store.
  3. ``paths(user, item, max_hops=3)`` time per call on the demo catalog, both stores (same answers).

Run: ``.venv/bin/python -m benchmarks.bench_kg [--rels 1000000] [--per-row 1000] [--paths-only]``.
Starts its own Neo4j (jars fetched once). Prints a table and writes ``benchmarks/results/kg.json``. Timings on a shared machine are noisy:
compare the ratio, which is measured on the same server in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "kg.json"


def synthetic_rows(n_users: int, n_items: int, n_rels: int, seed: int = 0) -> tuple[list, list, list]:
    """Unique (user, item) VIEWED rows with interaction properties; Zipf-ish item popularity."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, int(n_rels * 1.3))
    i = (rng.zipf(1.2, len(u)) - 1) % n_items
    pairs = np.unique(np.stack([u, i], 1), axis=0)
    pairs = pairs[rng.permutation(len(pairs))[:n_rels]]
    if len(pairs) < n_rels:
        raise SystemExit(f"only {len(pairs)} unique pairs; raise --users/--items")
    users = [{"id": f"U{k:07d}"} for k in range(n_users)]
    items = [{"id": f"I{k:06d}", "title": f"item {k}", "price": float(k % 100)} for k in range(n_items)]
    counts = rng.integers(1, 5, n_rels)
    rels = [
        {"src": f"U{a:07d}", "dst": f"I{b:06d}", "count": int(c),
         "first_ts": "2024-01-01T00:00:00.000000Z", "last_ts": "2024-02-01T00:00:00.000000Z"}
        for (a, b), c in zip(pairs.tolist(), counts.tolist())
    ]
    return users, items, rels


def bench_paths(n_pairs: int = 100) -> dict[str, object]:
    """Mean ``paths(user, item, max_hops=3, limit=10)`` time on the demo catalog (1000 items, 300 users), both
    stores, same random pairs; also checks that both stores return the same paths."""
    import tempfile

    from kg.embedded_store import EmbeddedStore
    from kg.neo4j_server import Neo4jServer
    from kg.neo4j_store import Neo4jStore
    from kgrec.data.ingest import ingest
    from kgrec.data.schema import Dataset
    from kgrec.data.synthetic import generate_catalog

    tmp = Path(tempfile.mkdtemp(prefix="bench-kg-paths-"))
    generate_catalog(tmp / "raw", n_items=1000, n_users=300, seed=0, images=False)
    ingest(tmp / "raw", tmp / "ds")
    ds = Dataset.open(tmp / "ds")
    rng = np.random.default_rng(0)
    users, items = sorted(ds.users["user_id"]), sorted(ds.items["item_id"])
    pairs = [(("User", users[rng.integers(len(users))]), ("Item", items[rng.integers(len(items))]))
             for _ in range(n_pairs)]
    out: dict[str, object] = {"pairs": n_pairs, "catalog": "demo 1000 items / 300 users", "max_hops": 3, "limit": 10}
    emb = EmbeddedStore()
    emb.load(ds)
    results = {}
    for name, store in [("embedded", emb)]:
        store.paths(*pairs[0])
        t = time.perf_counter()
        results[name] = [store.paths(u, i, 3, 10) for u, i in pairs]
        out[f"{name}_ms_per_call"] = 1000 * (time.perf_counter() - t) / n_pairs
    with Neo4jServer() as server:
        with Neo4jStore(server.uri, server.user, server.password, progress=False) as neo:
            neo.load(ds)
            neo.paths(*pairs[0])
            t = time.perf_counter()
            results["neo4j"] = [neo.paths(u, i, 3, 10) for u, i in pairs]
            out["neo4j_ms_per_call"] = 1000 * (time.perf_counter() - t) / n_pairs
    out["identical"] = results["embedded"] == results["neo4j"]
    out["mean_paths_found"] = float(np.mean([len(p) for p in results["embedded"]]))
    print(f"paths (max_hops=3, limit=10) on the demo catalog: embedded {out['embedded_ms_per_call']:.1f} ms/call, "
          f"neo4j {out['neo4j_ms_per_call']:.1f} ms/call, identical: {out['identical']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rels", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--per-row", type=int, default=1_000, help="sample size for the per-row MERGE baseline")
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--paths-only", action="store_true",
                    help="only time path queries on the demo catalog and merge them into the results JSON")
    args = ap.parse_args()
    if args.paths_only:
        res_old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        res_old["paths"] = bench_paths()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res_old, indent=2, default=float) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
        return

    from kg.embedded_store import EmbeddedStore
    from kg.neo4j_server import NEO4J_VERSION, Neo4jServer
    from kg.neo4j_store import Neo4jStore

    import torch_geometric  # noqa: F401 - imported before timing: exports should not pay for the import

    users, items, rels = synthetic_rows(args.users, args.items, args.rels)
    sample = rels[: args.per_row]
    bulk = rels[args.per_row:]
    res: dict[str, object] = {
        "rels_batched": len(bulk), "rels_per_row": len(sample), "users": args.users, "items": args.items,
        "batch_size": args.batch_size, "neo4j_version": NEO4J_VERSION,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_start": os.getloadavg()[0]},
        "created": datetime.now(timezone.utc).isoformat(),
    }
    with Neo4jServer(heap="1g") as server:
        store = Neo4jStore(server.uri, server.user, server.password, batch_size=args.batch_size, progress=True)
        t = time.perf_counter()
        store.upsert_nodes("User", users)
        store.upsert_nodes("Item", items)
        res["neo4j_nodes_s"] = time.perf_counter() - t
        # Per-row baseline first, on the same server with the same (indexed) nodes present.
        t = time.perf_counter()
        store.upsert_edges_per_row("VIEWED", sample)
        per_row_s = time.perf_counter() - t
        t = time.perf_counter()
        store.upsert_edges("VIEWED", bulk)
        batched_s = time.perf_counter() - t
        n = store.counts()["VIEWED"]
        assert n == len(rels), (n, len(rels))
        t = time.perf_counter()
        again = store.upsert_edges("VIEWED", rels[:100_000])  # idempotent re-run of a slice: nothing new
        res["neo4j_remerge_100k_s"] = time.perf_counter() - t
        assert store.counts()["VIEWED"] == len(rels) and again == min(100_000, len(rels))
        t = time.perf_counter()
        data, ids = store.to_hetero_data()
        res["neo4j_export_s"] = time.perf_counter() - t
        neo_edges = data["user", "viewed", "item"].edge_index.clone()
        store.close()
    res["neo4j_per_row_rels_per_s"] = len(sample) / per_row_s
    res["neo4j_batched_rels_per_s"] = len(bulk) / batched_s
    res["neo4j_batched_s"] = batched_s
    res["batched_over_per_row"] = res["neo4j_batched_rels_per_s"] / res["neo4j_per_row_rels_per_s"]

    emb = EmbeddedStore()
    t = time.perf_counter()
    emb.upsert_nodes("User", users)
    emb.upsert_nodes("Item", items)
    emb.upsert_edges("VIEWED", rels)
    res["embedded_load_s"] = time.perf_counter() - t
    res["embedded_rels_per_s"] = len(rels) / res["embedded_load_s"]
    t = time.perf_counter()
    edata, _ = emb.to_hetero_data()
    res["embedded_export_s"] = time.perf_counter() - t
    res["exports_identical"] = bool((edata["user", "viewed", "item"].edge_index == neo_edges).all().item())
    res["machine"]["load_avg_end"] = os.getloadavg()[0]  # type: ignore[index]
    res["paths"] = bench_paths()

    rows = [
        ("Neo4j per-row MERGE (1 tx/rel)", f"{len(sample):,}", f"{per_row_s:.1f}", f"{res['neo4j_per_row_rels_per_s']:,.0f}"),
        (f"Neo4j batched UNWIND MERGE ({args.batch_size:,}/tx)", f"{len(bulk):,}", f"{batched_s:.1f}",
         f"{res['neo4j_batched_rels_per_s']:,.0f}"),
        ("Embedded networkx upsert", f"{len(rels):,}", f"{res['embedded_load_s']:.1f}", f"{res['embedded_rels_per_s']:,.0f}"),
        ("Neo4j -> HeteroData (streamed)", f"{len(rels):,}", f"{res['neo4j_export_s']:.1f}", ""),
        ("Embedded -> HeteroData", f"{len(rels):,}", f"{res['embedded_export_s']:.1f}", ""),
    ]
    print(f"{'step':<44} {'rels':>10} {'s':>8} {'rels/s':>10}")
    for r in rows:
        print(f"{r[0]:<44} {r[1]:>10} {r[2]:>8} {r[3]:>10}")
    print(f"batched / per-row: {res['batched_over_per_row']:.1f}x (goal >= 20x); exports identical: "
          f"{res['exports_identical']}; load avg {res['machine']['load_avg_start']:.1f} -> "  # type: ignore[index]
          f"{res['machine']['load_avg_end']:.1f} on {os.cpu_count()} cpus")  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
