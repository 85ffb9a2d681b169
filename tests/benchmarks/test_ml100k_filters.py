"""The ml-100k graph-filter models on tiny matrices, against values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import expm

from benchmarks.ml100k_filters import (
    bspm_scores,
    gf_cf_scores,
    ideal_low_pass,
    normalized_item_graph,
    turbo_cf_scores,
)
from kgrec.errors import ConfigError

# 3 users x 2 items, both items of degree 2: P~ = [[3/4, 1/4], [1/4, 3/4]], eigenvalues 1 ([1, 1]) and 1/2 ([1, -1])
X2 = np.array([[1, 1], [1, 0], [0, 1]], dtype=np.float64)
# 5 users x 4 items; item degrees 4, 3, 3, 1; user degrees 2, 3, 3, 2, 1; one connected graph
X = np.array(
    [[1, 1, 0, 0],
     [1, 1, 1, 0],
     [1, 1, 0, 1],
     [1, 0, 1, 0],
     [0, 0, 1, 0]],
    dtype=np.float64,
)
# the difference of the two eigenvectors: the part of a filter that separates the two items
SPLIT = np.array([[1.0, -1.0], [-1.0, 1.0]]) / 2.0


def test_normalized_item_graph_by_hand() -> None:
    p, di = normalized_item_graph(X2)
    np.testing.assert_allclose(p, [[0.75, 0.25], [0.25, 0.75]])
    np.testing.assert_array_equal(di, [2.0, 2.0])
    p4, _ = normalized_item_graph(X)
    # items 0 and 1 share users 0 (degree 2), 1 and 2 (degree 3): (1/2 + 1/3 + 1/3) / sqrt(4 * 3)
    assert p4[0, 1] == pytest.approx((1 / 2 + 2 / 3) / np.sqrt(12.0))
    # an item nobody took has an all-zero row and column (no division by zero)
    p0, _ = normalized_item_graph(np.column_stack([X, np.zeros(5)]))
    assert np.all(p0[4] == 0.0) and np.all(np.isfinite(p0))


def test_ideal_low_pass_with_one_eigenvector_is_popularity() -> None:
    # the top eigenvector of P~ is D_i^1/2 (eigenvalue 1), so D_i^-1/2 v v' D_i^1/2 has every row d / sum(d)
    p, di = normalized_item_graph(X)
    low = ideal_low_pass(p, di, 1)
    np.testing.assert_allclose(low, np.tile(di / di.sum(), (4, 1)), atol=1e-12)
    # all eigenvectors: the identity
    np.testing.assert_allclose(ideal_low_pass(p, di, 4), np.eye(4), atol=1e-10)
    with pytest.raises(ConfigError, match="k=5"):
        ideal_low_pass(p, di, 5)


def test_gf_cf_is_the_linear_filter_plus_alpha_times_the_ideal_low_pass() -> None:
    s = gf_cf_scores(X2, k=1, alpha=0.3)
    # user 1 = [1, 0]: P~ row 0 plus 0.3 * [1/2, 1/2]
    np.testing.assert_allclose(s[1], [0.75 + 0.15, 0.25 + 0.15])
    np.testing.assert_allclose(gf_cf_scores(X2, k=1, alpha=0.0), X2 @ normalized_item_graph(X2)[0])
    # 4 items, k = 1: the ideal term adds |user| * d_j / 11
    s4 = gf_cf_scores(X, 1, 2.0) - gf_cf_scores(X, 1, 0.0)
    np.testing.assert_allclose(s4[2], 2.0 * 3.0 * np.array([4, 3, 3, 1]) / 11.0, atol=1e-12)


def test_bspm_one_euler_step_each_is_p_times_i_minus_p() -> None:
    # blur P (eigenvalues 1, 1/2), sharpen I - P (0, 1/2): P (I - P) = 1/4 on the splitting eigenvector only
    s = bspm_scores(X2, k=1, beta=0.0, t_blur=1.0, steps_blur=1, t_sharp=1.0, steps_sharp=1)
    np.testing.assert_allclose(s[1], 0.25 * SPLIT[0], atol=1e-12)
    # the ideal low-pass with k = 1 is the eigenvalue-1 projection, which sharpening (I - P) removes ...
    np.testing.assert_allclose(bspm_scores(X2, 1, 0.7, 1.0, 1, 1.0, 1, final_sharpening=True), s, atol=1e-12)
    # ... unless it is merged after sharpening: + 0.7 * [1/2, 1/2] for user [1, 0]
    late = bspm_scores(X2, 1, 0.7, 1.0, 1, 1.0, 1, final_sharpening=False)
    np.testing.assert_allclose(late[1] - s[1], [0.35, 0.35], atol=1e-12)


def test_bspm_euler_steps_are_matrix_powers_and_converge_to_the_ode() -> None:
    # blur 1 in 2 steps: ((I + P) / 2)^2 -> (3/4)^2 on the splitting eigenvector; sharpen 2 in 2 steps: (I - P)^2
    # -> (1/2)^2; the eigenvalue-1 direction goes to 0
    s = bspm_scores(X2, 1, 0.0, t_blur=1.0, steps_blur=2, t_sharp=2.0, steps_sharp=2)
    np.testing.assert_allclose(s[1], (9 / 16) * (1 / 4) * SPLIT[0], atol=1e-12)
    # many small steps solve dx/dt = x (P - I) then dx/dt = -x P: exp(T_b (P - I)) exp(-T_s P)
    p, _ = normalized_item_graph(X)
    exact = X @ expm(0.8 * (p - np.eye(4))) @ expm(-1.5 * p)
    fine = bspm_scores(X, 1, 0.0, t_blur=0.8, steps_blur=4000, t_sharp=1.5, steps_sharp=4000)
    np.testing.assert_allclose(fine, exact, atol=1e-3)
    with pytest.raises(ConfigError, match="steps_sharp=0"):
        bspm_scores(X, 1, 0.0, steps_sharp=0)


def test_turbo_cf_sharpens_renormalises_and_applies_the_polynomial() -> None:
    # power 1: P~ rows already sum to 1 here, so P = P~ and the linear filter is GF-CF's
    np.testing.assert_allclose(turbo_cf_scores(X2, [1.0], 1.0), gf_cf_scores(X2, 1, 0.0), atol=1e-12)
    # power 2: [[9, 1], [1, 9]] / 16, row sums 10/16 -> P = [[0.9, 0.1], [0.1, 0.9]]; 2P - P^2 = [[0.98, 0.02], ...]
    s = turbo_cf_scores(X2, [2.0, -1.0], 2.0)
    np.testing.assert_allclose(s[1], [0.98, 0.02], atol=1e-12)
    np.testing.assert_allclose(s[0], [1.0, 1.0], atol=1e-12)
    with pytest.raises(ConfigError, match="coefficient"):
        turbo_cf_scores(X2, [], 1.0)


def test_nonnegative_ease_matches_per_column_nnls() -> None:
    from scipy.optimize import nnls

    from benchmarks.ml100k_filters import nonnegative_ease_weights
    from benchmarks.ml100k_models import ease_weights

    rng = np.random.default_rng(0)
    x = (rng.random((30, 6)) < 0.4).astype(np.float64)
    lam = 2.0
    c = nonnegative_ease_weights(x.T @ x, lam, iterations=3000)
    assert np.all(c >= 0.0) and np.all(np.diag(c) == 0.0)
    # each column j is a non-negative ridge regression of item j on the other items: NNLS on [X_-j; sqrt(lam) I]
    for j in range(6):
        others = [i for i in range(6) if i != j]
        a = np.vstack([x[:, others], np.sqrt(lam) * np.eye(5)])
        ref, _ = nnls(a, np.concatenate([x[:, j], np.zeros(5)]))
        np.testing.assert_allclose(c[others, j], ref, atol=1e-6)
    # where EASE has no negative weight the constraint is inactive: two items, B[0, 1] = 3 / (4 + 2)
    two = X[:, :2]
    g2 = two.T @ two
    np.testing.assert_allclose(nonnegative_ease_weights(g2, 2.0, iterations=500), ease_weights(g2, 2.0), atol=1e-9)
    # the EASE solution of this x has negative weights, which the constrained one sets to 0
    assert ease_weights(x.T @ x, lam).min() < -0.01
    with pytest.raises(ConfigError, match="rho=0.0"):
        nonnegative_ease_weights(x.T @ x, 0.0)


def test_time_local_item_graph_weights_pairs_by_time_gap() -> None:
    from benchmarks.ml100k_filters import time_local_item_graph

    # X2 as events: user 0 rated items 0 and 1 ten seconds apart, users 1 and 2 one item each
    users, items, ts = np.array([0, 0, 1, 2]), np.array([0, 1, 0, 1]), np.array([0.0, 10.0, 5.0, 7.0])
    g = time_local_item_graph(users, items, ts, 2, tau=10.0)
    # before scaling: diagonal 1/2 + 1 (over degree 2) = 3/4, off-diagonal e^-1 / 2 / 2; top eigenvalue 3/4 + e^-1/4
    top = 0.75 + np.exp(-1.0) / 4
    np.testing.assert_allclose(g, np.array([[0.75, np.exp(-1.0) / 4], [np.exp(-1.0) / 4, 0.75]]) / top)
    # tau -> infinity: P~ (top eigenvalue already 1)
    p, _ = normalized_item_graph(X2)
    np.testing.assert_allclose(time_local_item_graph(users, items, ts, 2, 1e18), p, atol=1e-12)
    np.testing.assert_allclose(bspm_scores(X2, 1, 0.2, graph=p), bspm_scores(X2, 1, 0.2), atol=1e-12)
    with pytest.raises(ConfigError, match="shape"):
        bspm_scores(X2, 1, 0.2, graph=np.eye(3))


def test_nonnegative_ease_l1_matches_a_bounded_quadratic_solver() -> None:
    from scipy.optimize import minimize

    from benchmarks.ml100k_filters import nonnegative_ease_weights

    rng = np.random.default_rng(4)
    x = (rng.random((25, 4)) < 0.5).astype(np.float64)
    lam, l1 = 1.0, 0.8
    c = nonnegative_ease_weights(x.T @ x, lam, l1, iterations=3000)
    for j in range(4):
        a = np.delete(x, j, axis=1)

        def objective(b: np.ndarray, a: np.ndarray = a, j: int = j) -> tuple[float, np.ndarray]:
            r = a @ b - x[:, j]
            return 0.5 * r @ r + 0.5 * lam * b @ b + l1 * b.sum(), a.T @ r + lam * b + l1

        ref = minimize(objective, np.zeros(3), jac=True, bounds=[(0, None)] * 3, method="L-BFGS-B",
                       options={"ftol": 1e-15, "gtol": 1e-12}).x
        np.testing.assert_allclose(np.delete(c[:, j], j), ref, atol=1e-5)
    # a large enough L1 penalty switches every weight off
    assert np.all(nonnegative_ease_weights(x.T @ x, lam, 100.0, iterations=50) == 0.0)


@pytest.fixture
def one_torch_thread():
    # tiny networks: a second thread only adds contention (100x slower on a busy 2-core machine)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_rec_vae_learns_the_blocks_and_returns_each_checkpoint(one_torch_thread: None) -> None:
    from benchmarks.ml100k_filters import rec_vae_scores

    rng = np.random.default_rng(2)
    x = np.zeros((60, 20))
    x[:30, :10] = rng.random((30, 10)) < 0.6
    x[30:, 10:] = rng.random((30, 10)) < 0.6
    out = rec_vae_scores(x, checkpoints=(2, 15), hidden=16, latent=4, batch_size=16, lr=1e-2)
    assert sorted(out) == [2, 15] and out[15].shape == (60, 20)
    s = out[15]
    # every user's own-block items outscore the other block's on average, by a wide margin in logits
    assert (s[:30, :10].mean(1) - s[:30, 10:].mean(1)).min() > 1.0
    assert (s[30:, 10:].mean(1) - s[30:, :10].mean(1)).min() > 1.0
    # seeded: the same scores again
    np.testing.assert_array_equal(rec_vae_scores(x, checkpoints=(2,), hidden=16, latent=4, batch_size=16)[2],
                                  rec_vae_scores(x, checkpoints=(2,), hidden=16, latent=4, batch_size=16)[2])
