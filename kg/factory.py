"""Pick and open the configured ``GraphStore`` (embedded by default, Neo4j when ``kg.backend: neo4j``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kg.store import GraphStore
    from kgrec.config import KGConfig


def open_store(cfg: KGConfig, path: str | Path | None = None, *, env: dict[str, str] | None = None,
               **kwargs: Any) -> GraphStore:
    """The embedded store saved at ``path`` (empty when absent), or a ``Neo4jStore`` from ``NEO4J_*``/config.

    ``path`` is ignored for Neo4j (the graph lives in the server); ``kwargs`` go to the store's constructor.
    """
    if cfg.backend == "neo4j":
        from kg.neo4j_store import Neo4jStore

        return Neo4jStore.from_config(cfg, env, **kwargs)
    from kg.embedded_store import EmbeddedStore

    return EmbeddedStore.from_config(cfg, path)
