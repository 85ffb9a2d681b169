"""Item-item relations found by enrichment: near-duplicates, ``SIMILAR_TO`` (content) and ``COMPLEMENTS``
(co-purchase across categories).

Content similarity uses *centred* embeddings (the catalog mean subtracted, then L2-normalised): encoders give every
product vector a large shared component, which centring removes so that cosines spread over [-1, 1] and thresholds
mean something. Pairs are blocked by the top-``k`` neighbours of each item (never all pairs scored), computed in
row chunks: memory is ``chunk * n`` floats.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def centred(x: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """(n, d) float32: rows minus the mean of the present rows, L2-normalised; absent rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    present = np.any(x != 0, axis=1) if present is None else present
    out = np.zeros_like(x)
    if present.any() and x.shape[1]:
        c = x[present] - x[present].mean(axis=0, keepdims=True)
        out[present] = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return out


def content_vectors(text: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """(n, d_text + d_image) float32: centred text and image blocks, each weighted 1/sqrt(2), so that the dot
    product of two rows is the mean of their text and image cosines (text alone where an image is missing)."""
    blocks = [centred(text)]
    if image is not None and image.shape[1]:
        blocks.append(centred(image))
    out = np.concatenate(blocks, axis=1) / np.sqrt(len(blocks))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norms > 0, out / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def top_k_neighbours(vectors: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``(index, similarity)``, both (n, k): each row's ``k`` most similar other rows (dot product), best first."""
    n = len(vectors)
    k = max(1, min(k, n - 1))
    idx = np.zeros((n, k), dtype=np.int64)
    sim = np.zeros((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        s = vectors[start:start + chunk] @ vectors.T
        rows = np.arange(start, min(start + chunk, n))
        s[rows - start, rows] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -ps), axis=1)  # by similarity desc, then index (deterministic ties)
        idx[rows] = np.take_along_axis(part, order, axis=1)
        sim[rows] = np.take_along_axis(ps, order, axis=1)
    return idx, sim


def candidate_pairs(neighbours: np.ndarray) -> np.ndarray:
    """(m, 2) unique unordered pairs ``i < j`` from a top-k neighbour table, sorted."""
    n, k = neighbours.shape
    a = np.repeat(np.arange(n), k)
    b = neighbours.reshape(-1)
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The cut that maximises the between-class variance of a 1-d sample (Otsu's method)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or values.max() <= values.min():
        return float(values.max()) if len(values) else 1.0
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][np.argmax(between)])


# ----------------------------------------------------------------------------------------------- duplicates


@dataclass
class DuplicateSettings:
    k: int = 10  # neighbours per item considered (blocking)
    min_cosine: float = 0.5  # floor under the data-chosen text/image thresholds (centred cosines)
    price_tolerance: float = 0.005  # relative price difference still counted as "same price"
    require_same_category: bool = True  # when both are known
    require_same_brand: bool = True  # when both are known
    require_same_price: bool = True  # when both prices are known
    require_no_conflict: bool = True  # no attribute name with two different known values


@dataclass
class DuplicateResult:
    """Pairs judged duplicates (``pairs``: DataFrame src, dst, confidence + evidence columns), the chosen
    thresholds and the number of candidate pairs scored."""

    pairs: pd.DataFrame
    thresholds: dict[str, float]
    n_candidates: int
    stats: dict[str, Any] = field(default_factory=dict)


def _same(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(equal, both_known) for two object arrays of optional strings."""
    known = (np.array([isinstance(x, str) and bool(x) for x in a], dtype=bool)
             & np.array([isinstance(y, str) and bool(y) for y in b], dtype=bool))
    return known & (a == b), known


def find_duplicates(
    item_ids: list[str],
    text: np.ndarray,
    image: np.ndarray | None,
    brand: np.ndarray,
    category: np.ndarray,
    price: np.ndarray,
    settings: DuplicateSettings,
    attributes: list[dict[str, str]] | None = None,
) -> DuplicateResult:
    """Near-duplicate listings from text + image embeddings, with the evidence.

    Candidates are each item's top-``k`` content neighbours. A candidate pair is a duplicate when its centred text
    cosine and image cosine both reach thresholds chosen on this catalog (Otsu's cut of each cosine over the
    candidate pairs, never below ``min_cosine``) and the structured facts do not contradict it: same category,
    same brand, prices within ``price_tolerance`` and no attribute with two different values (each where both
    sides know it). Embeddings alone cannot tell a re-listed item from a different item with the same brand, colour
    and material (their cosines overlap); the structured facts can. ``confidence`` is the mean of how far each
    cosine sits between its threshold and 1, mapped to [0.5, 1]: a ranking score, not a calibrated probability.

    Args:
        item_ids: (n,) ids; text: (n, d_t) and image: (n, d_i) raw encoder vectors (zero rows = missing);
        brand / category: (n,) optional strings; price: (n,) float (NaN unknown);
        attributes: (n,) the items' source attributes ``{name: value}`` (agreement/conflict evidence).
    """
    n = len(item_ids)
    cols = ["src", "dst", "confidence", "text_cosine", "image_cosine", "same_brand", "same_category", "same_price",
            "price_src", "price_dst", "attributes_agree", "attributes_conflict"]
    if n < 2:
        return DuplicateResult(pd.DataFrame(columns=cols), {}, 0)
    t = centred(text)
    has_img = image is not None and image.shape[1] > 0
    im = centred(image) if has_img else None
    vec = content_vectors(text, image if has_img else None)
    nb, _ = top_k_neighbours(vec, settings.k)
    pairs = candidate_pairs(nb)
    a, b = pairs[:, 0], pairs[:, 1]
    tcos = np.sum(t[a] * t[b], axis=1)
    both_img = np.zeros(len(a), dtype=bool)
    icos = np.full(len(a), np.nan)
    if im is not None:
        present = np.any(im != 0, axis=1)
        both_img = present[a] & present[b]
        icos[both_img] = np.sum(im[a[both_img]] * im[b[both_img]], axis=1)
    t_text = max(settings.min_cosine, otsu_threshold(tcos))
    t_img = max(settings.min_cosine, otsu_threshold(icos[both_img])) if both_img.any() else 1.0
    brand, category = np.asarray(brand, dtype=object), np.asarray(category, dtype=object)
    same_brand, _ = _same(brand[a], brand[b])
    same_cat, cat_known = _same(category[a], category[b])
    price = np.asarray(price, dtype=np.float64)
    pa_, pb_ = price[a], price[b]
    price_known = np.isfinite(pa_) & np.isfinite(pb_)
    rel = np.abs(pa_ - pb_) / np.maximum(np.maximum(np.abs(pa_), np.abs(pb_)), 1e-9)
    same_price = price_known & (rel <= settings.price_tolerance)

    agree = np.zeros(len(a), dtype=np.int64)
    conflict = np.zeros(len(a), dtype=np.int64)
    if attributes is not None:
        for p, (x, y) in enumerate(zip(a, b)):
            ax, ay = attributes[x] or {}, attributes[y] or {}
            for name in ax.keys() & ay.keys():
                if ax[name] == ay[name]:
                    agree[p] += 1
                else:
                    conflict[p] += 1
    brand_known = (np.array([isinstance(x, str) and bool(x) for x in brand[a]], dtype=bool)
                   & np.array([isinstance(y, str) and bool(y) for y in brand[b]], dtype=bool))

    ok = tcos >= t_text
    ok &= np.where(both_img, np.nan_to_num(icos, nan=-1.0) >= t_img, True)
    if settings.require_same_category:
        ok &= ~cat_known | same_cat
    if settings.require_same_brand:
        ok &= ~brand_known | same_brand
    if settings.require_same_price:
        ok &= ~price_known | same_price
    if settings.require_no_conflict:
        ok &= conflict == 0
    margin_t = (tcos - t_text) / max(1e-9, 1 - t_text)
    margin_i = np.where(both_img, (np.nan_to_num(icos) - t_img) / max(1e-9, 1 - t_img), margin_t)
    confidence = 0.5 + 0.5 * np.clip((margin_t + margin_i) / 2, 0.0, 1.0)
    ids = np.asarray(item_ids, dtype=object)
    sel = np.flatnonzero(ok)
    frame = pd.DataFrame({
        "src": ids[a[sel]], "dst": ids[b[sel]], "confidence": np.round(confidence[sel], 4),
        "text_cosine": np.round(tcos[sel], 4), "image_cosine": np.round(icos[sel], 4),
        "same_brand": same_brand[sel], "same_category": same_cat[sel], "same_price": same_price[sel],
        "price_src": pa_[sel], "price_dst": pb_[sel], "attributes_agree": agree[sel],
        "attributes_conflict": conflict[sel],
    }, columns=cols)
    # ids in the frame are ordered so that src < dst (the store keeps symmetric relations once per pair)
    swap = frame["src"].to_numpy(dtype=str) > frame["dst"].to_numpy(dtype=str)
    if swap.any():
        frame.loc[swap, ["src", "dst", "price_src", "price_dst"]] = frame.loc[
            swap, ["dst", "src", "price_dst", "price_src"]].to_numpy()
    frame = frame.sort_values(["src", "dst"], kind="stable").reset_index(drop=True)
    logger.info("duplicates: %d of %d candidate pairs (thresholds text %.3f, image %.3f)", len(frame), len(pairs),
                t_text, t_img)
    return DuplicateResult(frame, {"text_cosine": round(t_text, 4), "image_cosine": round(t_img, 4)}, len(pairs))


# ----------------------------------------------------------------------------------------------- SIMILAR_TO


def similar_pairs(item_ids: list[str], vectors: np.ndarray, k: int, min_similarity: float,
                  exclude: set[tuple[str, str]] | None = None) -> pd.DataFrame:
    """``SIMILAR_TO`` pairs: each item's top-``k`` content neighbours with similarity >= ``min_similarity``,
    stored once per unordered pair (src < dst), duplicates (``exclude``) left out. Columns src, dst, confidence
    (the centred content cosine, in [0, 1] after the cut), rank (best rank of the pair in either direction)."""
    if len(item_ids) < 2:
        return pd.DataFrame(columns=["src", "dst", "confidence", "rank"])
    nb, sim = top_k_neighbours(vectors, k)
    ids = np.asarray(item_ids, dtype=object)
    best: dict[tuple[str, str], tuple[float, int]] = {}
    rows, ranks = np.nonzero(sim >= min_similarity)
    for r, j in zip(rows, ranks):
        a, b = ids[r], ids[nb[r, j]]
        key = (a, b) if a < b else (b, a)
        if exclude and key in exclude:
            continue
        s = float(sim[r, j])
        prev = best.get(key)
        best[key] = (max(s, prev[0]) if prev else s, min(int(j) + 1, prev[1]) if prev else int(j) + 1)
    frame = pd.DataFrame([(a, b, round(s, 4), r) for (a, b), (s, r) in best.items()],
                         columns=["src", "dst", "confidence", "rank"])
    return frame.sort_values(["src", "dst"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- COMPLEMENTS


def complement_pairs(events: pd.DataFrame, category: dict[str, str | None], min_users: int) -> pd.DataFrame:
    """``COMPLEMENTS``: item pairs bought by >= ``min_users`` common users whose leaf categories differ (both
    known). Columns src, dst (src < dst), confidence = co-buyers / sqrt(buyers_src * buyers_dst) (the cosine of
    their buyer sets), co_buyers, buyers_src, buyers_dst, lift (co-buyers * users / (buyers_src * buyers_dst)),
    category_src, category_dst."""
    import scipy.sparse as sp

    cols = ["src", "dst", "confidence", "co_buyers", "buyers_src", "buyers_dst", "lift", "category_src",
            "category_dst"]
    if events is None or len(events) == 0:
        return pd.DataFrame(columns=cols)
    buys = events.loc[events["type"] == "purchase", ["user_id", "item_id"]].astype(str).drop_duplicates()
    if len(buys) == 0:
        return pd.DataFrame(columns=cols)
    users = np.sort(buys["user_id"].unique())
    items = np.sort(buys["item_id"].unique())
    ui = np.searchsorted(users, buys["user_id"].to_numpy())
    ii = np.searchsorted(items, buys["item_id"].to_numpy())
    x = sp.csr_matrix((np.ones(len(buys), dtype=np.int32), (ui, ii)), shape=(len(users), len(items)))
    buyers = np.asarray(x.sum(axis=0)).ravel()
    co = sp.triu(x.T @ x, k=1).tocoo()
    keep = co.data >= max(1, min_users)
    r, c, w = co.row[keep], co.col[keep], co.data[keep].astype(np.float64)
    cat_r = np.array([category.get(str(i)) for i in items[r]], dtype=object)
    cat_c = np.array([category.get(str(i)) for i in items[c]], dtype=object)
    known = np.array([bool(x) for x in cat_r], dtype=bool) & np.array([bool(y) for y in cat_c], dtype=bool)
    diff = known & (cat_r != cat_c)
    r, c, w, cat_r, cat_c = r[diff], c[diff], w[diff], cat_r[diff], cat_c[diff]
    frame = pd.DataFrame({
        "src": items[r], "dst": items[c],
        "confidence": np.round(w / np.sqrt(buyers[r] * buyers[c]), 4),
        "co_buyers": w.astype(np.int64), "buyers_src": buyers[r], "buyers_dst": buyers[c],
        "lift": np.round(w * len(users) / (buyers[r] * buyers[c]), 3),
        "category_src": cat_r, "category_dst": cat_c,
    }, columns=cols)
    return frame.sort_values(["src", "dst"], kind="stable").reset_index(drop=True)
