"""Item and query encoders: a BERT-family text encoder and an open_clip image/text encoder, cached by content hash."""
from __future__ import annotations

from encoders.base import Encoder

__all__ = ["Encoder"]
