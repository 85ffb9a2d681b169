"""Item and query encoders: a BERT-family text encoder and an open_clip image/text encoder, cached by content hash.

Public surface (heavy modules are imported lazily, so ``import encoders`` stays cheap):

- :class:`~encoders.text.TextEncoder` — packaged all-MiniLM-L6-v2 by default, mean pooling, L2-normalised;
- :class:`~encoders.clip.ClipEncoder` — open_clip; default EfficientNet-Lite0 (ImageNet) + MiniLM towers;
- :func:`~encoders.items.item_text`, :func:`~encoders.items.encode_dataset`, :class:`~encoders.items.ItemEmbeddings`;
- :class:`~encoders.cache.EmbeddingCache`;
- :func:`~encoders.fit_clip.fit_clip`, :func:`~encoders.fit_text.fit_text`.
"""
from __future__ import annotations

import importlib
from typing import Any

from encoders.base import Encoder, l2_normalise

_LAZY = {
    "TextEncoder": "encoders.text",
    "ClipEncoder": "encoders.clip",
    "EmbeddingCache": "encoders.cache",
    "content_hash": "encoders.cache",
    "item_text": "encoders.items",
    "encode_dataset": "encoders.items",
    "ItemEmbeddings": "encoders.items",
    "fit_clip": "encoders.fit_clip",
    "FitClipConfig": "encoders.fit_clip",
    "fit_text": "encoders.fit_text",
    "FitTextConfig": "encoders.fit_text",
}

__all__ = ["Encoder", "l2_normalise", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'encoders' has no attribute {name!r}")
