"""Explanations of re-ranked recommendations: feature contributions in plain words, KG paths, modality evidence.

An :class:`Explanation` combines three kinds of evidence, each checkable:

* **features** - LightGBM TreeSHAP contributions (``pred_contrib=True``) of the ranker's own inputs; only features
  with a positive contribution whose value makes the phrase true are cited ("you often buy from *Acme*" needs at
  least one bought Acme item). ``all_contributions`` plus ``base_score`` sum to ``score``.
* **paths** - typed paths user -> item read from the ``GraphStore`` (``store.paths``), never synthesised, ranked by
  relevance (strength of the user's first relationship, kind of connection, length, and the ranker's contribution
  of the matching KG feature), rendered like "you bought *Trail Runner X* — same brand *Acme* — *Trail Runner Y*".
* **modality** - the item's fusion weights (text / image / graph) and the item's similarity to the user's history in
  each modality; ``dominant`` is the modality with the largest weight x similarity.

JSON schema (``Explanation.to_dict()``; machine-readable in ``ranking/explanation.schema.json``)::

    {
      "schema_version": 1,
      "user_id": str, "item_id": str, "item_title": str, "image": str | null,   # image relative to the dataset
      "score": float,                 # ranker raw score (higher = better, comparable within one user's list)
      "base_score": float,            # LightGBM expected value (the SHAP bias)
      "features": [                   # cited features, largest contribution first (each is a ranker input)
        {"name": str, "value": float | null, "contribution": float, "phrase": str}
      ],
      "all_contributions": {feature name: float},  # every input; sum + base_score == score
      "paths": [                      # cited KG paths, most relevant first (each exists in the graph store)
        {"text": str, "length": int, "relevance": float, "kind": str,
         "nodes": [{"label": str, "id": str, "name": str}], "rels": [{"type": str, "forward": bool}]}
      ],
      "modality": {"weights": {"text": float, "image": float, "graph": float} | null,
                   "similarities": {"text": float | null, "image": float | null, "graph": float | null},
                   "dominant": "text" | "image" | "graph" | null},
      "sentence": str                 # one sentence combining the above
    }
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

import numpy as np

from kg.store import Path as KGPath
from kgrec.config import RankingConfig
from kgrec.errors import KgrecError
from ranking.context import HISTORY_EVENT_TYPES, HISTORY_RELS, RankingContext
from ranking.features import FeatureBuilder
from ranking.graph_paths import paths_to_items
from ranking.ranker import Ranker

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA_FILE = "explanation.schema.json"

# Strength of the user's first relationship on a path (same order as the label grades).
FIRST_HOP_WEIGHT: dict[str, float] = {"PURCHASED": 4.0, "CARTED": 3.0, "RATED": 3.0, "CLICKED": 2.0, "VIEWED": 1.0}
FIRST_HOP_VERB: dict[str, str] = {
    "PURCHASED": "you bought",
    "CARTED": "you put in your cart",
    "RATED": "you rated",
    "CLICKED": "you clicked",
    "VIEWED": "you viewed",
}
# Kind of connection between the user's item and the recommended one: weight and matching ranker feature.
PATH_KINDS: dict[str, tuple[float, str | None]] = {
    "also_bought": (1.0, "kg_paths_also_bought"),
    "brand": (0.9, "kg_paths_brand"),
    "entity": (0.8, "kg_paths_entity"),
    "attribute": (0.7, "kg_paths_attribute"),
    "category": (0.6, "kg_paths_category"),
    "co_buyer": (0.5, "kg_paths_co_buyer"),
    "co_interest": (0.3, None),  # another user who only viewed / clicked one of the two items
    "direct": (0.4, None),
    "other": (0.2, None),
}
MODALITIES: tuple[str, ...] = ("text", "image", "graph")


class ExplanationError(KgrecError):
    """An explanation could not be produced (e.g. the ranker and the feature builder disagree)."""


@dataclass
class CitedFeature:
    name: str
    value: float | None
    contribution: float
    phrase: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "contribution": self.contribution, "phrase": self.phrase}


@dataclass
class CitedPath:
    path: KGPath
    names: list[str]
    kind: str
    relevance: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        nodes = [{"label": lbl, "id": i, "name": n} for (lbl, i), n in zip(self.path.nodes(), self.names)]
        return {
            "text": self.text,
            "length": self.path.length,
            "relevance": self.relevance,
            "kind": self.kind,
            "nodes": nodes,
            "rels": [{"type": s.rel, "forward": s.forward} for s in self.path.steps],
        }


@dataclass
class ModalityEvidence:
    weights: dict[str, float] | None
    similarities: dict[str, float | None]
    dominant: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "similarities": self.similarities, "dominant": self.dominant}


@dataclass
class Explanation:
    """Why ``item_id`` is recommended to ``user_id``; see the module docstring for the JSON schema."""

    user_id: str
    item_id: str
    item_title: str
    image: str | None
    score: float
    base_score: float
    features: list[CitedFeature]
    all_contributions: dict[str, float]
    paths: list[CitedPath]
    modality: ModalityEvidence
    sentence: str
    feature_values: dict[str, float | None] = field(default_factory=dict, repr=False)

    def with_standing(self, standing: str) -> Explanation:
        """The same explanation for an item that is not among the user's recommendations: its sentence says where
        the item stands (``standing``, e.g. "is not among your 200 candidates") instead of "is recommended"."""
        return dataclasses.replace(self, sentence=_sentence(self.item_title, self.features, self.paths, self.modality,
                                                            standing))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "item_title": self.item_title,
            "image": self.image,
            "score": self.score,
            "base_score": self.base_score,
            "features": [f.to_dict() for f in self.features],
            "all_contributions": dict(self.all_contributions),
            "paths": [p.to_dict() for p in self.paths],
            "modality": self.modality.to_dict(),
            "sentence": self.sentence,
        }

    def to_text(self) -> str:
        """A few plain lines for the terminal (``kgrec explain``)."""
        lines = [f"{self.item_title} ({self.item_id}) for {self.user_id}: score {self.score:.3f}", f"  {self.sentence}"]
        for f in self.features:
            lines.append(f"  + {f.phrase}  [{f.name} = {_fmt(f.value)}, {f.contribution:+.3f}]")
        against = sorted((v, k) for k, v in self.all_contributions.items() if v < 0)[:2]
        if against:  # what held the score down, so the list above is not read as the whole story
            lines.append("  - held back by: " + ", ".join(f"{k} {v:+.3f}" for v, k in against))
        for p in self.paths:
            lines.append(f"  path: {_plain(p.text)}")
        m = self.modality
        if m.weights:
            # "weighed most" is weight x similarity to the user's history, so both factors are shown
            parts = []
            for k, v in m.weights.items():
                sim = m.similarities.get(k)
                parts.append(f"{k} {v:.2f}" + (f" x {sim:.2f} = {v * sim:.2f}" if sim is not None and sim == sim else " x n/a"))
            lines.append(f"  modality weight x similarity to your history: {', '.join(parts)}; "
                         f"weighed most: {m.dominant}")
        return "\n".join(lines)


def explanation_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``Explanation.to_dict()``, shipped as ``ranking/explanation.schema.json``."""
    return json.loads(resources.files("ranking").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3f}"


