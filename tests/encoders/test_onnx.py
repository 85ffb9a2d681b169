"""ONNX Runtime query encoders: the same vectors as the torch encoders (BERT mean pooling, CLIP text tower)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from encoders.onnx import OnnxClipQueryEncoder, OnnxTextQueryEncoder, onnx_query_encoders
from encoders.text import TextEncoder
from kgrec.errors import EncoderError
from tests.encoders.conftest import TINY_BERT

TEXTS = ["red cotton shirt", "", "a", "wooden desk lamp with a long neck and a heavy base " * 8, "boots",
         "Lederhose größe 52", "blue"] * 6  # 42 texts: several batches of 16, one longer than max_length


def _tiny(max_length: int = 24) -> TextEncoder:
    return TextEncoder.from_config(TINY_BERT, seed=3, max_length=max_length, batch_size=16, device="cpu")


def test_text_query_encoder_equals_torch_across_batches_lengths_and_truncation():
    enc = _tiny()
    onnx = OnnxTextQueryEncoder(enc)
    got, want = onnx.encode(TEXTS), enc.encode(TEXTS)
    assert got.shape == (42, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert onnx.max_abs_diff <= 1e-5
    assert onnx.encode([]).shape == (0, 32)
    np.testing.assert_allclose(onnx.encode([None, "boots"]), enc.encode(["", "boots"]), atol=1e-5)  # type: ignore[list-item]


def test_packaged_minilm_query_encoder_equals_torch():
    enc = TextEncoder("packaged:all-MiniLM-L6-v2", max_length=32, device="cpu")
    onnx = OnnxTextQueryEncoder(enc)
    texts = ["red cotton shirt", "running shoes for women", "oak table", "x"]
    np.testing.assert_allclose(onnx.encode(texts), enc.encode(texts), atol=1e-5, rtol=0)
    assert onnx.max_abs_diff < 1e-5


def test_clip_text_tower_query_encoder_equals_torch():
    from encoders.clip import ClipEncoder
    from kgrec.pipeline import encode_clip_queries

    clip = ClipEncoder(device="cpu")  # the default: packaged EfficientNet-Lite0 + MiniLM text tower (HF)
    onnx = OnnxClipQueryEncoder(clip)
    texts = ["a red running shoe", "wooden table", "", "blue backpack with many pockets"]
    got = onnx.encode(texts)
    np.testing.assert_allclose(got, encode_clip_queries(clip, texts), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, clip.encode_texts(texts), atol=1e-5, rtol=0)


def test_a_disagreeing_or_unsupported_encoder_is_left_on_torch(caplog):
    from encoders.clip import ClipEncoder

    with pytest.raises(EncoderError, match="disagrees with torch"):
        OnnxTextQueryEncoder(_tiny(), tolerance=-1.0)
    tiny_clip = ClipEncoder("kgrec-tiny-test", device="cpu", seed=0)  # open_clip's own text tower: not exported
    with caplog.at_level(logging.WARNING, logger="encoders.onnx"):
        out = onnx_query_encoders(_tiny(), tiny_clip)
    assert set(out) == {"text"}
    assert "clip queries stay on torch" in caplog.text


def test_default_clip_and_text_encoder_share_one_forward():
    """The default CLIP's text tower is the packaged MiniLM (not fine-tuned) with a mean pooler and a projection:
    one ONNX forward gives both query vectors, equal to the two torch encoders'; a text the text encoder may have
    truncated takes the CLIP tower's own (longer) context."""
    from encoders.clip import ClipEncoder
    from encoders.onnx import OnnxSharedQueryEncoder, shares_text_tower
    from kgrec.pipeline import encode_clip_queries

    text = TextEncoder("packaged:all-MiniLM-L6-v2", max_length=8, device="cpu")
    clip = ClipEncoder(device="cpu")
    assert shares_text_tower(text, clip)
    assert not shares_text_tower(_tiny(), clip)  # other weights
    encoders = onnx_query_encoders(text, clip)
    assert isinstance(encoders["text"].shared, OnnxSharedQueryEncoder) and encoders["clip"].shared is encoders["text"].shared
    texts = ["red running shoe", "oak table", "", "a very long description of a blue backpack with many pockets"]
    t_vecs = encoders["text"].encode(texts)
    c_vecs = encoders["clip"].encode(texts)
    assert encoders["clip"].shared._last[0] == tuple(texts)  # the second call reused the first forward
    np.testing.assert_allclose(t_vecs, text.encode(texts), atol=1e-5, rtol=0)
    np.testing.assert_allclose(c_vecs, encode_clip_queries(clip, texts), atol=1e-5, rtol=0)
    assert len(text.tokenizer(texts[3])["input_ids"]) > 8  # truncated at 8 for the text vector, not for CLIP's
