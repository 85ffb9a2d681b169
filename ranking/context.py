"""``RankingContext``: every array the feature builder and the explainer read, built once per bundle.

Everything is a plain numpy array or a scipy CSR matrix indexed by dense user / item positions (the row order of
``user_vectors`` / ``item_vectors``), so features are computed with array operations and sparse products, never
with a Python loop per (user, item) pair. The knowledge graph part comes from any ``GraphStore`` through
``to_hetero_data()`` (:meth:`RankingContext.from_hetero`), so the features count exactly the relationships that the
store holds and that explanations later cite.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from kg.schema import INTERACTION_RELS
from kgrec.errors import DataError, UnknownIdError

if TYPE_CHECKING:  # pragma: no cover
    from torch_geometric.data import HeteroData

logger = logging.getLogger(__name__)

# event type -> HeteroData relation name of the user->item interaction edge ("purchase" -> "purchased").
INTERACTION_EDGE_NAMES: dict[str, str] = {ev: rel.lower() for ev, rel in INTERACTION_RELS.items()}
# Event types whose items form a user's "history": strong intent (bought, put in the cart, or rated - explicit
# feedback, the only signal of rating datasets such as MovieLens). Their relationships are the first hop of the KG
# paths counted by the features.
HISTORY_EVENT_TYPES: tuple[str, ...] = ("purchase", "cart", "rating")
HISTORY_RELS: tuple[str, ...] = tuple(INTERACTION_RELS[e] for e in HISTORY_EVENT_TYPES)
SECONDS_PER_DAY = 86_400.0
# Opt-in ranking features that read per-event times (``item_median_event``, ``user_last_event``,
# ``item_event_times``): a context built for other columns skips sorting every event by item and time.
EVENT_TIME_FEATURES: frozenset[str] = frozenset({"days_user_to_item_activity", "item_events_near_user_time"})


def _csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], data: np.ndarray | None = None) -> sp.csr_matrix:
    """Sparse matrix from coordinates; duplicate coordinates are summed."""
    if data is None:
        data = np.ones(len(rows), dtype=np.float32)
    m = sp.csr_matrix((np.asarray(data, dtype=np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    return m


def _normalise_rows(x: np.ndarray | None) -> np.ndarray | None:
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class RankingContext:
    """Arrays describing users, items and the knowledge graph, aligned to dense indices.

    Shapes: ``U`` users, ``I`` items, ``d`` GNN dim, ``dt``/``di`` text/image dims, ``Nb`` brands, ``Nc``
    categories, ``A`` attribute values, ``E`` external entities.

    Attributes:
        user_ids, item_ids: external ids; position = dense index.
        user_vectors: (U, d) float32 GNN user vectors (dot product with item vectors = GNN score).
        item_vectors: (I, d) float32 fused GNN item vectors.
        item_text, item_image: (I, dt) / (I, di) float32 L2-normalised encoder vectors, or None.
        modality_weights: (I, 3) float32 fusion weights (text, image, graph) summing to 1 per item, or None.
        interactions: event type -> (U, I) CSR counts of that interaction ("view", "click", "cart", "purchase",
            "rating"); a type absent from the data is an all-zero matrix.
        last_interaction: (U, I) CSR, seconds since the epoch of the user's last event on the item (any type),
            or None when no timestamps are known.
        reference_time: seconds since the epoch that "days since" features count from.
        item_price: (I,) float64, NaN where unknown.
        item_popularity: (I,) float64, log1p of the number of interactions of any type.
        item_last_event: (I,) float64 seconds since the epoch of the item's last event, NaN if none.
        item_median_event: (I,) float64 seconds since the epoch of the median time of the item's events, NaN if none.
        user_last_event: (U,) float64 seconds since the epoch of the user's last event, NaN if none.
        item_event_times: ``(indptr (I + 1,), seconds (n,))`` int64: every event's time, grouped by item and sorted
            within each item (``seconds[indptr[i]:indptr[i + 1]]`` are item ``i``'s), or None without timestamps.
        item_brand, item_category, item_attribute, item_entity: (I, Nb|Nc|A|E) CSR relationship counts
            (MADE_BY, IN_CATEGORY, HAS_ATTRIBUTE, LINKED_TO).
        also_bought: (I, I) CSR, ALSO_BOUGHT relationships in either direction, zero diagonal.
        brand_ids, category_ids, attribute_ids, entity_ids: node ids of the columns above.
        item_titles: readable item names (title, or the id when unknown); item_images: relative image paths.
    """

    user_ids: list[str]
    item_ids: list[str]
    user_vectors: np.ndarray
    item_vectors: np.ndarray
    interactions: dict[str, sp.csr_matrix]
    item_brand: sp.csr_matrix
    item_category: sp.csr_matrix
    item_attribute: sp.csr_matrix
    item_entity: sp.csr_matrix
    also_bought: sp.csr_matrix
    brand_ids: list[str] = field(default_factory=list)
    category_ids: list[str] = field(default_factory=list)
    attribute_ids: list[str] = field(default_factory=list)
    entity_ids: list[str] = field(default_factory=list)
    item_text: np.ndarray | None = None
    item_image: np.ndarray | None = None
    modality_weights: np.ndarray | None = None
    last_interaction: sp.csr_matrix | None = None
    reference_time: float = 0.0
    item_price: np.ndarray | None = None
    item_popularity: np.ndarray | None = None
    item_last_event: np.ndarray | None = None
    item_median_event: np.ndarray | None = None
    user_last_event: np.ndarray | None = None
    item_event_times: tuple[np.ndarray, np.ndarray] | None = None
    item_titles: list[str] | None = None
    item_images: list[str | None] | None = None
    # Optional (user_index (n,), candidates (n, C)) -> (n, C) scores that replace the plain dot product as the
    # ``gnn_score`` feature, e.g. a retrieval model with an extra item-item term (fusion's EASE hybrid).
    retrieval_scorer: Any = None

    def __post_init__(self) -> None:
        n_users, n_items = len(self.user_ids), len(self.item_ids)
        self.user_vectors = np.asarray(self.user_vectors, dtype=np.float32)
        self.item_vectors = np.asarray(self.item_vectors, dtype=np.float32)
        if self.user_vectors.shape[0] != n_users or self.item_vectors.shape[0] != n_items:
            raise DataError(
                f"ranking context: {n_users} user ids / {n_items} item ids but vectors of shape "
                f"{self.user_vectors.shape} / {self.item_vectors.shape}; pass vectors in id order"
            )
        self.item_text = _normalise_rows(self.item_text)
        self.item_image = _normalise_rows(self.item_image)
        for name in ("item_text", "item_image", "modality_weights"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[0] != n_items:
                raise DataError(f"ranking context: {name} has {arr.shape[0]} rows, expected {n_items} (one per item)")
        for ev in INTERACTION_EDGE_NAMES:
            self.interactions.setdefault(ev, sp.csr_matrix((n_users, n_items), dtype=np.float32))
        if self.item_price is None:
            self.item_price = np.full(n_items, np.nan)
        if self.item_popularity is None:
            total = sum(m for m in self.interactions.values())
            self.item_popularity = np.log1p(np.asarray(total.sum(axis=0)).ravel().astype(np.float64))
        if self.item_last_event is None:
            self.item_last_event = np.full(n_items, np.nan)
        if self.item_median_event is None:
            self.item_median_event = np.full(n_items, np.nan)
        if self.user_last_event is None:
            self.user_last_event = np.full(n_users, np.nan)
        if self.item_titles is None:
            self.item_titles = list(self.item_ids)
        if self.item_images is None:
            self.item_images = [None] * n_items
        self._user_pos = {u: i for i, u in enumerate(self.user_ids)}
        self._item_pos = {it: i for i, it in enumerate(self.item_ids)}
        self._derive()

    # ------------------------------------------------------------------ derived arrays
    def _derive(self) -> None:
        """Matrices every feature batch reuses: history (purchase + cart + rating relationships), prices."""
        parts = []
        for ev in HISTORY_EVENT_TYPES:
            m = self.interactions[ev].copy()
            m.data = np.ones_like(m.data)
            parts.append(m)
        # One entry per PURCHASED / CARTED / RATED relationship: the number of distinct first hops of a KG path.
        self.history_relations: sp.csr_matrix = sum(parts[1:], parts[0]).tocsr()
        binary = self.history_relations.copy()
        binary.data = np.ones_like(binary.data)
        self.history: sp.csr_matrix = binary  # (U, I) 1 where bought or carted
        self.history_size = np.asarray(binary.sum(axis=1)).ravel()
        # Users without purchases/carts fall back to everything they touched, so similarity features exist.
        any_rel = sum(m for m in self.interactions.values())
        any_bin = any_rel.tocsr().copy()
        any_bin.data = np.ones_like(any_bin.data)
        self.touched: sp.csr_matrix = any_bin
        self.item_vectors_unit = _normalise_rows(self.item_vectors)
        # Distinct items each user touched (any event type): how much the user's vector and history rest on.
        self.user_activity = np.log1p(np.diff(self.touched.indptr).astype(np.float64))
        # Per-user median price of bought/carted/rated items (NaN without priced history).
        self.user_median_price = np.full(len(self.user_ids), np.nan)
        price = self.item_price
        indptr, indices = binary.indptr, binary.indices
        if np.isfinite(price).any():
            lengths = np.diff(indptr)
            user_of = np.repeat(np.arange(len(self.user_ids)), lengths)
            p = price[indices]
            ok = np.isfinite(p)
            if ok.any():
                df = pd.DataFrame({"u": user_of[ok], "p": p[ok]})
                med = df.groupby("u")["p"].median()
                self.user_median_price[med.index.to_numpy()] = med.to_numpy()
        self.brand_of_item = _first_column(self.item_brand)
        self.category_of_item = _first_column(self.item_category)

    @cached_property
    def item_vector_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(d,) mean and (d, d) covariance of the item vectors (float64, in chunks; built on first use): a user's
        GNN dot products over all items have mean u.mu and variance u' S u, so the gnn_dot_z feature needs no pass
        over the catalog."""
        iv = self.item_vectors
        n, d = iv.shape
        total, gram = np.zeros(d), np.zeros((d, d))
        for s in range(0, n, 65_536):
            block = iv[s : s + 65_536].astype(np.float64)
            total += block.sum(axis=0)
            gram += block.T @ block
        mean = total / max(n, 1)
        return mean, gram / max(n, 1) - np.outer(mean, mean)

    @cached_property
    def history_t(self) -> sp.csr_matrix:
        """(I, U) binary history by item (the co_buyer_cosine feature; built on first use)."""
        return self.history.T.tocsr()

    @cached_property
    def item_history_norm(self) -> np.ndarray:
        """(I,) square roots of the number of users with the item in their history (item-kNN cosine norms)."""
        return np.sqrt(np.diff(self.history_t.indptr).astype(np.float64))

    # ------------------------------------------------------------------ lookups
    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def user_index(self, user_id: str) -> int:
        try:
            return self._user_pos[user_id]
        except KeyError:
            raise UnknownIdError(f"user {user_id!r} is not known to the ranking context (not in the trained bundle)") from None

    def item_index(self, item_id: str) -> int:
        try:
            return self._item_pos[item_id]
        except KeyError:
            raise UnknownIdError(f"item {item_id!r} is not known to the ranking context (not in the trained bundle)") from None

    def user_indices(self, user_ids: list[str]) -> np.ndarray:
        return np.array([self.user_index(u) for u in user_ids], dtype=np.int64)

    def item_indices(self, item_ids: list[str]) -> np.ndarray:
        return np.array([self.item_index(i) for i in item_ids], dtype=np.int64)

    def item_title(self, index: int) -> str:
        return self.item_titles[index] if self.item_titles else self.item_ids[index]

    def brand_name(self, item: int) -> str | None:
        b = self.brand_of_item[item]
        return None if b < 0 else self.brand_ids[b]

    def category_name(self, item: int) -> str | None:
        c = self.category_of_item[item]
        return None if c < 0 else self.category_ids[c]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hetero(
        cls,
        hetero: HeteroData,
        id_maps: dict[str, list[str]],
        *,
        user_vectors: np.ndarray,
        item_vectors: np.ndarray,
        user_ids: list[str] | None = None,
        item_ids: list[str] | None = None,
        item_text: np.ndarray | None = None,
        item_image: np.ndarray | None = None,
        modality_weights: np.ndarray | None = None,
        items: pd.DataFrame | None = None,
        events: pd.DataFrame | None = None,
        reference_time: datetime | float | None = None,
        columns: Any = None,
    ) -> RankingContext:
        """Build from ``GraphStore.to_hetero_data()`` plus vectors.

        Args:
            hetero, id_maps: the store's export (node type -> ids, position = HeteroData index).
            user_vectors, item_vectors: (U, d) / (I, d) GNN vectors, rows ordered like ``user_ids`` / ``item_ids``
                (default: the export's order).
            items: optional table with ``item_id`` and any of ``title``, ``price``, ``image``.
            events: optional table (``user_id``, ``item_id``, ``type``, ``timestamp``) for last-interaction times and
                item recency; interaction counts always come from the graph.
            reference_time: "now" for day-count features; default: the last event's time, else the current time.
            columns: the feature names this context will serve (a ranker's ``feature_names``); the per-event time
                arrays are built only when one of :data:`EVENT_TIME_FEATURES` is among them (None: always).
        """
        user_ids = list(id_maps.get("user", [])) if user_ids is None else list(user_ids)
        item_ids = list(id_maps.get("item", [])) if item_ids is None else list(item_ids)
        n_users, n_items = len(user_ids), len(item_ids)
        user_map = _alignment(id_maps.get("user", []), user_ids)
        item_map = _alignment(id_maps.get("item", []), item_ids)

        def edges(src: str, rel: str, dst: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            key = (src, rel, dst)
            if key not in hetero.edge_types:
                return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
            store = hetero[key]
            ei = store.edge_index.cpu().numpy()
            w = getattr(store, "edge_weight", None)
            w = np.ones(ei.shape[1], np.float32) if w is None else w.cpu().numpy().astype(np.float32)
            return ei[0], ei[1], w

        interactions: dict[str, sp.csr_matrix] = {}
        for ev, rel in INTERACTION_EDGE_NAMES.items():
            s, d, w = edges("user", rel, "item")
            s, d = user_map[s], item_map[d]
            keep = (s >= 0) & (d >= 0)
            interactions[ev] = _csr(s[keep], d[keep], (n_users, n_items), w[keep])

        def item_to(rel: str, dst: str) -> tuple[sp.csr_matrix, list[str]]:
            ids = list(id_maps.get(dst, []))
            s, d, _ = edges("item", rel, dst)
            s = item_map[s]
            keep = s >= 0
            # Relationship existence, not weight: each relationship is one path hop.
            return _csr(s[keep], d[keep], (n_items, len(ids))), ids

        item_brand, brand_ids = item_to("made_by", "brand")
        item_category, category_ids = item_to("in_category", "category")
        item_attribute, attribute_ids = item_to("has_attribute", "attribute")
        item_entity, entity_ids = item_to("linked_to", "entity")
        s, d, _ = edges("item", "also_bought", "item")
        s, d = item_map[s], item_map[d]
        keep = (s >= 0) & (d >= 0) & (s != d)
        ab = _csr(s[keep], d[keep], (n_items, n_items))
        also_bought = (ab + ab.T).tocsr()

        titles: list[str] = list(item_ids)
        images: list[str | None] = [None] * n_items
        price = np.full(n_items, np.nan)
        if items is not None and len(items):
            pos = pd.Series(np.arange(n_items), index=pd.Index(item_ids))
            idx = pos.reindex(items["item_id"].astype(str)).to_numpy()
            ok = ~np.isnan(idx)
            rows, sub = idx[ok].astype(np.int64), items[ok]
            if "title" in items:
                for r, t in zip(rows, sub["title"].tolist()):
                    if isinstance(t, str) and t:
                        titles[r] = t
            if "image" in items:
                for r, im in zip(rows, sub["image"].tolist()):
                    images[r] = im if isinstance(im, str) and im else None
            if "price" in items:
                price[rows] = pd.to_numeric(sub["price"], errors="coerce").to_numpy(dtype=np.float64)

        last_interaction = None
        item_last = np.full(n_items, np.nan)
        item_median = np.full(n_items, np.nan)
        user_last = np.full(n_users, np.nan)
        event_times = None
        ref: float | None = None
        if events is not None and len(events):
            ts = pd.to_datetime(events["timestamp"], utc=True)
            secs = ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
            upos = pd.Series(np.arange(n_users), index=pd.Index(user_ids)).reindex(events["user_id"].astype(str)).to_numpy()
            ipos = pd.Series(np.arange(n_items), index=pd.Index(item_ids)).reindex(events["item_id"].astype(str)).to_numpy()
            ok = ~np.isnan(upos) & ~np.isnan(ipos)
            df = pd.DataFrame({"u": upos[ok].astype(np.int64), "i": ipos[ok].astype(np.int64), "t": secs[ok].astype(np.float64)})
            last = df.groupby(["u", "i"], sort=False)["t"].max()
            ui = np.array(last.index.tolist(), dtype=np.int64).reshape(-1, 2)
            last_interaction = sp.csr_matrix((last.to_numpy(), (ui[:, 0], ui[:, 1])), shape=(n_users, n_items))
            per_item = df.groupby("i")["t"].max()
            item_last[per_item.index.to_numpy()] = per_item.to_numpy()
            ref = float(df["t"].max()) if len(df) else None
        if events is not None and len(events) and (columns is None or EVENT_TIME_FEATURES & set(columns)):
            med = df.groupby("i")["t"].median()
            item_median[med.index.to_numpy()] = med.to_numpy()
            per_user = df.groupby("u")["t"].max()
            user_last[per_user.index.to_numpy()] = per_user.to_numpy()
            timed = df[np.isfinite(df["t"].to_numpy())]  # events without a timestamp have no place in time
            order = np.lexsort((timed["t"].to_numpy(), timed["i"].to_numpy()))
            counts = np.bincount(timed["i"].to_numpy(), minlength=n_items)
            event_times = (np.r_[0, np.cumsum(counts)].astype(np.int64),
                           np.floor(timed["t"].to_numpy()[order]).astype(np.int64))
        if isinstance(reference_time, datetime):
            ref = reference_time.astimezone(timezone.utc).timestamp()
        elif reference_time is not None:
            ref = float(reference_time)
        if ref is None:
            ref = datetime.now(timezone.utc).timestamp()

        logger.info(
            "ranking context: %d users, %d items, %d brands, %d categories, %d attribute values, %d entities",
            n_users, n_items, len(brand_ids), len(category_ids), len(attribute_ids), len(entity_ids),
        )
        return cls(
            user_ids=user_ids,
            item_ids=item_ids,
            user_vectors=user_vectors,
            item_vectors=item_vectors,
            interactions=interactions,
            item_brand=item_brand,
            item_category=item_category,
            item_attribute=item_attribute,
            item_entity=item_entity,
            also_bought=also_bought,
            brand_ids=brand_ids,
            category_ids=category_ids,
            attribute_ids=attribute_ids,
            entity_ids=entity_ids,
            item_text=item_text,
            item_image=item_image,
            modality_weights=modality_weights,
            last_interaction=last_interaction,
            reference_time=ref,
            item_price=price,
            item_last_event=item_last,
            item_median_event=item_median,
            user_last_event=user_last,
            item_event_times=event_times,
            item_titles=titles,
            item_images=images,
        )

    @classmethod
    def from_store(cls, store: Any, **kwargs: Any) -> RankingContext:
        """Shorthand for ``from_hetero(*store.to_hetero_data(), **kwargs)`` on any ``GraphStore``."""
        hetero, id_maps = store.to_hetero_data()
        return cls.from_hetero(hetero, id_maps, **kwargs)

    def summary(self) -> dict[str, Any]:
        return {
            "users": self.num_users,
            "items": self.num_items,
            "brands": len(self.brand_ids),
            "categories": len(self.category_ids),
            "attribute_values": len(self.attribute_ids),
            "entities": len(self.entity_ids),
            "interactions": {k: int(v.nnz) for k, v in self.interactions.items()},
            "also_bought_pairs": int(self.also_bought.nnz // 2),
        }


def _alignment(export_ids: list[str], wanted: list[str]) -> np.ndarray:
    """Array mapping an export index to the wanted dense index (-1 where the id is not wanted)."""
    pos = {x: i for i, x in enumerate(wanted)}
    out = np.array([pos.get(x, -1) for x in export_ids], dtype=np.int64)
    if len(out) == 0:
        return np.zeros(0, dtype=np.int64)
    return out


def _first_column(m: sp.csr_matrix) -> np.ndarray:
    """(rows,) int64: the first non-zero column per row (e.g. an item's brand), -1 for empty rows."""
    out = np.full(m.shape[0], -1, dtype=np.int64)
    lengths = np.diff(m.indptr)
    has = lengths > 0
    out[has] = m.indices[m.indptr[:-1][has]]
    return out
