"""The ml-100k two-stage model: folds, features and the re-ranker's training set on small generated data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks import ml100k_stack as ms
from kgrec.errors import ConfigError

NUM_USERS, NUM_ITEMS = 40, 60


def _frame(seed: int = 0) -> pd.DataFrame:
    """Users in two taste groups (items 0-29 / 30-59), 12-20 interactions each, ratings 1-5, timestamps in
    sessions."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(NUM_USERS):
        lo = 0 if u % 2 == 0 else 30
        n = int(rng.integers(12, 21))
        items = rng.choice(np.arange(lo, lo + 30), size=n, replace=False)
        start = 880_000_000 + int(rng.integers(0, 10_000_000))
        for k, i in enumerate(items):
            rows.append((u, int(i), float(rng.integers(1, 6)), float(start + 30 * k)))
    return pd.DataFrame(rows, columns=["u", "i", "rating", "timestamp"])


def _side() -> ms.SideInfo:
    rng = np.random.default_rng(1)
    genres = (rng.random((NUM_ITEMS, 4)) < 0.4).astype(np.float64)
    year = rng.integers(1950, 1998, NUM_ITEMS).astype(np.float64)
    year[3] = np.nan  # an item without a release year
    return ms.SideInfo(year=year, genres=genres, age=rng.integers(18, 70, NUM_USERS).astype(np.float64),
                       gender=(rng.random(NUM_USERS) < 0.5).astype(np.float64),
                       occupation=rng.integers(0, 5, NUM_USERS).astype(np.float64))


def test_fold_assignment_spreads_every_user_evenly_and_is_seeded() -> None:
    frame = _frame()
    folds = ms.fold_assignment(frame.u.to_numpy(), 5, seed=3)
    assert folds.min() == 0 and folds.max() == 4
    for _, f in pd.Series(folds).groupby(frame.u.to_numpy()):
        sizes = np.bincount(f.to_numpy(), minlength=5)
        assert sizes.max() - sizes.min() <= 1  # every fold holds ~1/5 of every user
    assert np.array_equal(folds, ms.fold_assignment(frame.u.to_numpy(), 5, seed=3))
    assert not np.array_equal(folds, ms.fold_assignment(frame.u.to_numpy(), 5, seed=4))
    with pytest.raises(ConfigError, match="at least 2 folds"):
        ms.fold_assignment(frame.u.to_numpy(), 1)


def test_row_z_standardises_over_unmasked_items_only() -> None:
    s = np.array([[1.0, 2.0, 3.0, 100.0]])
    mask = np.array([[False, False, False, True]])
    z = ms.row_z(s, mask)
    # mean 2, population std sqrt(2/3) over the first three items; the masked 100 does not count
    assert z[0, :3] == pytest.approx([-1 / np.sqrt(2 / 3), 0.0, 1 / np.sqrt(2 / 3)], abs=1e-6)
    assert z[0, 3] == pytest.approx(98 / np.sqrt(2 / 3), rel=1e-6)


def test_near_share_counts_the_items_ratings_close_to_one_user_rating() -> None:
    frame = pd.DataFrame({"u": [0, 0, 1, 2, 3], "i": [0, 1, 1, 1, 1], "rating": [4.0] * 5,
                          "timestamp": [1000.0, 5000.0, 1500.0, 4000.0, 90_000.0]})
    st = ms._stats(frame, 4, 2, ms.SideInfo(year=np.zeros(2), genres=np.zeros((2, 1)), age=np.zeros(4),
                                               gender=np.zeros(4), occupation=np.zeros(4)))
    # item 1 is rated at 1500, 4000, 5000, 90000; user 0 rated at 1000 and 5000: within 3600 s of 1000 -> {1500},
    # of 5000 -> {1500, 4000, 5000}: the larger window count is 3 of item 1's 4 ratings
    out = ms._near_share(st, np.array([0, 0]), np.array([1, 0]), 3600.0)
    assert out[0] == pytest.approx(3 / 4)
    assert out[1] == pytest.approx(1.0)  # item 0's only rating is user 0's own


def test_candidates_exclude_the_mask_and_features_are_the_bases_per_user_z() -> None:
    frame = _frame()
    side = _side()
    bases = {"E": np.random.default_rng(0).normal(size=(NUM_USERS, NUM_ITEMS)),
             "TL": np.random.default_rng(1).normal(size=(NUM_USERS, NUM_ITEMS))}
    st = ms._stats(frame, NUM_USERS, NUM_ITEMS, side)
    mask = st.x > 0
    feats, u, i, names = ms.candidate_features(bases, st, side, mask, 10)
    assert feats.shape == (NUM_USERS * 10, len(names)) and feats.dtype == np.float32
    assert not mask[u, i].any()  # no seen item is a candidate
    assert np.array_equal(feats[:, names.index("candidate_position")], np.tile(np.arange(10), NUM_USERS))
    zsum = ms.row_z(bases["E"], mask) + ms.row_z(bases["TL"], mask)
    for user in (0, 7):
        unseen = np.flatnonzero(~mask[user])
        best = unseen[np.argsort(-zsum[user, unseen], kind="stable")[:10]]
        assert np.array_equal(i[u == user], best)  # the first stage's top 10, best first
    np.testing.assert_allclose(feats[:, names.index("z_E")], ms.row_z(bases["E"], mask)[u, i], rtol=1e-5)
    # log-rank of E among the user's unseen items: the item with the user's largest z_E has log1p(0) = 0
    lr = feats[:, names.index("logrank_E")]
    ze = feats[:, names.index("z_E")]
    for user in (0, 7):
        rows = u == user
        top = np.argmax(np.where(mask[user], -np.inf, ms.row_z(bases["E"], mask)[user]))
        if top in i[rows]:
            assert lr[rows][i[rows] == top][0] == 0.0
        assert np.all(lr[rows] >= 0) and ze[rows].max() <= ms.row_z(bases["E"], mask)[user, top] + 1e-6


