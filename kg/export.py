"""Build a PyG ``HeteroData`` from a store's nodes and relationships (shared by every store).

Conventions (the fusion and ranking stages rely on them):
  * node types are ``NODE_LABELS`` values; every node type is present with ``num_nodes`` (0 when empty);
  * node index = position of the id in the sorted list of that type's ids; ``id_maps[node_type]`` is that list;
  * edge types are ``EdgeType.pyg``; external triples become one edge type per relation
    (``entity_relation_pyg_name``); only edge types with at least one edge are present;
  * ``edge_index`` is ``(2, E)`` int64 sorted by (src, dst); ``edge_weight`` is ``(E,)`` float32: ``count`` for
    interactions, ``weight`` for ``ALSO_BOUGHT``, ``confidence`` where present (enrichment), else 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from kg.schema import EDGE_TYPES, NODE_LABELS, INTERACTION_RELS, entity_relation_pyg_name

if TYPE_CHECKING:  # pragma: no cover
    from torch_geometric.data import HeteroData

_INTERACTIONS = set(INTERACTION_RELS.values())


def edge_weight_of(rel: str, props: dict[str, Any]) -> float:
    """The ``edge_weight`` of one relationship in the export."""
    if rel in _INTERACTIONS:
        return float(props.get("count", 1))
    if rel == "ALSO_BOUGHT":
        return float(props.get("weight", 1))
    if "confidence" in props and props["confidence"] is not None:
        return float(props["confidence"])
    return 1.0


def pyg_edge_type(rel: str, props: dict[str, Any]) -> tuple[str, str, str]:
    et = EDGE_TYPES[rel]
    if rel == "ENTITY_RELATION":
        return (NODE_LABELS[et.src], entity_relation_pyg_name(str(props.get("relation", ""))), NODE_LABELS[et.dst])
    return et.pyg


def build_hetero_data(
    node_ids: dict[str, Iterable[str]],
    edges: Iterable[tuple[tuple[str, str, str], str, str, float]],
) -> tuple[HeteroData, dict[str, list[str]]]:
    """Assemble the export.

    Args:
        node_ids: label -> ids (any order; duplicates ignored).
        edges: ``(pyg edge type, src id, dst id, weight)`` in any order; ids must be in ``node_ids``.
    Returns:
        ``(data, id_maps)`` with ``id_maps[node_type]`` = sorted ids (position = node index).
    """
    import torch
    from torch_geometric.data import HeteroData

    id_maps: dict[str, list[str]] = {}
    index: dict[str, dict[str, int]] = {}
    for label, ntype in NODE_LABELS.items():
        ids = sorted(set(node_ids.get(label, ())))
        id_maps[ntype] = ids
        index[ntype] = {i: k for k, i in enumerate(ids)}

    buckets: dict[tuple[str, str, str], tuple[list[int], list[int], list[float]]] = {}
    for etype, s, d, w in edges:
        src_t, _, dst_t = etype
        b = buckets.setdefault(etype, ([], [], []))
        try:
            b[0].append(index[src_t][s])
            b[1].append(index[dst_t][d])
        except KeyError as exc:
            from kgrec.errors import GraphStoreError

            raise GraphStoreError(f"edge {etype} {s!r} -> {d!r} points to a node that is not in the store") from exc
        b[2].append(w)

    data = HeteroData()
    for ntype, ids in id_maps.items():
        data[ntype].num_nodes = len(ids)
    for etype in sorted(buckets):
        src, dst, w = (np.asarray(x) for x in buckets[etype])
        order = np.lexsort((dst, src))
        data[etype].edge_index = torch.from_numpy(np.stack([src[order], dst[order]]).astype(np.int64))
        data[etype].edge_weight = torch.from_numpy(w[order].astype(np.float32))
    return data, id_maps


def hetero_equal(a: HeteroData, b: HeteroData) -> bool:
    """Same node counts, same edge types, identical edge_index and edge_weight (edge for edge)."""
    import torch

    if sorted(a.node_types) != sorted(b.node_types) or sorted(a.edge_types) != sorted(b.edge_types):
        return False
    if any(a[t].num_nodes != b[t].num_nodes for t in a.node_types):
        return False
    return all(
        torch.equal(a[t].edge_index, b[t].edge_index) and torch.equal(a[t].edge_weight, b[t].edge_weight)
        for t in a.edge_types
    )