def _plain(text: str) -> str:
    return text.replace("*", "")


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


# ---------------------------------------------------------------------- the explainer
class Explainer:
    """Explains (user, item) pairs with a trained :class:`Ranker`, its :class:`FeatureBuilder` and a GraphStore.

    Args:
        context: the ranking context the features are computed from.
        ranker: the trained ranker; its feature names must equal the builder's.
        store: any ``GraphStore`` (paths are read from it); None explains without paths.
        builder: defaults to ``FeatureBuilder(context, ranker.feature_names)``.
        config: ``max paths`` / ``max features`` / path read limit (``RankingConfig.explain_*``).
    """

    def __init__(
        self,
        context: RankingContext,
        ranker: Ranker,
        store: Any | None = None,
        *,
        builder: FeatureBuilder | None = None,
        config: RankingConfig | None = None,
    ):
        self.ctx = context
        self.ranker = ranker
        self.store = store
        self.builder = builder or FeatureBuilder(context, ranker.feature_names)
        self.config = config or ranker.config
        if tuple(self.builder.names) != tuple(ranker.feature_names):
            raise ExplanationError(
                f"the ranker was trained on features {list(ranker.feature_names)} but the feature builder makes "
                f"{list(self.builder.names)}; retrain the ranker with this version (`kgrec train`)"
            )
        self._pos = {n: j for j, n in enumerate(self.builder.names)}

    # ------------------------------------------------------------------ public
    def explain(self, user_id: str, item_id: str, *, query_vector: np.ndarray | None = None) -> Explanation:
        """Explain one recommendation."""
        return self.explain_items(user_id, [item_id], query_vector=query_vector)[0]

    def explain_items(
        self, user_id: str, item_ids: list[str], *, query_vector: np.ndarray | None = None, with_paths: bool = True
    ) -> list[Explanation]:
        """Explain several items for one user with one feature/contribution computation."""
        u = self.ctx.user_index(user_id)
        items = self.ctx.item_indices(list(item_ids))
        fm = self.builder.build(np.array([u]), items.reshape(1, -1), query_vector)
        return self.explain_rows(u, items, fm.X, with_paths=with_paths)

    def explain_rows(self, user: int, items: np.ndarray, X: np.ndarray, *, with_paths: bool = True) -> list[Explanation]:
        """Explain already-featurised rows (``X`` (k, F) of dense user ``user`` x dense ``items``), e.g. the top of
        a ranked list. One contributions call and one graph walk for all rows."""
        items = np.asarray(items, dtype=np.int64).ravel()
        contrib = self.ranker.contributions(X)
        found: dict[tuple[str, str], list[KGPath]] = {}
        if with_paths and self.store is not None and len(items):
            targets = [("Item", self.ctx.item_ids[i]) for i in items]
            try:
                found = paths_to_items(
                    self.store, ("User", self.ctx.user_ids[user]), targets,
                    max_hops=3, limit=self.config.explain_path_limit,
                )
            except KgrecError as exc:
                logger.warning("no KG paths for user %s: %s", self.ctx.user_ids[user], exc)
        return [
            self._explain_row(user, int(i), X[k], contrib[k], found.get(("Item", self.ctx.item_ids[i]), []))
            for k, i in enumerate(items)
        ]

    # ------------------------------------------------------------------ one pair
    def _explain_row(self, u: int, i: int, x: np.ndarray, contrib: np.ndarray, found: list[KGPath]) -> Explanation:
        ctx = self.ctx
        names = self.builder.names
        score = float(contrib.sum())
        values = {n: _finite(x[j]) for j, n in enumerate(names)}
        all_contrib = {n: float(contrib[j]) for j, n in enumerate(names)}
        cited: list[CitedFeature] = []
        for j in np.argsort(-contrib[:-1], kind="stable"):
            c = float(contrib[j])
            if c <= 0 or len(cited) >= self.config.explain_max_features:
                break
            phrase = self._phrase(names[j], x[j], u, i)
            if phrase and all(phrase != f.phrase for f in cited):  # brand_share and kg_paths_brand say the same
                cited.append(CitedFeature(names[j], values[names[j]], c, phrase))
        paths = self._cite_paths(found, all_contrib)
        modality = self._modality(i, values)
        sentence = _sentence(ctx.item_title(i), cited, paths, modality)
        return Explanation(
            user_id=ctx.user_ids[u],
            item_id=ctx.item_ids[i],
            item_title=ctx.item_title(i),
            image=ctx.item_images[i] if ctx.item_images else None,
            score=score,
            base_score=float(contrib[-1]),
            features=cited,
            all_contributions=all_contrib,
            paths=paths,
            modality=modality,
            sentence=sentence,
            feature_values=values,
        )

    # ------------------------------------------------------------------ phrases
    def _phrase(self, name: str, value: float, u: int, i: int) -> str | None:
        """A true plain-language statement for a feature value, or None when the value does not support one."""
        fn = _PHRASES.get(name)
        if fn is None or not np.isfinite(value):
            return None
        return fn(self, float(value), u, i)

    def _history_items(self, u: int) -> np.ndarray:
        h = self.ctx.history[u]
        return h.indices if h.nnz else self.ctx.touched[u].indices

    def _history_verb(self, u: int, items: Any = None) -> str:
        """What the user did with ``items`` (default: every item ``_history_items`` returns), for "items you ...":
        "bought", "rated", "put in your cart", or short forms joined for several ("bought or rated", "bought,
        carted or rated"); "looked at" when the history falls back to every item the user touched (views, clicks)."""
        if self.ctx.history.indptr[u] == self.ctx.history.indptr[u + 1]:
            return "looked at"
        done = []
        for ev in HISTORY_EVENT_TYPES:  # CSR rows read through indptr: no per-phrase matrix slicing
            m = self.ctx.interactions[ev]
            row = m.indices[m.indptr[u]:m.indptr[u + 1]]
            if len(row) and (items is None or np.isin(items, row).any()):
                done.append(ev)
        if len(done) <= 1:
            return _HISTORY_VERBS[done[0]] if done else "looked at"
        short = [_HISTORY_VERBS_SHORT[ev] for ev in done]
        return ", ".join(short[:-1]) + " or " + short[-1]

    def _nearest_history_item(self, u: int, i: int, vectors: np.ndarray | None) -> str | None:
        hist = self._history_items(u)
        hist = hist[hist != i]
        if vectors is None or len(hist) == 0:
            return None
        sims = vectors[hist] @ vectors[i]
        return self.ctx.item_title(int(hist[int(np.argmax(sims))]))

    def _cite_paths(self, found: list[KGPath], contrib: dict[str, float]) -> list[CitedPath]:
        """Rank the store's paths by relevance and keep ``explain_max_paths``, preferring different kinds."""
        scored = [self._cite_path(p, contrib) for p in found if p.length >= 1]
        scored.sort(key=lambda c: -c.relevance)  # stable: ties keep the store's deterministic order
        chosen: list[CitedPath] = []
        kinds: set[str] = set()
        for c in scored:  # prefer different kinds of evidence, then fill with the next most relevant
            if c.kind not in kinds:
                chosen.append(c)
                kinds.add(c.kind)
            if len(chosen) >= self.config.explain_max_paths:
                break
        for c in scored:
            if len(chosen) >= self.config.explain_max_paths:
                break
            if c not in chosen:
                chosen.append(c)
        chosen.sort(key=lambda c: -c.relevance)
        return chosen

    def _cite_path(self, path: KGPath, contrib: dict[str, float]) -> CitedPath:
        steps = path.steps
        kind = _path_kind(path)
        first = FIRST_HOP_WEIGHT.get(steps[0].rel, 0.5)
        kind_w, feat = PATH_KINDS[kind]
        boost = 1.0 + max(0.0, contrib.get(feat, 0.0)) if feat else 1.0
        relevance = first * kind_w * boost / path.length
        names = [self._node_name(lbl, nid, k) for k, (lbl, nid) in enumerate(path.nodes())]
        return CitedPath(path=path, names=names, kind=kind, relevance=float(relevance), text=_path_text(path, names, kind))

    def _node_name(self, label: str, node_id: str, position: int) -> str:
        if label == "User":
            return "you" if position == 0 else "another customer"
        if label == "Item":
            try:
                return self.ctx.item_title(self.ctx.item_index(node_id))
            except KgrecError:
                return node_id
        if label == "Category":
            return node_id.split(">")[-1].strip() or node_id
        if label == "AttributeValue":
            name, _, value = node_id.partition("=")
            return f"{name}: {value}" if value else node_id
        return node_id

    def _modality(self, i: int, values: dict[str, float | None]) -> ModalityEvidence:
        sims = {
            "text": values.get("text_similarity"),
            "image": values.get("image_similarity"),
            "graph": values.get("history_similarity"),
        }
        weights = None
        dominant = None
        if self.ctx.modality_weights is not None:
            w = self.ctx.modality_weights[i]
            weights = {m: float(w[k]) for k, m in enumerate(MODALITIES)}
            strength = {m: weights[m] * max(sims[m] or 0.0, 0.0) for m in MODALITIES}
            if max(strength.values()) > 0:
                dominant = max(MODALITIES, key=lambda m: strength[m])
        else:
            present = {m: s for m, s in sims.items() if s is not None}
            if present and max(present.values()) > 0:
                dominant = max(present, key=lambda m: present[m])
        return ModalityEvidence(weights=weights, similarities=sims, dominant=dominant)


