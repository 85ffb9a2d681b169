"""Load test of the HTTP service on loopback: N concurrent clients for a fixed time per endpoint.

Question: how many requests per second do ``/recommend`` and ``/search`` answer, at what p50/p99 latency and with
how many errors, with the service started the way users start it (``kgrec serve --bundle B``, its own process)?

    .venv/bin/python -m benchmarks.bench_serve --bundle demo_out/bundle --clients 32 --duration 30
    .venv/bin/python -m benchmarks.bench_serve --build-items 1000 --workdir /tmp/bench_serve   # builds a bundle

The server runs in a subprocess (uvicorn, one worker); the clients are asyncio tasks on one ``httpx.AsyncClient``
in this process, so on a 2-core machine client and server share the CPUs (numbers are a floor). Each phase first
warms up for a few seconds (not counted). Users are drawn from the bundle's users, search texts from its item
titles (seeded). Prints a table and writes ``benchmarks/results/serve.json`` (merged by bundle label).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "serve.json"
ROOT = Path(__file__).resolve().parents[1]


def build_bundle(workdir: Path, n_items: int, n_users: int, epochs: int) -> Path:
    """Demo catalog -> ingest -> ``Recommender.fit`` with the default (packaged) encoders -> bundle."""
    from kgrec.config import Config
    from kgrec.data.ingest import ingest
    from kgrec.data.synthetic import generate_catalog
    from kgrec.pipeline import Recommender

    bundle = workdir / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    raw, ds = workdir / "raw", workdir / "dataset"
    if not (ds / "manifest.json").is_file():
        generate_catalog(raw, n_items=n_items, n_users=n_users, seed=0, images=True)
        ingest(raw, ds)
    cfg = Config.load(overrides={"fusion.epochs": epochs})
    Recommender.fit(ds, cfg).save(bundle)
    return bundle


def start_server(bundle: Path, port: int, timeout_s: float = 600.0) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kgrec.cli", "serve", "--bundle", str(bundle), "--port", str(port),
         "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kgrec serve exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"kgrec serve did not answer /health within {timeout_s} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _phase(base: str, make_request: Any, clients: int, duration: float, warmup: float) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60.0) as client:
        t_start = time.perf_counter()
        t_count, t_end = t_start + warmup, t_start + warmup + duration

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while True:
                now = time.perf_counter()
                if now >= t_end:
                    return
                url = make_request(rng)
                t0 = time.perf_counter()
                try:
                    r = await client.get(url)
                    ok, why = r.status_code == 200, f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, why = False, type(exc).__name__
                t1 = time.perf_counter()
                if t0 >= t_count and t1 <= t_end:
                    lat.append(t1 - t0)
                    if not ok:
                        errors[why] = errors.get(why, 0) + 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    a = np.array(lat) * 1e3
    n_err = sum(errors.values())
    return {
        "requests": len(lat), "errors": n_err, "error_kinds": errors, "duration_s": duration, "clients": clients,
        "throughput_rps": len(lat) / duration,
        "p50_ms": float(np.percentile(a, 50)) if len(a) else None,
        "p90_ms": float(np.percentile(a, 90)) if len(a) else None,
        "p99_ms": float(np.percentile(a, 99)) if len(a) else None,
        "max_ms": float(a.max()) if len(a) else None,
    }


def screenshot(base: str, path: Path, search: str | None = None) -> None:
    """Open the page in headless Chromium, recommend for the most active user, pick a result whose explanation
    has KG paths, and save a PNG of the page."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tests.e2e.browser import chromium_driver

    d = chromium_driver(1400, 1250)
    try:
        d.get(base + "/")
        wait = WebDriverWait(d, 120, poll_frequency=0.2)
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        Select(d.find_element("id", "user-picker")).select_by_index(0)
        d.find_element("id", "recommend-button").click()
        wait.until(lambda d: d.execute_script("return document.querySelector('#explanation .sentence') !== null"))
        cards = d.find_elements("css selector", "#results .card")
        for i, card in enumerate(cards):  # show an explanation that has a KG path drawn
            card.click()
            if d.execute_script("return document.querySelectorAll('#explanation svg.path').length") > 0:
                break
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete)"))
        time.sleep(0.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(path))
        print(f"wrote {path}")
    finally:
        d.quit()


def run(bundle: Path, label: str, clients: int, duration: float, warmup: float, port: int,
        shot: Path | None = None) -> dict[str, Any]:
    import httpx
    import pandas as pd

    users = pd.read_parquet(bundle / "idmaps" / "users.parquet").iloc[:, 0].astype(str).tolist()
    titles = pd.read_parquet(bundle / "data" / "items.parquet", columns=["title"])["title"].dropna().tolist()
    words = sorted({w for t in titles[:5000] for w in str(t).lower().split() if w.isalpha()})
    proc = start_server(bundle, port)
    try:
        base = f"http://127.0.0.1:{port}"
        health = httpx.get(base + "/health").json()
        if shot is not None:
            screenshot(base, shot)
        phases = {
            "recommend": lambda rng: f"/recommend?user={rng.choice(users)}&k=10",
            "recommend_explain": lambda rng: f"/recommend?user={rng.choice(users)}&k=10&explain=true",
            "search": lambda rng: "/search?k=10&text=" + "+".join(rng.sample(words, min(3, len(words)))),
        }
        out: dict[str, Any] = {"bundle": str(bundle), "items": health["items"], "users": health["users"],
                               "store": health["store"], "endpoints": {}}
        for name, make in phases.items():
            load_before = os.getloadavg()[0]
            res = asyncio.run(_phase(base, make, clients, duration, warmup))
            # other work on the machine shares the CPUs: record how busy it was (1-min load average)
            res["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            out["endpoints"][name] = res
            print(f"  {label:<10} {name:<18} {res['throughput_rps']:8.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                  f"p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}", flush=True)
    finally:
        stop_server(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle to serve (else one is built, see --build-items)")
    ap.add_argument("--label", default=None, help="name of this bundle in the JSON (default: '<items> items')")
    ap.add_argument("--build-items", type=int, default=1000)
    ap.add_argument("--build-users", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kgrec_bench_serve"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds measured per endpoint")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--screenshot", type=Path, default=None, help="also save a PNG of the page (e.g. docs/web.png)")
    args = ap.parse_args()

    bundle = args.bundle or build_bundle(args.workdir, args.build_items, args.build_users, args.epochs)
    from tests.e2e.browser import free_port

    port = args.port or free_port()
    res = run(bundle, args.label or "bundle", args.clients, args.duration, args.warmup, port, args.screenshot)
    label = args.label or f"{res['items']} items"
    print(f"\n| bundle | endpoint | clients | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|")
    for name, r in res["endpoints"].items():
        print(f"| {label} | {name} | {r['clients']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['errors']} |")
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data.setdefault("runs", {})[label] = res
    data["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    data["command"] = "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:])
    data["note"] = ("server: `kgrec serve` subprocess (uvicorn, 1 worker, recommender calls serialised by a lock); "
                    "clients: asyncio + httpx in the benchmark process on the same machine")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
