"""Generated taste data for fusion tests: users and items in clusters, items' text vectors reveal their cluster."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch


@dataclass
class Taste:
    num_users: int
    num_items: int
    user_cluster: np.ndarray  # (U,)
    item_cluster: np.ndarray  # (I,)
    text: np.ndarray  # (I, 16) float32
    users: np.ndarray  # interactions, split codes 0/1/2
    items: np.ndarray
    split: np.ndarray


def make_taste(num_users: int = 240, num_items: int = 120, clusters: int = 4, per_user: int = 14, seed: int = 0) -> Taste:
    """Each user interacts mostly (90%) with items of their own cluster; item popularity is mildly skewed so
    popularity is a weak but non-trivial baseline."""
    rng = np.random.default_rng(seed)
    uc = rng.integers(0, clusters, num_users)
    ic = np.arange(num_items) % clusters
    centres = rng.normal(size=(clusters, 16))
    text = (centres[ic] + 0.3 * rng.normal(size=(num_items, 16))).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    pop = rng.pareto(2.0, num_items) + 1.0
    us, its = [], []
    for u in range(num_users):
        p = np.where(ic == uc[u], 1.0, 0.02) * pop
        chosen = rng.choice(num_items, per_user, replace=False, p=p / p.sum())
        us += [u] * per_user
        its += list(chosen)
    users, items = np.array(us), np.array(its)
    from fusion.splits import random_split

    return Taste(num_users, num_items, uc, ic, text, users, items, random_split(users, seed=seed))


@pytest.fixture(scope="session")
def taste() -> Taste:
    torch.set_num_threads(1)  # under a shared, loaded CPU one thread is ~10x faster than two (measured)
    return make_taste()
