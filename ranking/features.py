"""Readable ranking features for (user, candidate item) pairs, computed with array ops and sparse products.

``FeatureBuilder(context).build(user_index, candidates, query_vectors=None)`` returns a :class:`FeatureMatrix` with
``X`` of shape ``(n_users * C, F)`` float32, rows ordered user-major (row ``u * C + c`` is user ``u``'s ``c``-th
candidate). Missing values are NaN (LightGBM treats them as missing).

KG evidence counts typed paths of length 2-3 that start with one of the user's history relationships
(user -[PURCHASED|CARTED|RATED]-> "bought" item ..., ``context.HISTORY_EVENT_TYPES``):

========================  ==========================================================================
feature                   path pattern (all counted as distinct relationship paths, no repeated node)
========================  ==========================================================================
kg_paths_also_bought      user -> bought -[ALSO_BOUGHT]- item                            (length 2)
kg_paths_brand            user -> bought -[MADE_BY]-> Brand <-[MADE_BY]- item           (length 3)
kg_paths_category         user -> bought -[IN_CATEGORY]-> Category <-[IN_CATEGORY]- item (length 3)
kg_paths_attribute        user -> bought -[HAS_ATTRIBUTE]-> value <-[HAS_ATTRIBUTE]- item (length 3)
kg_paths_entity           user -> bought -[LINKED_TO]-> Entity <-[LINKED_TO]- item       (length 3)
kg_paths_co_buyer         user -> bought <-[PURCHASED|CARTED|RATED]- other user -> item  (length 3)
========================  ==========================================================================

Each count is ``(H[u] @ M @ M.T)[i]`` for the history relationship matrix ``H`` and the item->node incidence
``M``, minus the non-simple paths through the candidate itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from ranking.context import EVENT_TIME_FEATURES, SECONDS_PER_DAY, RankingContext

logger = logging.getLogger(__name__)

# Feature names in column order, with what each one measures (the feature spec saved next to the model).
FEATURE_DESCRIPTIONS: dict[str, str] = {
    "gnn_score": "dot product of the GNN user and item vectors (the retrieval score)",
    "history_similarity": "cosine of the item's fused GNN vector to the mean of the user's bought/carted/rated items",
    "text_similarity": "cosine of the item's text vector to the mean text vector of the user's bought/carted/rated items",
    "image_similarity": "cosine of the item's image vector to the mean image vector of the user's bought/carted/rated items",
    "query_similarity": "cosine of the query vector to the item's text vector (NaN without a query)",
    "modality_weighted_similarity": "text/image/history similarities weighted by the item's fusion weights",
    "kg_paths_also_bought": "paths user-bought item-ALSO_BOUGHT-item",
    "kg_paths_brand": "paths user-bought item-MADE_BY-brand-MADE_BY-item (bought items of the same brand)",
    "kg_paths_category": "paths user-bought item-IN_CATEGORY-category-IN_CATEGORY-item",
    "kg_paths_attribute": "paths user-bought item-HAS_ATTRIBUTE-value-HAS_ATTRIBUTE-item (shared attribute values)",
    "kg_paths_entity": "paths user-bought item-LINKED_TO-entity-LINKED_TO-item",
    "kg_paths_co_buyer": "paths user-bought item-bought by another user-who bought the item",
    "kg_paths_total": "sum of the kg_paths_* counts",
    "kg_shortest_path": "length of the shortest purchase/cart/rating path (2 or 3; 4 when none within 3 hops)",
    "brand_share": "share of the user's purchase/cart/rating relationships whose item has the item's brand",
    "category_share": "share of the user's purchase/cart/rating relationships whose item is in the item's category",
    "attribute_overlap": "attribute values shared with the user's purchased/carted/rated items, per relationship",
    "user_item_views": "times the user viewed this item",
    "user_item_clicks": "times the user clicked this item",
    "user_item_carts": "times the user put this item in the cart",
    "user_item_purchases": "times the user bought this item",
    "days_since_user_item_event": "days since the user's last event on this item (NaN if none)",
    "item_popularity": "log1p of the item's number of interactions",
    "item_days_since_last_event": "days since anyone last interacted with the item (recency)",
    "price": "item price (NaN if unknown)",
    "price_ratio": "item price / median price of the user's bought/carted/rated items",
}
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURE_DESCRIPTIONS)  # the columns a ranker learns from by default
# Opt-in columns (``ranking.extra_features``), computed only for a ranker that uses them. Measured together against
# the default set (benchmarks/bench_ranker_features.py): test ratio to the GNN order 1.318 vs 1.428 over five demo
# catalogs, ml-100k Recall@20 0.4055 vs 0.4059 (likely more columns than a few hundred users' labels support).
OPTIONAL_FEATURE_DESCRIPTIONS: dict[str, str] = {
    "gnn_dot_z": "the GNN dot product as a standard score over all items for this user (how far the item stands out)",
    "user_activity": "log1p of the number of distinct items the user has any event on",
    "co_buyer_cosine": "sum of the item's cosine similarity (shared buyers) to each bought/carted/rated item (item kNN)",
    "days_user_to_item_activity": "days from the median time of the item's events to the user's last event",
    "item_events_near_user_time": "log1p of the item's events in the 7 days up to the user's last event",
}
OPTIONAL_FEATURES: tuple[str, ...] = tuple(OPTIONAL_FEATURE_DESCRIPTIONS)
FEATURE_DESCRIPTIONS.update(OPTIONAL_FEATURE_DESCRIPTIONS)  # every name a ranker may carry, described
ALL_FEATURES: tuple[str, ...] = FEATURE_NAMES + OPTIONAL_FEATURES
KG_PATH_FEATURES: tuple[str, ...] = (
    "kg_paths_also_bought",
    "kg_paths_brand",
    "kg_paths_category",
    "kg_paths_attribute",
    "kg_paths_entity",
    "kg_paths_co_buyer",
)
# Window of the item_events_near_user_time feature.
NEAR_USER_TIME_SECONDS = 7 * 86_400
# Users per sparse-product chunk: bounds the dense (chunk, K) buffers at ~ chunk * K floats.
_DENSE_BUDGET = 4_000_000


@dataclass
class FeatureMatrix:
    """Features of ``n_users x C`` candidate pairs.

    Attributes:
        X: (n_users * C, F) float32, row ``u * C + c`` = user ``u``'s ``c``-th candidate; NaN = missing.
        names: the F column names (see ``FEATURE_DESCRIPTIONS``).
        user_index: (n_users,) dense user indices.
        candidates: (n_users, C) dense item indices.
    """

    X: np.ndarray
    names: tuple[str, ...]
    user_index: np.ndarray
    candidates: np.ndarray

    def column(self, name: str) -> np.ndarray:
        return self.X[:, self.names.index(name)]

    def row(self, user_pos: int, cand_pos: int) -> np.ndarray:
        return self.X[user_pos * self.candidates.shape[1] + cand_pos]

    @property
    def group(self) -> np.ndarray:
        """(n_users,) group sizes for LightGBM: one group of C rows per user."""
        return np.full(len(self.user_index), self.candidates.shape[1], dtype=np.int64)


def check_feature_names(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``names`` as a tuple if each is a known feature (any subset, any order, no repeats), else ValueError."""
    names = tuple(names)
    unknown = [n for n in names if n not in ALL_FEATURES]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"ranking features must be distinct names from {list(ALL_FEATURES)}; got {list(names)}"
                         + (f" (unknown: {unknown})" if unknown else ""))
    return names


