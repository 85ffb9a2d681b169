from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from fusion.retrieve import similar_items, topk


def test_topk_matches_brute_force_with_exclusions() -> None:
    rng = np.random.default_rng(3)
    users, items = rng.normal(size=(37, 8)).astype(np.float32), rng.normal(size=(101, 8)).astype(np.float32)
    ex = sp.csr_matrix((rng.random((37, 101)) < 0.3).astype(np.float32))
    idx, val = topk(users, items, 10, exclude=ex, batch_size=8)
    full = users @ items.T
    full[ex.toarray() > 0] = -np.inf
    brute = np.argsort(-full, axis=1, kind="stable")[:, :10]
    assert np.allclose(val, np.take_along_axis(full, brute, 1), atol=1e-5)
    assert not (ex.toarray()[np.arange(37)[:, None], idx] > 0).any()


def test_topk_caps_and_marks_exhausted_slots() -> None:
    items = np.eye(3, dtype=np.float32)
    ex = sp.csr_matrix(np.array([[1, 1, 0]], dtype=np.float32))
    idx, val = topk(np.ones((1, 3), dtype=np.float32), items, 5, exclude=ex)
    assert idx.shape == (1, 3) and idx[0, 0] == 2 and (idx[0, 1:] == -1).all()


def test_similar_items_excludes_itself() -> None:
    v = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    idx, sim = similar_items(v, [0, 2], k=1)
    assert idx[:, 0].tolist() == [1, 3] and (sim[:, 0] > 0.9).all()
