"""The text-search fast path (BERT text space the only non-zero signal) must answer exactly like the full
computation: every part z-scored over all items, the parts averaged, a full stable sort.

The demo catalog has images, so these tests take copies of the fitted recommender whose aligned item vectors are
changed: no images (the CLIP part is then exactly zero and is skipped), no CLIP encoder at all, item text vectors
with many exact duplicates (ties), a constant text matrix (zero spread: the fallback)."""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kgrec.pipeline import Recommender, _zscore
from tests.kgrec.conftest_serve import serve_recommender  # noqa: F401  (fixture)


def _variant(rec: Recommender, *, text: np.ndarray | None = None, images: bool = False,
             clip: bool = True, image: np.ndarray | None = None, has_image: np.ndarray | None = None) -> Recommender:
    """A shallow copy of ``rec`` with its own caches and changed aligned vectors (the original is untouched)."""
    out = copy.copy(rec)
    vec = rec.aligned_vectors
    t = vec["text"] if text is None else text
    if has_image is None:
        has_image = vec["has_image"].copy() if images else np.zeros(len(rec.item_ids), dtype=bool)
    if image is None:
        image = vec["image"] if images else np.zeros_like(vec["image"])
    out._aligned = {"text": np.asfortranarray(t, dtype=np.float32), "image": np.asfortranarray(image),
                    "has_image": has_image}
    out._query_cache = OrderedDict()
    out._query_lock = threading.Lock()
    if not clip:
        out._clip_encoder = None
    return out


def _constant_rows(like: np.ndarray) -> np.ndarray:
    """Every item the same unit vector (shape of ``like``): every similarity equal, zero spread."""
    out = np.zeros(like.shape, dtype=np.float32)
    out[:, 0] = 1.0
    return out


def _full_search(rec: Recommender, text: str, k: int) -> list[tuple[str, float, float]]:
    """(item id, score, text similarity) by the full computation, as written before the fast path: one query,
    every part z-scored over all items (CLIP: items without an image filled with the row minimum), mean of the
    parts, full stable argsort."""
    vec = rec.aligned_vectors
    sim = np.asarray(vec["text"], dtype=np.float32) @ rec.text_encoder.encode([text])[0]
    parts = [_zscore(sim)]
    if rec.clip_encoder is not None:
        s = np.asarray(vec["image"]) @ rec.clip_encoder.encode_texts([text])[0]
        s[~vec["has_image"]] = np.nan
        floor = np.nanmin(s) if np.isfinite(s).any() else 0.0
        parts.append(np.nan_to_num(_zscore(np.nan_to_num(s, nan=floor)), nan=0.0))
    scores = np.mean(parts, axis=0)
    return [(rec.item_ids[i], float(scores[i]), float(sim[i])) for i in np.argsort(-scores, kind="stable")[:k]]


def _check(got, want, tol=1e-5) -> None:
    """Same items, same order; scores to ``tol``: the full computation scores one query with a matrix-vector
    product, the service a batch with a matrix product, whose float32 roundings differ by ~1e-7 per similarity
    (divided by the similarities' spread in a z-score)."""
    assert [r.item_id for r in got] == [w[0] for w in want]
    assert [r.rank for r in got] == list(range(1, len(want) + 1))
    np.testing.assert_allclose([r.score for r in got], [w[1] for w in want], rtol=tol, atol=tol)
    np.testing.assert_allclose([r.sources.get("text", np.nan) for r in got], [w[2] for w in want], rtol=1e-5, atol=1e-6)


def _score_tol(rec: Recommender, text: str) -> float:
    """Score tolerance for items that share a few distinct vectors: a z-score divides the similarities' float32
    rounding (~1e-7) by their spread, which two rows with nearly equal similarities to the query make tiny."""
    vec = rec.aligned_vectors
    spreads = [np.std(np.asarray(vec["text"], dtype=np.float64) @ rec.text_encoder.encode([text])[0])]
    if rec.clip_encoder is not None and vec["has_image"].any():
        spreads.append(np.std(np.asarray(vec["image"], dtype=np.float64)[vec["has_image"]]
                              @ rec.clip_encoder.encode_texts([text])[0]))
    spread = min(float(x) for x in spreads)
    return max(1e-5, 1e-6 / spread) if spread > 0 else 1e-5


QUERIES = ["red cotton shirt", "wooden desk lamp", "blue", "boots", "a ceramic cup for coffee", "red cotton shirt"]