def explain(
    user_id: str,
    item_id: str,
    *,
    context: RankingContext,
    ranker: Ranker,
    store: Any | None = None,
    query_vector: np.ndarray | None = None,
    config: RankingConfig | None = None,
) -> Explanation:
    """Explain why ``item_id`` is recommended to ``user_id`` (one-off; build an :class:`Explainer` to reuse)."""
    return Explainer(context, ranker, store, config=config).explain(user_id, item_id, query_vector=query_vector)


# ---------------------------------------------------------------------- phrase table
def _count(v: float, one: str, many: str) -> str:
    n = int(round(v))
    return one if n == 1 else many.format(n=n)


def _brand_phrase(ex: Explainer, v: float, u: int, i: int) -> str | None:
    brand = ex.ctx.brand_name(i)
    if brand is None or v <= 0:
        return None
    n = int(round(_bought_with(ex, u, i, ex.ctx.item_brand)))
    if n <= 0:
        return None
    return f"you often buy from *{brand}*" if n >= 2 else f"you bought from *{brand}* before"


def _category_phrase(ex: Explainer, v: float, u: int, i: int) -> str | None:
    cat = ex.ctx.category_name(i)
    if cat is None or v <= 0:
        return None
    n = int(round(_bought_with(ex, u, i, ex.ctx.item_category)))
    if n <= 0:
        return None
    leaf = cat.split(">")[-1]
    return f"you often shop in *{leaf}*" if n >= 2 else f"you bought in *{leaf}* before"


