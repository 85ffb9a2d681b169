"""The ml-100k attempt models on tiny matrices, against values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.ml100k_models import (
    add_ease_weights,
    dlae_weights,
    dropout_penalty,
    ease_weights,
    edlae_weights,
    higher_order_ease,
    ials,
    pair_indicators,
    side_info_gram,
    top_pairs,
    user_ease_scores,
)
from kgrec.errors import ConfigError

# 5 users x 4 items; item column sums 4, 3, 3, 1; items 0 and 1 co-occur for 3 users
X = np.array(
    [[1, 1, 0, 0],
     [1, 1, 1, 0],
     [1, 1, 0, 1],
     [1, 0, 1, 0],
     [0, 0, 1, 0]],
    dtype=np.float64,
)


def test_ease_two_items_is_a_ridge_regression_of_one_item_on_the_other() -> None:
    # G = [[a, c], [c, b]]: B[0, 1] = c / (a + lam) (predict item 1 from item 0), B[1, 0] = c / (b + lam)
    x = X[:, :2]
    b = ease_weights(x.T @ x, lam=2.0)
    assert b[0, 1] == pytest.approx(3.0 / (4.0 + 2.0))
    assert b[1, 0] == pytest.approx(3.0 / (3.0 + 2.0))
    assert np.all(np.diag(b) == 0.0)


def test_edlae_dropout_scales_the_penalty_with_item_popularity() -> None:
    x = X[:, :2]
    g = x.T @ x
    np.testing.assert_allclose(dropout_penalty(g, 0.5, 1.0), [4.0 + 1.0, 3.0 + 1.0])
    b = edlae_weights(g, p=0.5, lam=1.0)
    # penalty p/(1-p) * 4 + 1 = 5 on item 0: B[0, 1] = 3 / (4 + 5)
    assert b[0, 1] == pytest.approx(3.0 / 9.0)
    assert b[1, 0] == pytest.approx(3.0 / (3.0 + 4.0))
    np.testing.assert_allclose(edlae_weights(X.T @ X, 0.0, 3.0), ease_weights(X.T @ X, 3.0))
    with pytest.raises(ConfigError, match="p=1.0"):
        dropout_penalty(g, 1.0, 0.0)


def test_dlae_keeps_a_shrunk_identity() -> None:
    # one item, no constant penalty: B = a / (a + p/(1-p) a) = 1 - p
    g = np.array([[4.0]])
    assert dlae_weights(g, p=0.25, lam=0.0)[0, 0] == pytest.approx(0.75)
    # in general B = I - (G + Lambda)^-1 Lambda
    gx = X.T @ X
    lam = np.diag(dropout_penalty(gx, 0.3, 0.5))
    np.testing.assert_allclose(dlae_weights(gx, 0.3, 0.5), np.eye(4) - np.linalg.inv(gx + lam) @ lam, atol=1e-12)


def test_collective_ease_equals_ease_on_stacked_pseudo_users() -> None:
    f = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float64)  # items x features
    alpha = 0.7
    stacked = np.vstack([X, np.sqrt(alpha) * f.T])
    np.testing.assert_allclose(side_info_gram(X.T @ X, f, alpha), stacked.T @ stacked)
    with pytest.raises(ConfigError, match="3 rows"):
        side_info_gram(X.T @ X, f[:3], alpha)


def test_additive_ease_interpolates_the_two_models() -> None:
    f = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float64)
    g = X.T @ X
    np.testing.assert_allclose(add_ease_weights(g, f, 2.0, 1.0, 0.0), ease_weights(g, 2.0))
    np.testing.assert_allclose(add_ease_weights(g, f, 2.0, 1.0, 1.0), ease_weights(f @ f.T, 1.0))
    # features only: items 0 and 1 share feature 0 -> B_F[0, 1] = 1 / (1 + 1)
    assert add_ease_weights(g, f, 2.0, 1.0, 1.0)[0, 1] == pytest.approx(0.5)


def test_user_ease_two_users_vote_for_each_others_items() -> None:
    x = X[:2]  # user 0 has {0, 1}, user 1 has {0, 1, 2}: overlap 2
    s = user_ease_scores(x, lam=1.0)
    # user 0's score for item 2 = B_u[1, 0] * x[1, 2], B_u[1, 0] = overlap / (|user 1| + lam) = 2 / 4
    assert s[0, 2] == pytest.approx(2.0 / 4.0)
    # user 1's weight on user 0: 2 / (|user 0| + lam) = 2 / 3; user 0 has no item 2 or 3 to vote for
    assert s[1, 0] == pytest.approx(2.0 / 3.0)
    assert s[1, 3] == 0.0


def test_top_pairs_by_co_occurrence_then_index() -> None:
    pairs = top_pairs(X, num_pairs=3, min_count=1)
    # counts: (0,1) 3, (0,2) 2, (1,2) 1, (0,3) 1, (1,3) 1 -> ties by (i, j)
    np.testing.assert_array_equal(pairs, [[0, 1], [0, 2], [0, 3]])
    assert len(top_pairs(X, num_pairs=10, min_count=2)) == 2
    np.testing.assert_array_equal(pair_indicators(X, pairs)[:, 0], [1, 1, 1, 0, 0])


def test_higher_order_ease_constraints_and_a_conjunction_it_can_learn() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(400) < 0.5, rng.random(400) < 0.5
    noise = rng.random((400, 3)) < 0.3
    # item 2 is taken exactly by the users who have both 0 and 1: a pair effect a linear model cannot express
    x = np.column_stack([a, b, a & b, noise]).astype(np.float64)
    pairs = np.array([[0, 1], [3, 4]])
    bmat, c = higher_order_ease(x, pairs, lam=1.0, lam_pairs=1.0, iterations=3)
    assert np.all(np.diag(bmat) == 0.0)
    assert c[0, 0] == c[0, 1] == c[1, 3] == c[1, 4] == 0.0
    assert c[0, 2] > 0.4  # the pair (0, 1) predicts item 2
    z = pair_indicators(x, pairs)
    ease_residual = np.linalg.norm(x[:, 2] - x @ ease_weights(x.T @ x, 1.0)[:, 2])
    assert np.linalg.norm(x[:, 2] - x @ bmat[:, 2] - z @ c[:, 2]) < 0.5 * ease_residual
    # a huge pair penalty gives back EASE
    b_inf, c_inf = higher_order_ease(x, pairs, lam=1.0, lam_pairs=1e12, iterations=1)
    np.testing.assert_allclose(b_inf, ease_weights(x.T @ x, 1.0), atol=1e-8)
    assert np.abs(c_inf).max() < 1e-8


def _ials_objective(x: np.ndarray, w: np.ndarray, h: np.ndarray, alpha0: float, reg: float) -> float:
    s = w @ h.T
    n_u, n_i = x.shape
    return float((((s - 1.0) ** 2) * x).sum() + alpha0 * (s**2).sum()
                 + reg * ((x.sum(1) + alpha0 * n_i) * (w**2).sum(1)).sum()
                 + reg * ((x.sum(0) + alpha0 * n_u) * (h**2).sum(1)).sum())


def test_ials_decreases_its_objective_and_finds_the_blocks() -> None:
    rng = np.random.default_rng(1)
    # two user groups x two item groups, 80% density inside a block, 5% outside
    x = np.zeros((40, 20))
    x[:20, :10] = rng.random((20, 10)) < 0.8
    x[20:, 10:] = rng.random((20, 10)) < 0.8
    x = np.maximum(x, rng.random((40, 20)) < 0.05)
    losses = []
    for epochs in (1, 2, 4, 8):
        w, h = ials(x, dim=4, alpha0=0.1, reg=0.01, epochs=epochs, seed=3)
        losses.append(_ials_objective(x, w, h, 0.1, 0.01))
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    s = w @ h.T
    assert s[:20, :10].mean() > 0.6 > 0.2 > s[:20, 10:].mean()


def test_side_information_may_be_sparse() -> None:
    import scipy.sparse as sp

    f = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float64)
    g = X.T @ X
    np.testing.assert_allclose(side_info_gram(g, sp.csr_matrix(f), 0.5), side_info_gram(g, f, 0.5))
    np.testing.assert_allclose(add_ease_weights(g, sp.csr_matrix(f), 2.0, 1.0, 0.3), add_ease_weights(g, f, 2.0, 1.0, 0.3))


def test_mult_vae_learns_the_blocks_and_returns_each_checkpoint() -> None:
    from benchmarks.ml100k_models import mult_vae_scores

    rng = np.random.default_rng(2)
    x = np.zeros((60, 20))
    x[:30, :10] = rng.random((30, 10)) < 0.6
    x[30:, 10:] = rng.random((30, 10)) < 0.6
    out = mult_vae_scores(x, checkpoints=(5, 40), hidden=16, latent=4, anneal_steps=30, batch_size=16, lr=1e-2)
    assert sorted(out) == [5, 40] and out[40].shape == (60, 20)
    s = out[40]
    # every user's own-block items outscore the other block's on average, by a wide margin in logits
    assert (s[:30, :10].mean(1) - s[:30, 10:].mean(1)).min() > 1.0
    assert (s[30:, 10:].mean(1) - s[30:, :10].mean(1)).min() > 1.0


def test_time_local_gram_weights_pairs_by_time_gap() -> None:
    from benchmarks.ml100k_models import time_local_gram

    users = np.array([0, 0, 0, 1, 1])
    items = np.array([0, 1, 2, 0, 1])
    ts = np.array([0.0, 10.0, 1000.0, 5.0, 5.0])
    g = time_local_gram(users, items, ts, num_items=3, tau=10.0)
    # user 0: (0,1) 10 s apart -> e^-1, (0,2) 1000 s -> e^-100, (1,2) 990 s -> e^-99; user 1: (0,1) same time -> 1
    assert g[0, 1] == g[1, 0] == pytest.approx(np.exp(-1.0) + 1.0)
    assert g[0, 2] == pytest.approx(np.exp(-100.0))
    assert g[1, 2] == pytest.approx(np.exp(-99.0))
    np.testing.assert_array_equal(np.diag(g), [2.0, 2.0, 1.0])
    # tau -> infinity gives the plain co-occurrence counts X'X
    x = np.zeros((2, 3))
    x[users, items] = 1.0
    np.testing.assert_allclose(time_local_gram(users, items, ts, 3, 1e15), x.T @ x)