def test_without_images_the_clip_part_is_skipped_and_results_are_unchanged(serve_recommender):
    rec = _variant(serve_recommender)
    ks = [10, 5, 1, 10, 3, 7]
    batch = rec.search_batch(QUERIES, ks)
    for text, k, got in zip(QUERIES, ks, batch):
        _check(got, _full_search(rec, text, k))
        _check(rec.search(text=text, k=k), _full_search(rec, text, k))
        assert all(set(r.sources) == {"text"} for r in got)  # the CLIP similarity is NaN everywhere: not shown
    assert not any(kind == "clip" for kind, _ in rec._query_cache)  # the CLIP text tower never ran
    # from the same (batched) similarities, the moments give the full z-scores to the float32 rounding of those
    # similarities (~3e-7 here; the moments themselves are float64); the mean still counts the zero CLIP part, so
    # scores are half the text z-score, as before the fast path
    sims = np.stack(rec._query_vectors("text", QUERIES)) @ rec.aligned_vectors["text"].T
    for row, got in zip(sims, batch):
        z = _zscore(row)
        idx = [rec.item_ids.index(r.item_id) for r in got]
        np.testing.assert_allclose([r.score for r in got], z[idx] / 2, rtol=1e-6, atol=1e-6)


def test_without_a_clip_encoder_the_score_is_the_text_z_score(serve_recommender):
    rec = _variant(serve_recommender, clip=False)
    assert rec.clip_encoder is None
    for text in QUERIES:
        _check(rec.search(text=text, k=10), _full_search(rec, text, 10))


def test_with_images_the_two_space_path_equals_the_full_computation(serve_recommender):
    vec = serve_recommender.aligned_vectors
    has = vec["has_image"].copy()
    has[::3] = False  # every third item without its image (the demo catalog has one for every item)
    image = np.asarray(vec["image"]).copy()
    image[~has] = 0.0
    rec = _variant(serve_recommender, image=image, has_image=has)
    assert has.any() and not has.all()
    ks = [10, 5, 1, 10, 3, 60]
    batch = rec.search_batch(QUERIES, ks)
    full = rec._search_full(QUERIES, ks)
    for text, k, got, ref in zip(QUERIES, ks, batch, full):
        _check(got, _full_search(rec, text, k))
        assert [(r.item_id, r.rank) for r in got] == [(r.item_id, r.rank) for r in ref]
        # equal to the float32 rounding of the similarities (the candidates' are recomputed row by row, the full
        # computation's come from a matrix product), divided by their spread in a z-score
        np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=1e-5, atol=1e-5)
        for g, w in zip(got, ref):  # the CLIP similarity only for items with an image, as before
            assert g.sources.keys() == w.sources.keys()
            np.testing.assert_allclose(list(g.sources.values()), list(w.sources.values()), rtol=1e-5, atol=1e-6)
        assert any("clip_image" in r.sources for r in got)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), distinct=st.integers(1, 30), k=st.integers(1, 60),
       share=st.sampled_from([0.05, 0.5, 1.0]))
def test_two_space_ties_and_image_subsets_match_the_full_computation(serve_recommender, seed, distinct, k, share):
    """Items share one of ``distinct`` text vectors and one of ``distinct`` image vectors (exact ties in both
    parts), and a random share of the items has an image: same items, order and scores as the full computation."""
    base = serve_recommender
    rng = np.random.default_rng(seed)
    n = len(base.item_ids)
    vec = base.aligned_vectors

    def unit_rows(dim: int) -> np.ndarray:
        rows = rng.standard_normal((distinct, dim)).astype(np.float32)
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True))[rng.integers(0, distinct, size=n)]

    has = rng.random(n) < share
    has[rng.integers(0, n)] = True
    image = unit_rows(vec["image"].shape[1])
    image[~has] = 0.0
    rec = _variant(base, text=unit_rows(vec["text"].shape[1]), image=image, has_image=has)
    text = QUERIES[seed % len(QUERIES)]
    want = _full_search(rec, text, k)
    for slack in (1, 32):  # candidates within what torch.topk returned, or past it (one pass over the row)
        with patch("kgrec.pipeline.TOP_K_SLACK", slack):
            _check(rec.search_batch([text], k)[0], want, tol=_score_tol(rec, text))


def test_two_space_constant_or_non_finite_rows_take_the_full_computation(serve_recommender):
    base = serve_recommender
    has = np.ones(len(base.item_ids), dtype=bool)
    rec = _variant(base, image=_constant_rows(base.aligned_vectors["image"]), has_image=has)  # CLIP part: zero spread
    _check(rec.search_batch(["boots"], 10)[0], _full_search(rec, "boots", 10))
    bad = np.asarray(base.aligned_vectors["image"], dtype=np.float32).copy()
    bad[3, 0] = np.nan
    rec = _variant(base, image=bad, has_image=has)
    got = rec.search_batch(["boots"], 10)[0]
    assert [r.item_id for r in got] == [r.item_id for r in rec._search_full(["boots"], [10])[0]]