def _shared_with_history(ex: Explainer, u: int, i: int, incidence: Any) -> tuple[np.ndarray, np.ndarray]:
    """Item ``i``'s nodes in ``incidence`` (item x node CSR: attributes, entities) and, for each, how many of the
    user's other history items have it too (both empty when there is nothing to compare)."""
    hist = ex._history_items(u)
    hist = hist[hist != i]
    mine = incidence[i].indices
    if len(hist) == 0 or len(mine) == 0:
        return mine[:0], np.zeros(0)
    return mine, np.asarray(incidence[hist][:, mine].sum(axis=0)).ravel()


def _attribute_phrase(ex: Explainer, v: float, u: int, i: int) -> str | None:
    if v <= 0:
        return None
    mine, shared = _shared_with_history(ex, u, i, ex.ctx.item_attribute)
    if shared.max(initial=0) <= 0:
        return None
    order = np.argsort(-shared, kind="stable")
    vals = [ex.ctx.attribute_ids[mine[k]] for k in order[:2] if shared[k] > 0]
    text = " and ".join("*" + a.replace("=", ": ", 1) + "*" for a in vals)
    return f"it shares {text} with items you {ex._history_verb(u)}"


def _entity_phrase(ex: Explainer, v: float, u: int, i: int) -> str | None:
    if v <= 0:
        return None
    # the entity the user's items share most (the item's first entity need not be shared at all)
    ents, shared = _shared_with_history(ex, u, i, ex.ctx.item_entity)
    if shared.max(initial=0) <= 0:
        return None
    entity = ex.ctx.entity_ids[ents[int(np.argmax(shared))]]
    return f"it is linked to *{entity}* like items you {ex._history_verb(u)}"


