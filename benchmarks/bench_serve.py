"""Load test of the HTTP service on loopback: N concurrent clients for a fixed time per endpoint.

Question: how many requests per second do ``/recommend`` and ``/search`` answer, at what p50/p99 latency and with
how many errors, with the service started the way users start it (``kgrec serve --bundle B [--workers N]``, its own
process)? Goal (issue 9): 0 errors and p99 <= 100 ms at 100,000 items on 2 cores.

    .venv/bin/python -m benchmarks.bench_serve --build-items 100000 --build-users 20000 --epochs 5 \
        --workdir /tmp/kgrec_serve_100k --build-only                     # ~25 min once, see build_bundle
    .venv/bin/python -m benchmarks.bench_serve --bundle /tmp/kgrec_serve_100k/bundle --profile 40   # per stage
    .venv/bin/python -m benchmarks.bench_serve --bundle /tmp/kgrec_serve_100k/bundle --clients 32 --duration 60 \
        --generator wrk --workers 2 --label "100k items, wrk, 2 workers"
    .venv/bin/python -m benchmarks.bench_serve --build-items 1000 --workdir /tmp/bench_serve   # the demo bundle

Load generators (``--generator``): ``httpx`` = asyncio tasks on one ``httpx.AsyncClient`` in this process, so on a
2-core machine the Python clients take CPU from the server (numbers are a floor); ``wrk`` = the C load generator
(``apt-get install wrk``; one thread, event loop, a Lua script picks the request paths) in its own process, still on
the same cores but using little of them. Each phase first warms up for a few seconds (not counted). Users are drawn
from the bundle's users, search texts are 3 words of item titles and attribute values (seeded). ``--profile N``
times N requests per endpoint in-process, one at a time, by stage. Prints a table and writes
``benchmarks/results/serve.json`` (merged by label; runs record the machine load, the command and the bundle build).
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
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "serve.json"
ROOT = Path(__file__).resolve().parents[1]


LARGE_CATALOG = 10_000  # from this many items up, the build takes the short-text route (see build_bundle)


def build_bundle(workdir: Path, n_items: int, n_users: int, epochs: int, *, text_max_length: int = 32) -> Path:
    """Synthetic catalog -> ingest -> ``Recommender.fit`` with the default (packaged) encoders -> bundle.

    Reused when ``workdir/bundle`` exists. Small catalogs (< ``LARGE_CATALOG`` items) are built as the demo is: item
    images, full item texts. Large ones are built to finish in minutes on 2 CPU cores, and ``workdir/build.json``
    records exactly how:

    - no item images (the CLIP image matrix is all zero rows; serving still encodes the query with the CLIP text
      tower and scores the whole (items, 256) matrix, so the request path is the demo's);
    - short item texts: the title is the category's leaf name (e.g. "Boots") and the description is empty, so an
      item text is ``Boots. brand: Wren; category: Shoes > Boots; colour: white; material: rubber; ...`` (the
      brand, category and attributes, which the knowledge graph is built from, are untouched); about a fifth of
      the items have a distinct text; the text encoder keeps ``text_max_length`` tokens;
    - the embedding cache is filled first with the *distinct* item texts only (the cache is keyed by content hash,
      so ``Recommender.fit`` then reads every vector from it): the BERT vectors with the encoder's own ``encode``,
      the CLIP text vectors with the CLIP text tower on token batches cut after their last non-pad token (the
      tower masks pad tokens, so this equals ``ClipEncoder.encode_texts``; the largest difference on a sample is
      recorded);
    - ``epochs`` GNN epochs (EASE is skipped above ``fusion.max_ease_items`` anyway).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kgrec.config import Config
    from kgrec.data.ingest import ingest
    from kgrec.data.synthetic import generate_catalog
    from kgrec.pipeline import Recommender

    bundle = workdir / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    large = n_items >= LARGE_CATALOG
    info: dict[str, Any] = {"items": n_items, "users": n_users, "epochs": epochs, "seed": 0, "large_route": large,
                            "steps_s": {}}
    t0 = time.perf_counter()
    raw, ds_dir, cache = workdir / "raw", workdir / "dataset", workdir / "embedding_cache"
    if not (ds_dir / "manifest.json").is_file():
        summary = generate_catalog(raw, n_items=n_items, n_users=n_users, seed=0, images=not large,
                                   fmt="parquet" if large else "text")
        info["catalog"] = summary.counts
        if large:  # short item texts: the title is the category's leaf, no description
            items = pq.read_table(raw / "items.parquet")
            leaf = [c.split(">")[-1].strip() for c in items.column("category").to_pylist()]
            items = items.set_column(items.schema.get_field_index("title"), "title", pa.array(leaf, pa.string()))
            items = items.set_column(items.schema.get_field_index("description"), "description",
                                     pa.array([""] * items.num_rows, pa.string()))
            pq.write_table(items, raw / "items.parquet")
        ingest(raw, ds_dir)
    info["steps_s"]["generate_ingest"] = round(time.perf_counter() - t0, 1)
    overrides: dict[str, Any] = {"fusion.epochs": epochs, "encoders.cache_dir": str(cache)}
    if large:
        overrides["encoders.text_max_length"] = text_max_length
    info["config_overrides"] = overrides
    cfg = Config.load(overrides=overrides)
    if large:
        t1 = time.perf_counter()
        info["prefill"] = prefill_text_cache(ds_dir, cfg, cache)
        info["steps_s"]["encode_distinct_texts"] = round(time.perf_counter() - t1, 1)
    t2 = time.perf_counter()
    rec = Recommender.fit(ds_dir, cfg)
    info["steps_s"]["fit"] = round(time.perf_counter() - t2, 1)
    info["fit_timings_s"] = {k: round(v, 1) for k, v in rec.metrics.get("timings", {}).items()}
    info["test_metrics"] = rec.metrics.get("test", {})
    rec.save(bundle)
    info["steps_s"]["total"] = round(time.perf_counter() - t0, 1)
    info["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    (workdir / "build.json").write_text(json.dumps(info, indent=2, default=float) + "\n", encoding="utf-8")
    return bundle


def prefill_text_cache(ds_dir: Path, cfg: Any, cache: Path, batch: int = 256) -> dict[str, Any]:
    """Encode each distinct item text once (BERT and CLIP text) into the embedding cache ``fit`` reads."""
    import torch
    from tqdm.auto import tqdm

    from encoders.cache import EmbeddingCache, content_hash
    from encoders.items import item_text
    from kgrec.data.schema import Dataset
    from kgrec.pipeline import build_encoders

    ds = Dataset.open(ds_dir)
    texts = sorted({item_text(r) for r in ds.table("items").to_pylist()}, key=len)  # similar lengths batch well
    text_enc, clip_enc = build_encoders(cfg, ds)
    keys = [content_hash(t) for t in texts]
    out: dict[str, Any] = {"distinct_texts": len(texts), "items": ds.table("items").num_rows}

    def clip_trimmed(batch_texts: list[str]) -> np.ndarray:
        tokens = clip_enc.tokenizer(batch_texts)
        pad = clip_enc.model.text.config.pad_token_id
        width = int((tokens != pad).any(0).nonzero().max()) + 1
        with torch.inference_mode():
            return clip_enc.model.encode_text(tokens[:, :width], normalize=True).float().numpy()

    sample = texts[:: max(1, len(texts) // 64)][:64]
    out["clip_trimmed_max_abs_diff"] = float(np.abs(clip_trimmed(sample) - clip_enc.encode_texts(sample)).max())
    for name, model_id, fn in (("text", text_enc.model_id, text_enc.encode),
                               ("clip_text", clip_enc.model_id + ":text", clip_trimmed)):
        c = EmbeddingCache(cache, model_id)
        found, _ = c.get(keys)
        todo = np.flatnonzero(~found)
        t = time.perf_counter()
        for s in tqdm(range(0, len(todo), batch * 8), desc=f"encode {name}", unit="chunk"):
            rows = todo[s : s + batch * 8]
            vecs = np.concatenate([fn([texts[i] for i in rows[b : b + batch]]) for b in range(0, len(rows), batch)])
            c.put([keys[i] for i in rows], vecs)
        out[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
        out[f"{name}_encoded"] = int(len(todo))
    return out


def derive_image_bundle(bundle: Path, share: float, out: Path, seed: int = 0) -> Path:
    """A copy of ``bundle`` in which a random ``share`` of the items has an image vector, for timing search on a
    catalog with images without encoding 100,000 pictures (~75 min at 224 px on 2 cores).

    The stand-in image vector of an item is its CLIP text-tower vector (already in the bundle: unit norm, in the
    CLIP space, one per item), so search does exactly the work of a catalog with images — CLIP query encoding, the
    (I, 256) product, two z-scored parts — but the results' quality says nothing about real images. Unchanged files
    are hard links; the two embedding files and the manifest's digests are rewritten.
    """
    import shutil

    from encoders.items import STATUS_EMBEDDED, ItemEmbeddings
    from kgrec.data.schema import file_fingerprint

    out = Path(out)
    if (out / "manifest.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle, tmp, copy_function=os.link)
    emb_dir = tmp / "embeddings"
    emb = ItemEmbeddings.load(emb_dir)
    rng = np.random.default_rng(seed)
    has = rng.random(len(emb)) < share
    image = np.where(has[:, None], emb.clip_text, 0.0).astype(np.float32)
    status = [STATUS_EMBEDDED if h else st for h, st in zip(has, emb.status)]
    reason = ["" if h else r for h, r in zip(has, emb.reason)]
    shutil.rmtree(emb_dir)  # unlinks the hard links: the original bundle's files are untouched
    ItemEmbeddings(item_ids=emb.item_ids, text=emb.text, image=image, clip_text=emb.clip_text, status=status,
                   reason=reason, model_ids=emb.model_ids).save(emb_dir)
    manifest_path = tmp / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name in ("embeddings/embeddings.safetensors", "embeddings/items.json"):
        manifest["files"][name] = file_fingerprint(tmp / name)
    manifest["note"] = f"bench_serve: {int(has.sum())} items given stand-in image vectors (their CLIP text vectors)"
    manifest_path.unlink()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    tmp.rename(out)
    return out


def start_server(bundle: Path, port: int, timeout_s: float = 900.0, workers: int = 1,
                 max_batch: int | None = None, query_bf16: bool = False,
                 query_runtime: str | None = None) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if max_batch is not None:
        env["KGREC_SERVE__MAX_BATCH"] = str(max_batch)
    if query_bf16:
        env["KGREC_SERVE__QUERY_BF16"] = "true"
    if query_runtime is not None:
        env["KGREC_SERVE__QUERY_RUNTIME"] = query_runtime
    proc = subprocess.Popen(
        [sys.executable, "-m", "kgrec.cli", "serve", "--bundle", str(bundle), "--port", str(port),
         "--log-level", "warning"] + (["--workers", str(workers)] if workers > 1 else []),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + timeout_s
    # every worker must be up: each /health below is a new connection, which the kernel hands to a random worker
    # (a worker still loading the bundle holds it past the 2 s timeout), so ask until many in a row succeed
    needed, in_a_row = (1 if workers == 1 else 8 * workers), 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kgrec serve exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            ok = False
        in_a_row = in_a_row + 1 if ok else 0
        if in_a_row >= needed:
            return proc
        if not ok:
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


WRK_SCRIPT = """
paths = {%s}
math.randomseed(%d)
request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, ' ..
    '"timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _cpu_seconds(server_pid: int | None) -> tuple[float, float]:
    """(CPU seconds used so far by the server process tree, CPU seconds the whole machine has been busy)."""
    import psutil

    server = 0.0
    if server_pid is not None:
        try:
            root = psutil.Process(server_pid)
            for p in [root] + root.children(recursive=True):
                try:
                    t = p.cpu_times()
                    server += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)
    return server, busy


def _connections_per_worker(server_pid: int | None, port: int) -> list[int]:
    """Established connections on ``port`` held by each process of the server tree (workers that hold none: 0)."""
    import psutil

    if server_pid is None:
        return []
    out = []
    try:
        root = psutil.Process(server_pid)
        for p in [root] + root.children(recursive=True):
            try:
                n = sum(1 for c in p.net_connections(kind="tcp")
                        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if n:
                out.append(n)
    except psutil.NoSuchProcess:
        pass
    return sorted(out, reverse=True)


def _wrk_phase(base: str, paths: list[str], clients: int, duration: float, warmup: float, seed: int,
               server_pid: int | None = None) -> dict[str, Any]:
    """One phase with ``wrk`` (C, one thread, event loop): a load generator that needs little CPU of its own.

    Besides latency, the measured part records the CPU the server processes used per request and how busy the
    whole machine was (other work on a shared machine shows as CPU used by neither the server nor wrk)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (", ".join(json.dumps(p) for p in paths), seed))
        script = f.name
    try:
        def wrk(seconds: float) -> dict[str, Any]:
            out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
                                  "-s", script, base], capture_output=True, text=True, check=True).stdout
            line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
            return json.loads(line[len("WRK_JSON "):])

        if warmup > 0:
            wrk(warmup)
        cpu0, t0 = _cpu_seconds(server_pid), time.perf_counter()
        port = int(base.rsplit(":", 1)[1])
        spread: list[list[int]] = []
        sampler = threading.Timer(duration / 2, lambda: spread.append(_connections_per_worker(server_pid, port)))
        sampler.start()
        w = wrk(duration)
        sampler.join()
        cpu1, wall = _cpu_seconds(server_pid), time.perf_counter() - t0
    finally:
        os.unlink(script)
    errors = {k: w[k] for k in ("connect", "read", "write", "status", "timeout") if w[k]}
    secs = w["duration_us"] / 1e6
    server_cpu, busy = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {
        "requests": w["requests"], "errors": sum(errors.values()), "error_kinds": errors, "duration_s": round(secs, 2),
        "server_cpu_ms_per_request": round(server_cpu / max(w["requests"], 1) * 1e3, 3),
        "machine_busy_cores": round(busy / wall, 2), "server_busy_cores": round(server_cpu / wall, 2),
        "clients": clients, "throughput_rps": w["requests"] / secs,
        "connections_per_worker_mid_run": spread[0] if spread else [],
        "p50_ms": w["p50_us"] / 1e3, "p90_ms": w["p90_us"] / 1e3, "p99_ms": w["p99_us"] / 1e3,
        "max_ms": w["max_us"] / 1e3,
    }


def search_words(bundle: Path, n_items: int = 5000) -> list[str]:
    """Alphabetic words of the first items' titles and attribute values (the vocabulary of search queries)."""
    import pandas as pd

    items = pd.read_parquet(bundle / "data" / "items.parquet", columns=["title", "attributes"]).head(n_items)
    text = " ".join(items["title"].fillna("").astype(str))
    for a in items["attributes"].dropna():
        text += " " + " ".join(str(v) for v in (json.loads(a) if isinstance(a, str) else dict(a)).values())
    return sorted({w for w in text.lower().split() if w.isalpha()})


# Stages timed by ``profile_requests``: (module, class, method) -> stage name. Wrapping methods (not copying the
# request code) keeps the breakdown valid for older and newer versions of the serving path.
_STAGES: tuple[tuple[str, str | None, str, str], ...] = (
    ("kgrec.pipeline", "Recommender", "_candidates", "candidates (score all items + top-C)"),
    ("ranking.features", "FeatureBuilder", "__init__", "feature builder setup"),
    ("ranking.features", "FeatureBuilder", "build", "features"),
    ("ranking.ranker", "Ranker", "predict", "LightGBM predict"),
    ("ranking.explain", "Explainer", "explain_rows", "explanations"),
    ("kgrec.pipeline", "Recommender", "_result", "result records"),
    ("kgrec.pipeline", "Recommender", "_query_text_vector", "query encoding (BERT)"),
    ("encoders.text", "TextEncoder", "encode", "query encoding (BERT)"),
    ("encoders.clip", "ClipEncoder", "encode_texts", "query encoding (CLIP text)"),
    ("kgrec.pipeline", "Recommender", "_search_scores", "search scores (encode + matmul + z-score)"),
    ("kgrec.pipeline", "Recommender", "_text_query_parts", "search scores (encode + matmul + z-score)"),
    ("kgrec.pipeline", None, "encode_clip_queries", "query encoding (CLIP text)"),
)


def profile_requests(bundle: Path, n: int = 40, seed: int = 0) -> dict[str, Any]:
    """Mean milliseconds per request by stage, in-process (httpx over the ASGI app, one request at a time).

    ``http_total`` is the whole request through the ASGI app (routing, validation, response model, JSON);
    ``recommender_total`` the time inside ``Recommender.recommend`` / ``search``; stages are nested inside it
    (``search scores`` includes the query encodings), so they do not add up to the total.
    """
    import importlib

    import httpx
    import torch

    from kgrec.config import Config
    from kgrec.pipeline import Recommender
    from kgrec.serve.app import create_app

    torch.set_num_threads(max(1, Config().serve.torch_threads))
    acc: dict[str, float] = {}
    depth: dict[str, int] = {}

    def wrap(owner: Any, attr: str, stage: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            depth[stage] = depth.get(stage, 0) + 1
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[stage] -= 1
                if depth[stage] == 0:  # count nested calls of the same stage once
                    acc[stage] = acc.get(stage, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)

    for module, cls, attr, stage in _STAGES:
        mod = importlib.import_module(module)
        owner = mod if cls is None else getattr(mod, cls, None)
        if owner is not None and hasattr(owner, attr):
            wrap(owner, attr, stage)
    for name in ("recommend", "search", "recommend_batch", "search_batch"):  # the service calls the batch forms
        if hasattr(Recommender, name):
            wrap(Recommender, name, "recommender_total")

    t0 = time.perf_counter()
    rec = Recommender.load(bundle)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    app = create_app(rec, Config())
    warm_s = time.perf_counter() - t0
    rng = random.Random(seed)
    users = rec.user_ids
    words = search_words(bundle)
    phases = {
        "recommend": lambda: f"/recommend?user={rng.choice(users)}&k=10",
        "recommend_explain": lambda: f"/recommend?user={rng.choice(users)}&k=10&explain=true",
        "search": lambda: "/search?k=10&text=" + "+".join(rng.sample(words, min(3, len(words)))),
    }
    out: dict[str, Any] = {"requests_per_endpoint": n, "bundle_load_s": round(load_s, 1),
                           "warmup_s": round(warm_s, 1), "endpoints": {}}

    async def timed_requests(make: Any) -> float:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            for _ in range(3):
                await client.get(make())
            acc.clear()
            t = time.perf_counter()
            for _ in range(n):
                r = await client.get(make())
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: HTTP {r.status_code} {r.text[:300]}")
            return (time.perf_counter() - t) / n * 1e3

    for name, make in phases.items():
        total = asyncio.run(timed_requests(make))
        row = {"http_total": round(total, 2)}
        row.update({k: round(v / n * 1e3, 2) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])})
        row["routing_validation_json"] = round(total - row.get("recommender_total", 0.0), 2)
        out["endpoints"][name] = row
        print(f"  profile {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return out


def bf16_agreement(bundle: Path, n: int = 1000, k: int = 10, batch: int = 32, seed: int = 0) -> dict[str, Any]:
    """How far ``serve.query_bf16`` (bfloat16 query encoders) moves search results from the float32 answer.

    ``n`` seeded queries drawn like the load test's (3 words of item titles and attribute values), answered both
    ways in batches of ``batch``: mean recall@k (share of the float32 top-k also in the bf16 top-k), share of
    queries with the identical ranked top-k, mean |score difference| over items in both, and the cosine between
    the two query vectors; plus the time per query of each encoding (one thread).
    """
    import torch

    from kgrec.pipeline import Recommender

    torch.set_num_threads(1)
    rec = Recommender.load(bundle)
    words = search_words(bundle)
    rng = random.Random(seed)
    texts = list(dict.fromkeys(" ".join(rng.sample(words, min(3, len(words)))) for _ in range(n)))
    rec.search_batch(["warm up", "warm up batch"], k=1)
    rec.search_batch(["warm up", "warm up batch"], k=1, query_bf16=True)
    recall, same, diffs, cos, secs = [], [], [], [], {False: 0.0, True: 0.0}
    for a in range(0, len(texts), batch):
        chunk = texts[a : a + batch]
        got = {}
        for bf16 in (False, True):
            t = time.perf_counter()
            vecs = rec._query_vectors("text", chunk, bf16)
            secs[bf16] += time.perf_counter() - t
            got[bf16] = (np.stack(vecs), rec.search_batch(chunk, k, query_bf16=bf16))
        cos.extend((got[False][0] * got[True][0]).sum(axis=1).tolist())
        for exact, approx in zip(got[False][1], got[True][1]):
            e, p = [r.item_id for r in exact], [r.item_id for r in approx]
            recall.append(len(set(e) & set(p)) / len(e))
            same.append(e == p)
            sp = {r.item_id: r.score for r in approx}
            diffs.extend(abs(r.score - sp[r.item_id]) for r in exact if r.item_id in sp)
    out = {"queries": len(texts), "k": k, "recall_at_k": float(np.mean(recall)),
           "min_recall_at_k": float(np.min(recall)), "identical_top_k_share": float(np.mean(same)),
           "mean_abs_score_diff": float(np.mean(diffs)), "min_query_cosine": float(np.min(cos)),
           "encode_ms_per_query": {"float32": round(secs[False] / len(texts) * 1e3, 3),
                                   "bf16": round(secs[True] / len(texts) * 1e3, 3)},
           "cpu_bf16_flags": _cpu_bf16_flags()}
    print("  query_bf16 vs float32: " + ", ".join(f"{k_} {v}" for k_, v in out.items()), flush=True)
    return out


def _cpu_bf16_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags.split() if "bf16" in f or f.startswith("amx"))


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
        shot: Path | None = None, *, generator: str = "httpx", workers: int = 1, max_batch: int | None = None,
        endpoints: tuple[str, ...] = ("recommend", "recommend_explain", "search"),
        query_bf16: bool = False, query_runtime: str | None = None) -> dict[str, Any]:
    import httpx
    import pandas as pd

    users = pd.read_parquet(bundle / "idmaps" / "users.parquet").iloc[:, 0].astype(str).tolist()
    words = search_words(bundle)
    proc = start_server(bundle, port, workers=workers, max_batch=max_batch, query_bf16=query_bf16,
                        query_runtime=query_runtime)
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
                               "store": health["store"], "load_generator": generator, "server_workers": workers,
                               "max_batch": max_batch, "query_bf16": query_bf16,
                               "query_runtime": query_runtime or "config default", "endpoints": {}}
        for name in endpoints:
            make = phases[name]
            load_before = os.getloadavg()[0]
            if generator == "wrk":
                rng = random.Random(0)
                paths = [make(rng) for _ in range(4000)]
                res = _wrk_phase(base, paths, clients, duration, warmup, seed=0, server_pid=proc.pid)
                res["distinct_paths"] = len(set(paths))  # of 4000 drawn; the service caches 1024 query texts
            else:
                res = asyncio.run(_phase(base, make, clients, duration, warmup))
            # other work on the machine shares the CPUs: record how busy it was (1-min load average)
            res["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            out["endpoints"][name] = res
            print(f"  {label:<10} {name:<18} {res['throughput_rps']:8.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                  f"p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}"
                  + (f"  server CPU {res['server_cpu_ms_per_request']:.2f} ms/req, machine busy "
                     f"{res['machine_busy_cores']} cores (server {res['server_busy_cores']})"
                     if "server_cpu_ms_per_request" in res else "")
                  + (f", connections per worker {res['connections_per_worker_mid_run']}"
                     if res.get("connections_per_worker_mid_run") else ""), flush=True)
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
    ap.add_argument("--build-only", action="store_true", help="build (or find) the bundle and stop")
    ap.add_argument("--generator", choices=("httpx", "wrk"), default="httpx",
                    help="load generator: asyncio+httpx in this process, or `wrk` (apt-get install wrk), a separate "
                         "C process that needs little CPU")
    ap.add_argument("--workers", type=int, default=1, help="kgrec serve --workers")
    ap.add_argument("--max-batch", type=int, default=None, help="serve.max_batch (default: the config's)")
    ap.add_argument("--endpoints", default="recommend,recommend_explain,search")
    ap.add_argument("--query-bf16", action="store_true",
                    help="serve with serve.query_bf16 (approximate: bfloat16 query encoders)")
    ap.add_argument("--query-runtime", choices=("onnx", "torch", "both"), default=None,
                    help="serve.query_runtime for the text query encoders; 'both' runs every endpoint with torch, "
                         "then with onnx, in this one invocation (a same-run comparison)")
    ap.add_argument("--stand-in-images", type=float, default=0.0, metavar="SHARE",
                    help="serve a copy of the bundle in which this share of the items has an image vector (its CLIP "
                         "text vector as a stand-in): search then does the work of a catalog with images")
    ap.add_argument("--recall", type=int, default=0, metavar="N",
                    help="only compare N seeded search queries, query_bf16 vs float32 (recall@10, same order)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="only time N requests per endpoint in-process, by stage (no load test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--screenshot", type=Path, default=None, help="also save a PNG of the page (e.g. docs/web.png)")
    args = ap.parse_args()

    bundle = args.bundle or build_bundle(args.workdir, args.build_items, args.build_users, args.epochs)
    if args.stand_in_images:
        bundle = derive_image_bundle(bundle, args.stand_in_images,
                                     bundle.parent / f"{bundle.name}-images{round(args.stand_in_images * 100)}")
        print(f"bundle with stand-in image vectors for {args.stand_in_images:.0%} of the items: {bundle}")
    if args.build_only:
        print(f"bundle ready: {bundle}")
        return
    if args.recall:
        res = bf16_agreement(bundle, args.recall)
        data = json.loads(args.out.read_text()) if args.out.is_file() else {}
        res["loadavg_1min"] = round(os.getloadavg()[0], 2)
        res["command"] = "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:])
        data.setdefault("query_bf16_agreement", {})[args.label or str(bundle)] = res
        _write_json(args.out, data)
        return
    if args.profile:
        prof = profile_requests(bundle, args.profile)
        label = args.label or "profile"
        data = json.loads(args.out.read_text()) if args.out.is_file() else {}
        prof["loadavg_1min"] = round(os.getloadavg()[0], 2)
        prof["command"] = "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:])
        data.setdefault("profiles", {})[label] = prof
        _write_json(args.out, data)
        return
    from tests.e2e.browser import free_port

    port = args.port or free_port()
    runtimes = ["torch", "onnx"] if args.query_runtime == "both" else [args.query_runtime]
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for runtime in runtimes:
        load_before = [round(x, 2) for x in os.getloadavg()]
        res = run(bundle, args.label or "bundle", args.clients, args.duration, args.warmup, port, args.screenshot,
                  generator=args.generator, workers=args.workers, max_batch=args.max_batch,
                  endpoints=tuple(args.endpoints.split(",")), query_bf16=args.query_bf16, query_runtime=runtime)
        res["loadavg_before_after"] = [load_before, [round(x, 2) for x in os.getloadavg()]]
        res["command"] = "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:])
        build_info = bundle.parent / "build.json"
        if build_info.is_file():
            res["bundle_build"] = json.loads(build_info.read_text())
        label = args.label or f"{res['items']} items"
        if len(runtimes) > 1:
            label = f"{label}, {runtime} queries"
        print(f"\n| bundle | endpoint | clients | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|")
        for name, r in res["endpoints"].items():
            print(f"| {label} | {name} | {r['clients']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {r['errors']} |")
        data.setdefault("runs", {})[label] = res
    data["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    data["command"] = "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:])
    data["note"] = ("server: `kgrec serve` subprocess (uvicorn; each run records server_workers, max_batch and load_generator); "
                    "load_generator httpx = asyncio + httpx clients in the benchmark process, sharing the CPUs with the server; "
                    "wrk = the C load generator wrk (1 thread) in its own process, also on the same machine")
    _write_json(args.out, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
