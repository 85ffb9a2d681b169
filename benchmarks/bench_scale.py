"""One machine, 1,000,000 items / 10,000,000 events / 200,000 users: per-stage time and peak memory.

Stages: generate (synthetic catalog, Parquet, no images) -> ingest -> knowledge graph (HeteroData export) ->
encode (MiniLM on a sample: items/s, extrapolated) -> train (GNN, mini-batches of training edges over full-graph
sparse propagation) -> rank (RankingContext, features of sampled users' candidates, LightGBM) -> recommend
(per-user latency over all items). Peak RSS is sampled every 0.1 s per stage (the process, children excluded).

What does not fit and what was changed (see ``notes`` in the JSON):
* The embedded ``GraphStore`` (networkx, one Python dict per relationship) is not loaded at this size: at 100k items
  / ~0.4M relationships ``bench_ranking`` measured 91 s for ``EmbeddedStore.load``; 10M events would take tens of
  minutes and tens of GB. The KG stage here builds the same ``HeteroData`` export with column operations
  (:func:`hetero_from_dataset`, checked equal to ``EmbeddedStore.to_hetero_data()`` on the demo catalog with
  ``--check``).
* The text encoder runs on a sample (``--encode-sample``) and is extrapolated; the GNN trains on ID + KG (no text
  vectors) for ``--epochs`` with a large edge batch.

Run: ``.venv/bin/python -m benchmarks.bench_scale [--items 1000000 --events 10000000 --users 200000]
[--budget-s 1200]``; writes ``benchmarks/results/scale.json`` after every stage.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
logger = logging.getLogger("bench_scale")


# ---------------------------------------------------------------------------------------------- measurement
class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds while active; ``peak_mib`` is the maximum seen."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


# ---------------------------------------------------------------------------------------------- KG export
def hetero_from_dataset(ds: Any, events: pd.DataFrame | None = None, also_bought_min_count: int = 2) -> tuple[Any, dict[str, list[str]]]:
    """The ``GraphStore.to_hetero_data()`` export of ``ds`` built with column operations (no per-row objects).

    Same node sets (sorted ids), edge types, edge order (lexsorted by src, dst) and weights (interaction counts,
    ALSO_BOUGHT co-buyer counts, 1 otherwise) as ``kg.loading.build_graph_rows`` + ``kg.export.build_hetero_data``.
    """
    import torch
    from torch_geometric.data import HeteroData

    from kg.loading import attribute_value_id
    from kg.schema import INTERACTION_RELS, entity_relation_pyg_name

    items = ds.table("items").select(["item_id", "brand", "category"]).to_pandas()
    users = ds.table("users").select(["user_id"]).to_pandas()
    ev = ds.events if events is None else events
    triples, links = ds.triples, ds.links
    attrs = ds.item_attributes()

    def sorted_ids(*cols: Any) -> np.ndarray:
        parts = [pd.Series(c, dtype=object).dropna().astype(str) for c in cols]
        s = pd.concat(parts, ignore_index=True) if parts else pd.Series([], dtype=object)
        return np.sort(s.unique().astype(object))

    brand = items["brand"].where(items["brand"].astype(str).str.strip().ne("") & items["brand"].notna())
    cats = items["category"].where(items["category"].notna())
    leaf_of: dict[str, str] = {}
    prefixes: set[str] = set()
    for path in pd.unique(cats.dropna()):
        segs = [p.strip() for p in str(path).split(">") if p.strip()]
        pre = [">".join(segs[: k + 1]) for k in range(len(segs))]
        prefixes.update(pre)
        if pre:
            leaf_of[path] = pre[-1]
    av = attrs.assign(av=[attribute_value_id(str(n), str(v)) for n, v in zip(attrs["name"], attrs["value"])])
    ids = {
        "user": sorted_ids(users["user_id"], ev["user_id"]),
        "item": sorted_ids(items["item_id"], ev["item_id"], links["item_id"]),
        "brand": sorted_ids(brand),
        "category": np.sort(np.array(list(prefixes), dtype=object)),
        "attribute": sorted_ids(av["av"]),
        "entity": sorted_ids(triples["head"], triples["tail"], links["entity_id"]),
    }
    index = {t: pd.Index(v) for t, v in ids.items()}
    data = HeteroData()
    for t, v in ids.items():
        data[t].num_nodes = len(v)

    def put(et: tuple[str, str, str], src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None) -> None:
        s = index[et[0]].get_indexer(src)
        d = index[et[2]].get_indexer(dst)
        w = np.ones(len(s), np.float32) if w is None else np.asarray(w, np.float32)
        order = np.lexsort((d, s))
        data[et].edge_index = torch.from_numpy(np.stack([s[order], d[order]]).astype(np.int64))
        data[et].edge_weight = torch.from_numpy(w[order])

    ok = brand.notna()
    put(("item", "made_by", "brand"), items["item_id"][ok].to_numpy(), brand[ok].to_numpy())
    ok = cats.notna() & cats.map(leaf_of).notna()
    put(("item", "in_category", "category"), items["item_id"][ok].to_numpy(), cats[ok].map(leaf_of).to_numpy())
    sub = [c for c in sorted(prefixes) if ">" in c]
    if sub:
        put(("category", "subcategory_of", "category"), np.array(sub, object), np.array([c.rsplit(">", 1)[0] for c in sub], object))
    put(("item", "has_attribute", "attribute"), av["item_id"].astype(str).to_numpy(), av["av"].to_numpy())
    if len(links):
        put(("item", "linked_to", "entity"), links["item_id"].astype(str).to_numpy(), links["entity_id"].astype(str).to_numpy())
    for rel, grp in triples.groupby(triples["relation"].map(entity_relation_pyg_name)):
        put(("entity", rel, "entity"), grp["head"].astype(str).to_numpy(), grp["tail"].astype(str).to_numpy())
    # interactions: count per (user, item, type)
    u = index["user"].get_indexer(ev["user_id"].astype(str))
    i = index["item"].get_indexer(ev["item_id"].astype(str))
    n_items = len(ids["item"])
    key = u.astype(np.int64) * n_items + i
    types = ev["type"].astype(str).to_numpy()
    for etype, rel in INTERACTION_RELS.items():
        m = types == etype
        if not m.any():
            continue
        k, c = np.unique(key[m], return_counts=True)
        et = ("user", rel.lower(), "item")
        data[et].edge_index = torch.from_numpy(np.stack([k // n_items, k % n_items]).astype(np.int64))
        data[et].edge_weight = torch.from_numpy(c.astype(np.float32))
    # ALSO_BOUGHT: unordered item pairs with >= min_count common buyers (src < dst by id = by index)
    import scipy.sparse as sp

    m = types == "purchase"
    k = np.unique(key[m])
    p = sp.csr_matrix((np.ones(len(k), np.float32), (k // n_items, k % n_items)), shape=(len(ids["user"]), n_items))
    co = sp.triu(p.T @ p, k=1).tocoo()
    keep = co.data >= also_bought_min_count
    order = np.lexsort((co.col[keep], co.row[keep]))
    data[("item", "also_bought", "item")].edge_index = torch.from_numpy(
        np.stack([co.row[keep][order], co.col[keep][order]]).astype(np.int64))
    data[("item", "also_bought", "item")].edge_weight = torch.from_numpy(co.data[keep][order].astype(np.float32))
    return data, {t: list(v) for t, v in ids.items()}


def check_export(tmp: Path) -> dict[str, Any]:
    """The column-wise export equals ``EmbeddedStore.to_hetero_data()`` on the generated demo catalog."""
    from kg.embedded_store import EmbeddedStore
    from kg.export import hetero_equal
    from kgrec.data.ingest import ingest
    from kgrec.data.schema import Dataset
    from kgrec.data.synthetic import generate_catalog

    generate_catalog(tmp / "raw", n_items=300, n_users=120, seed=0, images=False)
    ingest(tmp / "raw", tmp / "ds")
    ds = Dataset.open(tmp / "ds")
    store = EmbeddedStore()
    store.load(ds)
    a, ida = store.to_hetero_data()
    b, idb = hetero_from_dataset(ds)
    same_ids = ida == idb
    same = bool(same_ids and hetero_equal(a, b))
    diff = sorted(set(a.edge_types) ^ set(b.edge_types))
    return {"equal": same, "same_id_maps": same_ids, "edge_types_differing": [list(x) for x in diff]}


# ---------------------------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kgrec_scale"))
    p.add_argument("--encode-sample", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=262_144)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--rank-users", type=int, default=3000)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--budget-s", type=float, default=1200.0, help="skip the remaining stages past this wall time")
    p.add_argument("--check", action="store_true", help="first check the column-wise export against EmbeddedStore")
    p.add_argument("--keep", action="store_true", help="keep the generated data in --workdir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "scale",
        "created": datetime.now(timezone.utc).isoformat(),
        "command": "python -m benchmarks.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ram_gib": round(__import__("psutil").virtual_memory().total / 2**30, 1),
                    "load_average_before": os.getloadavg(), "torch_threads": torch.get_num_threads()},
        "scale": {"items": args.items, "events": args.events, "users": args.users, "images": 0},
        "stages": {},
        "notes": [],
    }
    state: dict[str, Any] = {}

    def save() -> None:
        result["machine"]["load_average_now"] = os.getloadavg()
        result["total_s"] = time.perf_counter() - t_start
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")

    def stage(name: str, fn: Callable[[], dict[str, Any]]) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            result["stages"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s used up"}
            save()
            return False
        gc.collect()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            try:
                info = fn() or {}
                ok = True
            except Exception as exc:  # a benchmark reports the failing stage instead of dying
                logger.exception("stage %s failed", name)
                info, ok = {"error": f"{type(exc).__name__}: {exc}"}, False
        info.update(seconds=round(time.perf_counter() - t0, 2), cpu_s=round(time.process_time() - cpu0, 2),
                    peak_rss_mib=round(rss.peak_mib, 1))
        result["stages"][name] = info
        print(f"{name:<12} {info['seconds']:>9.1f} s  peak {info['peak_rss_mib']:>9.0f} MiB  "
              + ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("seconds", "cpu_s", "peak_rss_mib")
                          and not isinstance(v, (dict, list))), flush=True)
        save()
        return ok

    work = args.workdir
    if args.check:
        stage("check_export", lambda: check_export(_fresh(work / "check")))

    def generate() -> dict[str, Any]:
        from kgrec.data.synthetic import generate_catalog

        s = generate_catalog(_fresh(work / "raw"), n_items=args.items, n_users=args.users, seed=0, images=False,
                             n_events=args.events, fmt="parquet")
        return {"raw_mib": round(sum(f.stat().st_size for f in (work / "raw").rglob("*") if f.is_file()) / 2**20, 1)}

    def ingest_stage() -> dict[str, Any]:
        from kgrec.data.ingest import ingest

        if (work / "ds").exists():
            shutil.rmtree(work / "ds")
        rep = ingest(work / "raw", work / "ds")
        return {"rows_read": rep.read, "quarantined": rep.quarantined,
                "events_written": rep.tables["events"].written}

    def kg_stage() -> dict[str, Any]:
        from kgrec.data.schema import Dataset

        ds = Dataset.open(work / "ds")
        state["ds"] = ds
        state["events"] = ds.events
        hetero, id_maps = hetero_from_dataset(ds, state["events"])
        state["hetero"], state["id_maps"] = hetero, id_maps
        return {"nodes": {t: len(v) for t, v in id_maps.items()},
                "edges": int(sum(hetero[et].edge_index.shape[1] for et in hetero.edge_types))}

    def encode_stage() -> dict[str, Any]:
        from encoders.items import item_text
        from encoders.text import TextEncoder

        torch.set_num_threads(2)
        rows = state["ds"].table("items").slice(0, args.encode_sample).to_pylist()
        texts = [item_text(r) for r in rows]
        enc = TextEncoder(device="auto", batch_size=128)
        enc.encode(texts[:128])
        t = time.perf_counter()
        enc.encode(texts)
        rate = len(texts) / (time.perf_counter() - t)
        return {"sample": len(texts), "items_per_s": round(rate, 1), "device": str(enc.device),
                "extrapolated_full_catalog_s": round(args.items / rate, 0)}

    def train_stage() -> dict[str, Any]:
        from fusion.train import train_model
        from kgrec.config import FusionConfig
        from kgrec.pipeline import _index, split_pairs

        torch.set_num_threads(2)
        ids = state["id_maps"]
        t = time.perf_counter()
        pairs = split_pairs(state["ds"], state["events"], _index(ids["user"]), _index(ids["item"]))
        split_s = time.perf_counter() - t
        tr, va = pairs[pairs["split"] == 0], pairs[pairs["split"] == 1]
        state["pairs"] = pairs
        cfg = FusionConfig(dim=args.dim, num_layers=2, epochs=args.epochs, batch_size=args.batch_size, lr=0.01,
                           use_text=False, use_image=False, max_eval_users=2000, device="auto")
        model = train_model(len(ids["user"]), len(ids["item"]), tr["u"].to_numpy(), tr["i"].to_numpy(),
                            graph=state["hetero"], valid=(va["u"].to_numpy(), va["i"].to_numpy()), config=cfg)
        state["model"] = model
        h = model.history
        return {"split_s": round(split_s, 1), "train_pairs": len(tr), "valid_pairs": len(va),
                "epoch_s": [round(x["train_seconds"], 1) for x in h],
                "valid_ndcg@20": [round(x["valid"].get("ndcg@20", float("nan")), 4) for x in h],
                "steps_per_epoch": -(-len(tr) // args.batch_size), "batch_size": args.batch_size}

    def rank_stage() -> dict[str, Any]:
        from kgrec.config import RankingConfig
        from ranking.context import RankingContext
        from ranking.features import FeatureBuilder
        from ranking.ranker import Ranker, build_training_set, ndcg_at_k, top_candidates

        model, ids, pairs, events = state["model"], state["id_maps"], state["pairs"], state["events"]
        t = time.perf_counter()
        ctx = RankingContext.from_hetero(state["hetero"], ids, user_vectors=model.user_embeddings,
                                         item_vectors=model.item_embeddings, items=state["ds"].items)
        ctx_s = time.perf_counter() - t
        state["ctx"] = ctx
        va = pairs[pairs["split"] == 1]
        rng = np.random.default_rng(0)
        users = np.unique(va["u"].to_numpy())
        users = np.sort(rng.choice(users, min(args.rank_users, len(users)), replace=False))
        t = time.perf_counter()
        cand, _ = top_candidates(ctx.user_vectors[users], ctx.item_vectors, args.candidates, batch_size=64)
        cand_s = time.perf_counter() - t
        # labels: the users' validation pairs (graded by their strongest event); features from the full graph
        va_ids = va[va["u"].isin(users)]
        labels = pd.DataFrame({"user_id": np.asarray(ids["user"], dtype=object)[va_ids["u"].to_numpy()],
                               "item_id": np.asarray(ids["item"], dtype=object)[va_ids["i"].to_numpy()],
                               "type": "purchase"})
        builder = FeatureBuilder(ctx)
        t = time.perf_counter()
        ts = build_training_set(builder, users, cand, labels)
        feat_s = time.perf_counter() - t
        n = len(ts.group)
        cut = int(n * 0.8)
        rows_cut = int(ts.group[:cut].sum())
        cfg = RankingConfig(n_estimators=100, n_jobs=2)
        t = time.perf_counter()
        ranker = Ranker(cfg).fit(ts.X[:rows_cut], ts.y[:rows_cut], ts.group[:cut])
        fit_s = time.perf_counter() - t
        state["ranker"], state["builder"] = ranker, builder
        nd = ndcg_at_k(ranker.predict(ts.X[rows_cut:]), ts.y[rows_cut:], ts.group[cut:]) if cut < n else float("nan")
        nd_ret = ndcg_at_k(-np.tile(np.arange(args.candidates), n - cut).astype(float), ts.y[rows_cut:], ts.group[cut:]) if cut < n else float("nan")
        return {"context_s": round(ctx_s, 1), "candidates_s": round(cand_s, 1), "features_s": round(feat_s, 1),
                "ranker_fit_s": round(fit_s, 1), "groups_with_positives": n, "feature_rows": int(len(ts.X)),
                "heldout_ndcg@20_ranker": round(nd, 4), "heldout_ndcg@20_retrieval_order": round(nd_ret, 4)}

    def recommend_stage() -> dict[str, Any]:
        from ranking.ranker import top_candidates

        ctx, builder, ranker = state["ctx"], state["builder"], state["ranker"]
        torch.set_num_threads(1)
        rng = np.random.default_rng(1)
        lat = []
        for u in rng.choice(ctx.num_users, args.requests, replace=False):
            t = time.perf_counter()
            cand, _ = top_candidates(ctx.user_vectors[[u]], ctx.item_vectors, 200,
                                     exclude=ctx.interactions["purchase"][[u]])
            fm = builder.build(np.array([u]), cand)
            scores = ranker.predict(fm.X)
            _ = cand[0][np.argsort(-scores)[:10]]
            lat.append(time.perf_counter() - t)
        lat_ms = np.array(lat) * 1000
        return {"requests": args.requests, "p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
                "p99_ms": round(float(np.percentile(lat_ms, 99)), 1)}

    for name, fn in (("generate", generate), ("ingest", ingest_stage), ("kg", kg_stage), ("encode", encode_stage),
                     ("train", train_stage), ("rank", rank_stage), ("recommend", recommend_stage)):
        if not stage(name, fn) and name in ("generate", "ingest", "kg", "train", "rank"):
            result["notes"].append(f"stopped after {name}: later stages depend on it")
            break
    peaks = {k: v.get("peak_rss_mib", 0) for k, v in result["stages"].items()}
    result["peak_rss_mib_overall"] = max(peaks.values()) if peaks else 0
    result["fits_24_gib"] = result["peak_rss_mib_overall"] < 24 * 1024
    save()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {result['total_s']:.0f} s, peak RSS {result['peak_rss_mib_overall']:.0f} MiB -> {RESULTS}")
    return result


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


if __name__ == "__main__":
    main()