def test_image_moments_are_over_the_items_with_an_image(serve_recommender):
    rec = _variant(serve_recommender, images=True)
    vec = rec.aligned_vectors
    y = np.asarray(vec["image"], dtype=np.float64)[vec["has_image"]]
    mu, cov = rec._image_moments()
    np.testing.assert_allclose(mu, y.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(y, rowvar=False, bias=True), rtol=0, atol=1e-12)
    max_x, max_y = rec._max_norms()
    assert max_x == pytest.approx(np.linalg.norm(vec["text"], axis=1).max(), rel=1e-6)
    assert max_y == pytest.approx(np.linalg.norm(vec["image"], axis=1).max(), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), distinct=st.integers(1, 40), k=st.integers(1, 60))
def test_ties_from_duplicate_item_vectors_are_broken_by_item_order(serve_recommender, seed, distinct, k):
    """Items share one of ``distinct`` text vectors (thousands of exact ties at 200 items): same order as the
    full stable sort, scores equal."""
    base = serve_recommender
    rng = np.random.default_rng(seed)
    dim = base.aligned_vectors["text"].shape[1]
    rows = rng.standard_normal((distinct, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rec = _variant(base, text=rows[rng.integers(0, distinct, size=len(base.item_ids))])
    text = QUERIES[seed % len(QUERIES)]
    want = _full_search(rec, text, k)
    if distinct == 1:  # every similarity equal: the spread is zero and the row takes the full computation
        assert all(w[1] == 0.0 for w in want)
    _check(rec.search_batch([text], k)[0], want, tol=_score_tol(rec, text))


def test_constant_and_non_finite_rows_take_the_full_computation(serve_recommender):
    base = serve_recommender
    rec = _variant(base, text=_constant_rows(base.aligned_vectors["text"]))
    got = rec.search(text="boots", k=10)
    assert [r.item_id for r in got] == base.item_ids[:10] and all(r.score == 0.0 for r in got)
    bad = np.asarray(base.aligned_vectors["text"], dtype=np.float32).copy()
    bad[7, 0] = np.nan
    rec = _variant(base, text=bad)
    assert rec._text_moments()  # computed, but the NaN row below is not scored from them
    _check(rec.search(text="boots", k=10), _full_search(rec, "boots", 10))


def test_text_moments_equal_numpy_mean_and_covariance(serve_recommender):
    rec = _variant(serve_recommender)
    x = np.asarray(rec.aligned_vectors["text"], dtype=np.float64)
    mu, cov = rec._text_moments()
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False, bias=True), rtol=0, atol=1e-12)
    q = rng_query = np.random.default_rng(1).standard_normal(x.shape[1])
    s = x @ rng_query
    assert q @ mu == pytest.approx(s.mean(), rel=1e-10)
    assert np.sqrt(q @ cov @ q) == pytest.approx(s.std(), rel=1e-10)


def test_aligned_item_matrices_are_column_major_and_unchanged(serve_recommender):
    rec = serve_recommender
    vec = rec.aligned_vectors
    order = rec._item_order()
    for name in ("text", "image"):
        assert vec[name].T.flags.c_contiguous  # (dim, I) contiguous: Q @ vec[name].T is a plain product
        np.testing.assert_array_equal(vec[name], getattr(rec.embeddings, name)[order])


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 5),
    width=st.integers(1, 80),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_top_k_rows_equals_a_full_stable_argsort_per_row(rows, width, levels, seed, data):
    """Few distinct values (many ties, across the cut too) or continuous ones; k from 1 to past the row length."""
    from kgrec.pipeline import _top_k_rows

    rng = np.random.default_rng(seed)
    if levels < 6:
        scores = rng.integers(0, levels, size=(rows, width)).astype(np.float32)
    else:
        scores = rng.standard_normal((rows, width)).astype(np.float32)
    ks = data.draw(st.lists(st.integers(1, width + 3), min_size=rows, max_size=rows))
    for slack in (1, 3, 32):  # ties resolved inside the returned width, or past it (the full fallback)
        with patch("kgrec.pipeline.TOP_K_SLACK", slack):
            for row, k, got in zip(scores, ks, _top_k_rows(scores, ks)):
                np.testing.assert_array_equal(got, np.argsort(-row, kind="stable")[:k])


def test_query_bf16_is_a_close_approximation_cached_apart(serve_recommender):
    """``serve.query_bf16``: bfloat16 query vectors close to the float32 ones (the tiny test BERT's), kept apart in
    the query cache, and a search that mostly agrees; the default stays float32."""
    rec = _variant(serve_recommender)
    exact = np.stack(rec._query_vectors("text", QUERIES))
    approx = np.stack(rec._query_vectors("text", QUERIES, bf16=True))
    assert not np.array_equal(exact, approx)
    assert (exact * approx).sum(axis=1).min() > 0.99
    np.testing.assert_array_equal(np.stack(rec._query_vectors("text", QUERIES)), exact)  # cache not mixed
    assert {kind for kind, _ in rec._query_cache} == {"text", "text:bf16"}
    full = rec.search_batch(QUERIES, 10)
    fast = rec.search_batch(QUERIES, 10, query_bf16=True)
    overlap = [len({r.item_id for r in a} & {r.item_id for r in b}) / 10 for a, b in zip(full, fast)]
    assert np.mean(overlap) >= 0.8
    _check(full[0], _full_search(rec, QUERIES[0], 10))