def _also_bought_phrase(ex: Explainer, v: float, u: int, i: int) -> str | None:
    if v <= 0:
        return None
    ctx = ex.ctx
    hist = set(ctx.history[u].indices.tolist())
    partners = [j for j in ctx.also_bought[i].indices.tolist() if j in hist and j != i]
    if not partners:
        return None
    verb = ex._history_verb(u, partners[:1])
    return f"it is often bought together with *{ctx.item_title(partners[0])}*, which you {verb}"


def _similar_phrase(template: str, attr: str) -> Callable[[Explainer, float, int, int], str | None]:
    def fn(ex: Explainer, v: float, u: int, i: int) -> str | None:
        if v <= 0.2:  # weak cosine: not worth saying
            return None
        vectors = getattr(ex.ctx, attr)
        nearest = ex._nearest_history_item(u, i, vectors)
        return template.format(item=f"*{nearest}*" if nearest else f"items you {ex._history_verb(u)}")

    return fn


def _bought_with(ex: Explainer, u: int, i: int, incidence: Any) -> float:
    hist = ex._history_items(u)
    hist = hist[hist != i]
    if len(hist) == 0:
        return 0.0
    return float((incidence[hist] @ incidence[i].T).sum())


def _price_phrase(ex: Explainer, v: float, u: int, i: int) -> str | None:
    if v <= 0:
        return None
    if 0.75 <= v <= 1.33:
        return "it is priced like what you usually pay"
    return "it costs less than you usually pay" if v < 0.75 else None


