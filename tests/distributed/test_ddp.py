"""A 2-process gloo DDP run of the GNN equals the single-process run with the same global batch.

Tolerance: user/item embeddings within atol 1e-4 after 4 epochs (Adam on gradients that differ only in
floating-point summation order), per-epoch losses within rtol 1e-4, validation NDCG@20 within 1e-3.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kgrec.config import FusionConfig

U, I = 90, 60


def make_data(seed: int = 0):
    """Users and items in 3 clusters; users mostly pick items of their cluster; text vectors reveal the cluster."""
    rng = np.random.default_rng(seed)
    uc, ic = rng.integers(0, 3, U), np.arange(I) % 3
    text = (np.eye(3)[ic] @ rng.normal(size=(3, 8)) + 0.3 * rng.normal(size=(I, 8))).astype(np.float32)
    us, its = [], []
    for u in range(U):
        p = np.where(ic == uc[u], 1.0, 0.05)
        chosen = rng.choice(I, 8, replace=False, p=p / p.sum())
        us += [u] * 8
        its += list(chosen)
    users, items = np.array(us), np.array(its)
    valid = rng.random(len(users)) < 0.2
    return users[~valid], items[~valid], users[valid], items[valid], text


def config() -> FusionConfig:
    # 521 training pairs / batch 128: the last batch (9 rows) is uneven across ranks on purpose
    return FusionConfig(dim=16, num_layers=2, epochs=4, batch_size=128, lr=0.01, seed=5, device="cpu",
                        num_negatives=2, patience=10)


def _rank_main(rank: int, world: int, out: str) -> None:
    from safetensors.numpy import save_file

    from kgrec.distributed.ddp import train_model_ddp

    tu, ti, vu, vi, text = make_data()
    m = train_model_ddp(U, I, tu, ti, text=text, valid=(vu, vi), config=config())
    save_file({"users": m.user_embeddings, "items": m.item_embeddings,
               "loss": np.array([h["loss"] for h in m.history]),
               "ndcg": np.array([h["valid"]["ndcg@20"] for h in m.history])}, f"{out}/rank{rank}.safetensors")


def test_two_process_gloo_ddp_matches_single_process(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from fusion.train import train_model
    from kgrec.distributed.ddp import spawn

    tu, ti, vu, vi, text = make_data()
    torch.set_num_threads(1)
    single = train_model(U, I, tu, ti, text=text, valid=(vu, vi), config=config())
    spawn(_rank_main, 2, (str(tmp_path),))
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    np.testing.assert_array_equal(r0["users"], r1["users"])  # replicas stay identical
    np.testing.assert_allclose(r0["users"], single.user_embeddings, atol=1e-4)
    np.testing.assert_allclose(r0["items"], single.item_embeddings, atol=1e-4)
    loss = np.array([h["loss"] for h in single.history])
    np.testing.assert_allclose(r0["loss"], loss, rtol=1e-4)
    assert loss[-1] < loss[0]  # it learned something
    np.testing.assert_allclose(r0["ndcg"], [h["valid"]["ndcg@20"] for h in single.history], atol=1e-3)
    # training moved the vectors far more than the DDP/single difference
    assert np.abs(single.item_embeddings).mean() > 100 * np.abs(r0["items"] - single.item_embeddings).max()


def test_fit_without_process_group_is_a_clear_error() -> None:
    from kgrec.distributed.ddp import init_distributed
    from kgrec.errors import ConfigError

    with pytest.raises(ConfigError, match="torchrun"):
        init_distributed()