def test_service_passes_query_bf16_from_the_config(serve_recommender, monkeypatch):
    from fastapi.testclient import TestClient

    from kgrec.config import ServeConfig
    from kgrec.serve.app import create_app

    rec = _variant(serve_recommender)
    seen = []
    original = rec.search_batch

    def spy(texts, k=10, *, query_bf16=False):
        seen.append(query_bf16)
        return original(texts, k, query_bf16=query_bf16)

    monkeypatch.setattr(rec, "search_batch", spy)
    for flag in (False, True):
        seen.clear()
        with TestClient(create_app(rec, ServeConfig(query_bf16=flag), warmup=False)) as client:
            r = client.get("/search", params={"text": "red cotton shirt", "k": 5})
        assert r.status_code == 200 and len(r.json()["results"]) == 5
        assert seen == [flag]


def test_onnx_query_encoders_give_the_same_vectors_and_results(serve_recommender):
    """``use_onnx_queries``: BERT queries through ONNX Runtime (the tiny test CLIP is open_clip's own tower, which is
    left on torch), cached vectors dropped, same items in the same order as with torch."""
    rec = _variant(serve_recommender, images=True)
    rec._onnx_queries = {}
    want_vecs = np.stack(rec._query_vectors("text", QUERIES))
    want = rec.search_batch(QUERIES, 10)
    diffs = rec.use_onnx_queries()
    assert set(diffs) == {"text"} and diffs["text"] <= 1e-5
    assert not rec._query_cache
    np.testing.assert_allclose(np.stack(rec._query_vectors("text", QUERIES)), want_vecs, atol=1e-5, rtol=0)
    got = rec.search_batch(QUERIES, 10)
    for g, w in zip(got, want):
        assert [r.item_id for r in g] == [r.item_id for r in w]
        np.testing.assert_allclose([r.score for r in g], [r.score for r in w], atol=1e-4)
    _check(got[0], _full_search(rec, QUERIES[0], 10), tol=1e-4)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_service_sets_the_query_runtime_from_the_config(serve_recommender, runtime):
    from fastapi.testclient import TestClient

    from kgrec.config import ServeConfig
    from kgrec.serve.app import create_app

    rec = _variant(serve_recommender)
    rec._onnx_queries = {}
    with TestClient(create_app(rec, ServeConfig(query_runtime=runtime), warmup=False)) as client:
        r = client.get("/search", params={"text": "red cotton shirt", "k": 5})
    assert r.status_code == 200 and len(r.json()["results"]) == 5
    assert set(rec._onnx_queries) == ({"text"} if runtime == "onnx" else set())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 64), spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_int8_first_pass_error_is_within_its_bound(seed, dim, spread):
    """The int8 product's per-row bound holds for every item: unit-ish, tiny and large values, outliers."""
    from kgrec.pipeline import _int8_coarse, _int8_matrix

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((300, dim)) * spread).astype(np.float32)
    x[rng.integers(0, 300, 5)] *= 50  # outlier rows
    x[7] = 0.0
    q = (rng.standard_normal((4, dim)) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
    items = _int8_matrix(x, np.ones(300, dtype=bool))
    approx, bound = _int8_coarse(q, items)
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    assert (np.abs(approx - exact) <= bound[:, None]).all()


def test_int8_first_pass_and_float32_products_give_the_same_search(serve_recommender):
    vec = serve_recommender.aligned_vectors
    has = vec["has_image"].copy()
    has[1::4] = False
    image = np.asarray(vec["image"]).copy()
    image[~has] = 0.0
    rec = _variant(serve_recommender, image=image, has_image=has)
    assert rec._int8_items() is not None
    ks = [10, 1, 25, 10, 4, 60]
    fast, plain = rec._search_two_spaces(QUERIES, ks), rec._search_two_spaces(QUERIES, ks, int8_first=False)
    for a, b in zip(fast, plain):
        assert [(r.item_id, r.rank) for r in a] == [(r.item_id, r.rank) for r in b]
        np.testing.assert_allclose([r.score for r in a], [r.score for r in b], rtol=1e-5, atol=1e-5)
    bad = image.copy()
    bad[5, 0] = np.inf
    assert _variant(serve_recommender, image=bad, has_image=has)._int8_items() is None  # then float32 products
