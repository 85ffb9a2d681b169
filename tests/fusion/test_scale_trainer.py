"""fusion.trainer: scale — train_model dispatches to the fusion.scale two-tower trainer; the result is a TrainedModel
that saves, loads and serves like the GNN's (also through Recommender.fit / save / load)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.metrics import evaluate, to_csr
from kgrec.config import Config, FusionConfig
from tests.fusion.test_scale import _graph

SCALE = dict(trainer="scale", dim=16, hybrid_ease=True,
             scale_options=dict(hidden=0, epochs=12, batch_size=256, num_negatives=64, lr=0.01, patience=20))


def test_train_model_with_scale_trainer(taste, tmp_path):
    from fusion.baselines import Popularity
    from fusion.train import TrainedModel, train_model
    from kgrec.errors import DataError

    t = taste
    tr, va = t.split == 0, t.split == 1
    g = _graph(t.item_cluster, 4)
    present = np.arange(t.num_items) % 2 == 0  # half the items have an image
    image = np.where(present[:, None], t.text[:, :8], 0.0).astype(np.float32)
    m = train_model(t.num_users, t.num_items, t.users[tr], t.items[tr], graph=g, text=t.text, image=image,
                    image_present=present, valid=(t.users[va], t.items[va]), config=FusionConfig(**SCALE))
    assert isinstance(m, TrainedModel) and m.item_item is None  # no EASE term on this path
    assert m.config["trainer"] == "scale" and m.config["scale"]["hidden"] == 0
    assert m.config["feature_blocks"] == {"content": [0, 16], "kg": [16, 23], "image": [23, 31],
                                          "has_image": [31, 32]}
    np.testing.assert_allclose(m.modality_weights, np.full((t.num_items, 3), 1 / 3), atol=1e-6)
    assert m.user_embeddings.shape == (t.num_users, 16) and len(m.history) == 12
    train = to_csr(t.users[tr], t.items[tr], (t.num_users, t.num_items))
    valid = to_csr(t.users[va], t.items[va], (t.num_users, t.num_items))
    ours = evaluate(m.score_all, valid, train, ks=(20,))
    pop = evaluate(Popularity().fit(train).score, valid, train, ks=(20,))
    assert ours["recall@20"] > pop["recall@20"] + 0.1
    # same scores as the plain dot product (no hybrid term), and a save/load round trip
    np.testing.assert_allclose(m.score_all(np.array([0, 1])).numpy(), m.user_embeddings[:2] @ m.item_embeddings.T,
                               atol=1e-5)
    m.save(tmp_path / "fusion")
    back = TrainedModel.load(tmp_path / "fusion")
    np.testing.assert_array_equal(back.item_embeddings, m.item_embeddings)
    assert back.config == m.config and back.history == m.history
    items, _ = back.recommend(np.array([0]), k=5)
    assert not np.isin(np.asarray(items)[0], train[0].indices).any()
    with pytest.raises(DataError, match="trained without text"):
        back.item_vectors_from_content(text=t.text[:2])
    # text only: weights on text alone
    only_text = train_model(t.num_users, t.num_items, t.users[tr], t.items[tr], text=t.text,
                            config=FusionConfig(**{**SCALE, "epochs": 1, "use_kg": False}))
    np.testing.assert_allclose(only_text.modality_weights[0], [1.0, 0.0, 0.0])


def test_recommender_fit_save_load_with_scale_trainer(demo_dataset, tmp_path):
    from encoders.clip import ClipEncoder
    from encoders.text import TextEncoder
    from kgrec.pipeline import Recommender

    torch.manual_seed(0)
    text = TextEncoder.from_config(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64), seed=0, max_length=32, batch_size=16, device="cpu")
    clip = ClipEncoder("kgrec-tiny-test", device="cpu", batch_size=32, seed=0)
    cfg = Config.load(env={}, overrides={"fusion.trainer": "scale", "fusion.dim": 16,
                                          "fusion.scale_options": {"epochs": 8, "num_negatives": 64},
                                          "ranking.num_candidates": 50, "ranking.label_source": "valid+fold",
                                          "encoders.cache_dir": str(tmp_path / "cache")})
    rec = Recommender.fit(demo_dataset, cfg, progress=False, encoders=(text, clip))
    assert rec.model.config["trainer"] == "scale"
    # the ranker's train fold refits the scale trainer for the epochs the fitted model kept
    assert rec.metrics["ranker_training"]["fold"]["gnn_epochs"] == max(1, rec.model.kept_epochs) <= 8
    test = rec.metrics["test"]
    assert test["gnn"]["recall@20"] > test["popularity"]["recall@20"]  # "gnn" = the retrieval model's row
    user = rec.events["user_id"].value_counts().index[0]
    recs = rec.recommend(user, k=5, explain=True)
    assert len(recs) == 5 and not {r.item_id for r in recs} & set(rec.events.loc[rec.events["user_id"] == user, "item_id"])
    rec.save(tmp_path / "bundle")
    back = Recommender.load(tmp_path / "bundle", encoders=(text, clip))
    assert back.model.config["trainer"] == "scale"
    assert [r.item_id for r in back.recommend(user, k=5)] == [r.item_id for r in recs]
    # no content projection: update() refuses new items with a clear error, before touching anything
    from kgrec.data.schema import Dataset
    from kgrec.errors import DataError

    item = demo_dataset.items.iloc[[0]].assign(item_id="NEW-1", image=None)
    new = Dataset.write(tmp_path / "new", {"items": item, "events": demo_dataset.events.iloc[:0]})
    counts = back.store.counts()
    with pytest.raises(DataError, match="no content projection .* retrain"):
        back.update(new)
    assert back.store.counts() == counts and "NEW-1" not in back.item_pos


def test_scale_options_unknown_key_is_a_clear_error(taste):
    from fusion.train import train_model
    from kgrec.errors import ConfigError

    t = taste
    with pytest.raises(ConfigError, match="unknown keys \\['learning_rate'\\]"):
        train_model(t.num_users, t.num_items, t.users, t.items, text=t.text,
                    config=FusionConfig(trainer="scale", scale_options={"learning_rate": 0.1}))
