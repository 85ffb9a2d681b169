"""Encoding a whole catalog: item text, per-item status, cached text/image/CLIP-text vectors.

``encode_dataset`` produces an :class:`ItemEmbeddings` in the dataset's item order:

- ``text``      (n, d_text) float32 — the BERT encoder on :func:`item_text`;
- ``image``     (n, d_clip) float32 — the CLIP image tower; zero rows for items without a usable image;
- ``clip_text`` (n, d_clip) float32 — the CLIP text tower on the same item text (the bridge for text→image search);
- ``status``    per item: ``embedded`` (text + image), ``text_only`` (image missing or bad; ``reason`` says why) or
  ``failed`` (no text and no usable image; all rows zero).

Every vector goes through an :class:`~encoders.cache.EmbeddingCache` keyed by (model id, sha256 of the text or of
the image file's bytes): an unchanged catalog costs no model call, a changed item is re-encoded alone.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from encoders.cache import EmbeddingCache, content_hash
from encoders.images import read_image_bytes
from kgrec.data.schema import Dataset, atomic_directory, atomic_write_json
from kgrec.errors import DataError

logger = logging.getLogger(__name__)

STATUS_EMBEDDED = "embedded"
STATUS_TEXT_ONLY = "text_only"
STATUS_FAILED = "failed"
FORMAT_VERSION = 1


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and np.isnan(value):
        return ""
    return " ".join(str(value).split())


def item_text(item: Mapping[str, Any] | Any) -> str:
    """The text an item is encoded from: ``title. description. brand: B; category: C; name: value; ...``.

    ``item`` is an ``Item``, a dict or a DataFrame row with ``title``, ``description``, ``brand``, ``category`` and
    ``attributes`` (a dict or its JSON text). Empty parts are left out; whitespace is collapsed; attributes are
    sorted by name so the text (and its cache key) does not depend on dict order.
    """
    get = item.get if hasattr(item, "get") else lambda k, d=None: getattr(item, k, d)
    parts = [p for p in (_clean(get("title", "")), _clean(get("description", ""))) if p]
    facts: list[str] = []
    brand, category = _clean(get("brand", None)), _clean(get("category", None))
    if brand:
        facts.append(f"brand: {brand}")
    if category:
        facts.append(f"category: {' > '.join(c.strip() for c in category.split('>') if c.strip())}")
    attrs = get("attributes", None)
    if isinstance(attrs, str):
        try:
            attrs = json.loads(attrs) if attrs.strip() else {}
        except json.JSONDecodeError:
            attrs = {}
    if isinstance(attrs, Mapping):
        for name in sorted(attrs):
            value = _clean(attrs[name])
            if value:
                facts.append(f"{_clean(name)}: {value}")
    if facts:
        parts.append("; ".join(facts))
    return ". ".join(p.rstrip(".") for p in parts)


@dataclass
class ItemEmbeddings:
    """Per-item vectors in the dataset's item order (see module docstring for shapes and meanings)."""

    item_ids: list[str]
    text: np.ndarray
    image: np.ndarray
    clip_text: np.ndarray
    status: list[str]
    reason: list[str]
    model_ids: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item_ids)

    def index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}

    @property
    def has_image(self) -> np.ndarray:
        """(n,) bool: the item has an image vector."""
        return np.array([s == STATUS_EMBEDDED for s in self.status], dtype=bool)

    def status_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.status:
            out[s] = out.get(s, 0) + 1
        return out

    def save(self, directory: str | Path) -> None:
        """``embeddings.safetensors`` (text, image, clip_text) + ``items.json``, swapped in atomically."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            save_file(
                {name: np.ascontiguousarray(v, dtype=np.float32)  # raw buffers: C order or they load scrambled
                 for name, v in (("text", self.text), ("image", self.image), ("clip_text", self.clip_text))},
                str(tmp / "embeddings.safetensors"),
                metadata={"format_version": str(FORMAT_VERSION)},
            )
            atomic_write_json(
                tmp / "items.json",
                {
                    "format_version": FORMAT_VERSION,
                    "item_ids": self.item_ids,
                    "status": self.status,
                    "reason": self.reason,
                    "model_ids": self.model_ids,
                },
            )

    @classmethod
    def load(cls, directory: str | Path) -> ItemEmbeddings:
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta_path, vec_path = directory / "items.json", directory / "embeddings.safetensors"
        if not meta_path.is_file() or not vec_path.is_file():
            raise DataError(f"{directory} holds no item embeddings (items.json + embeddings.safetensors); run `kgrec encode`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{directory}: item embeddings format {meta.get('format_version')} is not supported")
        arrays = load_file(str(vec_path))
        return cls(
            item_ids=list(meta["item_ids"]),
            text=arrays["text"],
            image=arrays["image"],
            clip_text=arrays["clip_text"],
            status=list(meta["status"]),
            reason=list(meta["reason"]),
            model_ids=dict(meta.get("model_ids", {})),
        )


def _cached(cache_dir: Path | None, model_id: str) -> EmbeddingCache | None:
    return None if cache_dir is None else EmbeddingCache(cache_dir, model_id)


def _encode_texts(encode_fn: Any, texts: Sequence[str], cache: EmbeddingCache | None) -> np.ndarray:
    if cache is None:
        return np.asarray(encode_fn(list(texts)), dtype=np.float32)
    return cache.encode(list(texts), [content_hash(t) for t in texts], lambda batch: encode_fn(list(batch)))


def encode_dataset(
    dataset: Dataset,
    text_encoder: Any | None,
    clip_encoder: Any | None,
    cache_dir: str | Path | None = None,
    *,
    image_chunk: int = 512,
) -> ItemEmbeddings:
    """Encode every item of ``dataset``; one bad item never fails the run.

    Args:
        dataset: the catalog (``items.parquet`` + ``images/``).
        text_encoder: a :class:`~encoders.text.TextEncoder` (or any ``Encoder`` over strings); ``None`` skips text.
        clip_encoder: a :class:`~encoders.clip.ClipEncoder`; ``None`` skips images and CLIP text.
        cache_dir: embedding cache root; ``None`` disables caching.
        image_chunk: images decoded and encoded per cache write (bounds memory; each chunk is one shard).
    """
    cache_root = Path(cache_dir) if cache_dir is not None else None
    items = dataset.table("items").to_pylist()
    n = len(items)
    item_ids = [r["item_id"] for r in items]
    texts = [item_text(r) for r in items]
    has_text = np.array([bool(t.strip()) for t in texts])
    model_ids: dict[str, str] = {}

    if text_encoder is not None:
        model_ids["text"] = text_encoder.model_id
        text = _encode_texts(text_encoder.encode, texts, _cached(cache_root, text_encoder.model_id))
        text[~has_text] = 0.0
    else:
        text = np.zeros((n, 0), dtype=np.float32)

    reasons: list[str] = [""] * n
    if clip_encoder is not None:
        model_ids["clip"] = clip_encoder.model_id
        clip_text = _encode_texts(
            clip_encoder.encode_texts, texts, _cached(cache_root, clip_encoder.model_id + ":text")
        )
        clip_text[~has_text] = 0.0
        image, reasons = _encode_images(dataset, items, clip_encoder, cache_root, image_chunk)
    else:
        image = np.zeros((n, 0), dtype=np.float32)
        clip_text = np.zeros((n, 0), dtype=np.float32)
        reasons = ["image encoder not configured"] * n

    status: list[str] = []
    for i in range(n):
        image_ok = clip_encoder is not None and not reasons[i]
        if image_ok:
            status.append(STATUS_EMBEDDED)
            if not has_text[i]:
                reasons[i] = "no text (title, description and attributes are empty)"
        elif has_text[i]:
            status.append(STATUS_TEXT_ONLY)
        else:
            status.append(STATUS_FAILED)
            reasons[i] = f"no text and no usable image ({reasons[i]})"
    result = ItemEmbeddings(item_ids, text, image, clip_text, status, reasons, model_ids)
    logger.info("encoded %d items: %s", n, result.status_counts())
    return result


def _encode_images(
    dataset: Dataset, items: list[dict], clip_encoder: Any, cache_root: Path | None, chunk: int
) -> tuple[np.ndarray, list[str]]:
    n = len(items)
    dim = clip_encoder.dim
    image = np.zeros((n, dim), dtype=np.float32)
    reasons = [""] * n
    cache = _cached(cache_root, clip_encoder.model_id + ":image")
    todo: list[tuple[int, bytes, str]] = []  # (row, bytes, hash)
    for i, r in enumerate(items):
        path = dataset.image_path(r.get("image"))
        if path is None:
            reasons[i] = "item has no image"
            continue
        data, reason = read_image_bytes(path)
        if data is None:
            reasons[i] = reason or "image unreadable"
            continue
        todo.append((i, data, content_hash(data)))
    if cache is not None and todo:
        found, vecs = cache.get([h for _, _, h in todo])
        for (i, _, _), f, v in zip(todo, found, vecs):
            if f:
                image[i] = v
        todo = [t for t, f in zip(todo, found) if not f]
    progress = None
    if len(todo) > chunk:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(todo), desc="images", unit="img")
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        vecs, errs = clip_encoder.encode_images_with_status([data for _, data, _ in part])
        ok_keys, ok_vecs = [], []
        for (i, _, h), v, err in zip(part, vecs, errs):
            if err:
                reasons[i] = err
            else:
                image[i] = v
                ok_keys.append(h)
                ok_vecs.append(v)
        if cache is not None and ok_keys:
            cache.put(ok_keys, np.stack(ok_vecs))
        if progress is not None:
            progress.update(len(part))
    if progress is not None:
        progress.close()
    return image, reasons
