"""The product/user knowledge graph: one ``GraphStore`` protocol, a Neo4j and an embedded implementation,
typed path queries and export to PyG ``HeteroData``."""
from __future__ import annotations

from kg.schema import EDGE_TYPES, NODE_LABELS
from kg.store import GraphStore, Path, PathStep

__all__ = ["EDGE_TYPES", "NODE_LABELS", "GraphStore", "Path", "PathStep"]
