"""Exact, batched top-K retrieval by inner product (torch, CPU or GPU), with optional per-user exclusions."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor


def topk_from_scores(scores: Tensor, k: int, exclude: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of a (b, n) score tensor after setting ``exclude``'s (b, n) nonzeros to ``-inf``.

    Returns item indices (b, k) int64 and scores (b, k) float32, best first. ``k`` is capped at ``n``; slots
    beyond the available items (everything excluded) hold index -1 and score ``-inf``.
    """
    scores = scores.float().clone()
    k = min(k, scores.shape[1])
    if exclude is not None and exclude.nnz:
        ex = sp.coo_matrix(exclude)
        scores[torch.as_tensor(ex.row, device=scores.device), torch.as_tensor(ex.col, device=scores.device)] = -torch.inf
    val, idx = torch.topk(scores, k, dim=1)
    idx = idx.cpu().numpy().astype(np.int64)
    val = val.cpu().numpy().astype(np.float32)
    idx[~np.isfinite(val)] = -1
    return idx, val


def topk(
    user_vecs: np.ndarray | Tensor,
    item_vecs: np.ndarray | Tensor,
    k: int,
    exclude: sp.csr_matrix | None = None,
    *,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` items for each user vector by inner product.

    Args:
        user_vecs: (b, d) query vectors.
        item_vecs: (n, d) item vectors.
        k: results per query.
        exclude: optional (b, n) CSR; nonzero (row, item) pairs are never returned (e.g. items already seen).
        batch_size: queries scored at once (memory: batch_size x n floats).
        device: ``cpu`` or ``cuda``.

    Returns:
        indices (b, k) int64 and scores (b, k) float32, best first.
    """
    device = torch.device(device)
    items = torch.as_tensor(np.asarray(item_vecs, dtype=np.float32) if not isinstance(item_vecs, Tensor) else item_vecs).to(device)
    users = torch.as_tensor(np.asarray(user_vecs, dtype=np.float32) if not isinstance(user_vecs, Tensor) else user_vecs)
    if users.ndim == 1:
        users = users.unsqueeze(0)
    if exclude is not None:
        exclude = sp.csr_matrix(exclude)
        if exclude.shape != (users.shape[0], items.shape[0]):
            raise ValueError(f"exclude has shape {exclude.shape}, expected ({users.shape[0]}, {items.shape[0]})")
    out_idx, out_val = [], []
    with torch.no_grad():
        for start in range(0, users.shape[0], batch_size):
            u = users[start : start + batch_size].to(device)
            ex = None if exclude is None else exclude[start : start + batch_size]
            i, v = topk_from_scores(u @ items.T, k, ex)
            out_idx.append(i)
            out_val.append(v)
    return np.concatenate(out_idx), np.concatenate(out_val)


def similar_items(
    item_vecs: np.ndarray, item_idx: int | np.ndarray, k: int = 10, *, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` items with the highest cosine similarity to each of ``item_idx`` (the item itself excluded).

    Returns indices (b, k) int64 and cosine similarities (b, k) float32.
    """
    idx = np.atleast_1d(np.asarray(item_idx, dtype=np.int64))
    v = np.asarray(item_vecs, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    self_mask = sp.csr_matrix((np.ones(len(idx)), (np.arange(len(idx)), idx)), shape=(len(idx), len(v)))
    return topk(v[idx], v, k, exclude=self_mask, device=device)
