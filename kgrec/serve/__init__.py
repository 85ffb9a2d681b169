"""HTTP service and web page over a fitted :class:`kgrec.pipeline.Recommender` (``kgrec serve``)."""
from __future__ import annotations

from kgrec.serve.app import create_app

__all__ = ["create_app"]
