"""Explanations read KG paths from both GraphStores; every cited path is re-checked against the store, and removing
a cited path's relationships lowers the matching KG feature."""
from __future__ import annotations

import numpy as np
import pytest

from ranking.context import HISTORY_RELS, RankingContext
from ranking.explain import PATH_KINDS, Explainer
from ranking.features import FeatureBuilder
from tests.ranking.world import context_kwargs

pytest.importorskip("kg.embedded_store")


@pytest.fixture(scope="module")
def world_dataset(ranking_world, tmp_path_factory):
    return ranking_world.write_dataset(tmp_path_factory.mktemp("ranking") / "shop")


def context_from_store(world, store) -> RankingContext:
    return RankingContext.from_store(store, **context_kwargs(world))


@pytest.fixture(params=["embedded", pytest.param("neo4j", marks=pytest.mark.neo4j)])
def loaded_store(request, ranking_world, world_dataset):
    if request.param == "embedded":
        from kg.embedded_store import EmbeddedStore

        store = EmbeddedStore()
    else:
        store = request.getfixturevalue("neo4j_store")
    store.load(world_dataset, events=ranking_world.train_events)
    return store


def edge_exists(store, step) -> bool:
    """The relationship of a path step, looked up again in the store in its stored direction."""
    src, dst = (step.src_label, step.src_id), (step.dst_label, step.dst_id)
    direction = "out" if step.forward else "in"
    return dst in store.neighbours(src, [step.rel], direction=direction)


def remove_edges(hetero, ids, steps) -> int:
    """Drop the relationships of ``steps`` from a HeteroData export; returns how many were removed."""
    from kg.schema import EDGE_TYPES, NODE_LABELS

    removed = 0
    for s in steps:
        et = EDGE_TYPES[s.rel]
        a, b = ((s.src_label, s.src_id), (s.dst_label, s.dst_id)) if s.forward else ((s.dst_label, s.dst_id), (s.src_label, s.src_id))
        key = (NODE_LABELS[et.src], s.rel.lower(), NODE_LABELS[et.dst])
        ia, ib = ids[key[0]].index(a[1]), ids[key[2]].index(b[1])
        ei = hetero[key].edge_index
        keep = ~((ei[0] == ia) & (ei[1] == ib))
        removed += int((~keep).sum())
        hetero[key].edge_index = ei[:, keep]
        if getattr(hetero[key], "edge_weight", None) is not None:
            hetero[key].edge_weight = hetero[key].edge_weight[keep]
    return removed


def test_paths_exist_in_store_and_removing_them_lowers_kg_features(trained, ranking_world, loaded_store):
    world, store = ranking_world, loaded_store
    ctx = context_from_store(world, store)
    explainer = Explainer(ctx, trained.ranker, store)
    builder = explainer.builder
    users = np.linspace(0, ctx.num_users - 1, 6).astype(int)
    checked_paths, lowered, tried = 0, 0, 0
    exported, ids = store.to_hetero_data()
    for u in users:
        cand = trained.candidates[u][:4]
        exps = explainer.explain_items(ctx.user_ids[u], [ctx.item_ids[i] for i in cand])
        for e in exps:
            relevances = [p.relevance for p in e.paths]
            assert relevances == sorted(relevances, reverse=True)
            for p in e.paths:
                nodes = p.path.nodes()
                assert nodes[0] == ("User", e.user_id) and nodes[-1] == ("Item", e.item_id)
                assert len(set(nodes)) == len(nodes)  # simple path
                for step in p.path.steps:
                    assert edge_exists(store, step), (e.user_id, e.item_id, step)
                checked_paths += 1
            # Remove the most relevant cited path with a matching KG feature: that feature must drop.
            cited = next((p for p in e.paths if PATH_KINDS[p.kind][1] is not None), None)
            if cited is None or cited.path.steps[0].rel not in HISTORY_RELS:
                continue
            feature = PATH_KINDS[cited.kind][1]
            hetero = exported.clone()
            assert remove_edges(hetero, ids, cited.path.steps) == cited.path.length
            ctx2 = RankingContext.from_hetero(
                hetero, ids, user_vectors=world.user_vectors, item_vectors=world.item_vectors,
                user_ids=world.user_ids, item_ids=world.item_ids,
            )
            i = ctx.item_index(e.item_id)
            j = list(builder.names).index(feature)
            before = builder.build(np.array([u]), np.array([[i]])).X[0, j]
            after = FeatureBuilder(ctx2).build(np.array([u]), np.array([[i]])).X[0, j]
            tried += 1
            lowered += after < before
            assert after < before, (u, e.item_id, cited.text, feature, before, after)
    assert checked_paths >= 30
    assert tried >= 8 and lowered == tried


def test_kg_features_agree_with_store_path_counts(trained, ranking_world, loaded_store):
    """The vectorised counts equal the number of matching paths the store itself returns."""
    world, store = ranking_world, loaded_store
    ctx = context_from_store(world, store)
    builder = FeatureBuilder(ctx)
    from ranking.explain import _path_kind

    rng = np.random.default_rng(5)
    checked = 0
    for u in rng.choice(ctx.num_users, 4, replace=False):
        items = trained.candidates[u][:3]
        fm = builder.build(np.array([u]), items.reshape(1, -1))
        for c, i in enumerate(items):
            paths = store.paths(("User", ctx.user_ids[u]), ("Item", ctx.item_ids[i]), max_hops=3, limit=100_000)
            counts = {k: 0 for k, (_, f) in PATH_KINDS.items() if f}
            for p in paths:
                kind = _path_kind(p)
                if kind in counts and p.steps[0].rel in HISTORY_RELS:
                    counts[kind] += 1
            row = fm.row(0, c)
            for kind, n in counts.items():
                feature = PATH_KINDS[kind][1]
                assert row[list(builder.names).index(feature)] == n, (u, i, kind)
                checked += n
    assert checked > 10


def test_paths_to_items_equals_store_paths(trained, ranking_world, loaded_store):
    """The one-walk-per-user search returns exactly the store's own ``paths`` for every item (content and order)."""
    from ranking.graph_paths import paths_to_items

    store = loaded_store
    rng = np.random.default_rng(9)
    total = 0
    for u in rng.choice(len(ranking_world.user_ids), 3, replace=False):
        user = ("User", ranking_world.user_ids[u])
        bought = ranking_world.train_events[ranking_world.train_events["user_id"] == user[1]]["item_id"].iloc[:2].tolist()
        items = [("Item", ranking_world.item_ids[i]) for i in trained.candidates[u][:4]] + [("Item", b) for b in bought]
        for limit in (7, 10_000):
            got = paths_to_items(store, user, items, max_hops=3, limit=limit)
            for it in items:
                expected = store.paths(user, it, max_hops=3, limit=limit)
                assert got[it] == expected, (user, it, limit)
                total += len(expected)
    assert total > 50
