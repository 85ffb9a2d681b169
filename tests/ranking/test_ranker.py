"""LightGBM LambdaRank ranker: learns real signal, exact contributions, text-format persistence, graded labels."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kgrec.errors import BundleError, ModelNotTrainedError
from ranking.ranker import LABEL_GRADES, Ranker, grade_matrix, ndcg_at_k, top_candidates
from tests.ranking.conftest import small_config


def test_label_grades_are_ordered():
    assert LABEL_GRADES["purchase"] > LABEL_GRADES["cart"] > LABEL_GRADES["click"] > LABEL_GRADES["view"] > LABEL_GRADES["none"] == 0


def test_grade_matrix_keeps_strongest_event():
    ev = pd.DataFrame(
        {"user_id": ["a", "a", "a", "b"], "item_id": ["x", "x", "y", "y"], "type": ["view", "purchase", "click", "cart"]}
    )
    g = grade_matrix(ev, ["a", "b"], ["x", "y", "z"]).toarray()
    assert g.tolist() == [[4, 2, 0], [0, 3, 0]]


def test_ranker_beats_shuffled_labels_and_retrieval(trained):
    t = trained
    test = t.test
    ndcg_model = ndcg_at_k(t.ranker.predict(test.X), test.y, test.group, k=10)
    rng = np.random.default_rng(0)
    shuffled = t.train.y.copy()
    rng.shuffle(shuffled)
    control = Ranker(small_config()).fit(
        t.train.X, shuffled, t.train.group, eval_X=t.valid.X, eval_y=t.valid.y, eval_group=t.valid.group
    )
    ndcg_control = ndcg_at_k(control.predict(test.X), test.y, test.group, k=10)
    retrieval = -np.tile(np.arange(test.candidates.shape[1]), len(test.group)).astype(float)
    ndcg_retrieval = ndcg_at_k(retrieval, test.y, test.group, k=10)
    assert ndcg_model > ndcg_control * 1.3, (ndcg_model, ndcg_control)
    assert ndcg_model > ndcg_retrieval, (ndcg_model, ndcg_retrieval)
    # early stopping on NDCG@20 kept a best iteration below the cap
    assert 1 <= t.ranker.best_iteration_ <= t.config.n_estimators
    assert "valid_ndcg@20" in t.ranker.metrics_


def test_contributions_sum_to_raw_score(trained):
    X = trained.test.X[:500]
    contrib = trained.ranker.contributions(X)
    assert contrib.shape == (len(X), X.shape[1] + 1)
    np.testing.assert_allclose(contrib.sum(axis=1), trained.ranker.predict(X), atol=1e-9)


def test_save_load_roundtrip_text_format(trained, tmp_path):
    d = trained.ranker.save(tmp_path / "ranker")
    text = (d / "model.txt").read_text()
    assert text.startswith("tree")  # LightGBM text model, not a pickle
    spec = json.loads((d / "feature_spec.json").read_text())
    assert [f["name"] for f in spec["features"]] == list(trained.ranker.feature_names)
    assert spec["label_gain"] == trained.ranker.label_gain and spec["label_grades"]["purchase"] == 4
    loaded = Ranker.load(d)
    X = trained.test.X[:300]
    np.testing.assert_allclose(loaded.predict(X), trained.ranker.predict(X), atol=1e-12)
    np.testing.assert_allclose(loaded.medians_, trained.ranker.medians_, equal_nan=True)


def test_load_errors_are_specific(tmp_path):
    with pytest.raises(BundleError, match="not a saved ranker"):
        Ranker.load(tmp_path)
    (tmp_path / "model.txt").write_text("garbage")
    (tmp_path / "feature_spec.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        Ranker.load(tmp_path)
    with pytest.raises(ModelNotTrainedError):
        Ranker().predict(np.zeros((1, 3)))


def test_top_candidates_exact_and_excluding():
    rng = np.random.default_rng(0)
    U, I = rng.normal(size=(3, 4)), rng.normal(size=(50, 4))
    idx, scores = top_candidates(U, I, 5)
    full = U @ I.T
    for r in range(3):
        assert list(idx[r]) == list(np.argsort(-full[r])[:5])
    import scipy.sparse as sp

    ex = sp.csr_matrix(([1.0], ([0], [idx[0, 0]])), shape=(3, 50))
    idx2, _ = top_candidates(U, I, 5, exclude=ex)
    assert idx[0, 0] not in idx2[0] and list(idx2[0][:4]) == list(idx[0][1:5])


def test_fit_ranker_and_evaluation_table(trained):
    from ranking.train import evaluate_reranking, fit_ranker

    t = trained
    n = t.ctx.num_users
    train_users = np.arange(n * 8 // 10)
    test_users = np.arange(n * 8 // 10, n)
    ranker, report = fit_ranker(t.builder, train_users, t.candidates[train_users], t.world.test_events,
                                config=small_config(), valid_fraction=0.25)
    assert report["train_groups"] > 100 and report["valid_groups"] > 20
    assert report["valid_ndcg@20_ranker"] > report["valid_ndcg@20_retrieval"] and report["beats_retrieval"]
    table = evaluate_reranking(ranker, t.builder, test_users, t.candidates[test_users], t.world.test_events)
    assert table["users"] == len(test_users) and 0 < table["users_with_hit"] <= len(test_users)
    assert table["reranked"]["ndcg@10"] > table["retrieval"]["ndcg@10"]
    assert table["reranked"]["recall@20"] >= table["retrieval"]["recall@20"] * 0.9
    assert 0 <= table["retrieval"]["recall@10"] <= table["retrieval"]["recall@20"] <= 1


def test_a_ranker_that_cannot_beat_the_retrieval_order_is_reported(trained, caplog):
    # candidates in an oracle order (each user's held-out items first, best grade first): no ranker can do better
    import logging

    from ranking.ranker import grade_matrix
    from ranking.train import fit_ranker

    t = trained
    users = np.arange(t.ctx.num_users * 8 // 10)
    grades = grade_matrix(t.world.test_events, t.ctx.user_ids, t.ctx.item_ids)[users].toarray()
    cand = t.candidates[users]
    g = np.take_along_axis(grades, cand, axis=1)
    oracle = np.take_along_axis(cand, np.argsort(-g, axis=1, kind="stable"), axis=1)
    with caplog.at_level(logging.WARNING, logger="ranking.train"):
        _, report = fit_ranker(t.builder, users, oracle, t.world.test_events, config=small_config(),
                               valid_fraction=0.25)
    assert report["valid_ndcg@20_retrieval"] == pytest.approx(1.0)
    assert not report["beats_retrieval"]
    assert "does not beat the retrieval order" in caplog.text and f"{report['valid_groups']} validation users" in caplog.text


def test_padded_candidates_get_no_training_row_and_no_label(trained):
    # short candidate lists end in -1 padding: no feature row, no grade (a -1 column used to read the previous
    # user's last item), and the re-ranking table never ranks a pad
    import scipy.sparse as sp

    from ranking.features import _pair_values
    from ranking.ranker import build_training_set
    from ranking.train import evaluate_reranking

    g = sp.csr_matrix(np.array([[0, 0, 4], [1, 0, 0]], dtype=np.float32))
    assert _pair_values(g, np.array([1, 1, 0]), np.array([-1, 0, 2])).tolist() == [0.0, 1.0, 4.0]
    t = trained
    users = np.arange(40)
    cand = t.candidates[users].copy()
    cand[::2, -5:] = -1  # every other user: 5 pads
    full = build_training_set(t.builder, users, t.candidates[users], t.world.test_events,
                              drop_groups_without_positives=False)
    padded = build_training_set(t.builder, users, cand, t.world.test_events, drop_groups_without_positives=False)
    C = cand.shape[1]
    assert padded.group.tolist() == [C - 5 if u % 2 == 0 else C for u in range(40)]
    assert len(padded.X) == len(padded.y) == padded.group.sum()
    keep = (cand >= 0).ravel()
    np.testing.assert_array_equal(padded.X, full.X[keep])
    np.testing.assert_array_equal(padded.y, full.y[keep])
    table = evaluate_reranking(t.ranker, t.builder, users, cand, t.world.test_events)
    assert table["users"] == 40 and 0 <= table["reranked"]["recall@20"] <= 1


def test_fit_ranker_learns_from_extra_sets_without_the_early_stopping_users(trained):
    # extra labelled groups (Recommender.fit's held-out fold of train): the validation users' groups are left out of
    # them, so early stopping and the report stay on users the ranker has not learnt from
    from ranking.ranker import build_training_set
    from ranking.train import fit_ranker

    t = trained
    users = np.arange(t.ctx.num_users * 8 // 10)
    extra = build_training_set(t.builder, users, t.candidates[users], t.world.test_events)
    cfg = small_config().model_copy(update={"cv_folds": 0})  # early stopping on a held-out share of the users
    _, base = fit_ranker(t.builder, users, t.candidates[users], t.world.test_events, config=cfg, valid_fraction=0.25)
    order = np.random.default_rng(cfg.seed).permutation(len(users))  # fit_ranker's own user split
    es_users = users[order[: int(round(len(users) * 0.25))]]
    outside = int((~np.isin(extra.user_index, es_users)).sum())
    assert 0 < outside < len(extra.group)
    _, only = fit_ranker(t.builder, users, t.candidates[users], t.world.test_events, config=cfg, valid_fraction=0.25,
                         extra_train=[("fold", extra)], learn_from_heldout=False)
    assert only["train_groups_by_source"] == {"fold": outside} and only["train_groups"] == outside
    assert only["valid_groups"] == base["valid_groups"]  # the same early-stopping users
    # here the extra set IS the held-out groups of every user: without the ES users, the usual training groups
    assert outside == base["train_groups"]
    _, both = fit_ranker(t.builder, users, t.candidates[users], t.world.test_events, config=cfg, valid_fraction=0.25,
                         extra_train=[("fold", extra)])
    assert both["train_groups_by_source"] == {"heldout": base["train_groups"], "fold": outside}
    assert both["train_groups"] == base["train_groups"] + outside
    # cross-validated (the default): each fold model leaves its fold's users out of the extra set, the final
    # ranker learns from all of it
    _, cv = fit_ranker(t.builder, users, t.candidates[users], t.world.test_events,
                       config=cfg.model_copy(update={"cv_folds": 3}), extra_train=[("fold", extra)],
                       learn_from_heldout=False)
    assert cv["train_groups_by_source"] == {"fold": len(extra.group)} == {"fold": cv["valid_groups"]}
    with pytest.raises(ValueError, match="other feature columns"):
        fit_ranker(t.builder, users, t.candidates[users], t.world.test_events, config=cfg,
                   extra_train=[("fold", extra.__class__(**{**extra.__dict__, "names": extra.names[:-1]}))])


def test_cross_validated_tree_count_learns_from_every_user(trained):
    # ranking.cv_folds: the folds' mean NDCG@20 curve picks the tree count, then one ranker learns from all users;
    # the report is out-of-fold over every user with a held-out item among the candidates
    from ranking.ranker import build_training_set
    from ranking.train import fit_ranker

    t = trained
    users = np.arange(t.ctx.num_users * 8 // 10)
    cfg = small_config().model_copy(update={"cv_folds": 4})
    ranker, report = fit_ranker(t.builder, users, t.candidates[users], t.world.test_events, config=cfg)
    every = build_training_set(t.builder, users, t.candidates[users], t.world.test_events)
    assert report["train_groups"] == report["valid_groups"] == len(every.group)  # all users, both roles
    assert report["cv_folds"] == 4 and len(report["cv_best_iterations"]) == 4
    assert ranker.best_iteration_ == report["best_iteration"] == ranker.booster_.current_iteration()
    assert 1 <= report["best_iteration"] <= cfg.n_estimators and ranker.config.n_estimators == cfg.n_estimators
    assert report["valid_ndcg@20_ranker"] > report["valid_ndcg@20_retrieval"] and report["beats_retrieval"]
    # the reported score is out-of-fold AT the chosen count: refit each fold's ranker with exactly that many trees
    # (no early stopping) and score its own users
    from ranking.ranker import ndcg_at_k

    order = np.random.default_rng(cfg.seed).permutation(len(users))
    fold = np.empty(len(users), dtype=np.int64)
    fold[order] = np.arange(len(users)) % 4
    group_fold = fold[np.searchsorted(users, every.user_index)]
    scores = np.empty(len(every.y))
    fixed = cfg.model_copy(update={"n_estimators": report["best_iteration"]})
    for f in range(4):
        tr, te = np.repeat(group_fold != f, every.group), np.repeat(group_fold == f, every.group)
        m = Ranker(fixed, every.names).fit(every.X[tr], every.y[tr], every.group[group_fold != f])
        scores[te] = m.predict(every.X[te])
    assert report["valid_ndcg@20_ranker"] == pytest.approx(
        ndcg_at_k(scores, every.y, every.group, 20, ranker.label_gain), abs=1e-6)
    again, report2 = fit_ranker(t.builder, users, t.candidates[users], t.world.test_events, config=cfg)
    assert report2 == report  # seeded
    np.testing.assert_array_equal(again.predict(every.X[:200]), ranker.predict(every.X[:200]))
    # a user listed twice keeps one fold (the first); fewer users with a hit than folds: early stopping on a share
    twice = np.r_[users, users[:5]]
    _, rep_twice = fit_ranker(t.builder, twice, t.candidates[twice], t.world.test_events, config=cfg)
    n_twice = len(build_training_set(t.builder, twice, t.candidates[twice], t.world.test_events).group)
    assert rep_twice["cv_folds"] == 4 and rep_twice["valid_groups"] == n_twice > len(every.group)
    few = users[:40]
    n_hit = len(build_training_set(t.builder, few, t.candidates[few], t.world.test_events).group)
    _, rep_few = fit_ranker(t.builder, few, t.candidates[few], t.world.test_events,
                            config=cfg.model_copy(update={"cv_folds": n_hit + 1}))
    assert "cv_folds" not in rep_few and rep_few["train_groups"] + rep_few["valid_groups"] == n_hit
