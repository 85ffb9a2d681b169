"""Typed paths between two nodes, the same algorithm for every store.

A store only supplies ``expand(nodes) -> {node: [Hop, ...]}`` (all relationships touching each node, both
directions); :func:`find_paths` does a bidirectional search: half-paths of ``ceil(L/2)`` hops from the source and
``floor(L/2)`` hops from the target, joined on their meeting node, for every length ``L <= max_hops``. For
``max_hops = 3`` that is two expansions from the source and one from the target, so a Neo4j store needs three
batched queries, however many paths there are.

Order (deterministic, identical across stores): length, then relationship types, then node (label, id)s, then the
``relation`` property of external triples, then direction flags.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from kg.store import NodeRef, Path, PathStep


@dataclass(frozen=True)
class Hop:
    """One relationship seen from a node: ``rel`` to ``other``; ``forward`` when stored as node -> other."""

    rel: str
    forward: bool
    other: NodeRef
    properties: dict[str, Any]


Expand = Callable[[list[NodeRef]], dict[NodeRef, list[Hop]]]
# A half path: (nodes visited in order, hops taken).
_Half = tuple[tuple[NodeRef, ...], tuple[Hop, ...]]


def _half_paths(start: NodeRef, depth: int, expand: Expand, avoid: NodeRef) -> dict[int, list[_Half]]:
    """Simple walks of exactly 0..depth hops from ``start`` that do not pass through ``avoid`` before their end."""
    by_len: dict[int, list[_Half]] = {0: [((start,), ())]}
    frontier = by_len[0]
    for d in range(1, depth + 1):
        to_expand = sorted({nodes[-1] for nodes, _ in frontier if nodes[-1] != avoid})
        if not to_expand:
            break
        adj = expand(to_expand)
        nxt: list[_Half] = []
        for nodes, hops in frontier:
            end = nodes[-1]
            if end == avoid:
                continue
            for hop in adj.get(end, ()):
                if hop.other in nodes:
                    continue
                nxt.append((nodes + (hop.other,), hops + (hop,)))
        by_len[d] = nxt
        frontier = nxt
    return by_len


def path_sort_key(p: Path) -> tuple:
    return (
        p.length,
        p.rel_types,
        tuple(p.nodes()),
        tuple(str(s.properties.get("relation", "")) for s in p.steps),
        tuple(not s.forward for s in p.steps),
    )


def find_paths(expand: Expand, src: NodeRef, dst: NodeRef, max_hops: int = 3, limit: int = 10) -> list[Path]:
    """Simple undirected paths from ``src`` to ``dst`` with at most ``max_hops`` relationships, best ``limit``."""
    if max_hops < 1 or limit < 1 or src == dst:
        return []
    fwd = _half_paths(src, (max_hops + 1) // 2, expand, avoid=dst)
    bwd = _half_paths(dst, max_hops // 2, expand, avoid=src)
    found: list[Path] = []
    for length in range(1, max_hops + 1):
        a, b = (length + 1) // 2, length // 2
        backs: dict[NodeRef, list[_Half]] = {}
        for half in bwd.get(b, []):
            backs.setdefault(half[0][-1], []).append(half)
        this_len: list[Path] = []
        for f_nodes, f_hops in fwd.get(a, []):
            meet = f_nodes[-1]
            for b_nodes, b_hops in backs.get(meet, ()):
                if set(f_nodes[:-1]) & set(b_nodes):
                    continue
                this_len.append(_to_path(f_nodes, f_hops, b_nodes, b_hops))
        this_len.sort(key=path_sort_key)
        found.extend(this_len)
        if len(found) >= limit:
            break
    return found[:limit]


def _to_path(f_nodes: tuple[NodeRef, ...], f_hops: tuple[Hop, ...],
             b_nodes: tuple[NodeRef, ...], b_hops: tuple[Hop, ...]) -> Path:
    steps = [
        PathStep(u[0], u[1], h.rel, v[0], v[1], h.forward, dict(h.properties))
        for u, v, h in zip(f_nodes, f_nodes[1:], f_hops)
    ]
    # The target-side half was walked from dst towards the meeting node: reverse it.
    for i in range(len(b_hops) - 1, -1, -1):
        u, v, h = b_nodes[i + 1], b_nodes[i], b_hops[i]
        steps.append(PathStep(u[0], u[1], h.rel, v[0], v[1], not h.forward, dict(h.properties)))
    return Path(tuple(steps))


def describe(path: Path, names: dict[NodeRef, str] | None = None) -> str:
    """Human-readable path: ``Item 'X' -[MADE_BY]-> Brand 'Acme' <-[MADE_BY]- Item 'Y'``."""
    names = names or {}
    nodes = path.nodes()
    if not nodes:
        return ""

    def fmt(n: NodeRef) -> str:
        return f"{n[0]} {names.get(n, n[1])!r}"

    out = [fmt(nodes[0])]
    for step, node in zip(path.steps, nodes[1:]):
        out.append(f"-[{step.rel}]->" if step.forward else f"<-[{step.rel}]-")
        out.append(fmt(node))
    return " ".join(out)


def group_by_label(nodes: Iterable[NodeRef]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for label, node_id in nodes:
        out.setdefault(label, []).append(node_id)
    return out


def bfs_subgraph(
    expand: Expand,
    node_props: Callable[[list[NodeRef]], dict[NodeRef, dict[str, Any]]],
    start: NodeRef,
    hops: int,
) -> dict[str, Any]:
    """Nodes within ``hops`` of ``start`` (ignoring direction) and the relationships walked to reach them.

    Returns ``{"nodes": [{"label", "id", "distance", **props}], "edges": [{"type", "src": [label, id],
    "dst": [label, id], **props}]}``, both sorted; empty when ``start`` is not in the graph.
    """
    first = expand([start]).get(start)
    if first is None or (not first and not node_props([start]).get(start)):
        return {"nodes": [], "edges": []}
    distance: dict[NodeRef, int] = {start: 0}
    edges: dict[tuple, dict[str, Any]] = {}
    frontier = [start]
    adj = {start: first}
    for d in range(1, hops + 1):
        if d > 1:
            adj = expand(frontier)
        nxt: set[NodeRef] = set()
        for node in frontier:
            for hop in adj.get(node, ()):
                src, dst = (node, hop.other) if hop.forward else (hop.other, node)
                key = (hop.rel, src, dst, str(hop.properties.get("relation", "")))
                edges[key] = {"type": hop.rel, "src": list(src), "dst": list(dst), **hop.properties}
                if hop.other not in distance:
                    distance[hop.other] = d
                    nxt.add(hop.other)
        frontier = sorted(nxt)
        if not frontier:
            break
    props = node_props(sorted(distance))
    nodes = [
        {"label": n[0], "id": n[1], "distance": distance[n], **{k: v for k, v in props.get(n, {}).items() if k != "id"}}
        for n in sorted(distance)
    ]
    return {"nodes": nodes, "edges": [edges[k] for k in sorted(edges)]}
