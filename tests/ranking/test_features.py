"""Feature builder: shapes, and KG path counts equal to a brute-force walk of the same graph."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ranking.context import HISTORY_EVENT_TYPES
from ranking.features import ALL_FEATURES, FEATURE_NAMES, KG_PATH_FEATURES, FeatureBuilder
from tests.ranking.world import context_from_world, make_world


@pytest.fixture(scope="module")
def small():
    world = make_world(n_users=40, n_items=60, n_brands=5, n_categories=4, n_entities=6, seed=11)
    ctx = context_from_world(world)
    return world, ctx, FeatureBuilder(ctx)


def brute_force_paths(ctx, u: int, i: int) -> dict[str, int]:
    """Count typed simple paths user -[PURCHASED|CARTED|RATED]-> j ... -> i by walking neighbours pair by pair."""
    rels = []  # one entry per PURCHASED / CARTED / RATED relationship
    for ev in HISTORY_EVENT_TYPES:
        row = ctx.interactions[ev][u]
        rels += [int(j) for j in row.indices]
    out = {k: 0 for k in KG_PATH_FEATURES}
    inc = {
        "kg_paths_brand": ctx.item_brand,
        "kg_paths_category": ctx.item_category,
        "kg_paths_attribute": ctx.item_attribute,
        "kg_paths_entity": ctx.item_entity,
    }
    buyers = {}
    for ev in HISTORY_EVENT_TYPES:
        coo = ctx.interactions[ev].tocoo()
        for v, j in zip(coo.row, coo.col):
            buyers.setdefault(int(j), []).append(int(v))
    for j in rels:
        if j == i:
            continue  # u -> i -> ... -> i repeats i
        out["kg_paths_also_bought"] += int(ctx.also_bought[j, i])
        for name, m in inc.items():
            out[name] += len(set(m[j].indices) & set(m[i].indices))
        for v in buyers.get(j, []):
            if v != u:
                out["kg_paths_co_buyer"] += sum(1 for vv in buyers.get(i, []) if vv == v)
    return out


def test_shapes_names_and_missing_query(small):
    _, ctx, fb = small
    users = np.array([0, 3, 7])
    cand = np.tile(np.arange(10), (3, 1))
    fm = fb.build(users, cand)
    assert fm.X.shape == (30, len(FEATURE_NAMES)) and fm.X.dtype == np.float32
    assert fm.names == FEATURE_NAMES
    assert np.isnan(fm.column("query_similarity")).all()
    assert list(fm.group) == [10, 10, 10]
    # gnn_score is the dot product, row u*C + c
    assert fm.row(1, 4)[FEATURE_NAMES.index("gnn_score")] == pytest.approx(
        float(ctx.user_vectors[3] @ ctx.item_vectors[4]), rel=1e-5
    )


def test_query_similarity_is_cosine_to_item_text(small):
    _, ctx, fb = small
    q = np.random.default_rng(0).normal(size=ctx.item_text.shape[1]).astype(np.float32)
    fm = fb.build(np.array([2]), np.arange(8).reshape(1, -1), q)
    expected = ctx.item_text[:8] @ (q / np.linalg.norm(q))
    np.testing.assert_allclose(fm.column("query_similarity"), expected, rtol=1e-5, atol=1e-6)


def test_kg_path_counts_match_brute_force(small):
    _, ctx, fb = small
    rng = np.random.default_rng(1)
    users = rng.choice(ctx.num_users, 12, replace=False)
    cand = np.stack([rng.choice(ctx.num_items, 15, replace=False) for _ in users])
    # include bought items themselves among candidates: their self-paths must be excluded
    for r, u in enumerate(users):
        bought = ctx.interactions["purchase"][u].indices
        if len(bought):
            cand[r, 0] = bought[0]
    fm = fb.build(users, cand)
    checked_nonzero = 0
    for r, u in enumerate(users):
        for c, i in enumerate(cand[r]):
            expected = brute_force_paths(ctx, int(u), int(i))
            row = fm.row(r, c)
            for k, v in expected.items():
                assert row[FEATURE_NAMES.index(k)] == pytest.approx(v), (u, i, k)
            checked_nonzero += sum(v > 0 for v in expected.values())
            assert row[FEATURE_NAMES.index("kg_paths_total")] == pytest.approx(sum(expected.values()))
    assert checked_nonzero > 20  # the comparison covered real paths, not only zeros


def test_shares_and_price_ratio(small):
    _, ctx, fb = small
    u = int(np.argmax(ctx.history_size))
    bought = ctx.history[u].indices
    i = int(bought[0])
    # first candidate: an item the user did not buy, of a brand the user bought
    others = sorted(
        (j for j in range(ctx.num_items) if j not in set(bought)),
        key=lambda j: ctx.brand_of_item[j] not in set(ctx.brand_of_item[bought].tolist()),
    )
    fm = fb.build(np.array([u]), np.array([[i] + others[:5]]))
    brand = ctx.brand_of_item[others[0]]
    rel = ctx.history_relations[u]  # purchase + cart relationships (an item bought and carted counts twice)
    expected_share = rel.data[ctx.brand_of_item[rel.indices] == brand].sum() / rel.data.sum()
    assert expected_share > 0
    assert fm.row(0, 1)[FEATURE_NAMES.index("brand_share")] == pytest.approx(expected_share, rel=1e-5)
    med = np.median(ctx.item_price[bought])
    assert fm.row(0, 1)[FEATURE_NAMES.index("price_ratio")] == pytest.approx(ctx.item_price[others[0]] / med, rel=1e-5)
    # the user's own purchase of i is a direct-interaction feature
    assert fm.row(0, 0)[FEATURE_NAMES.index("user_item_purchases")] >= 1


def test_removing_path_edges_lowers_kg_features(small):
    world, ctx, fb = small
    hetero, ids = world.hetero()
    # a (user, item) pair with a same-brand path
    u, i, fm = None, None, None
    for uu in range(ctx.num_users):
        fm = fb.build(np.array([uu]), np.arange(ctx.num_items).reshape(1, -1))
        col = fm.column("kg_paths_brand")
        if col.max() > 0:
            u, i = uu, int(np.argmax(col))
            break
    assert u is not None
    before = fm.row(0, i)[FEATURE_NAMES.index("kg_paths_brand")]
    # remove the candidate's MADE_BY edge: every brand path to it goes through it
    key = ("item", "made_by", "brand")
    ei = hetero[key].edge_index
    item_pos = ids["item"].index(ctx.item_ids[i])
    keep = ei[0] != item_pos
    hetero[key].edge_index = ei[:, keep]
    hetero[key].edge_weight = hetero[key].edge_weight[keep]
    ctx2 = context_from_world(world, hetero, ids)
    after = FeatureBuilder(ctx2).build(np.array([u]), np.array([[i]])).X[0, FEATURE_NAMES.index("kg_paths_brand")]
    assert before >= 1 and after == 0
    assert isinstance(ei, torch.Tensor)


def test_pair_standing_item_knn_and_time_columns_match_direct_computation(small):
    """gnn_dot_z, user_activity, co_buyer_cosine and the two time columns against loops over the raw arrays."""
    world, ctx, _ = small
    fb = FeatureBuilder(ctx, ALL_FEATURES)
    users = np.array([0, 5, 11, 23])
    rng = np.random.default_rng(3)
    cand = np.stack([rng.choice(len(ctx.item_ids), 12, replace=False) for _ in users])
    fm = fb.build(users, cand)
    events = world.train_events.copy()  # the context's history
    events["t"] = (pd.to_datetime(events["timestamp"], utc=True) - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    hist = ctx.history.toarray()
    buyers = hist.T  # (I, U)
    for r, u in enumerate(users):
        dots = ctx.item_vectors.astype(np.float64) @ ctx.user_vectors[u].astype(np.float64)
        t_user = events.loc[events["user_id"] == ctx.user_ids[u], "t"].max()
        for c, i in enumerate(cand[r]):
            row = fm.row(r, c)
            get = lambda name: row[ALL_FEATURES.index(name)]  # noqa: E731
            assert get("gnn_dot_z") == pytest.approx((dots[i] - dots.mean()) / dots.std(), rel=1e-4, abs=1e-4)
            assert get("user_activity") == pytest.approx(np.log1p(ctx.touched[u].nnz))
            knn = 0.0
            for j in np.flatnonzero(hist[u]):
                if j != i and buyers[j].sum() and buyers[i].sum():
                    knn += buyers[j] @ buyers[i] / np.sqrt(buyers[j].sum() * buyers[i].sum())
            assert get("co_buyer_cosine") == pytest.approx(knn, rel=1e-5, abs=1e-6)
            item_t = events.loc[events["item_id"] == ctx.item_ids[i], "t"].to_numpy()
            if len(item_t):
                assert get("days_user_to_item_activity") == pytest.approx((t_user - np.median(item_t)) / 86_400,
                                                                         rel=1e-5)
            else:
                assert np.isnan(get("days_user_to_item_activity"))
            item_s, user_s = np.floor(item_t), np.floor(t_user)  # whole seconds
            near = ((item_s > user_s - 7 * 86_400) & (item_s <= user_s)).sum()
            assert get("item_events_near_user_time") == pytest.approx(np.log1p(near)), (u, i)


def test_builder_makes_a_saved_rankers_columns_by_name(small):
    _, ctx, fb = small
    users, cand = np.array([1, 2]), np.tile(np.arange(6), (2, 1))
    full = FeatureBuilder(ctx, ALL_FEATURES).build(users, cand)
    assert full.X.shape[1] == len(ALL_FEATURES) > fb.build(users, cand).X.shape[1] == len(FEATURE_NAMES)
    names = ("item_popularity", "gnn_score", "co_buyer_cosine")  # any subset, in the ranker's order
    part = FeatureBuilder(ctx, names).build(users, cand)
    assert part.names == names
    np.testing.assert_array_equal(part.X, np.stack([full.column(n) for n in names], axis=1))
    np.testing.assert_array_equal(fb.build(users, cand).X, full.X[:, : len(FEATURE_NAMES)])  # defaults first
    with pytest.raises(ValueError, match="unknown"):
        FeatureBuilder(ctx, ("gnn_score", "no_such_feature"))
    # a context built for the default columns skips the per-event time arrays; asking for a time column says so
    from ranking.context import RankingContext
    from tests.ranking.world import context_kwargs

    world = make_world(n_users=40, n_items=60, n_brands=5, n_categories=4, n_entities=6, seed=11)
    lean = RankingContext.from_hetero(*world.hetero(), **context_kwargs(world), columns=FEATURE_NAMES)
    assert lean.item_event_times is None and ctx.item_event_times is not None
    np.testing.assert_array_equal(FeatureBuilder(lean).build(users, cand).X, fb.build(users, cand).X)
    with pytest.raises(ValueError, match="need event times"):
        FeatureBuilder(lean, ("gnn_score", "item_events_near_user_time"))


def test_events_without_a_timestamp_leave_the_time_columns_of_the_others_unchanged():
    from ranking.context import RankingContext
    from tests.ranking.world import context_kwargs

    world = make_world(n_users=40, n_items=60, n_brands=5, n_categories=4, n_entities=6, seed=11)
    kw = context_kwargs(world)
    events = kw["events"].copy()
    events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
    undated = events.index[events["type"] == "view"][:3]  # views: the graph's interaction counts stay as they are
    names = ("days_user_to_item_activity", "item_events_near_user_time")
    ref = RankingContext.from_hetero(*world.hetero(), **{**kw, "events": events.drop(undated)})
    events.loc[undated, "timestamp"] = pd.NaT
    ctx = RankingContext.from_hetero(*world.hetero(), **{**kw, "events": events})
    users, cand = np.arange(10), np.tile(np.arange(30), (10, 1))
    got = FeatureBuilder(ctx, names).build(users, cand).X
    want = FeatureBuilder(ref, names).build(users, cand).X
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=1e-6)
    assert (got[:, 1] > 0).any()


def test_a_ranker_refuses_named_columns_that_are_not_its_own(small):
    from kgrec.config import RankingConfig
    from ranking.ranker import Ranker

    _, ctx, fb = small
    names = tuple(reversed(FEATURE_NAMES))  # same count, other order
    rng = np.random.default_rng(0)
    ranker = Ranker(RankingConfig(n_estimators=5), names).fit(rng.normal(size=(200, len(names))),
                                                               rng.integers(0, 2, 200), np.full(10, 20))
    fm = fb.build(np.array([0]), np.arange(20).reshape(1, -1))
    with pytest.raises(ValueError, match="in that order"):
        ranker.predict(fm)
    with pytest.raises(ValueError, match="in that order"):
        ranker.contributions(fm)
    own = FeatureBuilder(ctx, names).build(np.array([0]), np.arange(20).reshape(1, -1))
    np.testing.assert_array_equal(ranker.predict(own), ranker.predict(own.X))
