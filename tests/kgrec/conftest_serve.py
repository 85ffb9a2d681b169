"""Fixtures for the HTTP service tests (API, schema, browser): one small Recommender fitted once per test session.

Imported by ``tests/kgrec/test_serve*.py`` and ``tests/e2e/``. Fitting (tiny seeded encoders on the 200-item demo
catalog) takes about a minute on a busy 2-core machine, so the fitted object is memoised here at module level: the
fixture below is registered once per importing test module, but every registration returns the same recommender.
"""
from __future__ import annotations

import os
from typing import Any

import pytest

from kgrec.config import Config, ServeConfig

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
SERVE = ServeConfig(max_k=50, max_upload_bytes=200_000, max_query_chars=200)
_FITTED: dict[str, Any] = {}


def tiny_encoders() -> tuple[Any, Any]:
    """(text, clip) encoders built from tiny configs with fixed seeds: identical weights on every call."""
    from encoders.clip import ClipEncoder
    from encoders.text import TextEncoder

    text = TextEncoder.from_config(TINY_BERT, seed=0, max_length=32, batch_size=16, device="cpu")
    clip = ClipEncoder("kgrec-tiny-test", device="cpu", batch_size=32, seed=0)
    return text, clip


def fit_small_recommender(demo_dataset: Any, cache_dir: str) -> Any:
    """A Recommender on the demo catalog with tiny seeded text/CLIP encoders (no download, no network)."""
    from kgrec.pipeline import Recommender

    text, clip = tiny_encoders()
    cfg = Config.load(env={}, overrides={"fusion.epochs": 15, "fusion.dim": 32, "ranking.num_candidates": 50,
                                          "encoders.cache_dir": cache_dir})
    return Recommender.fit(demo_dataset, cfg, progress=False, encoders=(text, clip))


@pytest.fixture(scope="session")
def serve_recommender(demo_dataset: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if "rec" not in _FITTED and os.environ.get("KGREC_SERVE_TEST_BUNDLE"):
        # developer shortcut: a bundle saved from fit_small_recommender on the same demo catalog (seed 0)
        from kgrec.pipeline import Recommender

        _FITTED["rec"] = Recommender.load(os.environ["KGREC_SERVE_TEST_BUNDLE"], encoders=tiny_encoders())
    if "rec" not in _FITTED:
        _FITTED["rec"] = fit_small_recommender(demo_dataset, str(tmp_path_factory.mktemp("serve_cache")))
    return _FITTED["rec"]


@pytest.fixture(scope="session")
def serve_app(serve_recommender: Any) -> Any:
    from kgrec.serve.app import create_app

    if "app" not in _FITTED:
        _FITTED["app"] = create_app(serve_recommender, SERVE)
    return _FITTED["app"]