def ranker_feature_names(exclude: tuple[str, ...] | list[str] = (), extra: tuple[str, ...] | list[str] = ()
                         ) -> tuple[str, ...]:
    """The columns a new ranker learns from: :data:`FEATURE_NAMES` less ``exclude``, then the opt-in ``extra``
    (names from :data:`OPTIONAL_FEATURES`), in :data:`ALL_FEATURES` order."""
    unknown = [n for n in exclude if n not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f"unknown ranking features {unknown} to exclude; the default features are {list(FEATURE_NAMES)}")
    unknown = [n for n in extra if n not in OPTIONAL_FEATURES]
    if unknown:
        raise ValueError(f"unknown ranking features {unknown} to add; the opt-in features are {list(OPTIONAL_FEATURES)}")
    chosen = (set(FEATURE_NAMES) - set(exclude)) | set(extra)
    if not chosen:
        raise ValueError("every ranking feature is excluded: keep at least one (ranking.exclude_features)")
    return check_feature_names([n for n in ALL_FEATURES if n in chosen])


class FeatureBuilder:
    """Computes features for user x candidate matrices from a :class:`RankingContext`: every name in
    :data:`FEATURE_NAMES` by default, or the ``names`` given (a subset, in that column order: a saved ranker's)."""

    names: tuple[str, ...] = FEATURE_NAMES

    def __init__(self, context: RankingContext, names: tuple[str, ...] | list[str] | None = None):
        self.ctx = context
        if names is not None:
            self.names = check_feature_names(names)
        if EVENT_TIME_FEATURES & set(self.names) and context.item_event_times is None \
                and context.last_interaction is not None:
            raise ValueError(f"features {sorted(EVENT_TIME_FEATURES & set(self.names))} need event times: build the "
                             "context with columns= naming them (RankingContext.from_hetero)")
        ctx = context
        # Transposes used per call, built once.
        self._brand_t = ctx.item_brand.T.tocsr()
        self._category_t = ctx.item_category.T.tocsr()
        self._attribute_t = ctx.item_attribute.T.tocsr()
        self._entity_t = ctx.item_entity.T.tocsr()
        self._history_rel_t = ctx.history_relations.T.tocsr()  # (I, U)
        # Number of nodes each item reaches through a relation type (for removing non-simple self paths).
        self._self_brand = np.asarray(ctx.item_brand.multiply(ctx.item_brand).sum(axis=1)).ravel()
        self._self_category = np.asarray(ctx.item_category.multiply(ctx.item_category).sum(axis=1)).ravel()
        self._self_attribute = np.asarray(ctx.item_attribute.multiply(ctx.item_attribute).sum(axis=1)).ravel()
        self._self_entity = np.asarray(ctx.item_entity.multiply(ctx.item_entity).sum(axis=1)).ravel()
        h = ctx.history_relations
        self._buyers_sq = np.asarray(h.multiply(h).sum(axis=0)).ravel()  # sum_v H[v, i]^2 per item

    # ------------------------------------------------------------------ public
    def build(
        self,
        user_index: np.ndarray,
        candidates: np.ndarray,
        query_vectors: np.ndarray | None = None,
    ) -> FeatureMatrix:
        """Features for each user's candidates.

        Args:
            user_index: (n,) dense user indices.
            candidates: (n, C) dense item indices (every entry a valid item).
            query_vectors: optional (n, dt) or (dt,) query vectors in the item text space.

        Returns:
            FeatureMatrix with ``X`` (n * C, F) float32.
        """
        ctx = self.ctx
        user_index = np.asarray(user_index, dtype=np.int64).ravel()
        candidates = np.asarray(candidates, dtype=np.int64)
        if candidates.ndim != 2 or candidates.shape[0] != len(user_index):
            raise ValueError(f"candidates must be (n_users, C) for {len(user_index)} users, got {candidates.shape}")
        n, C = candidates.shape
        flat = candidates.ravel()
        rep = np.repeat(np.arange(n), C)
        users_flat = user_index[rep]
        cols: dict[str, np.ndarray] = {}

        # --- vectors
        uvec = ctx.user_vectors[user_index]
        if ctx.retrieval_scorer is not None:
            cols["gnn_score"] = np.asarray(ctx.retrieval_scorer(user_index, candidates), dtype=np.float32).ravel()
        else:
            cols["gnn_score"] = np.einsum("nd,ncd->nc", uvec, ctx.item_vectors[candidates]).ravel()
        hist = ctx.history[user_index]  # (n, I) binary
        has_hist = ctx.history_size[user_index] > 0
        base = ctx.touched[user_index]
        # Users without purchases/carts fall back to anything they touched.
        profile = (hist + sp.diags((~has_hist).astype(np.float32)) @ base).tocsr()
        cols["history_similarity"] = self._profile_cosine(profile, ctx.item_vectors_unit, candidates)
        cols["text_similarity"] = (
            self._profile_cosine(profile, ctx.item_text, candidates) if ctx.item_text is not None else _nan(n * C)
        )
        cols["image_similarity"] = (
            self._profile_cosine(profile, ctx.item_image, candidates) if ctx.item_image is not None else _nan(n * C)
        )
        if query_vectors is not None and ctx.item_text is not None:
            q = np.asarray(query_vectors, dtype=np.float32)
            q = np.broadcast_to(q.reshape(1, -1), (n, q.shape[-1])) if q.ndim == 1 else q
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
            cols["query_similarity"] = np.einsum("nd,ncd->nc", q, ctx.item_text[candidates]).ravel()
        else:
            cols["query_similarity"] = _nan(n * C)
        if ctx.modality_weights is not None:
            w = ctx.modality_weights[flat]
            sims = np.stack(
                [np.nan_to_num(cols["text_similarity"]), np.nan_to_num(cols["image_similarity"]),
                 np.nan_to_num(cols["history_similarity"])],
                axis=1,
            )
            cols["modality_weighted_similarity"] = (w * sims).sum(axis=1)
        else:
            cols["modality_weighted_similarity"] = np.nan_to_num(cols["history_similarity"])

        # --- KG paths through purchases / carts
        H = ctx.history_relations[user_index]  # (n, I) relationship counts
        own = _pair_values(H, rep, flat)  # H[u, i]: the candidate itself among the first hops
        cols["kg_paths_also_bought"] = _pair_dot(H @ ctx.also_bought, None, rep, flat)
        cols["kg_paths_brand"] = _pair_dot(H @ ctx.item_brand, ctx.item_brand, rep, flat) - own * self._self_brand[flat]
        cols["kg_paths_category"] = (
            _pair_dot(H @ ctx.item_category, ctx.item_category, rep, flat) - own * self._self_category[flat]
        )
        cols["kg_paths_attribute"] = (
            _pair_dot(H @ ctx.item_attribute, ctx.item_attribute, rep, flat) - own * self._self_attribute[flat]
        )
        cols["kg_paths_entity"] = (
            _pair_dot(H @ ctx.item_entity, ctx.item_entity, rep, flat) - own * self._self_entity[flat]
        )
        # u -> j <- v -> i with v != u and j != i
        co = (H @ self._history_rel_t).tocsr()  # (n, U): relationship pairs shared with each other user
        co = _zero_own_column(co, user_index)
        co_paths = _pair_dot(co, self._history_rel_t, rep, flat)
        # remove j == i terms: H[u,i] * sum_{v != u} H[v,i]^2
        co_paths -= own * (self._buyers_sq[flat] - own**2)
        cols["kg_paths_co_buyer"] = np.maximum(co_paths, 0.0)
        for k in KG_PATH_FEATURES:
            cols[k] = np.maximum(cols[k], 0.0)
        cols["kg_paths_total"] = sum(cols[k] for k in KG_PATH_FEATURES)
        length3 = sum(cols[k] for k in KG_PATH_FEATURES if k != "kg_paths_also_bought")
        cols["kg_shortest_path"] = np.where(cols["kg_paths_also_bought"] > 0, 2.0, np.where(length3 > 0, 3.0, 4.0))
        # Shares of the user's purchase/cart/rating relationships (a bought-and-carted item counts twice: stronger intent).
        n_rel = np.maximum(np.asarray(H.sum(axis=1)).ravel()[rep], 1.0)
        cols["brand_share"] = cols["kg_paths_brand"] / n_rel
        cols["category_share"] = cols["kg_paths_category"] / n_rel
        cols["attribute_overlap"] = cols["kg_paths_attribute"] / n_rel

        # --- the user's own interactions with the candidate
        cols["user_item_views"] = _pair_values(ctx.interactions["view"][user_index], rep, flat)
        cols["user_item_clicks"] = _pair_values(ctx.interactions["click"][user_index], rep, flat)
        cols["user_item_carts"] = _pair_values(ctx.interactions["cart"][user_index], rep, flat)
        cols["user_item_purchases"] = _pair_values(ctx.interactions["purchase"][user_index], rep, flat)
        if ctx.last_interaction is not None:
            t = _pair_values(ctx.last_interaction[user_index], rep, flat)
            cols["days_since_user_item_event"] = np.where(t > 0, (ctx.reference_time - t) / SECONDS_PER_DAY, np.nan)
        else:
            cols["days_since_user_item_event"] = _nan(n * C)

        # --- item context
        cols["item_popularity"] = ctx.item_popularity[flat]
        cols["item_days_since_last_event"] = (ctx.reference_time - ctx.item_last_event[flat]) / SECONDS_PER_DAY
        price = ctx.item_price[flat]
        cols["price"] = price
        with np.errstate(divide="ignore", invalid="ignore"):
            cols["price_ratio"] = price / ctx.user_median_price[users_flat]

        # --- opt-in: standing of the pair among everything the user could get, item kNN, time
        wanted = set(self.names)
        if "gnn_dot_z" in wanted:
            dot = np.einsum("nd,ncd->nc", uvec, ctx.item_vectors[candidates]).astype(np.float64)
            u64 = uvec.astype(np.float64)
            mu, cov = ctx.item_vector_moments
            mean = u64 @ mu
            sd = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", u64, cov, u64), 0.0))
            cols["gnn_dot_z"] = ((dot - mean[:, None]) / np.maximum(sd, 1e-12)[:, None]).ravel()
        if "user_activity" in wanted:
            cols["user_activity"] = ctx.user_activity[users_flat]
        if "co_buyer_cosine" in wanted:
            cols["co_buyer_cosine"] = self._item_knn(user_index, rep, flat)
        t_user = ctx.user_last_event[users_flat]
        if "days_user_to_item_activity" in wanted:
            cols["days_user_to_item_activity"] = (t_user - ctx.item_median_event[flat]) / SECONDS_PER_DAY
        if "item_events_near_user_time" in wanted:
            cols["item_events_near_user_time"] = _events_in_window(self._event_keys, flat, t_user,
                                                                   NEAR_USER_TIME_SECONDS)

        X = np.empty((n * C, len(self.names)), dtype=np.float32)
        for j, name in enumerate(self.names):
            X[:, j] = cols[name]
        return FeatureMatrix(X=X, names=self.names, user_index=user_index, candidates=candidates)

    # ------------------------------------------------------------------ helpers
    @cached_property
    def _event_keys(self) -> tuple[np.ndarray, int, int] | None:
        """Every event as one sorted int64 key ``item * (span + 1) + (second - t0)``, with ``t0`` and ``span``: a
        window count per pair is then two binary searches (built once per builder, not per request)."""
        if self.ctx.item_event_times is None:
            return None
        indptr, times = self.ctx.item_event_times
        if not len(times):
            return np.zeros(0, dtype=np.int64), 0, 0
        t0, span = int(times.min()), int(times.max() - times.min()) + 1
        keys = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr)) * (span + 1) + (times - t0)
        return keys, t0, span

    def _item_knn(self, user_index: np.ndarray, rep: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """sum_j h[u, j] cos(j, i) over the user's history items j != i, cosine over the items' buyer sets
        (binary history): ``((h_u / n) @ B.T) . B_i / n_i`` with ``n`` the square roots of the item degrees."""
        ctx = self.ctx
        inv = np.divide(1.0, ctx.item_history_norm, out=np.zeros_like(ctx.item_history_norm),
                        where=ctx.item_history_norm > 0)
        h = ctx.history[user_index]
        co = (h @ sp.diags(inv) @ ctx.history_t).tocsr()  # (n, U): shared-buyer weights
        raw = _pair_dot(co, ctx.history_t, rep, flat) * inv[flat]
        own = _pair_values(h, rep, flat)  # j == i: cos(i, i) = 1 when the user has the item itself
        return np.maximum(raw - own, 0.0)

    @staticmethod
    def _profile_cosine(profile: sp.csr_matrix, vectors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(n*C,) cosine between each candidate's vector and the mean vector of the user's profile items."""
        n = candidates.shape[0]
        mean = np.asarray(profile @ vectors, dtype=np.float32)  # (n, d) sums; normalising makes it a mean direction
        norm = np.linalg.norm(mean, axis=1, keepdims=True)
        empty = norm[:, 0] <= 1e-12
        mean = mean / np.maximum(norm, 1e-12)
        out = np.einsum("nd,ncd->nc", mean, vectors[candidates])
        out[empty] = np.nan
        return out.reshape(n * candidates.shape[1])


def _events_in_window(event_keys: tuple[np.ndarray, int, int] | None, items: np.ndarray, until: np.ndarray,
                      window: float) -> np.ndarray:
    """log1p of the number of events of ``items[r]`` in ``(until[r] - window, until[r]]``, whole seconds (NaN where
    ``until`` is NaN or no times are known); ``event_keys``: ``FeatureBuilder._event_keys``."""
    out = np.full(len(items), np.nan)
    if event_keys is None or not len(items):
        return out
    keys, t0, span = event_keys
    ok = np.isfinite(until)
    if not len(keys):
        out[ok] = 0.0
        return out
    it, hi = items[ok].astype(np.int64), np.floor(until[ok]).astype(np.int64) - t0
    lo = hi - int(window)
    base = it * (span + 1)  # item it's keys lie in [base, base + span - 1]; clipping keeps a bound in its gaps
    right = np.searchsorted(keys, base + np.clip(hi, -1, span), side="right")
    left = np.searchsorted(keys, base + np.clip(lo, -1, span), side="right")
    out[ok] = np.log1p(np.maximum(right - left, 0))
    return out


def _nan(size: int) -> np.ndarray:
    return np.full(size, np.nan, dtype=np.float32)


def _pair_values(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(len(rows),) float64 ``m[rows[k], cols[k]]`` for CSR ``m`` (zeros where absent or where the row or column
    is negative, e.g. the -1 padding of candidate lists), vectorised."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    valid = (rows >= 0) & (cols >= 0)
    if not valid.all():  # row * ncols + (-1) would read the previous row's last column
        out = np.zeros(len(rows), dtype=np.float64)
        out[valid] = _pair_values(m, rows[valid], cols[valid])
        return out
    m = m.tocsr()
    if not m.has_sorted_indices:
        m = m.sorted_indices()
    out = np.zeros(len(rows), dtype=np.float64)
    if m.nnz == 0 or len(rows) == 0:
        return out
    start, end = m.indptr[rows], m.indptr[rows + 1]
    # Binary search each column in its row's sorted index slice: offset into the global index array.
    lengths = end - start
    has = lengths > 0
    if not has.any():
        return out
    # Global sorted key: row * ncols + col, searchsorted over the whole matrix at once.
    ncols = m.shape[1]
    row_of = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    keys = row_of * ncols + m.indices.astype(np.int64)
    q = rows.astype(np.int64) * ncols + cols.astype(np.int64)
    pos = np.searchsorted(keys, q)
    pos_c = np.minimum(pos, len(keys) - 1)
    hit = keys[pos_c] == q
    out[hit] = m.data[pos_c[hit]]
    return out


def _pair_dot(P: sp.spmatrix, M: sp.csr_matrix | None, rep: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """``sum_k P[rep[r], k] * M[flat[r], k]`` for every pair r (``M=None`` means ``P[rep[r], flat[r]]``).

    P: (n, K) sparse per-user path prefixes; M: (I, K) CSR item incidence. Only non-zeros of ``M[flat]`` are
    touched, so the cost is O(nnz(M[flat]) + n*K / chunking), with no Python loop per pair.
    """
    P = sp.csr_matrix(P)
    if M is None:
        return _pair_values(P, rep, flat)
    out = np.zeros(len(rep), dtype=np.float64)
    if P.nnz == 0 or M.nnz == 0:
        return out
    n, K = P.shape
    chunk = max(1, _DENSE_BUDGET // max(K, 1))
    # rows of each user are contiguous in rep (user-major order)
    bounds = np.searchsorted(rep, np.arange(0, n + chunk, chunk))
    for c0 in range(0, n, chunk):
        r0, r1 = bounds[c0 // chunk], bounds[min(c0 // chunk + 1, len(bounds) - 1)]
        if r1 <= r0:
            continue
        dense = P[c0 : c0 + chunk].toarray()
        Q = M[flat[r0:r1]]  # (rows, K) CSR
        row_of_nnz = np.repeat(np.arange(r1 - r0), np.diff(Q.indptr))
        vals = Q.data * dense[rep[r0:r1][row_of_nnz] - c0, Q.indices]
        out[r0:r1] = np.bincount(row_of_nnz, weights=vals, minlength=r1 - r0)
    return out


def _zero_own_column(co: sp.csr_matrix, user_index: np.ndarray) -> sp.csr_matrix:
    """Zero entry (r, user_index[r]) of each row: a user is not their own co-buyer."""
    co = co.tocoo()
    keep = co.col != user_index[co.row]
    return sp.csr_matrix((co.data[keep], (co.row[keep], co.col[keep])), shape=co.shape)
