"""Run every benchmark one after another (each prints its table and writes benchmarks/results/<name>.json).

    python -m benchmarks.run_all                 # all of them (long: an hour or more on 2 cores)
    python -m benchmarks.run_all ingest kg       # a selection
"""
from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = ("ingest", "kg", "encoders", "ml100k", "ranking", "ranker_leaves", "enrichment", "serve", "dask", "scale")


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        t0 = time.perf_counter()
        print(f"\n===== benchmarks.bench_{name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.bench_{name}"])
        print(f"===== bench_{name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
