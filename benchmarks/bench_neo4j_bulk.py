"""Bulk-load the 1M-item knowledge graph into a real local Neo4j with ``neo4j-admin database import full``
(``kg.bulk_import``), against a same-run peer: the batched ``UNWIND ... MERGE`` path (``Neo4jStore.upsert_edges``)
on the first 200k relationships.

Dataset: ``--dataset`` (default /tmp/kgrec_scale/ds, made by ``bench_scale --keep``); generated with bench_scale's
generator + ingest (1M items / 10M events / 200k users) when absent.

Run: ``flock /tmp/kgrec_bench.lock .venv/bin/python -m benchmarks.bench_neo4j_bulk``
Writes ``benchmarks/results/neo4j_bulk.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.bench_scale import PeakRSS

RESULTS = Path(__file__).parent / "results" / "neo4j_bulk.json"


class ChildPeakRSS(PeakRSS):
    """Peak of the summed RSS of this process's child processes (the importer JVM, then the server)."""

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            total = 0
            for c in self.proc.children(recursive=True):
                try:
                    total += c.memory_info().rss
                except Exception:  # a child that just exited
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> ChildPeakRSS:
        super().__enter__()
        self.peak = 0
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=Path("/tmp/kgrec_scale/ds"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kgrec_neo4j_bulk"))
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--peer-rels", type=int, default=200_000)
    p.add_argument("--importer-heap", default="2g")
    p.add_argument("--max-off-heap", default="4g")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from kg.bulk_import import bulk_import, dataset_frames
    from kg.neo4j_server import Neo4jServer
    from kg.neo4j_store import Neo4jStore
    from kgrec.data.schema import Dataset

    result: dict[str, Any] = {
        "benchmark": "neo4j_bulk", "created": datetime.now(timezone.utc).isoformat(),
        "command": "python -m benchmarks.bench_neo4j_bulk " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()},
    }
    if not (args.dataset / "items.parquet").exists() and not any(args.dataset.glob("items*")):
        from kgrec.data.ingest import ingest
        from kgrec.data.synthetic import generate_catalog

        raw = args.workdir / "raw"
        shutil.rmtree(raw, ignore_errors=True)
        t = time.perf_counter()
        generate_catalog(raw, n_items=args.items, n_users=args.users, seed=0, images=False,
                         n_events=args.events, fmt="parquet")
        ingest(raw, args.dataset)
        result["generate_s"] = round(time.perf_counter() - t, 1)
    ds = Dataset.open(args.dataset)
    result["dataset"] = str(args.dataset)

    t = time.perf_counter()
    with PeakRSS() as rss:
        nodes, rels = dataset_frames(ds)
    result["frames"] = {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mib": round(rss.peak_mib)}
    n_nodes = sum(len(v) for v in nodes.values())
    n_rels = sum(len(v) for v in rels.values())
    print(f"frames: {n_nodes:,} nodes, {n_rels:,} relationships in {result['frames']['seconds']} s", flush=True)

    home = args.workdir / "home"
    shutil.rmtree(home, ignore_errors=True)
    server = Neo4jServer(home, heap="2g", pagecache="1g", remove_home=True)
    try:
        with PeakRSS() as rss, ChildPeakRSS() as child_rss:
            info = bulk_import(server, nodes, rels, work_dir=args.workdir / "csv", heap=args.importer_heap,
                               max_off_heap=args.max_off_heap, start=False)
        children_peak_mib = child_rss.peak_mib  # the importer JVM (sampled every 0.1 s)
        t_start = time.perf_counter()
        server.start()
        start_s = time.perf_counter() - t_start
        csv_bytes = _dir_bytes(args.workdir / "csv")
        t = time.perf_counter()
        with Neo4jStore(server.uri, server.user, server.password, progress=False) as store:
            constraints_s = time.perf_counter() - t  # ensure_schema: uniqueness constraints on the imported nodes
            counts = store.counts()
        expected = info["written"]
        result["bulk"] = {
            "nodes": n_nodes, "relationships": n_rels, "written": expected,
            "counts_match": all(counts[k] == v for k, v in expected.items()),
            "csv_write_s": round(info["csv_s"], 1), "csv_mib": round(csv_bytes / 2**20),
            "import_s": round(info["import_s"], 1), "server_start_s": round(start_s, 1),
            "constraints_s": round(constraints_s, 1),
            "relationships_per_s_import": round(n_rels / info["import_s"]),
            "relationships_per_s_csv_plus_import": round(n_rels / (info["csv_s"] + info["import_s"])),
            "store_mib": round(info["store_bytes"] / 2**20),
            "python_peak_rss_mib": round(rss.peak_mib),
            "importer_peak_rss_mib": round(children_peak_mib),
            "peak_rss_note": "python_peak_rss_mib: this process during CSV writing + import (frames held in memory); "
                             "importer_peak_rss_mib: summed RSS of child processes (the importer JVM) sampled every 0.1 s",
        }
        print(json.dumps(result["bulk"], indent=1), flush=True)
    finally:
        server.stop()
        shutil.rmtree(args.workdir / "csv", ignore_errors=True)

    # Same-run peer: batched UNWIND MERGE on the first N relationships of the largest interaction type.
    big = max(rels, key=lambda k: len(rels[k]))
    part = rels[big].head(args.peer_rels)
    rows = [{k: v for k, v in r.items() if v == v and v is not None} for r in part.to_dict("records")]
    with Neo4jServer(heap="2g", pagecache="1g") as peer:
        with Neo4jStore(peer.uri, peer.user, peer.password, batch_size=10_000, progress=False) as store:
            t = time.perf_counter()
            store.upsert_edges(big, rows)
            merge_s = time.perf_counter() - t
            ok = store.counts()[big] == len(part)
    result["merge_peer"] = {"relationship_type": big, "relationships": len(rows), "seconds": round(merge_s, 1),
                            "relationships_per_s": round(len(rows) / merge_s), "count_match": ok,
                            "batch_size": 10_000}
    result["speedup_import_vs_merge"] = round(result["bulk"]["relationships_per_s_import"]
                                              / result["merge_peer"]["relationships_per_s"], 1)
    result["speedup_csv_plus_import_vs_merge"] = round(result["bulk"]["relationships_per_s_csv_plus_import"]
                                                       / result["merge_peer"]["relationships_per_s"], 1)
    result["machine"]["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    print(f"{'path':<34}{'relationships':>14}{'seconds':>10}{'rel/s':>12}")
    b, m = result["bulk"], result["merge_peer"]
    print(f"{'neo4j-admin import':<34}{n_rels:>14,}{b['import_s']:>10}{b['relationships_per_s_import']:>12,}")
    print(f"{'CSV write + import':<34}{n_rels:>14,}{b['csv_write_s'] + b['import_s']:>10.1f}"
          f"{b['relationships_per_s_csv_plus_import']:>12,}")
    print(f"{'UNWIND MERGE (peer)':<34}{m['relationships']:>14,}{m['seconds']:>10}{m['relationships_per_s']:>12,}")
    print(f"speedup (import / MERGE): {result['speedup_import_vs_merge']}x; store {b['store_mib']} MiB")
    return result


if __name__ == "__main__":
    main()
