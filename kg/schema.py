"""Node labels and relationship types of the knowledge graph, and their names in PyG ``HeteroData``.

Labels and relationship types can never be Cypher parameters, so every one used in a query must come from the
whitelists here (``check_label`` / ``check_rel_type``). Values are always parameters.

Node keys (property ``id`` on every node, unique per label):
  User.id = user_id, Item.id = item_id, Brand.id = brand name, Category.id = full path ("Shoes>Running"),
  AttributeValue.id = "name=value" (with ``name`` and ``value`` properties), Entity.id = external entity id.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kgrec.errors import GraphStoreError

# label -> HeteroData node type
NODE_LABELS: dict[str, str] = {
    "User": "user",
    "Item": "item",
    "Brand": "brand",
    "Category": "category",
    "AttributeValue": "attribute",
    "Entity": "entity",
}
NODE_TYPES: dict[str, str] = {v: k for k, v in NODE_LABELS.items()}


@dataclass(frozen=True)
class EdgeType:
    rel: str  # Neo4j relationship type
    src: str  # source label
    dst: str  # target label

    @property
    def pyg(self) -> tuple[str, str, str]:
        """(src node type, relation name, dst node type) as used in HeteroData."""
        return (NODE_LABELS[self.src], self.rel.lower(), NODE_LABELS[self.dst])


# Interaction relationships carry: count (int), first_ts / last_ts (ISO-8601 UTC strings), value (last rating).
INTERACTION_RELS: dict[str, str] = {  # event type -> relationship type
    "view": "VIEWED",
    "click": "CLICKED",
    "cart": "CARTED",
    "purchase": "PURCHASED",
    "rating": "RATED",
}

EDGE_TYPES: dict[str, EdgeType] = {
    **{rel: EdgeType(rel, "User", "Item") for rel in INTERACTION_RELS.values()},
    "IN_CATEGORY": EdgeType("IN_CATEGORY", "Item", "Category"),
    "SUBCATEGORY_OF": EdgeType("SUBCATEGORY_OF", "Category", "Category"),
    "MADE_BY": EdgeType("MADE_BY", "Item", "Brand"),
    "HAS_ATTRIBUTE": EdgeType("HAS_ATTRIBUTE", "Item", "AttributeValue"),
    "LINKED_TO": EdgeType("LINKED_TO", "Item", "Entity"),
    # External triples: one relationship type; the triple's relation is the ``relation`` property and becomes
    # its own HeteroData edge type ("entity", "rel_<sanitised relation>", "entity").
    "ENTITY_RELATION": EdgeType("ENTITY_RELATION", "Entity", "Entity"),
    # Derived: weight = number of users who bought both.
    "ALSO_BOUGHT": EdgeType("ALSO_BOUGHT", "Item", "Item"),
    # From enrichment, with confidence and provenance properties (run_id, model_ids, created, source="enrichment").
    "SIMILAR_TO": EdgeType("SIMILAR_TO", "Item", "Item"),
    "COMPLEMENTS": EdgeType("COMPLEMENTS", "Item", "Item"),
    "DUPLICATE_OF": EdgeType("DUPLICATE_OF", "Item", "Item"),
}

_SAFE = re.compile(r"[^A-Za-z0-9_]+")


def entity_relation_pyg_name(relation: str) -> str:
    """HeteroData relation name for an external triple relation, safe for ``to_hetero`` module keys, and one name
    per relation: where making it safe changed the text ("is a", "is-a", "Director", "作者"), 8 hex digits of its
    SHA-1 follow, so relations that read alike stay apart ("directed_by" -> ``rel_directed_by``,
    "film.directed_by" -> ``rel_film_directed_by_<hash>``)."""
    safe = _SAFE.sub("_", relation).strip("_").lower()
    if safe != relation:
        digest = hashlib.sha1(relation.encode("utf-8")).hexdigest()[:8]
        safe = f"{safe}_{digest}" if safe else digest
    return "rel_" + safe


def check_label(label: str) -> str:
    if label not in NODE_LABELS:
        raise GraphStoreError(f"unknown node label {label!r}; one of {sorted(NODE_LABELS)}")
    return label


def check_rel_type(rel: str) -> str:
    if rel not in EDGE_TYPES:
        raise GraphStoreError(f"unknown relationship type {rel!r}; one of {sorted(EDGE_TYPES)}")
    return rel
