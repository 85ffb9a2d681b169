"""Full-ranking top-K metrics with RecBole 1.2.1's exact definitions.

For a user ``u`` with held-out items ``P_u`` and ``rel_i = 1`` when the item at rank ``i`` is in ``P_u``:

* ``recall@k``    = sum_{i<=k} rel_i / |P_u|  (full ``|P_u|`` in the denominator, not ``min(|P_u|, k)``)
* ``ndcg@k``      = DCG@k / IDCG@k, DCG@k = sum_{i<=k} rel_i / log2(i+1), IDCG@k = sum_{i=1}^{min(|P_u|,k)} 1/log2(i+1)
* ``hit@k``       = 1 if any rel_i = 1 for i <= k
* ``mrr@k``       = 1 / rank of the first relevant item within the top k, else 0
* ``precision@k`` = sum_{i<=k} rel_i / k
* ``item_coverage@k`` = distinct items in all users' top-k lists / number of items (a catalogue-level number)

Candidates are all items; the items in ``exclude`` (the user's train items at validation, train + valid at test)
are masked to ``-inf`` before ``torch.topk``. Users are macro-averaged over every user with at least one held-out
item. Values are returned unrounded; RecBole reports them rounded to 4 decimals.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("recall", "ndcg", "hit", "mrr", "precision")

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a 1-D tensor of user indices (b,) to scores over all items (b, num_items)."""


def to_csr(users: np.ndarray, items: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary user x item CSR matrix from index arrays (duplicates collapse to 1)."""
    data = np.ones(len(users), dtype=np.float32)
    m = sp.csr_matrix((data, (np.asarray(users), np.asarray(items))), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def rank_metrics(topk_hits: np.ndarray, num_pos: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-user metric values from a hit matrix.

    Args:
        topk_hits: (n_users, max_k) bool/0-1, ``topk_hits[u, i]`` is 1 when the item at rank ``i+1`` is relevant.
        num_pos: (n_users,) number of held-out items per user (> 0).
        ks: cut-offs, each <= max_k.

    Returns:
        ``{"recall@10": (n_users,) float64, ...}`` for every metric in ``METRICS`` and every k.
    """
    hits = np.asarray(topk_hits, dtype=np.float64)
    num_pos = np.asarray(num_pos, dtype=np.float64)
    max_k = hits.shape[1]
    ranks = np.arange(1, max_k + 1, dtype=np.float64)
    discounts = 1.0 / np.log2(ranks + 1.0)
    cum_hits = np.cumsum(hits, axis=1)
    dcg = np.cumsum(hits * discounts, axis=1)
    ideal_cum = np.cumsum(discounts)
    # rank of the first hit (1-based), 0 when none within max_k
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        if k > max_k:
            raise ValueError(f"cut-off k={k} exceeds the {max_k} ranked items available")
        h = cum_hits[:, k - 1]
        idcg = ideal_cum[np.minimum(num_pos, k).astype(np.int64) - 1]
        out[f"recall@{k}"] = h / num_pos
        out[f"ndcg@{k}"] = dcg[:, k - 1] / idcg
        out[f"hit@{k}"] = (h > 0).astype(np.float64)
        out[f"mrr@{k}"] = np.where((first > 0) & (first <= k), 1.0 / np.maximum(first, 1), 0.0)
        out[f"precision@{k}"] = h / k
    return out


def evaluate(
    score_fn: ScoreFn,
    heldout: sp.csr_matrix,
    exclude: sp.csr_matrix | None = None,
    ks: Sequence[int] = (10, 20),
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Full-ranking evaluation over all items, RecBole's protocol.

    Args:
        score_fn: user indices (b,) -> scores (b, num_items) tensor (any device).
        heldout: (num_users, num_items) CSR of held-out positives (valid or test).
        exclude: (num_users, num_items) CSR of items masked from each user's ranking (train at valid, train+valid
            at test), or None to rank everything.
        ks: cut-offs.
        batch_size: users scored at once.
        device: where masking and ``torch.topk`` run.

    Returns:
        ``{"recall@20": mean over users, ..., "item_coverage@20": fraction of items, "num_users": n}``.
    """
    heldout = sp.csr_matrix(heldout)
    num_users, num_items = heldout.shape
    num_pos_all = np.diff(heldout.indptr)
    users = np.flatnonzero(num_pos_all > 0)
    max_k = min(max(ks), num_items)
    device = torch.device(device)
    per_user: dict[str, list[np.ndarray]] = {}
    covered = {k: np.zeros(num_items, dtype=bool) for k in ks}
    exclude = None if exclude is None else sp.csr_matrix(exclude)
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        u = torch.as_tensor(batch, dtype=torch.long)
        with torch.no_grad():
            scores = score_fn(u).to(device=device, dtype=torch.float32).clone()
        if exclude is not None:
            ex = exclude[batch].tocoo()
            scores[torch.as_tensor(ex.row, device=device), torch.as_tensor(ex.col, device=device)] = -torch.inf
        top = torch.topk(scores, max_k, dim=1).indices.cpu().numpy()
        truth = heldout[batch].tocoo()
        # membership test on (row, item) keys: no dense (b, num_items) matrix, so it scales to large catalogues
        true_keys = truth.row.astype(np.int64) * num_items + truth.col
        top_keys = np.arange(len(batch), dtype=np.int64)[:, None] * num_items + top
        hits = np.isin(top_keys, true_keys)
        if hits.shape[1] < max(ks):  # a catalogue smaller than k: ranks past its end are never hits
            hits = np.pad(hits, ((0, 0), (0, max(ks) - hits.shape[1])))
        for name, vals in rank_metrics(hits, num_pos_all[batch], ks).items():
            per_user.setdefault(name, []).append(vals)
        for k in ks:
            covered[k][np.unique(top[:, :k])] = True
    result = {name: float(np.concatenate(v).mean()) for name, v in per_user.items()}
    for k in ks:
        result[f"item_coverage@{k}"] = float(covered[k].mean())
    result["num_users"] = float(len(users))
    return result


def scores_from_matrix(matrix: np.ndarray | torch.Tensor) -> ScoreFn:
    """A ``ScoreFn`` reading rows of a precomputed (num_users, num_items) score matrix."""
    t = torch.as_tensor(matrix)
    return lambda u: t[u.to(t.device)]
