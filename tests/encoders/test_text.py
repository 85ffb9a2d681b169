from __future__ import annotations

import numpy as np
import pytest

from encoders.base import Encoder


def test_shapes_normalisation_and_protocol(tiny_text_encoder):
    enc = tiny_text_encoder
    assert isinstance(enc, Encoder)
    v = enc.encode(["red shoes", "a table", "", "x " * 500, "日本語のテキスト", None])
    assert v.shape == (6, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, 32)


def test_length_sorted_batching_keeps_input_order(tiny_text_encoder):
    texts = ["short", "a much longer text with many more tokens in it than the others", "mid length text", "b"]
    batched = tiny_text_encoder.encode(texts)
    one_by_one = np.stack([tiny_text_encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_deterministic_and_model_id_follows_weights():
    import torch

    from encoders.text import TextEncoder
    from tests.encoders.conftest import TINY_BERT

    a = TextEncoder.from_config(TINY_BERT, seed=3, device="cpu")
    b = TextEncoder.from_config(TINY_BERT, seed=3, device="cpu")
    c = TextEncoder.from_config(TINY_BERT, seed=4, device="cpu")
    texts = ["blue backpack", "green running shoe"]
    np.testing.assert_array_equal(a.encode(texts), b.encode(texts))
    assert a.model_id == b.model_id != c.model_id
    with torch.no_grad():
        a.model.embeddings.word_embeddings.weight[0, 0] += 1.0
    a.invalidate_id()
    assert a.model_id != b.model_id


def test_model_id_follows_the_tokenizer():
    """Same weights, another tokenizer (one added token, or lower-casing off): another id, so the embedding cache
    never serves the first tokenizer's vectors; an equal tokenizer loaded again gives the same id."""
    import copy

    from encoders.text import TextEncoder
    from tests.encoders.conftest import TINY_BERT

    a = TextEncoder.from_config(TINY_BERT, seed=3, device="cpu")
    tok = copy.deepcopy(a.tokenizer)
    before = a.model_id
    a.encode(["red shoes", "a much longer text " * 40])  # a call sets truncation / padding in the backend
    a.invalidate_id()
    assert a.model_id == before
    assert TextEncoder(model=a.name, _modules=(tok, a.model)).model_id == a.model_id
    tok.add_tokens(["zzqx-sku-token"])
    other = TextEncoder(model=a.name, _modules=(tok, a.model))
    assert other.model_id != a.model_id
    assert other.model_id.split(":tok")[0] == a.model_id.split(":tok")[0]  # the weights part is the same


def test_truncation_long_text_equals_prefix(tiny_text_encoder):
    long = " ".join(f"word{i}" for i in range(400))
    v1, v2 = tiny_text_encoder.encode([long, long + " extra tail words"])
    np.testing.assert_allclose(v1, v2, atol=1e-6)  # both truncated to max_length=32 tokens


def test_packaged_minilm_semantics(minilm):
    v = minilm.encode(["red running shoes", "crimson sneakers for jogging", "a wooden dining table"])
    assert v.shape == (3, 384)
    sim_close, sim_far = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert sim_close > 0.5 > 0.2 > sim_far
    assert minilm.model_id.startswith("text:packaged:all-MiniLM-L6-v2:")


def test_unknown_model_is_a_clear_error():
    from encoders.text import TextEncoder
    from kgrec.errors import EncoderError

    with pytest.raises(EncoderError, match="packaged"):
        TextEncoder("packaged:no-such-model")
    with pytest.raises(EncoderError, match="could not load"):
        TextEncoder("/nonexistent/checkpoint/dir")
