from __future__ import annotations

import numpy as np
import pytest

from fusion.splits import TEST, TRAIN, VALID, given_split, leave_one_out, random_split, temporal_split
from kgrec.errors import DataError


def test_random_split_sizes_per_user() -> None:
    users = np.repeat(np.arange(3), [10, 25, 3])
    s = random_split(users, seed=1)
    for u, n in zip(range(3), [10, 25, 3]):
        su = s[users == u]
        assert (su == VALID).sum() == int(0.1 * n) and (su == TEST).sum() == int(0.1 * n)
        assert (su == TRAIN).sum() == n - 2 * int(0.1 * n)
    assert np.array_equal(s, random_split(users, seed=1))
    assert not np.array_equal(s, random_split(users, seed=2))


def test_leave_one_out_takes_latest() -> None:
    users = np.array([0, 0, 0, 0, 1, 1])
    ts = np.array([4, 1, 3, 2, 1, 2])
    s = leave_one_out(users, ts)
    assert list(s) == [TEST, TRAIN, VALID, TRAIN, TRAIN, TRAIN]  # user 1 has < 3 events: all train


def test_temporal_split_orders_by_time() -> None:
    users = np.zeros(10, dtype=int)
    ts = np.arange(10)[::-1]
    s = temporal_split(users, ts)
    assert s[0] == TEST and s[1] == VALID and (s[2:] == TRAIN).all()


def test_given_split_rejects_unknown_names() -> None:
    assert list(given_split(np.array(["train", "test", "valid"]))) == [TRAIN, TEST, VALID]
    with pytest.raises(DataError, match="row 1"):
        given_split(np.array(["train", "tst"]))
