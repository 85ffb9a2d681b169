"""kgrec: the thin application package that wires kg/, encoders/, fusion/ and ranking/ together.

Importing ``kgrec`` is cheap: heavy stages are imported lazily by the pipeline.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "Recommender"]


def __getattr__(name: str):
    if name == "Recommender":
        from kgrec.pipeline import Recommender

        return Recommender
    raise AttributeError(name)
