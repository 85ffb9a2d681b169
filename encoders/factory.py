"""Build the encoders a config names (used by ``kgrec encode`` and the app pipeline)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def text_encoder_from_config(cfg: Any, show_progress: bool = False):
    """A :class:`~encoders.text.TextEncoder` from an ``EncodersConfig`` (``text_model``, ``text_max_length``...).

    ``text_model: "static:<DIR or base>"`` gives the static (Model2Vec-style) encoder of ``encoders.static``
    instead, for big catalogs: a saved one from ``DIR``, or one distilled from ``base`` on the spot (~1 min).
    """
    from encoders.static import STATIC_PREFIX, static_encoder_from_name
    from encoders.text import TextEncoder

    if cfg.text_model.startswith(STATIC_PREFIX):
        return static_encoder_from_name(cfg.text_model)

    return TextEncoder(cfg.text_model, max_length=cfg.text_max_length, batch_size=cfg.text_batch_size,
                       device=cfg.device, show_progress=show_progress)


def clip_encoder_from_config(cfg: Any, show_progress: bool = False):
    """A :class:`~encoders.clip.ClipEncoder`: the fit-clip checkpoint when ``clip_checkpoint`` is set, else
    ``clip_model`` + ``clip_pretrained``. Without a checkpoint the default model's projection heads are untrained
    (image vectors still carry the pretrained EfficientNet features, but text↔image similarity is meaningless):
    a warning says so."""
    from encoders.clip import DEFAULT_CLIP_MODEL, ClipEncoder

    if cfg.clip_checkpoint is None and cfg.clip_pretrained is None and cfg.clip_model == DEFAULT_CLIP_MODEL:
        logger.warning("CLIP %s has untrained projection heads: run `kgrec encoders fit-clip` and set "
                       "encoders.clip_checkpoint for text->image search", cfg.clip_model)
    return ClipEncoder(cfg.clip_model, cfg.clip_pretrained,
                       checkpoint=Path(cfg.clip_checkpoint) if cfg.clip_checkpoint else None,
                       device=cfg.device, batch_size=cfg.image_batch_size, num_workers=cfg.num_workers,
                       show_progress=show_progress)


def default_cache_dir(cfg: Any, dataset_root: Path) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(dataset_root) / ".cache" / "embeddings"
