"""The ``Encoder`` protocol shared by the text (BERT) and CLIP encoders."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    """Turns a batch of inputs into ``(n, dim)`` float32 L2-normalised vectors."""

    @property
    def dim(self) -> int: ...

    @property
    def model_id(self) -> str:
        """Stable identifier of architecture + weights; part of every cache key."""
        ...

    def encode(self, inputs: Sequence[Any]) -> np.ndarray: ...


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation, float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@dataclass
class FitResult:
    """What a fine-tuning run (``fit_clip``, ``fit_text``) returns: the checkpoint directory, held-out metrics, the
    per-epoch curve and the wall time in seconds."""

    out_dir: Path
    metrics: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's output: its class and, for a fast tokenizer, its whole serialised
    pipeline (vocabulary, normaliser, pre-tokeniser, added tokens); for a slow one its vocabulary, added tokens and
    lower-casing flag. Part of the text encoders' ``model_id``, so another tokenizer over the same weights never
    reads cached vectors of the first."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation / padding are per-call settings the tokenizer call writes into the backend, not its identity
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    return h.hexdigest()
