"""The ``GraphStore`` protocol: what every graph backend (Neo4j, embedded) offers the rest of the system."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from torch_geometric.data import HeteroData

    from kgrec.data.schema import Dataset


@dataclass(frozen=True)
class PathStep:
    """One hop: ``(src label, src id) -[rel]-> (dst label, dst id)``; ``forward`` is False when walked backwards."""

    src_label: str
    src_id: str
    rel: str
    dst_label: str
    dst_id: str
    forward: bool = True
    properties: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Path:
    """A typed path between two nodes, as a list of steps (``steps[0].src`` is the start)."""

    steps: tuple[PathStep, ...]

    @property
    def length(self) -> int:
        return len(self.steps)

    @property
    def rel_types(self) -> tuple[str, ...]:
        return tuple(s.rel for s in self.steps)

    def nodes(self) -> list[tuple[str, str]]:
        if not self.steps:
            return []
        out = [(self.steps[0].src_label, self.steps[0].src_id)]
        out += [(s.dst_label, s.dst_id) for s in self.steps]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [{"label": lbl, "id": i} for lbl, i in self.nodes()],
            "rels": [{"type": s.rel, "forward": s.forward} for s in self.steps],
        }


NodeRef = tuple[str, str]  # (label, id)


@runtime_checkable
class GraphStore(Protocol):
    """A product/user knowledge graph. All ids are strings; labels and relationship types come from kg.schema."""

    def load(self, dataset: Dataset, *, events: Any | None = None) -> dict[str, int]:
        """Load a whole dataset idempotently (loading twice changes nothing). ``events`` optionally replaces the
        dataset's events (e.g. only the train split). Returns counts written per label / relationship type."""

    def upsert_nodes(self, label: str, rows: Iterable[dict[str, Any]]) -> int:
        """MERGE nodes by ``id``; other keys become properties. Returns rows processed."""

    def upsert_edges(self, rel_type: str, rows: Iterable[dict[str, Any]]) -> int:
        """MERGE relationships; each row has ``src``, ``dst`` (node ids) and optional properties."""

    def counts(self) -> dict[str, int]:
        """Number of nodes per label and relationships per type (keys are labels and rel types)."""

    def neighbours(self, node: NodeRef, types: Iterable[str] | None = None, *, direction: str = "both") -> list[NodeRef]:
        """Nodes one hop from ``node`` through the given relationship types (all when None), sorted."""

    def expand(self, nodes: list[NodeRef]) -> dict[NodeRef, list[Any]]:
        """Every relationship touching each node, both directions, as ``kg.paths.Hop`` (rel, forward, other,
        properties): the adjacency read behind ``paths``/``subgraph`` (one batched query per label on Neo4j)."""

    def paths(self, src: NodeRef, dst: NodeRef, max_hops: int = 3, limit: int = 10) -> list[Path]:
        """Simple paths (no repeated node) from src to dst, ignoring direction, shortest first, then by
        relationship types and ids (deterministic, identical across backends)."""

    def subgraph(self, user: str, hops: int = 2) -> dict[str, Any]:
        """Nodes and relationships within ``hops`` of a user: ``{"nodes": [...], "edges": [...]}``."""

    def to_hetero_data(self) -> tuple[HeteroData, dict[str, list[str]]]:
        """Export to PyG: node types/edge types from kg.schema, node indices ordered by sorted id, and the id maps
        (node type -> list of ids, position = index). ``edge_weight`` holds counts/weights where defined."""

    def write_enrichment(self, records: Iterable[dict[str, Any]], provenance: dict[str, Any]) -> dict[str, int]:
        """Write inferred attributes / relations with confidence and provenance; never overwrite source values."""

    def close(self) -> None:
        """Release connections / flush to disk."""