def _co_buyer_phrase(ex: Explainer, v: float, u: int, i: int) -> str | None:
    return f"customers who chose what you {ex._history_verb(u)} also chose it" if v > 0 else None


# "items you ..." for each history event type (``HISTORY_EVENT_TYPES``)
_HISTORY_VERBS = {"purchase": "bought", "cart": "put in your cart", "rating": "rated"}
_HISTORY_VERBS_SHORT = {"purchase": "bought", "cart": "carted", "rating": "rated"}  # in a list of several

_PHRASES: dict[str, Callable[[Explainer, float, int, int], str | None]] = {
    "gnn_score": lambda ex, v, u, i: "customers with tastes like yours chose it",
    "history_similarity": _similar_phrase("it is close to {item} in what people buy together", "item_vectors_unit"),
    "text_similarity": _similar_phrase("its description reads like {item}", "item_text"),
    "image_similarity": _similar_phrase("it looks like {item}", "item_image"),
    "query_similarity": lambda ex, v, u, i: "it matches your search" if v > 0.2 else None,
    "modality_weighted_similarity": lambda ex, v, u, i: (
        f"it resembles items you {ex._history_verb(u)}" if v > 0.2 else None),
    "kg_paths_also_bought": _also_bought_phrase,
    "kg_paths_brand": _brand_phrase,
    "brand_share": _brand_phrase,
    "kg_paths_category": _category_phrase,
    "category_share": _category_phrase,
    "kg_paths_attribute": _attribute_phrase,
    "attribute_overlap": _attribute_phrase,
    "kg_paths_entity": _entity_phrase,
    "kg_paths_co_buyer": _co_buyer_phrase,
    "co_buyer_cosine": _co_buyer_phrase,  # the same evidence, weighted by item similarity
    "gnn_dot_z": lambda ex, v, u, i: "it stands out for you among the whole catalog" if v >= 2 else None,
    "item_events_near_user_time": lambda ex, v, u, i: (
        "people were choosing it around your last visit" if v > 0 else None),
    "user_activity": None,  # type: ignore[dict-item]  # about the user, not the item
    "days_user_to_item_activity": None,  # type: ignore[dict-item]  # a time gap is context, not a reason
    "kg_paths_total": lambda ex, v, u, i: (
        _count(v, "one product-graph path links it to items you " + ex._history_verb(u),
               "{n} product-graph paths link it to items you " + ex._history_verb(u)) if v > 0 else None
    ),
    "kg_shortest_path": lambda ex, v, u, i: (
        f"it is closely connected to items you {ex._history_verb(u)} in the product graph" if v <= 3 else None
    ),
    "user_item_views": lambda ex, v, u, i: _count(v, "you viewed it", "you viewed it {n} times") if v > 0 else None,
    "user_item_clicks": lambda ex, v, u, i: _count(v, "you clicked on it", "you clicked on it {n} times") if v > 0 else None,
    "user_item_carts": lambda ex, v, u, i: "you put it in your cart" if v > 0 else None,
    "user_item_purchases": lambda ex, v, u, i: "you bought it before" if v > 0 else None,
    "days_since_user_item_event": lambda ex, v, u, i: (
        "you looked at it today" if v < 1 else _count(v, "you looked at it a day ago", "you looked at it {n} days ago")
    ),
    "item_popularity": lambda ex, v, u, i: "it is popular" if v > 0 else None,
    "item_days_since_last_event": lambda ex, v, u, i: "people are buying it right now" if v <= 7 else None,
    "price": None,  # type: ignore[dict-item]  # a raw price is context, not a reason
    "price_ratio": _price_phrase,
}
_PHRASES = {k: v for k, v in _PHRASES.items() if v is not None}


