"""Closed-form and small iterative recommenders tried against EASE on ml-100k (issue #6, fourth attempt).

Every function takes dense float64 numpy arrays (the ml-100k matrices are 943 x 1,598) and returns item-item weights
or a (num_users, num_items) score matrix; the caller masks seen items and ranks. Everything is fitted on the matrix
it is given (the benchmark passes the train split only).

* ``ease_weights``: EASE (Steck 2019), ``B = I - P diagMat(1 / diag(P))``, ``P = (G + lam I)^-1``.
* ``dlae_weights`` / ``edlae_weights``: the denoising linear autoencoders of Steck, NeurIPS 2020 ("Autoencoders
  that don't overfit towards the identity"): dropout with probability ``p`` becomes the L2 penalty
  ``Lambda = p / (1 - p) diagMat(diag(G)) + lam I``; DLAE is the unconstrained ``B = (G + Lambda)^-1 G``, EDLAE (full
  emphasis on the dropped-out inputs) the same penalty with a zero diagonal.
* ``side_info_gram`` (collective EASE, Jeunen et al. 2020): side information ``F`` (num_items, num_features)
  stacked under ``X`` as ``sqrt(alpha) F'`` pseudo-users, i.e. ``G + alpha F F'``; ``add_ease_weights``: the
  additive variant, ``(1 - beta) B_X + beta B_F`` with ``B_F`` an EASE fitted on ``F'`` alone.
* ``user_ease_scores``: EASE on the transposed matrix (user-user weights from ``X X'``), scores ``B_u' X``.
* ``top_pairs`` / ``pair_indicators`` / ``higher_order_ease``: EASE plus item-pair inputs (Steck & Liang, RecSys
  2021, "Negative interactions for improved collaborative filtering: don't go deeper, go higher"): scores
  ``X B + Z C`` with ``Z[u, p] = X[u, i] X[u, j]`` for the chosen pairs ``p = (i, j)``, fitted by alternating
  closed-form ridge steps with ``diag(B) = 0`` and ``C[p, i] = C[p, j] = 0`` (a pair never predicts its own items).
* ``time_local_gram``: a co-occurrence matrix where two items of one user count ``exp(-|t_i - t_j| / tau)``
  (rated in the same sitting counts ~1, months apart ~0), with the plain counts on the diagonal, for EASE.
* ``ials``: implicit ALS with the frequency-scaled regularisation of Rendle et al. 2021 ("Revisiting the
  performance of iALS on item recommendation benchmarks").
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from kgrec.errors import ConfigError

logger = logging.getLogger(__name__)


def _zero_diagonal_solution(p: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``argmin_B ||Y - X B||^2 + ||B||_Lambda^2`` s.t. ``diag(B) = 0``, given ``P = (X'X + Lambda)^-1`` and
    ``rhs = P X'Y`` (the unconstrained solution): ``B = rhs - P diagMat(diag(rhs) / diag(P))`` (Lagrange)."""
    b = rhs - p * (np.diag(rhs) / np.diag(p))[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE item-item weights (num_items, num_items) from the Gram matrix ``X'X``; zero diagonal."""
    return edlae_weights(gram, 0.0, lam, zero_diagonal=True)


def dropout_penalty(gram: np.ndarray, p: float, lam: float) -> np.ndarray:
    """The per-item L2 penalty (num_items,) that input dropout ``p`` amounts to: ``p/(1-p) diag(G) + lam``."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout probability p={p} must be in [0, 1)")
    return p / (1.0 - p) * np.diag(gram) + lam


def edlae_weights(gram: np.ndarray, p: float, lam: float, zero_diagonal: bool = True) -> np.ndarray:
    """DLAE (``zero_diagonal=False``: ``B = (G + Lambda)^-1 G``) or EDLAE (``True``: zero diagonal) weights.

    Args:
        gram: (num_items, num_items) ``X'X``, float64.
        p: dropout probability of the denoising objective (0 gives plain ridge / EASE).
        lam: extra constant L2 penalty.
        zero_diagonal: constrain ``diag(B) = 0`` (EDLAE with full emphasis) instead of the DLAE solution.
    """
    a = gram.copy()
    a[np.diag_indices_from(a)] += dropout_penalty(gram, p, lam)
    inv = np.linalg.inv(a)
    if not zero_diagonal:
        return inv @ gram
    b = -inv / np.diag(inv)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def dlae_weights(gram: np.ndarray, p: float, lam: float) -> np.ndarray:
    """DLAE weights ``(G + Lambda)^-1 G = I - (G + Lambda)^-1 Lambda`` (diagonal kept, shrunk towards ``1 - p``)."""
    return edlae_weights(gram, p, lam, zero_diagonal=False)


def feature_gram(features: np.ndarray | sp.spmatrix) -> np.ndarray:
    """``F F'`` (num_items, num_items) float64 for dense or sparse item features ``F`` (num_items, num_features)."""
    ff = features @ features.T
    return np.asarray(ff.toarray() if sp.issparse(ff) else ff, dtype=np.float64)


def side_info_gram(gram: np.ndarray, features: np.ndarray | sp.spmatrix, alpha: float) -> np.ndarray:
    """Collective EASE Gram: ``X'X + alpha F F'`` for item features ``F`` (num_items, num_features), dense or sparse."""
    if features.shape[0] != gram.shape[0]:
        raise ConfigError(f"side information has {features.shape[0]} rows, the interaction matrix {gram.shape[0]} items")
    return gram + alpha * feature_gram(features)


def add_ease_weights(
    gram: np.ndarray, features: np.ndarray | sp.spmatrix, lam: float, lam_side: float, beta: float
) -> np.ndarray:
    """Additive EASE: ``(1 - beta) EASE(X'X, lam) + beta EASE(F F', lam_side)``, both (num_items, num_items)."""
    side = ease_weights(feature_gram(features), lam_side)
    return (1.0 - beta) * ease_weights(gram, lam) + beta * side


def user_ease_scores(x: np.ndarray, lam: float) -> np.ndarray:
    """User-user EASE: weights ``B_u`` (num_users, num_users) from ``X X'``; scores ``B_u' X`` (num_users, num_items).

    A user's score for item i is a weighted vote of the other users who interacted with i (zero self-weight)."""
    b = ease_weights(x @ x.T, lam)
    return b.T @ x


def time_local_gram(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, num_items: int, tau: float
) -> np.ndarray:
    """(num_items, num_items) ``sum_u sum_{i != j in I_u} exp(-|t_ui - t_uj| / tau)``; diagonal = item counts.

    Args:
        users, items: (n,) int interaction indices (no duplicate pairs); timestamps: (n,) seconds; tau: seconds.
    """
    gram = np.zeros((num_items, num_items))
    order = np.argsort(users, kind="stable")
    users, items, timestamps = users[order], items[order], np.asarray(timestamps, dtype=np.float64)[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    for it, ts in zip(np.split(items, bounds), np.split(timestamps, bounds)):
        gram[np.ix_(it, it)] += np.exp(-np.abs(ts[:, None] - ts[None, :]) / tau)
    np.fill_diagonal(gram, np.bincount(items, minlength=num_items).astype(np.float64))
    return gram


def top_pairs(x: np.ndarray, num_pairs: int, min_count: int = 2) -> np.ndarray:
    """The ``num_pairs`` item pairs (i < j) that co-occur in most users' histories (at least ``min_count``):
    (num_pairs, 2) int64, most frequent first, ties by (i, j)."""
    co = x.T @ x
    iu, ju = np.triu_indices(co.shape[0], k=1)
    counts = co[iu, ju]
    keep = counts >= min_count
    iu, ju, counts = iu[keep], ju[keep], counts[keep]
    order = np.lexsort((ju, iu, -counts))[:num_pairs]
    return np.stack([iu[order], ju[order]], 1).astype(np.int64)


def pair_indicators(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``Z`` (num_users, num_pairs): 1 where the user has both items of the pair."""
    return x[:, pairs[:, 0]] * x[:, pairs[:, 1]]


def higher_order_ease(
    x: np.ndarray, pairs: np.ndarray, lam: float, lam_pairs: float, iterations: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``X ~ X B + Z C`` (``Z = pair_indicators(x, pairs)``) by alternating constrained ridge regressions.

    Args:
        x: (num_users, num_items) training interactions.
        pairs: (num_pairs, 2) item pairs, e.g. from ``top_pairs``.
        lam: L2 penalty of ``B``; ``lam_pairs``: of ``C``.
        iterations: rounds of (C given B, B given C) after the EASE start.

    Returns:
        ``B`` (num_items, num_items) with a zero diagonal and ``C`` (num_pairs, num_items) with
        ``C[p, pairs[p, 0]] = C[p, pairs[p, 1]] = 0``. Scores: ``x @ B + pair_indicators(x, pairs) @ C``.
    """
    z = pair_indicators(x, pairs)
    gram = x.T @ x
    a = gram.copy()
    a[np.diag_indices_from(a)] += lam
    p_items = np.linalg.inv(a)
    zg = z.T @ z
    zg[np.diag_indices_from(zg)] += lam_pairs
    q = np.linalg.inv(zg)
    # pairs containing item i: the rows of C's column i that must be zero
    owners: dict[int, list[int]] = {}
    for k, (i, j) in enumerate(pairs):
        owners.setdefault(int(i), []).append(k)
        owners.setdefault(int(j), []).append(k)
    b = _zero_diagonal_solution(p_items, p_items @ gram)
    c = np.zeros((len(pairs), x.shape[1]))
    for it in range(iterations):
        c = q @ (z.T @ (x - x @ b))
        for i, rows in owners.items():
            s = np.asarray(rows)
            # Lagrange correction that zeroes C[s, i]: c_i - Q[:, s] Q[s, s]^-1 c_i[s]
            c[:, i] -= q[:, s] @ np.linalg.solve(q[np.ix_(s, s)], c[s, i])
            c[s, i] = 0.0
        b = _zero_diagonal_solution(p_items, p_items @ (x.T @ (x - z @ c)))
        logger.debug("higher-order EASE iteration %d: |C| %.3g", it, float(np.abs(c).sum()))
    return b, c


def ials(
    x: np.ndarray,
    dim: int,
    alpha0: float,
    reg: float,
    nu: float = 1.0,
    epochs: int = 16,
    seed: int = 0,
    init_std: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Implicit ALS (Rendle et al. 2021): minimise
    ``sum_{(u,i) observed} (w_u.h_i - 1)^2 + alpha0 sum_{u,i} (w_u.h_i)^2 + reg sum_u (n_u + alpha0 I)^nu |w_u|^2
    + reg sum_i (n_i + alpha0 U)^nu |h_i|^2`` by exact alternating solves.

    Args:
        x: (num_users, num_items) binary training interactions.
        dim: embedding size; ``alpha0``: weight of the unobserved (all-pairs) term; ``reg``, ``nu``: regulariser
            scaled by ``(count + alpha0 * other side size) ** nu``; ``epochs``: user+item sweeps.
        seed: initialisation seed; ``init_std``: initial std, divided by ``sqrt(dim)``.

    Returns:
        user factors (num_users, dim) and item factors (num_items, dim); scores ``W @ H.T``.
    """
    rng = np.random.default_rng(seed)
    n_users, n_items = x.shape
    w = rng.normal(0.0, init_std / np.sqrt(dim), (n_users, dim))
    hmat = rng.normal(0.0, init_std / np.sqrt(dim), (n_items, dim))

    def solve(rows: np.ndarray, fixed: np.ndarray, n_other: int) -> np.ndarray:
        # per row: (alpha0 F'F + F_r'F_r + reg_r I) w = F_r' 1, with F_r the fixed factors of the row's items;
        # F_r'F_r from the row's own items (sum of n_r d^2), not a dense outer-product table
        counts = rows.sum(1)
        gram = alpha0 * (fixed.T @ fixed)
        reg_rows = reg * (counts + alpha0 * n_other) ** nu
        out = np.empty((rows.shape[0], dim))
        a = np.empty((rows.shape[0], dim, dim))
        for r in range(rows.shape[0]):
            f = fixed[np.flatnonzero(rows[r])]
            a[r] = f.T @ f
        a += gram[None]
        a[:, np.arange(dim), np.arange(dim)] += reg_rows[:, None]
        out[:] = np.linalg.solve(a, (rows @ fixed)[:, :, None])[:, :, 0]
        return out

    for ep in range(epochs):
        w = solve(x, hmat, n_items)
        hmat = solve(x.T, w, n_users)
        logger.debug("iALS epoch %d done", ep)
    return w, hmat


def mult_vae_scores(
    x: np.ndarray,
    checkpoints: tuple[int, ...] = (50, 100, 200),
    hidden: int = 600,
    latent: int = 200,
    beta_max: float = 0.2,
    anneal_steps: int = 2000,
    dropout: float = 0.5,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Mult-VAE (Liang et al. 2018, "Variational autoencoders for collaborative filtering"), trained on ``x``.

    Encoder: L2-normalised, dropped-out history -> tanh(``hidden``) -> mean and log-variance (``latent``);
    decoder: tanh(``hidden``) -> logits over items; loss: multinomial log-likelihood + ``beta`` KL, ``beta``
    annealed linearly to ``beta_max`` over ``anneal_steps`` updates.

    Returns:
        ``{epoch: (num_users, num_items) float64 scores}`` (decoder logits of the mean code, no dropout) after each
        epoch count in ``checkpoints``, so the caller can choose the epoch count on validation data.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_users, n_items = x.shape
    enc = nn.Sequential(nn.Linear(n_items, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
    dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, n_items))
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    data = torch.as_tensor(x, dtype=torch.float32)
    drop = nn.Dropout(dropout)

    def encode(batch: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = nn.functional.normalize(batch, dim=1)
        h = drop(h) if train else h
        mu, logvar = enc(h).chunk(2, dim=1)
        return mu, logvar

    out: dict[int, np.ndarray] = {}
    step = 0
    for epoch in range(1, max(checkpoints) + 1):
        enc.train(), dec.train(), drop.train()
        order = torch.as_tensor(rng.permutation(n_users))
        for start in range(0, n_users, batch_size):
            batch = data[order[start : start + batch_size]]
            mu, logvar = encode(batch, True)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            logp = torch.log_softmax(dec(z), dim=1)
            nll = -(logp * batch).sum(1).mean()
            kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
            beta = min(beta_max, beta_max * step / anneal_steps)
            loss = nll + beta * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        if epoch in checkpoints:
            with torch.no_grad():
                enc.eval(), dec.eval()
                mu, _ = encode(data, False)
                out[epoch] = dec(mu).double().numpy()
    return out
