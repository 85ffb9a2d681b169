"""Graph-filter recommenders tried against EASE on ml-100k (issue #6, filter families).

The ``*_scores`` functions take the dense (num_users, num_items) 0/1 float64 interaction matrix ``X`` (the benchmark
passes the train split only) and return a (num_users, num_items) float64 score matrix; the caller masks seen items
and ranks. All but RecVAE are closed forms in numpy (deterministic: eigendecompositions by ``numpy.linalg.eigh``, no
random starts), so their results depend only on ``X`` and the arguments.

The common object is the normalised item-item graph of Shen et al. 2021:

* ``R~ = D_u^-1/2 X D_i^-1/2`` (``D_u``, ``D_i``: user and item degrees; a zero degree gives a zero row/column),
  ``P~ = R~' R~`` (num_items, num_items), symmetric, eigenvalues in [0, 1];
* the *ideal low-pass filter* keeps the top-``k`` eigenvectors ``V_k`` of ``P~`` (the top right singular vectors of
  ``R~``), mapped back to the raw item space as ``D_i^-1/2 V_k V_k' D_i^1/2``.

Models:

* ``gf_cf_scores`` (GF-CF, Shen et al., CIKM 2021, "How powerful is graph convolution for recommendation?"):
  ``X P~ + alpha X D_i^-1/2 V_k V_k' D_i^1/2``.
* ``bspm_scores`` (BSPM, Choi et al., SIGIR 2023, "Blurring-sharpening process models for collaborative
  filtering"): the blurring ODE ``dx/dt = x (P~ - I)`` then the sharpening ODE ``dx/dt = -x P~``, both solved with
  explicit Euler steps, which makes each one a matrix polynomial: blurring over time ``T_b`` in ``K_b`` steps is
  ``((1 - h) I + h P~)^K_b`` with ``h = T_b / K_b``, sharpening over ``T_s`` in ``K_s`` steps is
  ``(I - h P~)^K_s``. The ideal low-pass output (weight ``beta``) is added before sharpening ("final sharpening",
  the paper's default) or after it ("early merge").
* ``turbo_cf_scores`` (after Turbo-CF, Park et al., SIGIR 2024, "Turbo-CF: matrix decomposition-free graph
  filtering for fast recommendation"): no eigendecomposition; the item graph ``P~`` is sharpened element-wise
  (``P~^(o s)``, entries raised to the power ``s``), re-normalised symmetrically by its row sums (eigenvalues then in
  [-1, 1]) and filtered by a polynomial ``sum_j c_j P^j``, e.g. ``2 P - P^2`` (a low-pass filter steeper than ``P``).
* ``time_local_item_graph``: ``P~`` from time-local co-occurrences (a user's two items weighted by
  ``exp(-|t_i - t_j| / tau)``, so items rated in one sitting count fully), for BSPM's ODEs (``graph=``).
* ``nonnegative_ease_weights``: EASE with ``B >= 0`` (and an optional L1 penalty), solved by ADMM (SLIM-style).
* ``rec_vae_scores``: RecVAE (Shenbin et al. 2020), the one trained model here (torch on the CPU, seeded); the
  others are closed forms.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from kgrec.errors import ConfigError

logger = logging.getLogger(__name__)


def _inverse_power(degrees: np.ndarray, exponent: float) -> np.ndarray:
    """``degrees ** -exponent`` with 0 where a degree is 0 (an item nobody took stays out of the graph)."""
    out = np.zeros_like(degrees, dtype=np.float64)
    nz = degrees > 0
    out[nz] = degrees[nz] ** -exponent
    return out


def normalized_item_graph(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P~ = R~' R~`` with ``R~ = D_u^-1/2 X D_i^-1/2``.

    Args:
        x: (num_users, num_items) interactions, 0/1 float64.

    Returns:
        ``P~`` (num_items, num_items) symmetric, eigenvalues in [0, 1], and the item degrees (num_items,).
    """
    du = x.sum(1)
    di = x.sum(0)
    r = x * _inverse_power(du, 0.5)[:, None] * _inverse_power(di, 0.5)[None, :]
    return r.T @ r, di