def test_build_labels_each_fold_by_its_held_out_items_and_reranker_scores_only_candidates() -> None:
    frame = _frame()
    side = _side()
    test_exclude = ms.dense(frame, NUM_USERS, NUM_ITEMS) > 0
    data = ms.build(frame, NUM_USERS, NUM_ITEMS, side, test_exclude, num_folds=3, num_candidates=15)
    assert data.train_features.shape == (3 * NUM_USERS * 15, len(data.names))
    assert data.groups == [15] * (3 * NUM_USERS)
    # labels: held-out items among the candidates; recall per fold = labelled / held-out
    folds = ms.fold_assignment(frame.u.to_numpy(), 3, 0)
    for f in range(3):
        rows = slice(f * NUM_USERS * 15, (f + 1) * NUM_USERS * 15)
        assert data.train_labels[rows].sum() == pytest.approx(data.fold_candidate_recall[f] * (folds == f).sum())
    # the taste groups make held-out items easy to find: most of them are among the 15 candidates
    assert min(data.fold_candidate_recall) > 0.5
    sv, st, booster = ms.fit_predict(data, objective="binary", leaves=4, trees=20, lr=0.1)
    assert sv.shape == st.shape == (NUM_USERS, NUM_ITEMS)
    fv, uv, iv = data.valid
    # every candidate scores above every non-candidate (they sit 1e6 below, in the first stage's order)
    cand = np.zeros((NUM_USERS, NUM_ITEMS), dtype=bool)
    cand[uv, iv] = True
    assert sv[cand].min() > sv[~cand].max()
    assert booster.num_feature() == len(data.names)
    with pytest.raises(ConfigError, match="objective"):
        ms.fit_predict(data, objective="poisson", leaves=4, trees=2, lr=0.1)
    # an ablation drops exactly the named columns and keeps candidates and labels
    less = data.without({"z_GF", "logrank_GF", "age"})
    assert len(less.names) == len(data.names) - 3 and "z_GF" not in less.names and "z_E" in less.names
    k = data.names.index("z_E")
    assert np.array_equal(less.train_features[:, less.names.index("z_E")], data.train_features[:, k])
    assert np.array_equal(less.valid[0][:, less.names.index("z_E")], data.valid[0][:, k])
    assert np.array_equal(less.train_labels, data.train_labels) and np.array_equal(less.test[2], data.test[2])
    with pytest.raises(ConfigError, match="no such stacking features"):
        data.without({"z_nothing"})


def test_build_variants_share_the_closed_forms_and_each_equals_its_own_build() -> None:
    frame = _frame()
    side = _side()
    test_exclude = ms.dense(frame, NUM_USERS, NUM_ITEMS) > 0
    calls: list[int] = []

    def gnn(seed: int):
        def fn(f: pd.DataFrame) -> np.ndarray:
            calls.append(seed)
            return np.random.default_rng([seed, len(f)]).random((NUM_USERS, NUM_ITEMS))
        return fn

    many = ms.build_variants(frame, NUM_USERS, NUM_ITEMS, side, test_exclude, {"a": gnn(1), "b": gnn(2), "none": None},
                             num_folds=3, num_candidates=15)
    assert calls.count(1) == calls.count(2) == 4  # 3 folds + all of train, once per variant
    for key, seed in (("a", 1), ("b", 2)):
        one = ms.build(frame, NUM_USERS, NUM_ITEMS, side, test_exclude, num_folds=3, num_candidates=15, gnn=gnn(seed))
        assert many[key].names == one.names
        assert np.array_equal(many[key].train_features, one.train_features, equal_nan=True)
        assert np.array_equal(many[key].test[0], one.test[0], equal_nan=True)
        assert np.array_equal(many[key].train_labels, one.train_labels)
    # the GNN column sits before KNN; the GNN-free variant has exactly the other columns
    names = many["a"].names
    assert names.index("z_GNN") < names.index("z_KNN")
    assert many["none"].names == [n for n in names if n not in ("z_GNN", "logrank_GNN")]
    assert not np.array_equal(many["a"].train_features, many["b"].train_features)


