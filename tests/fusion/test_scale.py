"""fusion.scale: propagated features (leave-one-out user means) and the two-tower trainer on generated taste data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import HeteroData

from fusion.metrics import evaluate, to_csr


def _graph(item_cluster: np.ndarray, clusters: int) -> HeteroData:
    """Items -> category (their cluster) and -> brand (random, uninformative)."""
    g = HeteroData()
    n = len(item_cluster)
    g["item"].num_nodes = n
    g["category"].num_nodes = clusters
    g["brand"].num_nodes = 3
    g["item", "in_category", "category"].edge_index = torch.as_tensor(np.stack([np.arange(n), item_cluster]))
    g["item", "made_by", "brand"].edge_index = torch.as_tensor(np.stack([np.arange(n), np.arange(n) % 3]))
    return g


@pytest.fixture(scope="module")
def world(taste):
    tr = taste.split == 0
    return taste, taste.users[tr], taste.items[tr], _graph(taste.item_cluster, 4)


def test_features_blocks_and_leave_one_out(world):
    from fusion.scale import propagate_features

    t, tu, ti, g = world
    f = propagate_features(t.num_users, t.num_items, tu, ti, content=t.text, graph=g)
    assert f.blocks == {"content": (0, 16), "kg": (16, 16 + 4 + 3)}
    assert f.item.shape == (t.num_items, 23) and f.user_sum.shape == (t.num_users, 23)
    # KG block: one-hot of category and brand, row-normalised (two neighbours -> 0.5 each)
    np.testing.assert_allclose(f.item[0, 16:], [0.5, 0, 0, 0, 0.5, 0, 0])
    u = int(tu[0])
    mine = np.unique(ti[tu == u])
    np.testing.assert_allclose(f.user_sum[u], f.item[mine].sum(0), atol=1e-5)
    left = int(mine[0])
    expect = (f.item[mine[1:]].mean(0) - f.user_mean) / f.user_std
    got = f.user_rows(torch.tensor([u]), leave_out=torch.tensor([left]))[0].numpy()
    np.testing.assert_allclose(got, expect, atol=1e-4)
    full = f.user_rows(torch.tensor([u]))[0].numpy()
    np.testing.assert_allclose(full, (f.item[mine].mean(0) - f.user_mean) / f.user_std, atol=1e-4)


def test_learns_tastes_beats_popularity_and_round_trips(world, tmp_path):
    from fusion.baselines import Popularity
    from fusion.scale import ScaleModel, ScaleTrainConfig, propagate_features, train_scale_model

    t, tu, ti, g = world
    va = t.split == 1
    f = propagate_features(t.num_users, t.num_items, tu, ti, graph=g)  # KG only: content-free generalisation
    cfg = ScaleTrainConfig(dim=16, hidden=0, epochs=15, batch_size=256, num_negatives=64, lr=0.01, patience=20)
    m = train_scale_model(t.num_users, t.num_items, tu, ti, features=f, valid=(t.users[va], t.items[va]), config=cfg)
    assert len(m.history) == 15 and m.history[-1]["loss"] < m.history[0]["loss"]
    assert m.user_embeddings.shape == (t.num_users, 16) and m.item_embeddings.shape == (t.num_items, 16)
    np.testing.assert_allclose(np.linalg.norm(m.item_embeddings, axis=1), 1.0, atol=1e-5)
    # a user's own-cluster items score above the others
    s = m.user_embeddings @ m.item_embeddings.T
    same = t.user_cluster[:, None] == t.item_cluster[None, :]
    assert s[same].mean() - s[~same].mean() > 0.3
    train = to_csr(tu, ti, (t.num_users, t.num_items))
    valid = to_csr(t.users[va], t.items[va], (t.num_users, t.num_items))
    ours = evaluate(lambda u: torch.as_tensor(s)[u], valid, train, ks=(20,))
    pop = evaluate(Popularity().fit(train).score, valid, train, ks=(20,))
    assert ours["recall@20"] > pop["recall@20"] + 0.1
    m.save(tmp_path / "m")
    back = ScaleModel.load(tmp_path / "m")
    np.testing.assert_array_equal(back.item_embeddings, m.item_embeddings)
    assert back.history == m.history and back.config == m.config
    items, _ = back.recommend(np.array([0, 1]), k=5, exclude=train[[0, 1]])
    assert items.shape == (2, 5) and not np.isin(items[0], train[0].indices).any()


def test_deterministic_id_embeddings_and_errors(world):
    from fusion.scale import ScaleTrainConfig, propagate_features, train_scale_model
    from kgrec.errors import DataError

    t, tu, ti, g = world
    f = propagate_features(t.num_users, t.num_items, tu, ti, content=t.text)
    cfg = ScaleTrainConfig(dim=8, hidden=16, use_id=True, epochs=2, batch_size=512, num_negatives=32)
    a = train_scale_model(t.num_users, t.num_items, tu, ti, features=f, config=cfg)
    b = train_scale_model(t.num_users, t.num_items, tu, ti, features=f, config=cfg)
    np.testing.assert_array_equal(a.user_embeddings, b.user_embeddings)
    va = t.split == 1
    deep = train_scale_model(t.num_users, t.num_items, tu, ti, features=f, valid=(t.users[va], t.items[va]),
                             config=cfg.__class__(**{**cfg.__dict__, "select_metric": "recall@50"}))
    assert {"recall@50", "ndcg@20"} <= set(deep.history[0]["valid"])
    with pytest.raises(DataError, match="not of the form"):
        train_scale_model(t.num_users, t.num_items, tu, ti, features=f, valid=(t.users[va], t.items[va]),
                          config=cfg.__class__(**{**cfg.__dict__, "select_metric": "auc"}))
    with pytest.raises(DataError, match="content vectors, a knowledge graph, or both"):
        propagate_features(t.num_users, t.num_items, tu, ti)
    with pytest.raises(DataError, match="no training interactions"):
        train_scale_model(t.num_users, t.num_items, tu[:0], ti[:0], features=f, config=cfg)


def test_image_block_zeros_indicator_and_it_is_used(world, tmp_path):
    """Image vectors for half the items: an ``image`` block (zeros elsewhere) + ``has_image``; a memory-mapped source
    works, and with KG features that say nothing about taste, the image vectors are what lets the towers learn."""
    from fusion.scale import ScaleTrainConfig, propagate_features, train_scale_model
    from kgrec.errors import DataError

    t, tu, ti, _ = world
    rng = np.random.default_rng(0)
    with_image = np.sort(rng.choice(t.num_items, t.num_items // 2, replace=False))
    centres = rng.normal(size=(4, 8))
    vec = (centres[t.item_cluster[with_image]] + 0.2 * rng.normal(size=(len(with_image), 8))).astype(np.float32)
    np.save(tmp_path / "img.npy", vec)
    mm = np.load(tmp_path / "img.npy", mmap_mode="r")
    g = HeteroData()  # brand only: random, uninformative
    g["item"].num_nodes, g["brand"].num_nodes = t.num_items, 3
    g["item", "made_by", "brand"].edge_index = torch.as_tensor(np.stack([np.arange(t.num_items), np.arange(t.num_items) % 3]))
    f = propagate_features(t.num_users, t.num_items, tu, ti, graph=g, image_vectors=mm, image_items=with_image)
    assert f.blocks == {"kg": (0, 3), "image": (3, 11), "has_image": (11, 12)}
    np.testing.assert_array_equal(f.item[with_image, 3:11], vec)
    without = np.setdiff1d(np.arange(t.num_items), with_image)
    assert not f.item[without, 3:11].any()
    np.testing.assert_array_equal(f.item[:, 11], np.isin(np.arange(t.num_items), with_image).astype(np.float32))
    # the user side averages the image block too (leave-one-out sums over the same columns)
    u = int(tu[0])
    np.testing.assert_allclose(f.user_sum[u, 3:12], f.item[np.unique(ti[tu == u]), 3:12].sum(0), atol=1e-5)

    va = t.split == 1
    cfg = ScaleTrainConfig(dim=16, hidden=0, epochs=12, batch_size=256, num_negatives=64, lr=0.01, patience=20)
    blind = propagate_features(t.num_users, t.num_items, tu, ti, graph=g)

    def own_cluster_margin(feats) -> float:
        m = train_scale_model(t.num_users, t.num_items, tu, ti, features=feats, valid=(t.users[va], t.items[va]),
                              config=cfg)
        s = m.user_embeddings @ m.item_embeddings[with_image].T
        same = t.user_cluster[:, None] == t.item_cluster[with_image][None, :]
        return float(s[same].mean() - s[~same].mean())

    seeing, not_seeing = own_cluster_margin(f), own_cluster_margin(blind)
    assert seeing > 0.2 and seeing > not_seeing + 0.2  # measured: 0.36 vs -0.01
    with pytest.raises(DataError, match="both image_vectors"):
        propagate_features(t.num_users, t.num_items, tu, ti, graph=g, image_vectors=vec)
    with pytest.raises(DataError, match="item indices"):
        propagate_features(t.num_users, t.num_items, tu, ti, image_vectors=vec, image_items=with_image + t.num_items)
