"""One machine, 1,000,000 items / 10,000,000 events / 200,000 users: per-stage time, CPU time and peak memory.

Stages: generate (synthetic catalog, Parquet, images for the ``--images`` items with the smallest ids) -> ingest ->
knowledge graph (HeteroData export) -> neo4j (the same graph bulk-imported into a real local Neo4j with
neo4j-admin, counts read back and compared, path queries; server stopped before encode) -> encode (static text encoder
distilled from MiniLM, whole catalog; MiniLM itself on a sample for speed and agreement) -> images (the packaged
ClipEncoder's image tower on the image subset, input size chosen on a sample; memory-mapped .npy) -> train (``fusion.scale``: propagated graph features computed once, mini-batch two-tower training; valid/test
Recall/NDCG@20 on sampled users vs popularity and vs the generator's true tastes) -> rank (ranker features from the
training interactions only, LightGBM on sampled users' candidates plus their held-out positives, evaluated on
held-out users' plain retrieval candidates) -> recommend (per-user latency: retrieval over all items + features +
ranker). Peak RSS is sampled every 0.1 s per stage (the process, children excluded; the neo4j stage reports the
importer's and the server's JVM peaks separately).

What did not fit before and what was changed (see ``notes`` in the JSON):
* The embedded ``GraphStore`` (networkx, one Python dict per relationship) is not loaded at this size; the KG stage
  builds the same ``HeteroData`` export with column operations (:func:`hetero_from_dataset`, checked equal to
  ``EmbeddedStore.to_hetero_data()`` on the demo catalog with ``--check``).
* encode: MiniLM on 2 CPU cores runs at ~40 item texts/s (~7 h for 1M items); the static encoder
  (``encoders.static``, Model2Vec-style) encodes thousands per second after a ~1 min distillation.
* train: full-graph propagation per step over 17M edges took ~15 s per step (one epoch of 20 steps learned
  nothing); ``fusion.scale`` propagates once, then trains with thousands of cheap steps
  (``--full-propagation-epochs N`` trains the old path on the same split for comparison).
* rank: LambdaRank needs groups with a positive; training groups add the held-out positives to the candidates.

Run: ``flock /tmp/kgrec_bench.lock .venv/bin/python -m benchmarks.bench_scale`` (defaults: 1M / 10M / 200k,
writes ``benchmarks/results/scale.json`` after every stage); at 100k: ``--items 100000 --events 1000000 --users
20000 --pairs-per-epoch 200000 --train-budget-s 150 --full-propagation-epochs 4 --out
benchmarks/results/scale_100k.json``.
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
    p.add_argument("--static-dims", type=int, default=256, help="PCA dims of the distilled static text encoder")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--pairs-per-epoch", type=int, default=1_000_000)
    p.add_argument("--negatives", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128, help="tower MLP hidden size (0: linear towers)")
    p.add_argument("--select-metric", default="recall@1000", help="validation metric for early stopping")
    p.add_argument("--patience", type=int, default=3, help="epochs without a better valid NDCG@20 before stopping")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--train-budget-s", type=float, default=900.0)
    p.add_argument("--eval-users", type=int, default=2000, help="validation users sampled for per-epoch NDCG")
    p.add_argument("--final-eval-users", type=int, default=2000, help="users sampled for the final valid/test table")
    p.add_argument("--no-text", action="store_true", help="train without the text vectors (KG + interactions)")
    p.add_argument("--no-kg", action="store_true", help="train without the KG profile features")
    p.add_argument("--full-propagation-epochs", type=int, default=0,
                   help="also train the full-propagation GNN (fusion.train) this many epochs for comparison")
    p.add_argument("--reuse", action="store_true", help="reuse generated + ingested data in --workdir")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rank-users", type=int, default=5000)
    p.add_argument("--rank-fit-share", type=float, default=0.5, help="share of rank users the ranker is fit on")
    p.add_argument("--candidates", type=int, default=300)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON path")
    p.add_argument("--budget-s", type=float, default=5400.0, help="skip the remaining stages past this wall time")
    p.add_argument("--images", type=int, default=100_000, help="draw images for this many items (smallest ids)")
    p.add_argument("--image-sample", type=int, default=2000,
                   help="images encoded at 64 and 128 px to choose the input size (category/colour 1-NN accuracy)")
    p.add_argument("--image-size", type=int, default=0, help="force the ClipEncoder input size (0: choose)")
    p.add_argument("--image-budget-s", type=float, default=1200.0,
                   help="fall back to 64 px when 128 px would take longer than this (extrapolated from the sample)")
    p.add_argument("--no-image-features", action="store_true", help="train without the image vectors")
    p.add_argument("--no-neo4j", action="store_true", help="skip the Neo4j bulk-import stage")
    p.add_argument("--neo4j-heap", default="2g", help="Neo4j server and importer JVM heap")
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
        "scale": {"items": args.items, "events": args.events, "users": args.users,
                  "images": min(args.images, args.items)},
        "stages": {},
        "notes": [],
    }
    state: dict[str, Any] = {}

    def save() -> None:
        result["machine"]["load_average_now"] = os.getloadavg()
        result["total_s"] = time.perf_counter() - t_start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")

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

        s = generate_catalog(_fresh(work / "raw"), n_items=args.items, n_users=args.users, seed=0,
                             images=max(args.images, 0), n_events=args.events, fmt="parquet")
        return {"raw_mib": round(sum(f.stat().st_size for f in (work / "raw").rglob("*") if f.is_file()) / 2**20, 1),
                "images": len(list((work / "raw" / "images").glob("*.png"))) if args.images > 0 else 0}

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
        from encoders.static import StaticTextEncoder, encoder_agreement
        from encoders.text import TextEncoder

        torch.set_num_threads(2)
        t = time.perf_counter()
        items = state["ds"].table("items").select(["item_id", "title", "description", "brand", "category",
                                                    "attributes"]).to_pandas()
        texts = [item_text(r) for r in items.to_dict("records")]
        labels = {"category": items["category"].astype(str).to_numpy(), "brand": items["brand"].astype(str).to_numpy(),
                  "colour": items["attributes"].astype(str).str.extract(r'"colou?r": ?"([^"]*)"')[0].astype(str).to_numpy()}
        if list(items["item_id"].astype(str)) != state["id_maps"]["item"][:len(items)] or len(items) != len(state["id_maps"]["item"]):
            raise RuntimeError("items table order differs from the graph's item index: align before encoding")
        del items
        texts_s = time.perf_counter() - t
        # --- the base model (MiniLM) on a sample, and the distilled static encoder on the same sample
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(len(texts), min(args.encode_sample, len(texts)), replace=False))
        sample_texts = [texts[i] for i in sample]
        base = TextEncoder(device="auto", batch_size=128)
        base.encode(sample_texts[:128])
        t = time.perf_counter()
        v_base = base.encode(sample_texts)
        base_rate = len(sample_texts) / (time.perf_counter() - t)
        t = time.perf_counter()
        static = StaticTextEncoder.distill(base, pca_dims=args.static_dims)
        distill_s = time.perf_counter() - t
        static_corpus = static.with_corpus_weights(texts[: min(len(texts), 200_000)])
        del base
        gc.collect()
        quality = {}
        for name, enc in (("zipf", static), ("corpus", static_corpus)):
            enc.encode(sample_texts[:256])
            t = time.perf_counter()
            v = enc.encode(sample_texts)
            rate = len(sample_texts) / (time.perf_counter() - t)
            quality[name] = {**encoder_agreement(v_base, v), **neighbour_accuracy(v, labels, sample),
                             "sample_items_per_s": round(rate, 1)}
        quality["minilm"] = {**neighbour_accuracy(v_base, labels, sample), "sample_items_per_s": round(base_rate, 1)}
        chosen = max(("zipf", "corpus"), key=lambda k: quality[k]["knn@10_overlap"])
        enc = static if chosen == "zipf" else static_corpus
        enc.save(work / "static_encoder")
        # --- the whole catalog
        t = time.perf_counter()
        vectors = enc.encode(texts)
        full_s = time.perf_counter() - t
        np.save(work / "item_text.npy", vectors)
        state["text"] = np.load(work / "item_text.npy", mmap_mode="r")
        n_unique = len(set(texts))
        return {"encoder": f"static:{enc.base} ({chosen} SIF weights, {enc.dim}-d)", "items": len(texts),
                "unique_texts": n_unique, "item_text_s": round(texts_s, 1), "distill_s": round(distill_s, 1),
                "full_catalog_encode_s": round(full_s, 1), "full_catalog_items_per_s": round(len(texts) / full_s, 0),
                "minilm_sample": len(sample_texts), "minilm_items_per_s": round(base_rate, 1),
                "minilm_extrapolated_full_catalog_s": round(len(texts) / base_rate, 0),
                "speed_ratio_static_over_minilm_same_sample": round(quality[chosen]["sample_items_per_s"] / base_rate, 1),
                "quality_vs_minilm_on_sample": quality, "device": "cpu"}

    def neo4j_stage() -> dict[str, Any]:
        """Bulk-import the same graph into a real local Neo4j (neo4j-admin import), read the counts back and check
        them against the column-wise export, run path queries, then stop the server and free its memory."""
        from benchmarks.bench_neo4j_bulk import ChildPeakRSS
        from kg.bulk_import import bulk_import, dataset_frames
        from kg.neo4j_server import Neo4jServer
        from kg.neo4j_store import Neo4jStore
        from kg.schema import EDGE_TYPES, NODE_LABELS

        hetero, ids = state["hetero"], state["id_maps"]
        expected: dict[str, int] = {label: len(ids[t]) for label, t in NODE_LABELS.items()}
        for rel, et in EDGE_TYPES.items():
            if rel == "ENTITY_RELATION":
                expected[rel] = sum(int(hetero[e].edge_index.shape[1]) for e in hetero.edge_types
                                    if e[0] == "entity" and e[2] == "entity")
            else:
                expected[rel] = int(hetero[et.pyg].edge_index.shape[1]) if et.pyg in hetero.edge_types else 0
        t = time.perf_counter()
        nodes, rels = dataset_frames(state["ds"], events=state["events"])
        frames_s = time.perf_counter() - t
        home = work / "neo4j_home"
        shutil.rmtree(home, ignore_errors=True)
        server = Neo4jServer(home, heap=args.neo4j_heap, pagecache="1g", remove_home=True)
        out: dict[str, Any] = {"frames_s": round(frames_s, 1)}
        try:
            with ChildPeakRSS() as importer_rss:
                info = bulk_import(server, nodes, rels, work_dir=work / "neo4j_csv", heap=args.neo4j_heap,
                                   max_off_heap="4g", start=False)
            shutil.rmtree(work / "neo4j_csv", ignore_errors=True)
            n_rels = sum(len(v) for v in rels.values())
            del nodes, rels
            gc.collect()
            with ChildPeakRSS() as server_rss:
                t = time.perf_counter()
                server.start()
                start_s = time.perf_counter() - t
                with Neo4jStore(server.uri, server.user, server.password, progress=False) as store:
                    t = time.perf_counter()
                    counts = store.counts()
                    counts_s = time.perf_counter() - t
                    # path queries (User -> Item, at most 3 hops) between sampled users and items they bought
                    buys = hetero[("user", "purchased", "item")].edge_index.numpy()
                    pick = np.random.default_rng(3).choice(buys.shape[1], 5, replace=False)
                    path_s, n_paths = [], []
                    for k in pick:
                        u, i = ids["user"][int(buys[0, k])], ids["item"][int(buys[1, k])]
                        t = time.perf_counter()
                        found = store.paths(("User", u), ("Item", i), max_hops=3, limit=10)
                        path_s.append(time.perf_counter() - t)
                        n_paths.append(len(found))
                    t = time.perf_counter()
                    nb = store.neighbours(("Item", ids["item"][0]))
                    neighbours_s = time.perf_counter() - t
            mismatched = {k: {"neo4j": counts.get(k), "export": v} for k, v in expected.items() if counts.get(k) != v}
            out.update({
                "server": f"Neo4j {server.version} Community (local, neo4j-admin database import full)",
                "nodes": sum(counts[k] for k in NODE_LABELS), "relationships": n_rels,
                "counts_equal_column_wise_graph": not mismatched, "mismatched_counts": mismatched,
                "csv_write_s": round(info["csv_s"], 1), "import_s": round(info["import_s"], 1),
                "relationships_per_s_import": round(n_rels / info["import_s"]),
                "server_start_s": round(start_s, 1), "counts_query_s": round(counts_s, 1),
                "path_queries": len(path_s), "paths_found": n_paths,
                "path_query_ms": [round(x * 1000, 1) for x in path_s],
                "neighbours_ms": round(neighbours_s * 1000, 1), "item_neighbours": len(nb),
                "store_mib": round(info["store_bytes"] / 2**20),
                "importer_peak_rss_mib": round(importer_rss.peak_mib),
                "server_peak_rss_mib": round(server_rss.peak_mib),
                "heap": args.neo4j_heap, "pagecache": "1g",
                "memory_note": "peak_rss_mib: this Python process (frames + the run's state); importer_/server_peak_rss"
                               "_mib: the child JVMs sampled every 0.1 s (the importer runs while the frames are "
                               "held; the server after they are freed)",
            })
        finally:
            server.stop()
            shutil.rmtree(work / "neo4j_csv", ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
        gc.collect()
        return out

    def images_stage() -> dict[str, Any]:
        """Encode the subset's images with the packaged ClipEncoder (EfficientNet-Lite0 tower) through the real
        image path; the input size is chosen on a sample (64 px if within 2 points of 128 px on category and colour
        1-NN accuracy). Vectors go to a memory-mapped .npy."""
        from encoders.clip import ClipEncoder

        torch.set_num_threads(2)
        ds = state["ds"]
        items = ds.table("items").select(["item_id", "category", "attributes", "image"]).to_pandas()
        if list(items["item_id"].astype(str)) != state["id_maps"]["item"][:len(items)]:
            raise RuntimeError("items table order differs from the graph's item index: align before encoding")
        refs = items["image"].to_numpy(dtype=object)
        rows = np.flatnonzero([isinstance(r, str) and bool(r) for r in refs])
        if not len(rows):
            return {"images": 0, "note": "the catalog has no images"}
        paths = [str(ds.image_path(refs[r])) for r in rows]
        labels = {"category": items["category"].astype(str).to_numpy()[rows],
                  "colour": items["attributes"].astype(str).str.extract(r'"colou?r": ?"([^"]*)"')[0]
                  .astype(str).to_numpy()[rows]}
        del items, refs
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(len(rows), min(args.image_sample, len(rows)), replace=False))
        sample_paths = [paths[k] for k in sample]
        by_size: dict[int, dict[str, Any]] = {}
        encoders: dict[int, Any] = {}
        for px in (64, 128, 224):
            enc = ClipEncoder(image_size=px, device="cpu", batch_size=128)
            n = len(sample_paths) if px != 224 else min(256, len(sample_paths))
            enc.encode_images_with_status(sample_paths[:32])  # warm-up
            t = time.perf_counter()
            v, reasons = enc.encode_images_with_status(sample_paths[:n])
            rate = n / (time.perf_counter() - t)
            by_size[px] = {"sample": n, "images_per_s": round(rate, 1),
                           "extrapolated_subset_s": round(len(rows) / rate, 0),
                           "failures": sum(r is not None for r in reasons)}
            if px != 224:
                by_size[px].update(neighbour_accuracy(v, {k: y[sample] for k, y in labels.items()}, np.arange(n)))
                encoders[px] = enc
        acc = lambda px, k: by_size[px][f"{k}_1nn_accuracy"]  # noqa: E731
        close = all(acc(64, k) >= acc(128, k) - 0.02 for k in labels)
        chosen = args.image_size or (64 if close else 128)
        over_budget = (not args.image_size and chosen == 128
                       and by_size[128]["extrapolated_subset_s"] > args.image_budget_s)
        if over_budget:  # the machine is slower than planned for: keep the run within its time
            chosen = 64
        enc = encoders.get(chosen) or ClipEncoder(image_size=chosen, device="cpu", batch_size=128)
        encoders.clear()
        out_path = work / "item_image.npy"
        vectors = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(len(rows), enc.dim))
        failed = np.zeros(len(rows), dtype=bool)
        reasons_seen: dict[str, int] = {}
        t = time.perf_counter()
        chunk = 8192
        for s_ in range(0, len(rows), chunk):
            v, reasons = enc.encode_images_with_status(paths[s_:s_ + chunk])
            vectors[s_:s_ + len(v)] = v
            for k, r in enumerate(reasons):
                if r is not None:
                    failed[s_ + k] = True
                    reasons_seen[r.split(":")[0]] = reasons_seen.get(r.split(":")[0], 0) + 1
        encode_s = time.perf_counter() - t
        vectors.flush()
        del vectors
        np.save(work / "item_image_items.npy", rows)
        mm = np.load(out_path, mmap_mode="r")
        keep = np.flatnonzero(~failed)
        state["image"] = (mm if len(keep) == len(rows) else np.asarray(mm[keep]), rows[keep])
        return {"encoder": f"{enc.model_id} (packaged EfficientNet-Lite0 tower, random projection)",
                "images": len(rows), "failures": int(failed.sum()), "failure_reasons": reasons_seen,
                "chosen_image_size": chosen,
                "choice_rule": "64 px if its category and colour 1-NN accuracy are within 0.02 of 128 px, else 128 "
                               f"(unless 128 px would take over {args.image_budget_s:.0f} s)",
                "accuracy_within_0.02_at_64": close, "fell_back_to_64_for_time": bool(over_budget),
                "by_image_size": {str(k): v for k, v in by_size.items()},
                "encode_s": round(encode_s, 1), "images_per_s": round(len(rows) / encode_s, 1),
                "vectors": f"{out_path.name} ({len(rows)}, {enc.dim}) float32, memory-mapped", "device": "cpu"}

    def train_stage() -> dict[str, Any]:
        from fusion.baselines import Popularity
        from fusion.metrics import evaluate, to_csr
        from fusion.scale import ScaleTrainConfig, propagate_features, train_scale_model
        from kgrec.pipeline import _index, split_pairs

        torch.set_num_threads(2)
        ids = state["id_maps"]
        U, I = len(ids["user"]), len(ids["item"])
        t = time.perf_counter()
        pairs = split_pairs(state["ds"], state["events"], _index(ids["user"]), _index(ids["item"]))
        split_s = time.perf_counter() - t
        state["pairs"] = pairs
        tr, va, te = (pairs[pairs["split"] == k] for k in (0, 1, 2))
        tu, ti = tr["u"].to_numpy(), tr["i"].to_numpy()
        text = None if args.no_text else np.asarray(state["text"])
        image = None if args.no_image_features else state.get("image")
        feats = propagate_features(U, I, tu, ti, content=text, graph=None if args.no_kg else state["hetero"],
                                   image_vectors=None if image is None else image[0],
                                   image_items=None if image is None else image[1])
        feature_blocks = {k: b - a for k, (a, b) in feats.blocks.items()}
        cfg = ScaleTrainConfig(dim=args.dim, hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, pairs_per_epoch=args.pairs_per_epoch, num_negatives=args.negatives,
                               max_eval_users=args.eval_users, time_budget_s=args.train_budget_s,
                               patience=args.patience, select_metric=args.select_metric)
        model = train_scale_model(U, I, tu, ti, features=feats, valid=(va["u"].to_numpy(), va["i"].to_numpy()),
                                  config=cfg)
        state["model"] = model
        del feats
        gc.collect()
        # test on sampled users (train + valid masked), model vs popularity; popularity also on valid
        train_csr = to_csr(tu, ti, (U, I))
        valid_csr = to_csr(va["u"].to_numpy(), va["i"].to_numpy(), (U, I))
        test_csr = to_csr(te["u"].to_numpy(), te["i"].to_numpy(), (U, I))
        seen = (train_csr + valid_csr).tocsr()
        out_metrics = {}
        pop = Popularity().fit(train_csr)
        oracle = taste_oracle(work / "raw", state["ds"], ids)
        uv, iv = torch.from_numpy(model.user_embeddings), torch.from_numpy(model.item_embeddings)
        for split, held, excl in (("valid", valid_csr, train_csr), ("test", test_csr, seen)):
            users = _sample_rows(held, args.final_eval_users, seed=1)
            sub = _rows_only(held, users)
            out_metrics[split] = {"users": len(users)}
            for name, fn, bs in (("model", lambda u: uv[u] @ iv.T, 128), ("popularity", pop.score, 128),
                                 ("true_taste_oracle", oracle, 32)):
                if fn is None:
                    continue
                m = evaluate(fn, sub, excl, ks=(20, 1000), batch_size=bs)
                out_metrics[split][name] = {k: round(m[k], 5) for k in ("recall@20", "ndcg@20", "recall@1000")}
                out_metrics[split][name]["mean_percentile_rank"] = round(percentile_rank(fn, sub, excl, bs), 4)
        h = model.history
        info = {"model": "fusion.scale two-tower over propagated features (SIGN-style, no per-step propagation)",
                "config": model.config, "split_s": round(split_s, 1), "features_s": round(model.feature_seconds, 1),
                "feature_blocks": feature_blocks,
                "items_with_image_features": 0 if image is None else int(len(image[1])),
                "train_pairs": len(tr), "valid_pairs": len(va), "test_pairs": len(te), "epochs": len(h),
                "pairs_per_epoch": h[0]["pairs"] if h else 0,
                "epoch_train_s": [round(x["train_seconds"], 1) for x in h],
                "epoch_eval_s": [round(x.get("eval_seconds", 0.0), 1) for x in h],
                "valid_ndcg@20_by_epoch": [round(x["valid"].get("ndcg@20", float("nan")), 5) for x in h],
                "metrics_sampled_users": out_metrics}
        if args.full_propagation_epochs:
            info["full_propagation_gnn"] = full_propagation(state["hetero"], U, I, tr, va)
        return info

    def full_propagation(hetero: Any, U: int, I: int, tr: pd.DataFrame, va: pd.DataFrame) -> dict[str, Any]:
        """The existing trainer (fusion.train: full-graph propagation every step) for comparison, same split."""
        from fusion.train import train_model
        from kgrec.config import FusionConfig

        cfg = FusionConfig(dim=args.dim, num_layers=2, epochs=args.full_propagation_epochs, batch_size=65_536,
                           lr=0.01, use_text=False, use_image=False, max_eval_users=args.eval_users, device="cpu",
                           hybrid_ease=False, patience=100)
        t = time.perf_counter()
        m = train_model(U, I, tr["u"].to_numpy(), tr["i"].to_numpy(), graph=hetero,
                        valid=(va["u"].to_numpy(), va["i"].to_numpy()), config=cfg)
        return {"seconds": round(time.perf_counter() - t, 1), "batch_size": cfg.batch_size,
                "epoch_train_s": [round(x["train_seconds"], 1) for x in m.history],
                "valid_ndcg@20_by_epoch": [round(x["valid"].get("ndcg@20", float("nan")), 5) for x in m.history]}

    def rank_stage() -> dict[str, Any]:
        from kgrec.config import RankingConfig
        from kgrec.pipeline import interaction_view
        from ranking.context import RankingContext
        from ranking.features import FeatureBuilder
        from ranking.ranker import Ranker, build_training_set, ndcg_at_k, top_candidates

        torch.set_num_threads(2)
        model, ids, pairs, events = state["model"], state["id_maps"], state["pairs"], state["events"]
        U, I = len(ids["user"]), len(ids["item"])
        user_pos, item_pos = pd.Index(ids["user"]), pd.Index(ids["item"])
        ev_key = user_pos.get_indexer(events["user_id"].astype(str)).astype(np.int64) * I \
            + item_pos.get_indexer(events["item_id"].astype(str))
        key_of = lambda df: df["u"].to_numpy(np.int64) * I + df["i"].to_numpy(np.int64)  # noqa: E731
        tr, va = pairs[pairs["split"] == 0], pairs[pairs["split"] == 1]
        t = time.perf_counter()
        # ranker features see the training interactions only (the labels are validation events)
        train_graph = interaction_view(state["hetero"], ids, events[np.isin(ev_key, key_of(tr))], 2)
        state.pop("hetero", None)
        gc.collect()
        ctx = RankingContext.from_hetero(train_graph, ids, user_vectors=model.user_embeddings,
                                         item_vectors=model.item_embeddings, items=state["ds"].items,
                                         item_text=np.asarray(state["text"]) if "text" in state else None)
        del train_graph
        ctx_s = time.perf_counter() - t
        state["ctx"] = ctx
        va_events = events[np.isin(ev_key, key_of(va))][["user_id", "item_id", "type"]]
        rng = np.random.default_rng(0)
        users = np.sort(rng.choice(np.unique(va["u"].to_numpy()), min(args.rank_users, va["u"].nunique()),
                                   replace=False))
        fit_users = np.sort(rng.choice(users, int(len(users) * args.rank_fit_share), replace=False))
        eval_users = np.setdiff1d(users, fit_users)
        t = time.perf_counter()
        train_seen = _csr_rows(tr, U, I)
        cand, _ = top_candidates(model.user_embeddings[users], model.item_embeddings, args.candidates,
                                 exclude=train_seen[users], batch_size=256)
        cand_s = time.perf_counter() - t
        pos_in_cand = _positives_in(cand, users, va, I)
        # training groups: retrieval candidates plus the user's held-out positives (they replace the lowest-ranked
        # candidates when missing), the usual way to give LambdaRank positives when retrieval recall is low
        is_fit = np.isin(users, fit_users)
        fit_cand = _inject_positives(cand[is_fit], users[is_fit], va, I)
        builder = FeatureBuilder(ctx)
        t = time.perf_counter()
        ts = build_training_set(builder, users[is_fit], fit_cand, va_events)
        if len(ts.group) == 0:
            raise RuntimeError(f"no ranker training group: none of the {is_fit.sum()} sampled users has a "
                               "validation event on an item of its candidate set, even after adding the held-out "
                               "positives; check that validation events exist for the sampled users")
        # evaluation groups: held-out users, retrieval candidates only (no injection): a fair comparison
        ev_set = build_training_set(builder, users[~is_fit], cand[~is_fit], va_events)
        feat_s = time.perf_counter() - t
        ts_plain = build_training_set(builder, users[is_fit], cand[is_fit], va_events)
        cfg = RankingConfig(n_estimators=100, n_jobs=2)
        t = time.perf_counter()
        ranker = Ranker(cfg).fit(ts.X, ts.y, ts.group)
        fit_s = time.perf_counter() - t
        plain = Ranker(cfg).fit(ts_plain.X, ts_plain.y, ts_plain.group) if len(ts_plain.group) > 1 else None
        state["ranker"], state["builder"] = ranker, builder
        out = {"context_s": round(ctx_s, 1), "candidates_s": round(cand_s, 1), "features_s": round(feat_s, 1),
               "ranker_fit_s": round(fit_s, 1), "sampled_users": len(users), "candidates_per_user": args.candidates,
               "users_with_valid_positive_in_retrieval_candidates": int(pos_in_cand.sum()),
               "fit_users": int(is_fit.sum()), "fit_groups": len(ts.group), "fit_rows": int(len(ts.X)),
               "heldout_users": int((~is_fit).sum()), "heldout_groups_with_positive_in_candidates": len(ev_set.group)}
        if len(ev_set.group):
            C = args.candidates
            out["heldout_ndcg@20_ranker"] = round(ndcg_at_k(ranker.predict(ev_set.X), ev_set.y, ev_set.group), 4)
            out["fit_groups_retrieval_only"] = len(ts_plain.group)
            if plain is not None:
                out["heldout_ndcg@20_ranker_fit_on_retrieval_only_groups"] = round(
                    ndcg_at_k(plain.predict(ev_set.X), ev_set.y, ev_set.group), 4)
            out["heldout_ndcg@20_retrieval_order"] = round(
                ndcg_at_k(-np.tile(np.arange(C), len(ev_set.group)).astype(float), ev_set.y, ev_set.group), 4)
        return out

    def recommend_stage() -> dict[str, Any]:
        from ranking.ranker import top_candidates

        ctx, builder, ranker = state["ctx"], state["builder"], state["ranker"]
        torch.set_num_threads(1)
        rng = np.random.default_rng(1)
        lat = []
        seen = ctx.interactions["view"] + ctx.interactions["purchase"]
        for u in rng.choice(ctx.num_users, args.requests, replace=False):
            t = time.perf_counter()
            cand, _ = top_candidates(ctx.user_vectors[[u]], ctx.item_vectors, 200, exclude=seen[[u]])
            fm = builder.build(np.array([u]), cand)
            scores = ranker.predict(fm.X)
            _ = cand[0][np.argsort(-scores)[:10]]
            lat.append(time.perf_counter() - t)
        lat_ms = np.array(lat) * 1000
        return {"requests": args.requests, "candidates": 200, "p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
                "p99_ms": round(float(np.percentile(lat_ms, 99)), 1), "torch_threads": 1}

    stages = [("generate", generate), ("ingest", ingest_stage), ("kg", kg_stage), ("neo4j", neo4j_stage),
              ("encode", encode_stage), ("images", images_stage), ("train", train_stage), ("rank", rank_stage),
              ("recommend", recommend_stage)]
    if args.no_neo4j:
        stages = [st for st in stages if st[0] != "neo4j"]
    if args.no_image_features:
        stages = [st for st in stages if st[0] != "images"]
    if args.reuse and (work / "ds" / "manifest.json").is_file():
        stages = stages[2:]
        result["notes"].append(f"generate/ingest reused from {work}")
    for name, fn in stages:
        if not stage(name, fn) and name in ("generate", "ingest", "kg", "encode", "train", "rank"):
            result["notes"].append(f"stopped after {name}: later stages depend on it")
            break
    peaks = {k: v.get("peak_rss_mib", 0) for k, v in result["stages"].items()}
    result["peak_rss_mib_overall"] = max(peaks.values()) if peaks else 0
    result["fits_24_gib"] = result["peak_rss_mib_overall"] < 24 * 1024
    save()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {result['total_s']:.0f} s, peak RSS {result['peak_rss_mib_overall']:.0f} MiB -> {args.out}")
    return result


def neighbour_accuracy(vectors: np.ndarray, labels: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, float]:
    """Leave-one-out 1-nearest-neighbour (cosine) accuracy of ``vectors`` (n, d) for each label column (rows of
    ``labels[name]`` picked by ``rows``)."""
    from encoders.base import l2_normalise

    v = l2_normalise(vectors)
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    nn_ = np.argmax(s, axis=1)
    return {f"{k}_1nn_accuracy": round(float(np.mean(y[rows][nn_] == y[rows])), 4) for k, y in labels.items()}


def taste_oracle(raw: Path, ds: Any, ids: dict[str, list[str]]) -> Callable[[Any], Any] | None:
    """A score function from the generator's *true* user tastes (``truth/user_tastes.csv``): 10 x favourite category
    + favourite brand + favourite colour + price level (tercile of price within the category), ties broken by a fixed
    random order. Not a model: it says how much of the held-out item choice is predictable at all (the generator
    picks the item uniformly inside a taste cell). None when the truth file is absent."""
    import torch

    path = raw / "truth" / "user_tastes.csv"
    if not path.is_file():
        return None
    items = ds.table("items").select(["item_id", "category", "brand", "attributes", "price"]).to_pandas()
    items = items.set_index(items["item_id"].astype(str)).reindex(ids["item"])
    colour = items["attributes"].astype(str).str.extract(r'"colou?r": ?"([^"]*)"')[0].astype(str)
    tier = items.groupby("category")["price"].transform(
        lambda s_: np.floor(3 * (s_.rank(method="first") - 1) / max(len(s_), 1))).fillna(-1).to_numpy(np.int64)
    cat_c, cat_u = pd.factorize(items["category"].astype(str))
    br_c, br_u = pd.factorize(items["brand"].astype(str))
    co_c, co_u = pd.factorize(colour)
    tastes = pd.read_csv(path).set_index("user_id").reindex(ids["user"])
    U = len(ids["user"])

    def table(column: str, names: Any) -> np.ndarray:
        pos = {n: k for k, n in enumerate(names)}
        out = np.zeros((U, len(names) + 1), dtype=np.float32)
        for u, v in enumerate(tastes[column].fillna("").astype(str)):
            for n in v.split("|"):
                if n in pos:
                    out[u, pos[n]] = 1.0
        return out

    cat_ok, br_ok, co_ok = table("categories", cat_u), table("brands", br_u), table("colours", co_u)
    level = tastes["price_level"].map({"budget": 0, "mid": 1, "premium": 2}).fillna(-9).to_numpy(np.int64)
    tie = np.random.default_rng(0).random(len(ids["item"])).astype(np.float32) * 1e-3

    def score(users: Any) -> Any:
        u = np.asarray(users.cpu() if hasattr(users, "cpu") else users, dtype=np.int64)
        s_ = 10 * cat_ok[u][:, cat_c] + br_ok[u][:, br_c] + co_ok[u][:, co_c] + (tier[None, :] == level[u, None]) + tie
        return torch.as_tensor(s_.astype(np.float32))

    return score


def percentile_rank(score_fn: Callable[[Any], Any], heldout: Any, exclude: Any, batch_size: int = 128) -> float:
    """Mean percentile rank of held-out items among the items not excluded (0 = ranked first, 0.5 = random;
    Hu, Koren & Volinsky 2008): a full-ranking measure that still separates models when top-20 hits are rare."""
    import torch

    users = np.flatnonzero(np.diff(heldout.indptr) > 0)
    ranks = []
    for s_ in range(0, len(users), batch_size):
        u = users[s_:s_ + batch_size]
        scores = score_fn(torch.as_tensor(u)).float().cpu().numpy().copy()
        ex = exclude[u].tocoo()
        scores[ex.row, ex.col] = -np.inf
        valid_n = scores.shape[1] - np.asarray(exclude[u].sum(1)).ravel()
        h = heldout[u].tocoo()
        for r in np.unique(h.row):
            cols = h.col[h.row == r]
            better = (scores[r][None, :] > scores[r, cols][:, None]).sum(1)
            ranks.extend(better / max(valid_n[r] - 1, 1))
    return float(np.mean(ranks)) if ranks else float("nan")


def _csr_rows(df: pd.DataFrame, U: int, I: int) -> Any:
    from fusion.metrics import to_csr

    return to_csr(df["u"].to_numpy(), df["i"].to_numpy(), (U, I))


def _sample_rows(m: Any, n: int, seed: int) -> np.ndarray:
    have = np.flatnonzero(np.diff(m.indptr) > 0)
    return np.sort(np.random.default_rng(seed).choice(have, min(n, len(have)), replace=False))


def _rows_only(m: Any, rows: np.ndarray) -> Any:
    import scipy.sparse as sp

    keep = np.zeros(m.shape[0], dtype=np.float32)
    keep[rows] = 1.0
    return sp.csr_matrix(sp.diags(keep) @ m)


def _positives_in(cand: np.ndarray, users: np.ndarray, held: pd.DataFrame, I: int) -> np.ndarray:
    """(n,) bool: whether each user's candidate row holds one of its held-out items."""
    keys = np.unique(held["u"].to_numpy(np.int64) * I + held["i"].to_numpy(np.int64))
    return np.isin(users[:, None] * I + cand, keys).any(axis=1)


def _inject_positives(cand: np.ndarray, users: np.ndarray, held: pd.DataFrame, I: int) -> np.ndarray:
    """Copy of ``cand`` (n, C) where each user's held-out items missing from its row replace the lowest-ranked
    candidates (at most C // 2 of them)."""
    out = cand.copy()
    C = cand.shape[1]
    h = held[held["u"].isin(users)]
    by_user = h.groupby("u")["i"].apply(lambda s: s.to_numpy()).to_dict()
    for r, u in enumerate(users):
        pos = by_user.get(int(u))
        if pos is None:
            continue
        missing = np.setdiff1d(pos, out[r])[: C // 2]
        if len(missing):
            out[r, C - len(missing):] = missing
    return out


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


if __name__ == "__main__":
    main()
