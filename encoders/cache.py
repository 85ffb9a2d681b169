"""On-disk embedding cache keyed by (model id, sha256 of the exact input).

Layout under ``root``::

    <sha256(model_id)[:24]>/
        index.json                     {"model_id", "dim", "shards": [{"file", "rows", "sha256"}]}
        shard-<uuid>.safetensors       tensor "vectors" (rows, dim) float32; metadata "keys" = JSON list of hashes

A shard is written to a temporary file, fsynced and renamed; only then is ``index.json`` rewritten the same way.
On open every listed shard is checked against its sha256 and row count: a shard that does not match (torn write,
truncated copy, bit rot) is ignored and its keys count as misses, so an interrupted run never reads back as valid.
Shards the index does not list (a run interrupted between the two renames) are ignored and removed by ``compact``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kgrec.data.schema import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

INDEX_VERSION = 1


def content_hash(data: str | bytes) -> str:
    """sha256 hex of the exact input: UTF-8 text or raw bytes (an image file's bytes)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    invalid_shards: list[str] = field(default_factory=list)


class EmbeddingCache:
    """Vectors of one model, looked up by content hash.

    Args:
        root: cache directory shared by all models (each model gets a sub-directory).
        model_id: the encoder's ``model_id``; a different id never sees these vectors.
    """

    def __init__(self, root: str | Path, model_id: str):
        self.root = Path(root)
        self.model_id = model_id
        self.dir = self.root / hashlib.sha256(model_id.encode()).hexdigest()[:24]
        self.stats = CacheStats()
        self._keys: dict[str, tuple[int, int]] = {}  # hash -> (shard number, row)
        self._shards: list[np.ndarray] = []
        self._entries: list[dict] = []
        self.dim: int | None = None
        self._load()

    # ---------------------------------------------------------------- reading
    def _load(self) -> None:
        index_path = self.dir / "index.json"
        if not index_path.is_file():
            return
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("embedding cache index %s unreadable (%s); starting empty", index_path, exc)
            return
        if index.get("model_id") != self.model_id or index.get("version") != INDEX_VERSION:
            logger.warning("embedding cache %s belongs to another model or version; ignoring it", self.dir)
            return
        self.dim = index.get("dim")
        for entry in index.get("shards", []):
            vectors, keys = self._read_shard(entry)
            if vectors is None:
                self.stats.invalid_shards.append(entry.get("file", "?"))
                continue
            n = len(self._shards)
            self._shards.append(vectors)
            self._entries.append(entry)
            for row, key in enumerate(keys):
                self._keys[key] = (n, row)

    def _read_shard(self, entry: dict) -> tuple[np.ndarray | None, list[str]]:
        from safetensors import safe_open
        from safetensors.numpy import load as st_load

        path = self.dir / str(entry.get("file", ""))
        try:
            data = path.read_bytes()
        except OSError as exc:
            logger.warning("embedding cache shard %s unreadable (%s); its vectors will be recomputed", path, exc)
            return None, []
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            logger.warning("embedding cache shard %s fails its checksum (interrupted write?); ignoring it", path)
            return None, []
        try:
            vectors = st_load(data)["vectors"]
            with safe_open(str(path), framework="numpy") as fh:
                keys = json.loads((fh.metadata() or {}).get("keys", "[]"))
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not valid"
            logger.warning("embedding cache shard %s does not parse (%s); ignoring it", path, exc)
            return None, []
        if vectors.ndim != 2 or len(keys) != vectors.shape[0] or vectors.shape[0] != entry.get("rows"):
            logger.warning("embedding cache shard %s has inconsistent rows; ignoring it", path)
            return None, []
        return vectors.astype(np.float32, copy=False), keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(found mask (n,), vectors (n, dim))``; rows of missing keys are zeros. Updates hit/miss stats."""
        n = len(keys)
        found = np.zeros(n, dtype=bool)
        out = np.zeros((n, self.dim or 0), dtype=np.float32)
        for i, key in enumerate(keys):
            loc = self._keys.get(key)
            if loc is not None:
                found[i] = True
                out[i] = self._shards[loc[0]][loc[1]]
        self.stats.hits += int(found.sum())
        self.stats.misses += int(n - found.sum())
        return found, out

    # ---------------------------------------------------------------- writing
    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors`` (n, dim) under ``keys`` as one new shard (atomic; duplicates are skipped)."""
        from safetensors.numpy import save as st_save

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"put: {len(keys)} keys but vectors of shape {vectors.shape}")
        if self.dim is not None and len(self._keys) and vectors.shape[1] != self.dim:
            raise ValueError(f"put: vectors have dim {vectors.shape[1]}, cache holds dim {self.dim}")
        keep: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self._keys and key not in keep:
                keep[key] = i
        if not keep:
            return
        rows = np.ascontiguousarray(vectors[list(keep.values())])
        shard_keys = list(keep.keys())
        data = st_save({"vectors": rows}, metadata={"keys": json.dumps(shard_keys), "model_id": self.model_id})
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        atomic_write_bytes(self.dir / name, data)
        entry = {"file": name, "rows": len(shard_keys), "sha256": hashlib.sha256(data).hexdigest()}
        self.dim = int(rows.shape[1])
        self._write_index(self._entries + [entry])
        n = len(self._shards)
        self._shards.append(rows)
        self._entries.append(entry)
        for row, key in enumerate(shard_keys):
            self._keys[key] = (n, row)

    def _write_index(self, entries: list[dict]) -> None:
        atomic_write_json(
            self.dir / "index.json",
            {"version": INDEX_VERSION, "model_id": self.model_id, "dim": self.dim, "shards": entries},
        )

    def compact(self) -> None:
        """Merge all valid shards into one and delete unlisted, invalid and temporary files."""
        if len(self._shards) > 1:
            keys = sorted(self._keys, key=lambda k: self._keys[k])
            vectors = np.concatenate(self._shards, axis=0)[[self._flat(k) for k in keys]]
            old = set(e["file"] for e in self._entries)
            self._keys, self._shards, self._entries = {}, [], []
            self.put(keys, vectors)
            listed = {e["file"] for e in self._entries}
            for f in old - listed:
                (self.dir / f).unlink(missing_ok=True)
        if self.dir.is_dir():
            self._write_index(self._entries)  # invalid shards leave the index too, not only the directory
            listed = {e["file"] for e in self._entries} | {"index.json"}
            for child in self.dir.iterdir():
                if child.name not in listed:
                    child.unlink(missing_ok=True)

    def _flat(self, key: str) -> int:
        shard, row = self._keys[key]
        return sum(len(s) for s in self._shards[:shard]) + row

    # ---------------------------------------------------------------- the main use
    def encode(
        self,
        inputs: Sequence[object],
        keys: Sequence[str],
        encode_fn: Callable[[list[object]], np.ndarray],
    ) -> np.ndarray:
        """Vectors for ``inputs`` (n, dim): cached rows come from disk, the rest from ``encode_fn`` (then stored)."""
        found, out = self.get(keys)
        missing = np.flatnonzero(~found)
        if len(missing):
            fresh = np.asarray(encode_fn([inputs[i] for i in missing]), dtype=np.float32)
            if out.shape[1] != fresh.shape[1]:  # only when the cache was empty (dim unknown): nothing was found
                out = np.zeros((len(keys), fresh.shape[1]), dtype=np.float32)
            out[missing] = fresh
            self.put([keys[i] for i in missing], fresh)
        return out