def top_eigenvectors(p: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` eigenvectors of the symmetric ``p`` with the largest eigenvalues, (num_items, k), by ``eigh``."""
    n = p.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"ideal low-pass filter: k={k} must be in [1, {n}] (the number of items)")
    _, vecs = np.linalg.eigh(p)
    return vecs[:, ::-1][:, :k]


def ideal_low_pass(p: np.ndarray, item_degrees: np.ndarray, k: int) -> np.ndarray:
    """GF-CF's ideal low-pass filter in the raw item space: ``D_i^-1/2 V_k V_k' D_i^1/2`` (num_items, num_items)."""
    v = top_eigenvectors(p, k)
    left = v * _inverse_power(item_degrees, 0.5)[:, None]
    right = v.T * np.sqrt(item_degrees)[None, :]
    return left @ right


def gf_cf_scores(x: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """GF-CF (Shen et al. 2021): ``X P~ + alpha X D_i^-1/2 V_k V_k' D_i^1/2``.

    Args:
        x: (num_users, num_items) 0/1 float64 interactions.
        k: number of eigenvectors in the ideal low-pass filter.
        alpha: weight of the ideal low-pass term (0 gives the linear filter ``X P~`` alone).

    Returns:
        (num_users, num_items) float64 scores.
    """
    p, di = normalized_item_graph(x)
    filt = p if alpha == 0.0 else p + alpha * ideal_low_pass(p, di, k)
    return x @ filt


def time_local_item_graph(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, num_items: int, tau: float
) -> np.ndarray:
    """``P~`` with a user's two items weighted by ``exp(-|t_ui - t_uj| / tau)``, scaled to top eigenvalue 1.

    ``sum_u (1 / n_u) k_u(i, j)`` with ``k_u(i, j) = exp(-|t_ui - t_uj| / tau)`` (1 on the diagonal), normalised by
    ``D_i^-1/2 . D_i^-1/2`` like ``P~`` (``tau -> infinity`` gives ``P~`` itself), then divided by its largest
    eigenvalue so that BSPM's Euler steps keep their meaning. Items rated in one sitting count fully, items rated
    months apart barely (the time-local co-occurrence of ``benchmarks.ml100k_models.time_local_gram``).

    Args:
        users, items: (n,) int interaction indices (no duplicate pairs); timestamps: (n,) seconds; tau: seconds.

    Returns:
        (num_items, num_items) float64, symmetric.
    """
    if tau <= 0:
        raise ConfigError(f"time_local_item_graph: tau={tau} must be > 0 seconds")
    g = np.zeros((num_items, num_items))
    order = np.argsort(users, kind="stable")
    users, items, ts = users[order], items[order], np.asarray(timestamps, dtype=np.float64)[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    for it, t in zip(np.split(items, bounds), np.split(ts, bounds)):
        g[np.ix_(it, it)] += np.exp(-np.abs(t[:, None] - t[None, :]) / tau) / len(it)
    d = _inverse_power(np.bincount(items, minlength=num_items).astype(np.float64), 0.5)
    g *= d[:, None] * d[None, :]
    return g / np.linalg.eigvalsh(g)[-1]


def _euler_polynomial(p: np.ndarray, a: float, b: float, steps: int) -> np.ndarray:
    """``(a I + b P)^steps`` (num_items, num_items), by repeated multiplication."""
    step = b * p
    step[np.diag_indices_from(step)] += a
    out = np.eye(p.shape[0])
    for _ in range(steps):
        out = out @ step
    return out


def bspm_scores(
    x: np.ndarray,
    k: int,
    beta: float,
    t_blur: float = 1.0,
    steps_blur: int = 1,
    t_sharp: float = 1.0,
    steps_sharp: int = 1,
    final_sharpening: bool = True,
    graph: np.ndarray | None = None,
) -> np.ndarray:
    """BSPM (Choi et al. 2023) with explicit Euler steps on both ODEs.

    Blurring ``dx/dt = x (P~ - I)`` for ``t_blur`` in ``steps_blur`` steps, sharpening ``dx/dt = -x P~`` for
    ``t_sharp`` in ``steps_sharp`` steps (``t_sharp = 0`` switches sharpening off). The ideal low-pass output
    ``beta X D_i^-1/2 V_k V_k' D_i^1/2`` is added to the blurred signal before sharpening when
    ``final_sharpening`` (the paper's default), else to the sharpened one.

    Args:
        x: (num_users, num_items) 0/1 float64 interactions.
        k: eigenvectors in the ideal low-pass filter (unused when ``beta`` is 0).
        beta: weight of the ideal low-pass output.
        t_blur, steps_blur, t_sharp, steps_sharp: ODE horizons and Euler step counts (steps >= 1).
        final_sharpening: merge the ideal low-pass output before (True) or after (False) sharpening.
        graph: (num_items, num_items) symmetric item graph with top eigenvalue 1 for the two ODEs (e.g.
            ``time_local_item_graph``); default ``P~``. The ideal low-pass filter always comes from ``P~``.

    Returns:
        (num_users, num_items) float64 scores.
    """
    if steps_blur < 1 or steps_sharp < 1:
        raise ConfigError(
            f"BSPM: Euler step counts must be >= 1, got steps_blur={steps_blur}, steps_sharp={steps_sharp}"
        )
    p_plain, di = normalized_item_graph(x)
    p = p_plain if graph is None else graph
    if p.shape != p_plain.shape:
        raise ConfigError(f"BSPM: graph has shape {p.shape}, expected {p_plain.shape} (num_items x num_items)")
    h_b = t_blur / steps_blur
    blur = _euler_polynomial(p, 1.0 - h_b, h_b, steps_blur)
    sharp = _euler_polynomial(p, 1.0, -t_sharp / steps_sharp, steps_sharp)
    if beta == 0.0:
        return x @ (blur @ sharp)
    idl = beta * ideal_low_pass(p_plain, di, k)
    filt = (blur + idl) @ sharp if final_sharpening else blur @ sharp + idl
    return x @ filt


def turbo_cf_scores(x: np.ndarray, coefficients: Sequence[float], power: float = 1.0) -> np.ndarray:
    """A Turbo-CF style polynomial filter: ``X sum_j c_j P^j`` with ``P = D^-1/2 (P~^(o power)) D^-1/2``.

    ``P~`` is GF-CF's normalised item graph, raised element-wise to ``power`` (> 1 sharpens it: weak co-occurrences
    shrink faster than strong ones), then normalised symmetrically by its row sums ``D`` (so its eigenvalues lie in
    [-1, 1] and the polynomial is a graph filter in the usual sense).

    Args:
        x: (num_users, num_items) 0/1 float64 interactions.
        coefficients: ``c_1, c_2, ...`` of ``P^1, P^2, ...`` (no constant term: ``c_0 I`` only adds the seen items).
        power: element-wise exponent on ``P~``.

    Returns:
        (num_users, num_items) float64 scores.
    """
    if len(coefficients) == 0:
        raise ConfigError("turbo_cf_scores: give at least one polynomial coefficient (of P^1)")
    p_tilde, _ = normalized_item_graph(x)
    ps = p_tilde**power
    d = _inverse_power(ps.sum(1), 0.5)
    p = ps * d[:, None] * d[None, :]
    filt = np.zeros_like(p)
    term = np.eye(p.shape[0])
    for c in coefficients:
        term = term @ p
        if c:
            filt += c * term
    return x @ filt


def nonnegative_ease_weights(
    gram: np.ndarray, lam: float, l1: float = 0.0, rho: float | None = None, iterations: int = 100
) -> np.ndarray:
    """EASE with non-negative weights (and an optional L1 penalty), i.e. SLIM solved by ADMM (Steck et al., WSDM
    2020, "ADMM SLIM").

    Minimises ``1/2 ||X - X B||^2 + lam/2 ||B||^2 + l1 sum(B)`` subject to ``B >= 0`` and ``diag(B) = 0`` through the
    split ``B = C``: ``B`` gets the zero-diagonal ridge solution with the extra penalty ``rho/2 ||B - C + U||^2``,
    ``C = max(B + U - l1 / rho, 0)`` (zero diagonal), ``U += B - C``. Without the constraint this is EASE with the
    same ``lam``.

    Args:
        gram: ``X'X`` (num_items, num_items).
        lam: L2 penalty (EASE's lambda).
        l1: L1 penalty (>= 0) on the weights.
        rho: ADMM step; defaults to ``lam``.
        iterations: ADMM iterations.

    Returns:
        ``C`` (num_items, num_items): non-negative weights with a zero diagonal.
    """
    if lam < 0 or l1 < 0:
        raise ConfigError(f"non-negative EASE: lam={lam} and l1={l1} must be >= 0")
    rho = float(lam if rho is None else rho)
    if rho <= 0:
        raise ConfigError(f"non-negative EASE: the ADMM step rho={rho} must be > 0 (give rho when lam is 0)")
    n = gram.shape[0]
    p = np.linalg.inv(gram + (lam + rho) * np.eye(n))
    pg = p @ gram
    c = np.zeros_like(gram)
    u = np.zeros_like(gram)
    for _ in range(iterations):
        rhs = pg + rho * (p @ (c - u))
        b = rhs - p * (np.diag(rhs) / np.diag(p))[None, :]
        np.fill_diagonal(b, 0.0)
        c = np.maximum(b + u - l1 / rho, 0.0)
        np.fill_diagonal(c, 0.0)
        u += b - c
    logger.debug("non-negative EASE: primal residual %.3g after %d iterations", np.abs(b - c).max(), iterations)
    return c


def rec_vae_scores(
    x: np.ndarray,
    checkpoints: Sequence[int] = (25, 50, 100),
    hidden: int = 600,
    latent: int = 200,
    gamma: float = 0.005,
    encoder_epochs: int = 3,
    dropout: float = 0.5,
    lr: float = 5e-4,
    batch_size: int = 500,
    mixture_weights: tuple[float, float, float] = (3 / 20, 3 / 4, 1 / 10),
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """RecVAE (Shenbin et al., WSDM 2020, "RecVAE: a new variational autoencoder for top-N recommendations with
    implicit feedback"), trained on ``x`` with torch on the CPU.

    Against Mult-VAE: a 5-layer encoder with dense residual connections, swish and layer norm; a composite prior
    (standard normal, the previous epoch's posterior ``q_old(z | x)``, a wide normal with log-variance 10, mixed by
    ``mixture_weights``); a KL weight ``gamma * |x_u|`` growing with the user's history; alternating updates, each
    epoch ``encoder_epochs`` passes of the encoder (input dropout ``dropout``) then one of the (linear) decoder
    without dropout, the prior's encoder copied from the current one in between.

    Returns:
        ``{epoch: (num_users, num_items) float64 scores}`` (decoder logits of the posterior mean) after each epoch
        count in ``checkpoints``, so the caller can choose the epoch count on validation data.
    """
    import copy
    import math

    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_users, n_items = x.shape

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.ModuleList([nn.Linear(n_items if i == 0 else hidden, hidden) for i in range(5)])
            self.ln = nn.ModuleList([nn.LayerNorm(hidden, eps=0.1) for _ in range(5)])
            self.mu, self.logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)

        def forward(self, batch: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
            h = nn.functional.dropout(nn.functional.normalize(batch, dim=1), p=rate, training=rate > 0)
            skip = None
            for fc, ln in zip(self.fc, self.ln):
                pre = fc(h) if skip is None else fc(h) + skip
                h = ln(nn.functional.silu(pre))
                skip = h if skip is None else skip + h
            return self.mu(h), self.logvar(h)

    def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return -0.5 * (logvar + math.log(2 * math.pi) + (z - mu) ** 2 / logvar.exp())

    encoder, decoder = Encoder(), nn.Linear(latent, n_items)
    old = copy.deepcopy(encoder).requires_grad_(False)
    log_w = [math.log(w) for w in mixture_weights]
    opt_enc = torch.optim.Adam(encoder.parameters(), lr=lr)
    opt_dec = torch.optim.Adam(decoder.parameters(), lr=lr)
    data = torch.as_tensor(x, dtype=torch.float32)
    zero = torch.zeros(1, latent)

    def run(opt: torch.optim.Optimizer, rate: float) -> None:
        order = torch.as_tensor(rng.permutation(n_users))
        for start in range(0, n_users, batch_size):
            batch = data[order[start : start + batch_size]]
            mu, logvar = encoder(batch, rate)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            mll = (torch.log_softmax(decoder(z), dim=1) * batch).sum(1).mean()
            with torch.no_grad():
                old_mu, old_logvar = old(batch, 0.0)
            prior = torch.logsumexp(torch.stack([
                log_normal(z, zero, zero) + log_w[0],
                log_normal(z, old_mu, old_logvar) + log_w[1],
                log_normal(z, zero, torch.full_like(zero, 10.0)) + log_w[2],
            ], dim=-1), dim=-1)
            kl = ((log_normal(z, mu, logvar) - prior).sum(1) * gamma * batch.sum(1)).mean()
            loss = kl - mll
            opt.zero_grad()
            loss.backward()
            opt.step()

    out: dict[int, np.ndarray] = {}
    for epoch in range(1, max(checkpoints) + 1):
        for _ in range(encoder_epochs):
            run(opt_enc, dropout)
        old.load_state_dict(encoder.state_dict())
        run(opt_dec, 0.0)
        if epoch in checkpoints:
            with torch.no_grad():
                mu, _ = encoder(data, 0.0)
                out[epoch] = decoder(mu).double().numpy()
    return out