# ---------------------------------------------------------------------- paths and sentences
def _path_kind(path: KGPath) -> str:
    rels = path.rel_types
    labels = [lbl for lbl, _ in path.nodes()]
    if path.length == 1:
        return "direct"
    if path.length == 2 and rels[1] == "ALSO_BOUGHT":
        return "also_bought"
    if path.length == 3 and labels[1] == "Item":
        middle = labels[2]
        if middle == "User" and not all(r in HISTORY_RELS for r in rels):
            return "co_interest"
        return {
            "Brand": "brand",
            "Category": "category",
            "AttributeValue": "attribute",
            "Entity": "entity",
            "User": "co_buyer",
        }.get(middle, "other")
    return "other"


def _path_text(path: KGPath, names: list[str], kind: str) -> str:
    """'you bought *X* — same brand *Acme* — *Y*' style rendering (``*`` marks names)."""
    steps = path.steps
    verb = FIRST_HOP_VERB.get(steps[0].rel, steps[0].rel.lower().replace("_", " "))
    if kind == "direct":
        return f"{verb} *{names[1]}*"
    if kind == "also_bought":
        return f"{verb} *{names[1]}* — often bought together with — *{names[2]}*"
    if kind in ("brand", "category", "attribute", "entity"):
        link = {"brand": "same brand", "category": "same category", "attribute": "both", "entity": "both linked to"}[kind]
        return f"{verb} *{names[1]}* — {link} *{names[2]}* — *{names[3]}*"
    if kind == "co_buyer":
        return f"{verb} *{names[1]}* — another customer who bought it also chose — *{names[3]}*"
    if kind == "co_interest":
        return f"{verb} *{names[1]}* — another customer interested in it also looked at — *{names[3]}*"
    parts = [verb, f"*{names[1]}*"]
    for s, n in zip(steps[1:], names[2:]):
        parts += [f"— {s.rel.lower().replace('_', ' ')} —", f"*{n}*"]
    return " ".join(parts)


def _sentence(title: str, cited: list[CitedFeature], paths: list[CitedPath], modality: ModalityEvidence,
              standing: str | None = None) -> str:
    """The one-sentence explanation. ``standing`` replaces "is recommended" for an item asked about that is not
    among the user's recommendations (e.g. "is already in your history, so it is not recommended again")."""
    reasons: list[str] = []
    for f in cited:
        if f.phrase not in reasons:
            reasons.append(f.phrase)
    reasons = reasons[:3]
    because = (reasons[0] if len(reasons) == 1 else ", ".join(reasons[:-1]) + " and " + reasons[-1]) if reasons else ""
    if standing is not None:
        text = f"*{title}* {standing}" + (f"; what speaks for it: {because}" if reasons else "")
    elif reasons:
        text = f"*{title}* is recommended because {because}"
    else:
        text = f"*{title}* is recommended for its overall fit to your history"
    if paths:
        text += f"; in the product graph, {paths[0].text}"
    if modality.dominant is not None:
        text += f" ({modality.dominant} similarity weighed most)"
    return text + "."
