"""The zero-setup ``GraphStore``: a networkx ``MultiDiGraph`` in memory, saved as Parquet node/edge tables.

Nodes are ``(label, id)`` tuples with their properties as node data; relationships are keyed by type (external
triples by ``ENTITY_RELATION|<relation>``, so several relations between two entities coexist), which gives the
same MERGE semantics as the Neo4j store. On disk (no pickle)::

    <dir>/nodes.parquet   label, id, props (JSON text)
    <dir>/edges.parquet   rel, src_label, src, dst_label, dst, props (JSON text)
    <dir>/meta.json       format version and counts

written to a temporary sibling and swapped in (``atomic_directory``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Any, Iterable

import networkx as nx
import pyarrow as pa
import pyarrow.parquet as pq

from kg.enrichment import ENRICHMENT_RELS, plan_enrichment
from kg.export import build_hetero_data, edge_weight_of, pyg_edge_type
from kg.loading import DATA_SOURCE, build_graph_rows
from kg.paths import Hop, find_paths
from kg.schema import EDGE_TYPES, NODE_LABELS, check_label, check_rel_type
from kg.store import NodeRef, Path
from kgrec.data.schema import atomic_directory, atomic_write_json
from kgrec.errors import GraphStoreError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from torch_geometric.data import HeteroData

    from kgrec.config import KGConfig
    from kgrec.data.schema import Dataset

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _edge_key(rel: str, props: dict[str, Any]) -> str:
    return f"{rel}|{props.get('relation', '')}" if rel == "ENTITY_RELATION" else rel


def _rel_of(key: str) -> str:
    return key.split("|", 1)[0]


def _merge_props(target: dict[str, Any], props: dict[str, Any]) -> None:
    """``SET x += props`` semantics: a None value removes the property."""
    for k, v in props.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v


class EmbeddedStore:
    """networkx-backed ``GraphStore``. ``path`` (optional) is where ``save()``/``close()`` write."""

    def __init__(self, path: str | FsPath | None = None, *, also_bought_min_count: int = 2) -> None:
        self.path = FsPath(path) if path is not None else None
        self.also_bought_min_count = also_bought_min_count
        self.graph = nx.MultiDiGraph()
        self._dirty = False

    # ------------------------------------------------------------------ persistence
    @classmethod
    def open(cls, path: str | FsPath, *, also_bought_min_count: int = 2) -> EmbeddedStore:
        """Open a saved store (an empty one bound to ``path`` when the directory does not exist yet)."""
        store = cls(path, also_bought_min_count=also_bought_min_count)
        root = FsPath(path)
        if not (root / "meta.json").is_file():
            if root.exists() and any(root.iterdir()):
                raise GraphStoreError(f"{root} exists but is not an embedded graph store (no meta.json)")
            return store
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise GraphStoreError(
                f"{root}: embedded store format {meta.get('format_version')} is not supported "
                f"(expected {FORMAT_VERSION}); rebuild it with `kgrec kg load`"
            )
        g = store.graph
        nodes = pq.read_table(root / "nodes.parquet").to_pydict()
        for label, nid, props in zip(nodes["label"], nodes["id"], nodes["props"]):
            g.add_node((label, nid), **json.loads(props))
        edges = pq.read_table(root / "edges.parquet").to_pydict()
        for rel, sl, s, dl, d, props in zip(edges["rel"], edges["src_label"], edges["src"], edges["dst_label"],
                                             edges["dst"], edges["props"]):
            p = json.loads(props)
            g.add_edge((sl, s), (dl, d), key=_edge_key(rel, p), **p)
        logger.info("opened embedded graph %s: %d nodes, %d relationships", root, g.number_of_nodes(),
                    g.number_of_edges())
        return store

    @classmethod
    def from_config(cls, cfg: KGConfig, path: str | FsPath | None = None) -> EmbeddedStore:
        if path is not None and (FsPath(path) / "meta.json").is_file():
            return cls.open(path, also_bought_min_count=cfg.also_bought_min_count)
        return cls(path, also_bought_min_count=cfg.also_bought_min_count)

    def save(self, path: str | FsPath | None = None) -> FsPath:
        """Write the graph atomically to ``path`` (or the path it was opened with)."""
        target = FsPath(path) if path is not None else self.path
        if target is None:
            raise GraphStoreError("EmbeddedStore.save() needs a path (the store was created without one)")
        if target.exists() and not (target / "meta.json").is_file() and any(target.iterdir()):
            raise GraphStoreError(
                f"refusing to replace {target}: it is not empty and not an embedded graph store; choose another path"
            )
        with atomic_directory(target) as tmp:
            g = self.graph
            node_list = sorted(g.nodes(data=True), key=lambda x: x[0])
            pq.write_table(pa.table({
                "label": [n[0] for n, _ in node_list],
                "id": [n[1] for n, _ in node_list],
                "props": [json.dumps(p, sort_keys=True, ensure_ascii=False) for _, p in node_list],
            }), tmp / "nodes.parquet", compression="zstd")
            cols: dict[str, list[str]] = {k: [] for k in ("rel", "src_label", "src", "dst_label", "dst", "props")}
            for u, v, k, p in g.edges(keys=True, data=True):
                cols["rel"].append(_rel_of(k))
                cols["src_label"].append(u[0])
                cols["src"].append(u[1])
                cols["dst_label"].append(v[0])
                cols["dst"].append(v[1])
                cols["props"].append(json.dumps(p, sort_keys=True, ensure_ascii=False))
            pq.write_table(pa.table(cols, schema=pa.schema([(c, pa.string()) for c in cols])),
                           tmp / "edges.parquet", compression="zstd")
            atomic_write_json(tmp / "meta.json", {"format_version": FORMAT_VERSION, "counts": self.counts()})
        self.path = target
        self._dirty = False
        return target

    def close(self) -> None:
        if self.path is not None and self._dirty:
            self.save()

    def __enter__(self) -> EmbeddedStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ writes
    def load(self, dataset: Dataset, *, events: pd.DataFrame | None = None) -> dict[str, int]:
        rows = build_graph_rows(dataset, events=events, also_bought_min_count=self.also_bought_min_count)
        written: dict[str, int] = {}
        for label, node_rows in rows.iter_nodes():
            written[label] = self.upsert_nodes(label, node_rows)
        for rel, edge_rows in rows.iter_edges():
            written[rel] = self.upsert_edges(rel, edge_rows)
        logger.info("loaded %s into the embedded graph: %s", dataset.root, written)
        return written

    def upsert_nodes(self, label: str, rows: Iterable[dict[str, Any]]) -> int:
        check_label(label)
        g = self.graph
        n = 0
        for row in rows:
            props = {k: v for k, v in row.items() if k != "id"}
            node = (label, str(row["id"]))
            if node in g:
                _merge_props(g.nodes[node], props)
            else:
                g.add_node(node, **{k: v for k, v in props.items() if v is not None})
            n += 1
        self._dirty = True
        return n

    def upsert_edges(self, rel_type: str, rows: Iterable[dict[str, Any]]) -> int:
        """MERGE relationships (and bare endpoint nodes if missing); ``ENTITY_RELATION`` rows need ``relation``."""
        et = EDGE_TYPES[check_rel_type(rel_type)]
        g = self.graph
        n = 0
        for row in rows:
            props = {k: v for k, v in row.items() if k not in ("src", "dst")}
            if rel_type == "ENTITY_RELATION" and props.get("relation") is None:
                raise GraphStoreError("ENTITY_RELATION rows need a 'relation' value")
            u, v = (et.src, str(row["src"])), (et.dst, str(row["dst"]))
            for node in (u, v):
                if node not in g:
                    g.add_node(node)
            key = _edge_key(rel_type, props)
            if g.has_edge(u, v, key):
                _merge_props(g.edges[u, v, key], props)
            else:
                g.add_edge(u, v, key=key, **{k: x for k, x in props.items() if x is not None})
            n += 1
        self._dirty = True
        return n

    def write_enrichment(self, records: Iterable[dict[str, Any]], provenance: dict[str, Any]) -> dict[str, int]:
        plan = plan_enrichment(records, provenance)
        g = self.graph
        written_attr = written_rel = 0
        for rec in plan.attributes:
            item = ("Item", rec["item_id"])
            if item not in g:
                continue
            blocked = False
            for _, av, key, props in g.out_edges(item, keys=True, data=True):
                if key != "HAS_ATTRIBUTE":
                    continue
                same_name = g.nodes[av].get("name") == rec["name"]
                if (same_name and props.get("source") == DATA_SOURCE) or av == ("AttributeValue", rec["av_id"]):
                    blocked = True
                    break
            if blocked:
                continue
            av = ("AttributeValue", rec["av_id"])
            if av not in g:
                g.add_node(av, name=rec["name"], value=rec["value"])
            g.add_edge(item, av, key="HAS_ATTRIBUTE", **rec["props"])
            written_attr += 1
        for rel, rows in plan.relations.items():
            assert rel in ENRICHMENT_RELS
            for rec in rows:
                a, b = ("Item", rec["src"]), ("Item", rec["dst"])
                if a not in g or b not in g or g.has_edge(a, b, rel):
                    continue
                g.add_edge(a, b, key=rel, **rec["props"])
                written_rel += 1
        self._dirty = self._dirty or bool(written_attr or written_rel)
        written = written_attr + written_rel
        return {"written": written, "skipped": plan.total - written, "attributes": written_attr,
                "relations": written_rel}

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[str, int]:
        out = {label: 0 for label in NODE_LABELS} | {rel: 0 for rel in EDGE_TYPES}
        for label, _ in self.graph.nodes:
            out[label] = out.get(label, 0) + 1
        for _, _, key in self.graph.edges(keys=True):
            rel = _rel_of(key)
            out[rel] = out.get(rel, 0) + 1
        return out

    def node(self, node: NodeRef) -> dict[str, Any] | None:
        """Properties of one node (with ``id``), or None when absent."""
        check_label(node[0])
        if node not in self.graph:
            return None
        return {"id": node[1], **self.graph.nodes[node]}

    def _node_props(self, nodes: list[NodeRef]) -> dict[NodeRef, dict[str, Any]]:
        g = self.graph
        return {n: {"id": n[1], **g.nodes[n]} for n in nodes if n in g}

    def _hops(self, node: NodeRef, types: set[str] | None, direction: str) -> list[Hop]:
        g = self.graph
        if node not in g:
            return []
        out: list[Hop] = []
        if direction in ("out", "both"):
            for _, v, k, p in g.out_edges(node, keys=True, data=True):
                rel = _rel_of(k)
                if types is None or rel in types:
                    out.append(Hop(rel, True, v, p))
        if direction in ("in", "both"):
            for u, _, k, p in g.in_edges(node, keys=True, data=True):
                rel = _rel_of(k)
                if types is None or rel in types:
                    out.append(Hop(rel, False, u, p))
        return out

    def expand(self, nodes: list[NodeRef]) -> dict[NodeRef, list[Hop]]:
        """Every relationship touching each node (the ``kg.paths`` adjacency callback)."""
        return {n: self._hops(n, None, "both") for n in nodes}

    def neighbours(self, node: NodeRef, types: Iterable[str] | None = None, *, direction: str = "both") -> list[NodeRef]:
        check_label(node[0])
        if direction not in ("out", "in", "both"):
            raise GraphStoreError(f"direction must be 'out', 'in' or 'both', not {direction!r}")
        wanted = None if types is None else {check_rel_type(t) for t in types}
        return sorted({h.other for h in self._hops(node, wanted, direction)})

    def paths(self, src: NodeRef, dst: NodeRef, max_hops: int = 3, limit: int = 10) -> list[Path]:
        check_label(src[0])
        check_label(dst[0])
        return find_paths(self.expand, src, dst, max_hops=max_hops, limit=limit)

    def subgraph(self, user: str, hops: int = 2) -> dict[str, Any]:
        from kg.paths import bfs_subgraph

        return bfs_subgraph(self.expand, self._node_props,
                            ("User", str(user)), hops)

    def to_hetero_data(self) -> tuple[HeteroData, dict[str, list[str]]]:
        node_ids: dict[str, list[str]] = {}
        for label, nid in self.graph.nodes:
            node_ids.setdefault(label, []).append(nid)
        edges = (
            (pyg_edge_type(_rel_of(k), p), u[1], v[1], edge_weight_of(_rel_of(k), p))
            for u, v, k, p in self.graph.edges(keys=True, data=True)
        )
        return build_hetero_data(node_ids, edges)

    def __repr__(self) -> str:
        return f"EmbeddedStore(path={str(self.path) if self.path else None!r}, nodes={self.graph.number_of_nodes()}, " \
               f"relationships={self.graph.number_of_edges()})"
