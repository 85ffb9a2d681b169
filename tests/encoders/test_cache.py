"""Embedding cache: hits, misses, model separation, invalidation, and that interrupted writes never read back."""
from __future__ import annotations

import json

import numpy as np
import pytest

from encoders.cache import EmbeddingCache, content_hash


def _vecs(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_roundtrip_hits_and_misses(tmp_path):
    keys = [content_hash(f"text {i}") for i in range(5)]
    cache = EmbeddingCache(tmp_path, "model-a")
    cache.put(keys[:3], _vecs(3))
    reopened = EmbeddingCache(tmp_path, "model-a")
    found, vecs = reopened.get(keys)
    assert found.tolist() == [True, True, True, False, False]
    np.testing.assert_array_equal(vecs[:3], _vecs(3))
    assert (reopened.stats.hits, reopened.stats.misses) == (3, 2)
    assert len(EmbeddingCache(tmp_path, "model-b")) == 0  # another model never sees these vectors


def test_encode_calls_the_model_only_for_misses(tmp_path):
    calls: list[int] = []

    def model(batch):
        calls.append(len(batch))
        return np.stack([np.full(4, float(len(t)), dtype=np.float32) for t in batch])

    texts = ["a", "bb", "ccc"]
    out1 = EmbeddingCache(tmp_path, "m").encode(texts, [content_hash(t) for t in texts], model)
    out2 = EmbeddingCache(tmp_path, "m").encode(texts, [content_hash(t) for t in texts], model)
    texts[1] = "changed"
    out3 = EmbeddingCache(tmp_path, "m").encode(texts, [content_hash(t) for t in texts], model)
    assert calls == [3, 1]
    np.testing.assert_array_equal(out1, out2)
    assert out3[1, 0] == 7.0 and out3[0, 0] == 1.0


def test_interrupted_shard_write_leaves_cache_valid(tmp_path, monkeypatch):
    keys = [content_hash(str(i)) for i in range(4)]
    cache = EmbeddingCache(tmp_path, "m")
    cache.put(keys[:2], _vecs(2))

    import os

    real_replace = os.replace

    def crash(src, dst):  # the process "dies" after writing the temp shard, before the rename
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put(keys[2:], _vecs(2, seed=1))
    monkeypatch.setattr(os, "replace", real_replace)
    reopened = EmbeddingCache(tmp_path, "m")
    assert reopened.get(keys)[0].tolist() == [True, True, False, False]
    assert not [p for p in cache.dir.iterdir() if p.name.endswith(".tmp")]  # temp file cleaned up


def _two_shards(tmp_path, n: int) -> tuple[EmbeddingCache, list[str], dict]:
    """A cache holding n keys in two shards of n / 2, and its index."""
    keys = [content_hash(str(i)) for i in range(n)]
    cache = EmbeddingCache(tmp_path, "m")
    cache.put(keys[: n // 2], _vecs(n // 2))
    cache.put(keys[n // 2 :], _vecs(n - n // 2, seed=2))
    return cache, keys, json.loads((cache.dir / "index.json").read_text())


def test_truncated_or_corrupt_shard_is_ignored(tmp_path):
    cache, keys, index = _two_shards(tmp_path, 6)
    second = cache.dir / index["shards"][1]["file"]
    second.write_bytes(second.read_bytes()[:-40])  # a torn write of the second shard
    reopened = EmbeddingCache(tmp_path, "m")
    assert reopened.get(keys)[0].tolist() == [True] * 3 + [False] * 3
    assert reopened.stats.invalid_shards == [second.name]
    # the missing vectors are recomputed and the cache heals
    reopened.put(keys[3:], _vecs(3, seed=2))
    assert EmbeddingCache(tmp_path, "m").get(keys)[0].all()


def test_shard_not_in_index_is_not_read_and_compact_removes_it(tmp_path):
    keys = [content_hash(str(i)) for i in range(3)]
    cache = EmbeddingCache(tmp_path, "m")
    cache.put(keys[:1], _vecs(1))
    index_before = (cache.dir / "index.json").read_bytes()
    cache.put(keys[1:], _vecs(2))
    (cache.dir / "index.json").write_bytes(index_before)  # crash between shard rename and index rename
    reopened = EmbeddingCache(tmp_path, "m")
    assert reopened.get(keys)[0].tolist() == [True, False, False]
    reopened.put(keys[1:2], _vecs(1, seed=5))
    reopened.compact()
    files = sorted(p.name for p in cache.dir.iterdir())
    assert len(files) == 2 and "index.json" in files
    final = EmbeddingCache(tmp_path, "m")
    found, vecs = final.get(keys)
    assert found.tolist() == [True, True, False]
    np.testing.assert_array_equal(vecs[0], _vecs(1)[0])
    np.testing.assert_array_equal(vecs[1], _vecs(1, seed=5)[0])


def test_compact_drops_invalid_shards_from_the_index(tmp_path):
    cache, keys, index = _two_shards(tmp_path, 4)
    broken = cache.dir / index["shards"][1]["file"]
    broken.write_bytes(b"torn")
    reopened = EmbeddingCache(tmp_path, "m")  # one valid shard left: nothing to merge
    reopened.compact()
    assert not broken.exists()
    assert [s["file"] for s in json.loads((cache.dir / "index.json").read_text())["shards"]] == [index["shards"][0]["file"]]
    again = EmbeddingCache(tmp_path, "m")
    assert again.stats.invalid_shards == [] and again.get(keys)[0].tolist() == [True, True, False, False]
