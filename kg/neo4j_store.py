"""``GraphStore`` on a real Neo4j 5 server through the official Python driver.

Writes are batched ``UNWIND $rows AS row MERGE ...`` in ``execute_write`` transactions (the driver retries
transient errors); every batch is idempotent, so a load interrupted by a crash is finished by loading again.
Labels and relationship types are interpolated only after ``check_label`` / ``check_rel_type`` (whitelists from
``kg.schema``); every value is a query parameter.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from tqdm.auto import tqdm

from kg.enrichment import ENRICHMENT_RELS, plan_enrichment
from kg.export import build_hetero_data, edge_weight_of, pyg_edge_type
from kg.loading import DATA_SOURCE, build_graph_rows
from kg.paths import Hop, bfs_subgraph, find_paths
from kg.schema import EDGE_TYPES, NODE_LABELS, check_label, check_rel_type
from kg.store import NodeRef, Path
from kgrec.errors import ConfigError, GraphStoreError, Neo4jUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from neo4j import Driver, ManagedTransaction
    from torch_geometric.data import HeteroData

    from kgrec.config import KGConfig
    from kgrec.data.schema import Dataset

logger = logging.getLogger(__name__)


# The relationship properties the export needs (edge type split and edge_weight), per relationship type.
_EXPORT_PROPS: dict[str, tuple[str, ...]] = {
    **{rel: ("count",) for rel in ("VIEWED", "CLICKED", "CARTED", "PURCHASED", "RATED")},
    "ALSO_BOUGHT": ("weight",),
    "ENTITY_RELATION": ("relation",),
}


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class Neo4jStore:
    """Neo4j-backed ``GraphStore``.

    Args:
        uri, user, password, database: connection (``bolt://`` or ``neo4j://``/``neo4j+s://`` for Aura).
        batch_size: rows per write transaction.
        also_bought_min_count: co-purchases needed for an ``ALSO_BOUGHT`` edge at load.
        max_retry_time_s: how long the driver retries a transaction on transient errors / lost connections.
        progress: show tqdm bars on long loads and exports.
    """

    def __init__(
        self,
        uri: str,
        user: str = "neo4j",
        password: str | None = None,
        database: str = "neo4j",
        *,
        batch_size: int = 10_000,
        also_bought_min_count: int = 2,
        max_retry_time_s: float = 30.0,
        progress: bool = True,
    ) -> None:
        from neo4j import GraphDatabase
        from neo4j.exceptions import AuthError, ServiceUnavailable

        if not uri:
            raise ConfigError(
                "no Neo4j URI: set NEO4J_URI (and NEO4J_PASSWORD), or start a local server with `kgrec neo4j start`"
            )
        self.uri, self.user, self.database = uri, user, database
        self.batch_size = batch_size
        self.also_bought_min_count = also_bought_min_count
        self.progress = progress
        self.driver: Driver = GraphDatabase.driver(
            uri, auth=(user, password or ""), max_transaction_retry_time=max_retry_time_s,
            # Queries name every whitelisted type even when absent ("type does not exist" warnings are noise).
            notifications_min_severity="OFF",
        )
        try:
            self.driver.verify_connectivity()
        except AuthError as exc:
            self.driver.close()
            raise Neo4jUnavailableError(
                f"Neo4j at {uri} refused the password for user '{user}' — set NEO4J_PASSWORD"
            ) from exc
        except (ServiceUnavailable, OSError) as exc:
            self.driver.close()
            raise Neo4jUnavailableError(
                f"cannot reach Neo4j at {uri} ({exc}); start one with `kgrec neo4j start` or set NEO4J_URI"
            ) from exc
        self.ensure_schema()

    @classmethod
    def from_config(cls, cfg: KGConfig, env: dict[str, str] | None = None, **kwargs: Any) -> Neo4jStore:
        """Connect with ``NEO4J_*`` environment variables over the ``kg`` config section."""
        from kgrec.config import neo4j_settings

        s = neo4j_settings(cfg, env)
        return cls(s["uri"] or "", s["user"] or "neo4j", s["password"], s["database"] or "neo4j",
                   batch_size=cfg.batch_size, also_bought_min_count=cfg.also_bought_min_count, **kwargs)

    # ------------------------------------------------------------------ plumbing
    def _read(self, query: str, **params: Any) -> list[dict[str, Any]]:
        def work(tx: ManagedTransaction) -> list[dict[str, Any]]:
            return [r.data() for r in tx.run(query, params)]

        with self.driver.session(database=self.database) as session:
            return session.execute_read(work)

    def _write(self, query: str, **params: Any) -> list[dict[str, Any]]:
        def work(tx: ManagedTransaction) -> list[dict[str, Any]]:
            return [r.data() for r in tx.run(query, params)]

        with self.driver.session(database=self.database) as session:
            return session.execute_write(work)

    def ensure_schema(self) -> None:
        """Uniqueness constraint on ``id`` for every label, and an index for attribute-name lookups."""
        with self.driver.session(database=self.database) as session:
            for label in NODE_LABELS:
                session.run(
                    f"CREATE CONSTRAINT kgrec_{label.lower()}_id IF NOT EXISTS "
                    f"FOR (n:{check_label(label)}) REQUIRE n.id IS UNIQUE"
                ).consume()
            session.run(
                "CREATE INDEX kgrec_attributevalue_name IF NOT EXISTS FOR (n:AttributeValue) ON (n.name)"
            ).consume()
            session.run("CALL db.awaitIndexes(300)").consume()

    def clear(self) -> None:
        """Delete every node and relationship (in batches; constraints stay)."""
        with self.driver.session(database=self.database) as session:
            session.run("MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS").consume()

    def close(self) -> None:
        self.driver.close()

    def __enter__(self) -> Neo4jStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ writes
    def load(self, dataset: Dataset, *, events: pd.DataFrame | None = None) -> dict[str, int]:
        rows = build_graph_rows(dataset, events=events, also_bought_min_count=self.also_bought_min_count)
        total = sum(len(r) for _, r in rows.iter_nodes()) + sum(len(r) for _, r in rows.iter_edges())
        written: dict[str, int] = {}
        with tqdm(total=total, desc="kg load (neo4j)", unit="row", disable=not self.progress) as bar:
            for label, node_rows in rows.iter_nodes():
                written[label] = self.upsert_nodes(label, node_rows, _bar=bar)
            for rel, edge_rows in rows.iter_edges():
                written[rel] = self.upsert_edges(rel, edge_rows, _bar=bar)
        logger.info("loaded %s into Neo4j %s: %s", dataset.root, self.uri, written)
        return written

    def upsert_nodes(self, label: str, rows: Iterable[dict[str, Any]], *, _bar: Any = None) -> int:
        check_label(label)
        query = f"UNWIND $rows AS row MERGE (n:{label} {{id: row.id}}) SET n += row.props"
        n = 0
        for batch in _batches(rows, self.batch_size):
            payload = [{"id": str(r["id"]), "props": {k: v for k, v in r.items() if k != "id"}} for r in batch]
            self._write(query, rows=payload)
            n += len(batch)
            if _bar is not None:
                _bar.update(len(batch))
        return n

    def upsert_edges(self, rel_type: str, rows: Iterable[dict[str, Any]], *, _bar: Any = None) -> int:
        """MERGE relationships (and bare endpoint nodes if missing); ``ENTITY_RELATION`` rows need ``relation``."""
        et = EDGE_TYPES[check_rel_type(rel_type)]
        src, dst = check_label(et.src), check_label(et.dst)
        ident = " {relation: row.relation}" if rel_type == "ENTITY_RELATION" else ""
        query = (
            f"UNWIND $rows AS row MERGE (a:{src} {{id: row.src}}) MERGE (b:{dst} {{id: row.dst}}) "
            f"MERGE (a)-[r:{rel_type}{ident}]->(b) SET r += row.props"
        )
        n = 0
        for batch in _batches(rows, self.batch_size):
            payload = []
            for r in batch:
                props = {k: v for k, v in r.items() if k not in ("src", "dst")}
                item = {"src": str(r["src"]), "dst": str(r["dst"]), "props": props}
                if rel_type == "ENTITY_RELATION":
                    if props.get("relation") is None:
                        raise GraphStoreError("ENTITY_RELATION rows need a 'relation' value")
                    item["relation"] = str(props["relation"])
                payload.append(item)
            self._write(query, rows=payload)
            n += len(batch)
            if _bar is not None:
                _bar.update(len(batch))
        return n

    def upsert_edges_per_row(self, rel_type: str, rows: Iterable[dict[str, Any]]) -> int:
        """One transaction per relationship: the slow baseline the benchmark compares batching against."""
        et = EDGE_TYPES[check_rel_type(rel_type)]
        # the same identity as upsert_edges: triples between two entities are one relationship per relation
        ident = " {relation: $relation}" if rel_type == "ENTITY_RELATION" else ""
        query = (
            f"MERGE (a:{check_label(et.src)} {{id: $src}}) MERGE (b:{check_label(et.dst)} {{id: $dst}}) "
            f"MERGE (a)-[r:{rel_type}{ident}]->(b) SET r += $props"
        )
        n = 0
        for r in rows:
            props = {k: v for k, v in r.items() if k not in ("src", "dst")}
            params: dict[str, Any] = {"src": str(r["src"]), "dst": str(r["dst"]), "props": props}
            if rel_type == "ENTITY_RELATION":
                if props.get("relation") is None:
                    raise GraphStoreError("ENTITY_RELATION rows need a 'relation' value")
                params["relation"] = str(props["relation"])
            self._write(query, **params)
            n += 1
        return n

    def write_enrichment(self, records: Iterable[dict[str, Any]], provenance: dict[str, Any]) -> dict[str, int]:
        plan = plan_enrichment(records, provenance)
        # Row by row inside one transaction (CALL per row) so a record sees the ones before it, as in the
        # embedded store; a data-sourced value for the same attribute name blocks the inferred one.
        attr_query = (
            "UNWIND $rows AS row CALL (row) { "
            "MATCH (i:Item {id: row.item_id}) "
            "WHERE NOT EXISTS { MATCH (i)-[d:HAS_ATTRIBUTE]->(x:AttributeValue) "
            "  WHERE (x.name = row.name AND d.source = $data) OR x.id = row.av_id } "
            "MERGE (a:AttributeValue {id: row.av_id}) ON CREATE SET a.name = row.name, a.value = row.value "
            "CREATE (i)-[r:HAS_ATTRIBUTE]->(a) SET r += row.props "
            "RETURN count(r) AS c } RETURN sum(c) AS written"
        )
        written_attr = written_rel = 0
        for batch in _batches(plan.attributes, self.batch_size):
            written_attr += self._write(attr_query, rows=batch, data=DATA_SOURCE)[0]["written"] or 0
        for rel, rows in plan.relations.items():
            if rel not in ENRICHMENT_RELS:
                raise GraphStoreError(f"{rel!r} is not an enrichment relationship type")
            rel_query = (
                "UNWIND $rows AS row CALL (row) { "
                "MATCH (a:Item {id: row.src}), (b:Item {id: row.dst}) "
                f"WHERE NOT EXISTS {{ MATCH (a)-[:{check_rel_type(rel)}]->(b) }} "
                f"CREATE (a)-[r:{rel}]->(b) SET r += row.props RETURN count(r) AS c }} "
                "RETURN sum(c) AS written"
            )
            for batch in _batches(rows, self.batch_size):
                written_rel += self._write(rel_query, rows=batch)[0]["written"] or 0
        written = written_attr + written_rel
        return {"written": written, "skipped": plan.total - written, "attributes": written_attr,
                "relations": written_rel}

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for label in NODE_LABELS:
            out[label] = self._read(f"MATCH (n:{check_label(label)}) RETURN count(n) AS c")[0]["c"]
        for rel in EDGE_TYPES:
            out[rel] = self._read(f"MATCH ()-[r:{check_rel_type(rel)}]->() RETURN count(r) AS c")[0]["c"]
        return out

    def node(self, node: NodeRef) -> dict[str, Any] | None:
        label = check_label(node[0])
        rows = self._read(f"MATCH (n:{label} {{id: $id}}) RETURN properties(n) AS p", id=node[1])
        return rows[0]["p"] if rows else None

    def _node_props(self, nodes: list[NodeRef]) -> dict[NodeRef, dict[str, Any]]:
        out: dict[NodeRef, dict[str, Any]] = {}
        by_label: dict[str, list[str]] = {}
        for label, nid in nodes:
            by_label.setdefault(check_label(label), []).append(nid)
        for label, ids in by_label.items():
            for r in self._read(f"UNWIND $ids AS id MATCH (n:{label} {{id: id}}) RETURN id, properties(n) AS p",
                                ids=ids):
                out[(label, r["id"])] = r["p"]
        return out

    def _hops(self, nodes: list[NodeRef], types: list[str] | None, direction: str) -> dict[NodeRef, list[Hop]]:
        pattern = {"out": "-[r]->", "in": "<-[r]-", "both": "-[r]-"}[direction]
        rels = list(EDGE_TYPES) if types is None else types
        out: dict[NodeRef, list[Hop]] = {n: [] for n in nodes}
        by_label: dict[str, list[str]] = {}
        for label, nid in nodes:
            by_label.setdefault(check_label(label), []).append(nid)
        for label, ids in by_label.items():
            query = (
                f"UNWIND $ids AS id MATCH (n:{label} {{id: id}}){pattern}(m) WHERE type(r) IN $rels "
                "RETURN id, type(r) AS rel, startNode(r) = n AS fwd, labels(m) AS ml, m.id AS mid, "
                "properties(r) AS p"
            )
            for r in self._read(query, ids=ids, rels=rels):
                mlabel = next((lbl for lbl in r["ml"] if lbl in NODE_LABELS), None)
                if mlabel is None or r["mid"] is None:
                    continue
                out[(label, r["id"])].append(Hop(r["rel"], bool(r["fwd"]), (mlabel, r["mid"]), r["p"]))
        return out

    def expand(self, nodes: list[NodeRef]) -> dict[NodeRef, list[Hop]]:
        """Every relationship touching each node: one query per label (the ``kg.paths`` adjacency callback)."""
        return self._hops(nodes, None, "both")

    def neighbours(self, node: NodeRef, types: Iterable[str] | None = None, *, direction: str = "both") -> list[NodeRef]:
        check_label(node[0])
        if direction not in ("out", "in", "both"):
            raise GraphStoreError(f"direction must be 'out', 'in' or 'both', not {direction!r}")
        wanted = None if types is None else [check_rel_type(t) for t in types]
        return sorted({h.other for h in self._hops([node], wanted, direction)[node]})

    def paths(self, src: NodeRef, dst: NodeRef, max_hops: int = 3, limit: int = 10) -> list[Path]:
        check_label(src[0])
        check_label(dst[0])
        return find_paths(self.expand, src, dst, max_hops=max_hops, limit=limit)

    def subgraph(self, user: str, hops: int = 2) -> dict[str, Any]:
        return bfs_subgraph(self.expand, self._node_props, ("User", str(user)), hops)

    def to_hetero_data(self) -> tuple[HeteroData, dict[str, list[str]]]:
        """Stream nodes (keyset pages on the ``id`` index) and relationships (per page of source ids)."""
        node_ids: dict[str, list[str]] = {}
        for label in NODE_LABELS:
            ids: list[str] = []
            after = None
            while True:
                # Keyset pages in index order (a plain range predicate, so the uniqueness index serves the sort).
                where = "" if after is None else "WHERE n.id > $after "
                page = self._read(
                    f"MATCH (n:{label}) {where}RETURN n.id AS id ORDER BY n.id LIMIT $limit",
                    after=after, limit=self.batch_size,
                )
                ids.extend(r["id"] for r in page)
                if len(page) < self.batch_size:
                    break
                after = page[-1]["id"]
            node_ids[label] = ids
        counts = self.counts()
        edges: list[tuple[tuple[str, str, str], str, str, float]] = []
        total = sum(counts[r] for r in EDGE_TYPES)
        with tqdm(total=total, desc="export (neo4j)", unit="rel", disable=not self.progress) as bar:
            for rel, et in EDGE_TYPES.items():
                if counts[rel] == 0:
                    continue
                src_ids = node_ids[et.src]
                per_node = max(1, counts[rel] // max(1, len(src_ids)))
                step = max(1, self.batch_size // per_node)
                wanted = _EXPORT_PROPS.get(rel, ("confidence",))
                query = (
                    f"UNWIND $ids AS sid MATCH (a:{et.src} {{id: sid}})-[r:{rel}]->(b:{et.dst}) "
                    "RETURN sid, b.id AS did" + "".join(f", r.{k} AS {k}" for k in wanted)
                )
                for start in range(0, len(src_ids), step):
                    for r in self._read(query, ids=src_ids[start:start + step]):
                        props = {k: r[k] for k in wanted if r[k] is not None}
                        edges.append((pyg_edge_type(rel, props), r["sid"], r["did"], edge_weight_of(rel, props)))
                        bar.update(1)
        return build_hetero_data(node_ids, edges)

    def __repr__(self) -> str:
        return f"Neo4jStore(uri={self.uri!r}, database={self.database!r})"
