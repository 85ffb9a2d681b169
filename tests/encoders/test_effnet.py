"""The packaged EfficientNet-Lite0 weights: explicit key mapping onto timm, and that they carry real features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.effnet import (
    VARIANTS,
    build_efficientnet_lite0,
    load_packaged_state_dict,
    map_efficientnet_pytorch_to_timm,
)
from kgrec.errors import EncoderError
from tests.encoders.conftest import CATEGORIES, COLOURS, draw_product


@pytest.mark.parametrize("variant", VARIANTS)
def test_mapping_uses_every_tensor_no_missing_or_unexpected(variant):
    import timm

    source = load_packaged_state_dict()
    assert len(source) == 296
    model = timm.create_model(variant, pretrained=False)
    mapped = map_efficientnet_pytorch_to_timm(source, model)
    assert len(mapped) == len(source) == len(model.state_dict())
    result = model.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # values really moved (by name, not position): a few spot checks
    torch.testing.assert_close(model.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(model.blocks[0][0].conv_dw.weight, source["_blocks.0._depthwise_conv.weight"])
    torch.testing.assert_close(model.blocks[1][1].conv_pwl.weight, source["_blocks.2._project_conv.weight"])
    torch.testing.assert_close(model.blocks[6][0].bn3.running_var, source["_blocks.15._bn2.running_var"])
    torch.testing.assert_close(model.classifier.bias, source["_fc.bias"])


def test_mapping_rejects_incomplete_state_dict():
    import timm

    source = load_packaged_state_dict()
    del source["_blocks.3._bn1.weight"]
    with pytest.raises(EncoderError, match="missing"):
        map_efficientnet_pytorch_to_timm(source, timm.create_model("tf_efficientnet_lite0"))
    source = load_packaged_state_dict()
    source["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(EncoderError, match="unexpected"):
        map_efficientnet_pytorch_to_timm(source, timm.create_model("tf_efficientnet_lite0"))


def _features(model, images) -> np.ndarray:
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1) for im in images])
    with torch.inference_mode():
        f = model(x).numpy()
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def cross_colour_1nn_accuracy(features: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> float:
    """Category of each item from its nearest neighbour among items of *other* colours (colour is the distractor)."""
    sim = features @ features.T
    sim[colours[:, None] == colours[None, :]] = -np.inf
    return float((labels[sim.argmax(1)] == labels).mean())


def test_pretrained_features_separate_categories_better_than_random():
    images, categories, colours = [], [], []
    k = 0
    for colour in COLOURS:
        for cat in CATEGORIES:
            for _ in range(3):
                images.append(draw_product(colour, cat, size=96, seed=k))
                categories.append(cat)
                colours.append(colour)
                k += 1
    labels, colours = np.array(categories), np.array(colours)
    torch.manual_seed(0)
    pretrained = build_efficientnet_lite0("tf_efficientnet_lite0", pretrained=True, num_classes=0)
    random = build_efficientnet_lite0("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    acc_pre = cross_colour_1nn_accuracy(_features(pretrained, images), labels, colours)
    acc_rand = cross_colour_1nn_accuracy(_features(random, images), labels, colours)
    # chance is 1/3; measured: pretrained 1.00, random 0.64 — ImageNet features see shape across colours
    assert acc_pre >= 0.9, acc_pre
    assert acc_pre > acc_rand + 0.2, (acc_pre, acc_rand)
