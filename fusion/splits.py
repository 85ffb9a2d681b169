"""Train/valid/test splits of interaction index arrays (plain arrays in, boolean masks or arrays out).

Every function returns a ``split`` array of the same length as the interactions with values 0 (train), 1 (valid),
2 (test). ``random_split`` is RecBole's ``RS: [0.8, 0.1, 0.1], group_by: user`` without its small-user rule: per
user with ``n`` interactions, ``valid = test = int(0.1 * n)`` taken from a seeded shuffle, train gets the rest, so
users with fewer than 10 interactions stay in train only (RecBole >= 1.0 moves one interaction each into valid and
test when ``0 < 0.1 * n < 1``; for n >= 10 the counts are the same). ``temporal_split`` has the same rule.
"""
from __future__ import annotations

import numpy as np

from kgrec.errors import DataError

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "valid": VALID, "test": TEST}


def given_split(labels: np.ndarray) -> np.ndarray:
    """Map split names (``train``/``valid``/``test``) to codes; raises DataError naming the first bad value."""
    labels = np.asarray(labels).astype(str)
    bad = ~np.isin(labels, list(SPLIT_NAMES))
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise DataError(f"split row {pos}: unknown split {labels[pos]!r}; use train, valid or test")
    out = np.empty(len(labels), dtype=np.int8)
    for name, code in SPLIT_NAMES.items():
        out[labels == name] = code
    return out


def random_split(users: np.ndarray, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 2020) -> np.ndarray:
    """Random per-user split: each user's interactions are shuffled; ``int(ratio * n)`` go to valid and test.

    Args:
        users: (n,) user index per interaction.
        ratios: train/valid/test fractions (valid and test sizes are floored, train takes the rest).
        seed: numpy seed of the shuffle.
    """
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise DataError(f"split ratios {ratios} must sum to 1")
    users = np.asarray(users)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(users))
    order = perm[np.argsort(users[perm], kind="stable")]  # grouped by user, shuffled within
    out = np.full(len(users), TRAIN, dtype=np.int8)
    _, starts, counts = np.unique(users[order], return_index=True, return_counts=True)
    for s, n in zip(starts, counts):
        n_valid, n_test = int(ratios[1] * n), int(ratios[2] * n)
        rows = order[s : s + n]
        out[rows[n - n_valid - n_test : n - n_test]] = VALID
        out[rows[n - n_test :]] = TEST
    return out


def _ordered_holdout(users: np.ndarray, order_key: np.ndarray, n_valid: np.ndarray, n_test: np.ndarray) -> np.ndarray:
    order = np.lexsort((order_key, users))
    out = np.full(len(users), TRAIN, dtype=np.int8)
    _, starts, counts = np.unique(users[order], return_index=True, return_counts=True)
    for k, (s, n) in enumerate(zip(starts, counts)):
        rows = order[s : s + n]
        nv, nt = int(n_valid[k]), int(n_test[k])
        out[rows[n - nv - nt : n - nt]] = VALID
        out[rows[n - nt :]] = TEST
    return out


def leave_one_out(users: np.ndarray, timestamps: np.ndarray | None = None, seed: int = 2020) -> np.ndarray:
    """Last interaction of each user (by timestamp, or a seeded random one) is test, the one before valid.

    Users with fewer than 3 interactions keep everything in train.
    """
    users = np.asarray(users)
    key = np.asarray(timestamps) if timestamps is not None else np.random.default_rng(seed).random(len(users))
    _, counts = np.unique(users, return_counts=True)
    enough = (counts >= 3).astype(int)
    return _ordered_holdout(users, key, enough, enough)


def temporal_split(users: np.ndarray, timestamps: np.ndarray, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """Per-user temporal split: each user's oldest interactions train, the newest ``int(ratio * n)`` valid/test."""
    users = np.asarray(users)
    _, counts = np.unique(users, return_counts=True)
    return _ordered_holdout(
        users, np.asarray(timestamps), (counts * ratios[1]).astype(int), (counts * ratios[2]).astype(int)
    )


def global_temporal_split(timestamps: np.ndarray, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """One global cut in time: the oldest ``ratios[0]`` of all interactions train, then valid, then test."""
    ts = np.asarray(timestamps)
    order = np.argsort(ts, kind="stable")
    n = len(ts)
    a, b = int(round(ratios[0] * n)), int(round((ratios[0] + ratios[1]) * n))
    out = np.full(n, TRAIN, dtype=np.int8)
    out[order[a:b]] = VALID
    out[order[b:]] = TEST
    return out
