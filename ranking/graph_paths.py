"""KG paths from one user to several items, reading the store's adjacency once per user.

``GraphStore.paths(src, dst)`` searches from both ends for every pair, so explaining ten items re-walks the user's
two-hop neighbourhood ten times (measured: up to 0.8 s per user at 100,000 items, mostly re-expanding popular items
with thousands of buyers). :func:`paths_to_items` walks that neighbourhood once and joins it with one hop from each
item. The result is the same list ``store.paths(src, dst, max_hops, limit)`` returns for each item (same simple
paths, same order: ``kg.paths.path_sort_key``), which the tests check on both stores.

It needs the store's ``expand(nodes) -> {node: [Hop, ...]}`` adjacency read (both ``EmbeddedStore`` and
``Neo4jStore`` have it: two batched queries for the user side, one per item); a store without it falls back to
``store.paths`` per item.
"""
from __future__ import annotations

import gc
import logging
from typing import Any

from kg.paths import Hop, path_sort_key
from kg.store import NodeRef, Path, PathStep

logger = logging.getLogger(__name__)


def _step(a: NodeRef, b: NodeRef, hop: Hop, forward: bool) -> PathStep:
    return PathStep(a[0], a[1], hop.rel, b[0], b[1], forward, dict(hop.properties))


def paths_to_items(
    store: Any, src: NodeRef, dsts: list[NodeRef], *, max_hops: int = 3, limit: int = 200
) -> dict[NodeRef, list[Path]]:
    """Simple undirected paths of 1..``max_hops`` (<= 3) relationships from ``src`` to each of ``dsts``.

    Returns ``{dst: paths}`` with, per destination, exactly what ``store.paths(src, dst, max_hops, limit)`` returns.
    """
    if not hasattr(store, "expand") or max_hops > 3:
        return {d: store.paths(src, d, max_hops=max_hops, limit=limit) for d in dsts}
    was_enabled = gc.isenabled()
    gc.disable()  # many short-lived tuples; a full collection over a big in-memory graph costs seconds
    try:
        return _search(store, src, dsts, max_hops, limit)
    finally:
        if was_enabled:
            gc.enable()


def _search(store: Any, src: NodeRef, dsts: list[NodeRef], max_hops: int, limit: int) -> dict[NodeRef, list[Path]]:
    wanted = set(dsts)
    hops1: list[Hop] = store.expand([src]).get(src, []) if max_hops >= 1 else []
    # Second forward hop, from every first-hop node (a walk may not continue from its own destination; that
    # exclusion is applied per destination below).
    mids = sorted({h.other for h in hops1 if h.other != src})
    adj2 = store.expand(mids) if max_hops >= 2 and mids else {}
    # Items' own hops (one batched read for all destinations).
    adj_dst = store.expand(sorted(wanted)) if max_hops >= 2 else {}
    # Index two-hop walks src -h1- j -h2- m by their end m (for length-3 joins).
    by_end: dict[NodeRef, list[tuple[NodeRef, Hop, Hop]]] = {}
    if max_hops >= 3:
        for h1 in hops1:
            j = h1.other
            if j == src:
                continue
            for h2 in adj2.get(j, ()):
                m = h2.other
                if m == src or m == j:
                    continue
                by_end.setdefault(m, []).append((j, h1, h2))
    out: dict[NodeRef, list[Path]] = {}
    for dst in dsts:
        if dst == src:
            out[dst] = []
            continue
        found: list[Path] = []
        # length 1: src -h- dst
        this = [Path((_step(src, dst, h, h.forward),)) for h in hops1 if h.other == dst]
        this.sort(key=path_sort_key)
        found.extend(this)
        if max_hops >= 2 and len(found) < limit:
            # length 2: src -h1- j -h- dst, with h seen from dst (reversed)
            back = adj_dst.get(dst, [])
            via: dict[NodeRef, list[Hop]] = {}
            for h in back:
                via.setdefault(h.other, []).append(h)
            this = []
            for h1 in hops1:
                j = h1.other
                if j == dst or j == src:
                    continue
                for h in via.get(j, ()):
                    this.append(Path((_step(src, j, h1, h1.forward), _step(j, dst, h, not h.forward))))
            this.sort(key=path_sort_key)
            found.extend(this)
            if max_hops >= 3 and len(found) < limit:
                # length 3: src -h1- j -h2- m -h- dst; j != dst (walks stop at dst), m not in {src, j, dst}
                this = []
                for h in back:
                    m = h.other
                    if m == src or m == dst:
                        continue
                    for j, h1, h2 in by_end.get(m, ()):
                        if j == dst:
                            continue
                        this.append(
                            Path((_step(src, j, h1, h1.forward), _step(j, m, h2, h2.forward), _step(m, dst, h, not h.forward)))
                        )
                this.sort(key=path_sort_key)
                found.extend(this)
        out[dst] = found[:limit]
    return out
