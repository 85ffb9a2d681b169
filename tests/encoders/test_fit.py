"""fit-clip and fit-text on the demo catalog: training lowers the loss, checkpoints reload exactly, quality rises."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest


@pytest.mark.slow
def test_fit_clip_full_mode_tiny_model_checkpoint_roundtrip(demo_dataset, tmp_path, caplog):
    from encoders.clip import ClipEncoder
    from encoders.fit_clip import FitClipConfig, fit_clip

    out = tmp_path / "clip"
    with caplog.at_level(logging.INFO, logger="encoders.fit_clip"):
        result = fit_clip(demo_dataset, out, FitClipConfig(model="kgrec-tiny-test", mode="full", epochs=4,
                                                           batch_size=64, lr=1e-3, image_size=32, device="cpu",
                                                           patience=10))
    assert result.metrics["mode"] == "full"
    curve = result.curve
    # the epochs go into a progress bar; one line says what was kept
    best = min(curve, key=lambda c: c["val_loss"])
    trained = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit-clip trained")]
    assert trained == [f"fit-clip trained 4 epochs; best held-out loss {best['val_loss']:.4f} at epoch "
                       f"{best['epoch']}, kept"]
    assert not any(r.getMessage().startswith("fit-clip epoch") for r in caplog.records)
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
    for name in ("clip_config.json", "clip_weights.safetensors", "metrics.json", "training_curve.png"):
        assert (out / name).is_file()
    after = result.metrics["after"]
    assert {"colour", "category"} <= set(after)
    assert 0.0 <= after["colour"]["zero_shot_accuracy"] <= 1.0 and after["colour"]["classes"] >= 5
    # reloading the checkpoint gives a different model than the untrained base, and the same on every load
    enc1, enc2 = ClipEncoder(checkpoint=out, device="cpu"), ClipEncoder(checkpoint=out, device="cpu")
    base = ClipEncoder("kgrec-tiny-test", device="cpu", image_size=32)
    texts = ["colour: red", "category: Home>Mug"]
    np.testing.assert_array_equal(enc1.encode_texts(texts), enc2.encode_texts(texts))
    assert not np.allclose(enc1.encode_texts(texts), base.encode_texts(texts))
    assert enc1.model_id != base.model_id and enc1.image_size == (32, 32)


@pytest.mark.slow
def test_fit_clip_heads_mode_aligns_packaged_towers(demo_dataset, tmp_path):
    """The real default: frozen EfficientNet-Lite0 + MiniLM, trained heads; zero-shot beats chance clearly."""
    from encoders.fit_clip import FitClipConfig, fit_clip

    result = fit_clip(demo_dataset, tmp_path / "clip", FitClipConfig(epochs=25, image_size=64, device="cpu",
                                                                     batch_size=64, patience=25))
    m = result.metrics
    assert m["mode"] == "heads"
    for attr in ("colour", "category"):
        after = m["after"][attr]
        assert after["zero_shot_accuracy"] > 2 * after["chance_majority"], (attr, after)
        assert after["precision@10"] > 2 * after["precision@10_random"], (attr, after)
        assert after["zero_shot_accuracy"] > m["before"][attr]["zero_shot_accuracy"]


def test_fit_text_tiny_model_improves_held_out_retrieval(demo_dataset, tmp_path):
    from encoders.fit_text import FitTextConfig, catalog_text_pairs, fit_text
    from encoders.text import TextEncoder
    from tests.encoders.conftest import TINY_BERT

    pairs, positives = catalog_text_pairs(demo_dataset)
    kinds = {p.kind for p in pairs}
    assert kinds == {"title", "query"}
    enc = TextEncoder.from_config(TINY_BERT, seed=0, device="cpu")
    out = tmp_path / "text"
    result = fit_text(demo_dataset, out, FitTextConfig(epochs=3, lr=1e-3, train_layers=0, batch_size=32,
                                                       max_length=48, patience=3, device="cpu"), encoder=enc)
    m = result.metrics
    assert m["improved"]
    assert m["after"]["title"]["mrr"] > m["before"]["title"]["mrr"] + 0.05
    # the output is a loadable checkpoint directory whose vectors equal the trained encoder's
    reloaded = TextEncoder(str(out), max_length=48, device="cpu")
    texts = ["red mug", "leather boots"]
    np.testing.assert_allclose(reloaded.encode(texts), enc.encode(texts), atol=1e-5)
    assert json.loads((out / "fit_text_config.json").read_text())["fit"]["epochs"] == 3
