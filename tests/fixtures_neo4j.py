"""The real Neo4j server fixture (owned by kg/)."""
from __future__ import annotations