def test_fold_cv_scores_each_held_out_fold_against_all_its_held_out_items(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = _frame()
    test_exclude = ms.dense(frame, NUM_USERS, NUM_ITEMS) > 0
    data = ms.build(frame, NUM_USERS, NUM_ITEMS, _side(), test_exclude, num_folds=3, num_candidates=15)
    folds = ms.fold_assignment(frame.u.to_numpy(), 3, 0)
    for f in range(3):  # held-out counts per user and fold
        assert np.array_equal(data.fold_held[f], np.bincount(frame.u.to_numpy()[folds == f], minlength=NUM_USERS))
    fitted_rows = []

    def oracle(features, labels, groups, **kw):  # ranks by the label itself: the metric part alone
        fitted_rows.append(len(labels))
        lookup = {row.tobytes(): y for row, y in zip(data.train_features, data.train_labels)}
        return None, lambda f: np.array([lookup[row.tobytes()] for row in f])

    monkeypatch.setattr(ms, "_fit", oracle)
    got = ms.fold_cv(data, (0, 2), objective="binary", leaves=4, trees=5, lr=0.1)
    assert fitted_rows == [2 * NUM_USERS * 15] * 2  # refitted without the evaluated fold's rows
    # hand computation: the oracle puts the m held-out candidates first, so DCG = sum_{r<m} 1/log2(r+2) and
    # recall = m / held; ideal DCG over min(held, 20) ranks
    disc = 1.0 / np.log2(np.arange(2, 22))
    nd, rc = [], []
    for f in (0, 2):
        y = data.train_labels[f * NUM_USERS * 15:(f + 1) * NUM_USERS * 15].reshape(NUM_USERS, 15)
        per_n, per_r = [], []
        for u in range(NUM_USERS):
            held = data.fold_held[f, u]
            if held == 0:
                continue
            m = int(y[u].sum())
            per_n.append(disc[:m].sum() / disc[:min(held, 20)].sum())
            per_r.append(m / held)
        nd.append(np.mean(per_n))
        rc.append(np.mean(per_r))
    assert got["ndcg@20"] == pytest.approx(np.mean(nd))
    assert got["recall@20"] == pytest.approx(np.mean(rc))
    assert got["per_fold_ndcg"] == pytest.approx(nd)
    assert 0.5 < got["recall@20"] <= 1.0  # most held-out items are candidates on this data
    with pytest.raises(ConfigError, match="not one of the 3 folds"):
        ms.fold_cv(data, (3,), objective="binary", leaves=4, trees=5, lr=0.1)


def test_mlp_reranker_learns_the_held_out_items_is_seeded_and_averages_with_lightgbm() -> None:
    import torch

    torch.set_num_threads(1)
    frame = _frame()
    test_exclude = ms.dense(frame, NUM_USERS, NUM_ITEMS) > 0
    data = ms.build(frame, NUM_USERS, NUM_ITEMS, _side(), test_exclude, num_folds=3, num_candidates=15)
    sv, st = ms.fit_mlp(data, seed=0, epochs=30)
    again, _ = ms.fit_mlp(data, seed=0, epochs=30)
    other, _ = ms.fit_mlp(data, seed=1, epochs=30)
    assert np.array_equal(sv, again, equal_nan=True) and not np.array_equal(sv, other, equal_nan=True)
    fv, uv, iv = data.valid
    cand = np.zeros((NUM_USERS, NUM_ITEMS), dtype=bool)
    cand[uv, iv] = True
    assert sv.shape == st.shape == (NUM_USERS, NUM_ITEMS) and sv[cand].min() > np.nanmax(sv[~cand])
    # outside the candidates: the first stage's order (NaN where the user's own items are masked)
    assert np.array_equal(sv[~cand], data.first_stage[~cand] - 1e6, equal_nan=True)
    # it learnt the taste groups from the train folds: candidates of the user's own group score higher
    own = (iv < 30) == (uv % 2 == 0)
    assert sv[uv[own], iv[own]].mean() > sv[uv[~own], iv[~own]].mean()
    # two_family: each family's per-user z-scores weighted 1/2 (one LightGBM seed: its raw scores z-scored first)
    lv, lt, _ = ms.fit_predict(data, objective="binary", leaves=4, trees=20, lr=0.1)
    best = {"valid_scores": lv, "test_scores": lt}
    both_v, both_t = ms.two_family(data, best, 1, bag=2)
    m = [ms.fit_mlp(data, seed=s) for s in (0, 1)]
    want = 0.5 * ms.row_z(lv, lv < -1e5) + 0.5 * np.mean([ms.row_z(r[0], r[0] < -1e5) for r in m], 0)
    np.testing.assert_allclose(both_v[cand], want[cand], rtol=1e-6)
    with pytest.raises(ConfigError, match="groups of one size"):
        ms.fit_mlp(ms.StackedData(data.train_features[:-1], data.train_labels[:-1], data.groups[:-1] + [14],
                                  data.valid, data.test, data.first_stage, data.names))
