"""Static (Model2Vec-style) encoder distilled from a tiny seeded BERT: rows, weighting, dedupe, save/load, config."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.base import Encoder

CORPUS = ["red running shoes", "blue running shoes", "a wooden dining table", "green cotton shirt",
          "red cotton shirt", "oak table with four chairs", "shoes shoes shoes"]


@pytest.fixture(scope="module")
def static(tiny_text_encoder):
    from encoders.static import StaticTextEncoder

    return StaticTextEncoder.distill(tiny_text_encoder, corpus=CORPUS, vocabulary="corpus", pca_dims=8)


def test_protocol_shape_and_normalisation(static):
    assert isinstance(static, Encoder)
    v = static.encode(["red shoes", "a table", "", None])
    assert v.shape == (4, 8) and v.dtype == np.float32 and static.dim == 8
    np.testing.assert_allclose(np.linalg.norm(v[:2], axis=1), 1.0, atol=1e-5)
    assert not v[2].any() and not v[3].any()  # no token -> zero row
    assert static.info["tokens"] == len({t for x in static.token_ids(CORPUS) for t in x})


def test_vector_is_weighted_mean_of_token_rows(static):
    text = "red running shoes and a table"
    ids = static.token_ids([text])[0]
    w = static.weights[ids]
    assert (w[np.isin(ids, static.token_ids(CORPUS)[0])] > 0).all()
    mean = (w[:, None] * static.embeddings[ids]).sum(0) / w.sum()
    np.testing.assert_allclose(static.encode([text])[0], mean / np.linalg.norm(mean), atol=1e-5)
    # rarer corpus tokens weigh more (SIF): "shoes" appears 5 times, "oak" once
    shoes, oak = (static.token_ids([t])[0][0] for t in ("shoes", "oak"))
    assert static.weights[oak] > static.weights[shoes] > 0


def test_rows_are_the_base_models_mean_pooled_token_output(tiny_text_encoder):
    from encoders.static import StaticTextEncoder

    st = StaticTextEncoder.distill(tiny_text_encoder, corpus=CORPUS, vocabulary="corpus", pca_dims=None)
    tok = tiny_text_encoder.tokenizer
    t = st.token_ids(["table"])[0][0]
    x = torch.tensor([[tok.cls_token_id, t, tok.sep_token_id]])
    with torch.no_grad():
        out = tiny_text_encoder.model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state.mean(1)[0]
    np.testing.assert_allclose(st.embeddings[t], out.numpy(), atol=1e-5)
    assert st.dim == tiny_text_encoder.dim
    assert not st.embeddings[tok.cls_token_id].any() and st.weights[tok.cls_token_id] == 0


def test_deterministic_and_dedupes_identical_texts(tiny_text_encoder, static):
    from encoders.static import StaticTextEncoder

    again = StaticTextEncoder.distill(tiny_text_encoder, corpus=CORPUS, vocabulary="corpus", pca_dims=8)
    np.testing.assert_array_equal(again.embeddings, static.embeddings)
    assert again.model_id == static.model_id
    texts = ["red shoes", "green shirt", "red shoes"] * 50
    v = static.encode(texts)
    np.testing.assert_array_equal(v[0], v[2])
    np.testing.assert_array_equal(v, np.tile(static.encode(texts[:3]), (50, 1)))
    small_chunks = StaticTextEncoder(static.tokenizer, static.embeddings, static.weights, chunk_size=7)
    np.testing.assert_allclose(small_chunks.encode(texts), v, atol=1e-6)


def test_save_load_identical_and_config_selects_it(static, tmp_path):
    from encoders.factory import text_encoder_from_config
    from encoders.static import StaticTextEncoder
    from kgrec.config import EncodersConfig

    static.save(tmp_path / "st")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["embeddings.safetensors", "static.json", "tokenizer"]
    loaded = StaticTextEncoder.load(tmp_path / "st")
    texts = CORPUS + ["unseen words entirely"]
    np.testing.assert_array_equal(loaded.encode(texts), static.encode(texts))
    assert loaded.model_id == static.model_id
    enc = text_encoder_from_config(EncodersConfig(text_model=f"static:{tmp_path / 'st'}"))
    np.testing.assert_array_equal(enc.encode(texts), static.encode(texts))
    # the app's wiring (kgrec train, a bundle's encoders) goes through the same factory
    from kgrec.config import Config
    from kgrec.pipeline import build_encoders

    cfg = Config.load(env={}, overrides={"encoders.text_model": f"static:{tmp_path / 'st'}", "encoders.clip_model": ""})
    text, clip = build_encoders(cfg, None)
    assert clip is None and text.model_id == static.model_id
    spec = {"text_model": f"static:{tmp_path / 'st'}", "clip_model": None}  # a bundle's encoders.json
    text, _ = build_encoders(Config.load(env={}), None, spec=spec)
    np.testing.assert_array_equal(text.encode(texts), static.encode(texts))


def test_corpus_weights_and_errors(static, tmp_path):
    from encoders.static import StaticTextEncoder
    from kgrec.errors import EncoderError

    other = static.with_corpus_weights(["table table table table", "shoes"])
    t_table, t_shoes = (static.token_ids([w])[0][0] for w in ("table", "shoes"))
    assert other.weights[t_table] < other.weights[t_shoes]
    assert other.model_id != static.model_id
    with pytest.raises(EncoderError, match="not a saved static text encoder"):
        StaticTextEncoder.load(tmp_path)
    with pytest.raises(EncoderError, match="needs a corpus"):
        StaticTextEncoder.distill(_tiny(), vocabulary="corpus")


def _tiny():
    from encoders.text import TextEncoder
    from tests.encoders.conftest import TINY_BERT

    return TextEncoder.from_config(TINY_BERT, seed=0, device="cpu")


def test_agreement_metric_is_one_for_the_same_vectors_and_lower_for_noise():
    from encoders.static import encoder_agreement

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)).astype(np.float32)
    same = encoder_agreement(a, a, k=10, pairs=2000)
    assert same["knn@10_overlap"] == 1.0 and same["pairwise_cosine_spearman"] > 0.999
    noisy = encoder_agreement(a, a + rng.normal(size=a.shape).astype(np.float32), k=10, pairs=2000)
    assert noisy["knn@10_overlap"] < 0.6 and 0.2 < noisy["pairwise_cosine_spearman"] < 0.95
