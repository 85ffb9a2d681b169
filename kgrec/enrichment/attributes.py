"""Missing attribute values: several evidence sources, stacked, then calibrated on hidden known values.

For one attribute (``colour``, ``material``, ``brand``, ...) with vocabulary ``values`` (V of them), every source
gives each item a probability vector over the V values:

- ``classifier``: multinomial logistic regression on the item's embeddings (PCA-reduced text + image vectors),
  trained on items that have the value;
- ``knn``: cosine-weighted vote of the ``k`` nearest items that have the value;
- ``zero_shot``: CLIP, the item image against prompts ``"a photo of a {value} {noun}"`` through the CLIP text
  tower (only useful once ``fit-clip`` aligned the towers: the stacker learns how much to trust it from its
  accuracy on known values);
- ``kg_<relation>``: votes of knowledge-graph neighbours (items with the same brand, the same category, bought
  together), smoothed towards the global value frequencies;
- ``text``: the title/description literally names the value (a whole-word match).

A stacker (binary logistic regression on (item, value) pairs: the per-source probabilities and their logs --
log-linear pooling, so agreeing sources multiply --, whether the value is each source's top pick, whether the text
names it, its log prior frequency) turns these into one score per value,
normalised with a softmax over the values. Training targets come from hiding known
values: for items that have the value every source is evaluated out-of-fold (classifier: K folds; kNN and KG votes:
leave-one-out; the other sources use no labels), so the stacker sees what it will see on items that lack it. The
stacker's own out-of-fold top scores are then calibrated with isotonic regression (cross-fitted for the reported
numbers), which is the confidence compared with the write threshold.
"""
from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from kgrec.enrichment.calibration import (
    IsotonicCalibrator,
    ReliabilityCurve,
    cross_fitted_calibration,
    reliability_curve,
)

logger = logging.getLogger(__name__)

PromptEncoder = Callable[[list[str]], np.ndarray]  # texts -> (m, d) L2-normalised CLIP text vectors
CLIP_LOGIT_SCALE = 100.0  # CLIP's trained temperature: cosine * 100 before the softmax


@dataclass
class ItemEvidence:
    """Everything the sources read about the catalog, in one item order.

    Attributes:
        item_ids: (n,) item ids.
        features: (n, d) float32, L2-normalised rows: the content vector the classifier and kNN use (text and image
            blocks concatenated). Zero rows for items with nothing encoded.
        image: (n, d_clip) float32 L2-normalised CLIP image vectors, or ``None``; ``has_image`` marks real rows.
        has_image: (n,) bool.
        texts: (n,) title + description (never the attributes themselves), for literal evidence.
        category: (n,) leaf category path per item (``None`` when unknown).
        brand: (n,) brand per item (``None`` when unknown).
        kg_groups: relation name -> (n,) int group code (-1 unknown): items sharing a brand / a category are each
            other's KG neighbours (kept as codes: a brand's clique is never materialised).
        kg_neighbours: relation name -> (n, n) binary CSR adjacency without self loops (``also_bought``).
        prompt_encoder: CLIP text tower for zero-shot prompts, or ``None`` (no zero-shot source).
    """

    item_ids: list[str]
    features: np.ndarray
    image: np.ndarray | None
    has_image: np.ndarray
    texts: list[str]
    category: np.ndarray
    brand: np.ndarray
    kg_groups: dict[str, np.ndarray] = field(default_factory=dict)
    kg_neighbours: dict[str, sp.csr_matrix] = field(default_factory=dict)
    prompt_encoder: PromptEncoder | None = None

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass
class InferenceSettings:
    """Knobs of the attribute inference (``EnrichmentConfig`` carries the user-facing defaults)."""

    folds: int = 5
    seed: int = 2020
    knn_k: int = 10
    classifier_dims: int = 64
    classifier_c: float = 1.0
    kg_smoothing: float = 1.0  # pseudo-votes of the global value frequencies added to every KG vote
    prompt: str = "a photo of a {value} {noun}"
    min_labelled: int = 20
    exclude_sources: tuple[str, ...] = ()  # sources left out (ablations): classifier, knn, zero_shot, kg_*, text


@dataclass
class AttributeResult:
    """Inference for one attribute.

    ``targets`` are the item positions whose value was missing (and applicable); ``predicted`` (index into
    ``values``), ``confidence`` (calibrated, [0, 1]) and ``source_probs`` (per source, (len(targets), V)) are
    aligned with them. ``validation`` holds the numbers measured on hidden known values.
    """

    name: str
    values: list[str]
    targets: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    source_probs: dict[str, np.ndarray]
    validation: dict[str, Any]
    curve: ReliabilityCurve | None = None
    calibrator: IsotonicCalibrator | None = None
    skipped: str | None = None  # why nothing was inferred (too few known values, one value only, ...)

    def predicted_values(self) -> list[str]:
        return [self.values[k] for k in self.predicted]

    def evidence(self, row: int) -> dict[str, float]:
        """Per-source probability of the predicted value for ``targets[row]`` (rounded, for provenance)."""
        k = int(self.predicted[row])
        return {s: round(float(p[row, k]), 4) for s, p in self.source_probs.items()}


# ----------------------------------------------------------------------------------------------- sources


def _stable_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def assign_folds(labelled: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n,) fold index for labelled items (a seeded permutation dealt round-robin), -1 elsewhere."""
    out = np.full(len(labelled), -1, dtype=np.int64)
    idx = np.flatnonzero(labelled)
    rng = np.random.default_rng(seed)
    out[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % max(2, folds)
    return out


def _fit_predict_logreg(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_values: int, c: float,
                        seed: int) -> np.ndarray:
    if len(x_test) == 0:
        return np.zeros((0, n_values))
    classes = np.unique(y_train)
    out = np.zeros((len(x_test), n_values))
    if len(classes) == 1:
        out[:, classes[0]] = 1.0
        return out
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=500, random_state=seed)
    clf.fit(x_train, y_train)
    out[:, clf.classes_] = clf.predict_proba(x_test)
    return out


def classifier_source(x: np.ndarray, labels: np.ndarray, fold: np.ndarray, query: np.ndarray, n_values: int,
                      settings: InferenceSettings, seed: int) -> np.ndarray:
    """(n, V) probabilities: out-of-fold for labelled items, a model on all labelled items for ``query`` rows."""
    lab = labels >= 0
    out = np.zeros((len(labels), n_values))
    for f in np.unique(fold[lab]):
        train, test = lab & (fold != f), fold == f
        out[test] = _fit_predict_logreg(x[train], labels[train], x[test], n_values, settings.classifier_c, seed)
    q = query & ~lab
    out[q] = _fit_predict_logreg(x[lab], labels[lab], x[q], n_values, settings.classifier_c, seed)
    return out


def knn_source(features: np.ndarray, labels: np.ndarray, query: np.ndarray, n_values: int, k: int,
               chunk: int = 2048) -> np.ndarray:
    """(n, V) cosine-weighted votes of the ``k`` most similar labelled items (never the item itself)."""
    lab_idx = np.flatnonzero(labels >= 0)
    out = np.zeros((len(labels), n_values))
    rows = np.flatnonzero(query | (labels >= 0))
    if len(lab_idx) == 0:
        return out
    lab_feat = features[lab_idx]
    k = min(k, len(lab_idx) - 1) if len(lab_idx) > 1 else 1
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk]
        sim = features[r] @ lab_feat.T  # (c, L)
        sim[r[:, None] == lab_idx[None, :]] = -np.inf  # leave-one-out
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        w = np.maximum(np.take_along_axis(sim, top, axis=1), 0.0)
        votes = labels[lab_idx[top]]
        for j in range(k):
            np.add.at(out, (r, votes[:, j]), w[:, j])
    total = out.sum(axis=1, keepdims=True)
    return np.where(total > 0, out / np.maximum(total, 1e-12), 1.0 / n_values)


def kg_vote_source(neighbours: sp.csr_matrix | np.ndarray, labels: np.ndarray, n_values: int,
                   smoothing: float) -> np.ndarray:
    """(n, V) value frequencies among an item's KG neighbours that have the value, smoothed towards the global
    frequencies with ``smoothing`` pseudo-votes. ``neighbours`` is an (n, n) adjacency without self loops or an
    (n,) group code array (-1 = no group; members of a group are all neighbours). An item never votes for itself."""
    lab = labels >= 0
    if isinstance(neighbours, np.ndarray) and neighbours.ndim == 1:
        codes = neighbours
        n_groups = int(codes.max()) + 1 if len(codes) and codes.max() >= 0 else 0
        per_group = np.zeros((n_groups + 1, n_values))  # last row: "no group", always empty
        m = lab & (codes >= 0)
        np.add.at(per_group, (codes[m], labels[m]), 1.0)
        counts = per_group[np.where(codes >= 0, codes, n_groups)]
        counts[np.flatnonzero(m), labels[m]] -= 1.0
    else:
        y = sp.csr_matrix((np.ones(lab.sum()), (np.flatnonzero(lab), labels[lab])), shape=(len(labels), n_values))
        counts = np.asarray((neighbours @ y).todense(), dtype=np.float64)
    prior = np.bincount(labels[lab], minlength=n_values).astype(np.float64)
    prior = (prior + 1.0) / (prior.sum() + n_values)
    total = counts.sum(axis=1, keepdims=True) + smoothing
    return np.where(total > 0, (counts + smoothing * prior) / np.maximum(total, 1e-12), prior)


def _noun(category: str | None) -> str:
    if not category:
        return "product"
    return str(category).split(">")[-1].strip().lower() or "product"


def value_phrase(name: str, value: str) -> str:
    """How a value reads in text: a category path reads as its leaf."""
    return str(value).split(">")[-1].strip() if name == "category" else str(value)


def zero_shot_source(name: str, values: list[str], evidence: ItemEvidence, rows: np.ndarray,
                     template: str) -> np.ndarray | None:
    """(n, V) softmax over CLIP cosine(image, prompt) for ``rows`` with an image; uniform elsewhere."""
    if evidence.prompt_encoder is None or evidence.image is None or evidence.image.shape[1] == 0:
        return None
    n_values = len(values)
    out = np.full((len(evidence), n_values), 1.0 / n_values)
    rows = rows[evidence.has_image[rows]]
    if len(rows) == 0:
        return out
    nouns = np.array([_noun(c) if name != "category" else "" for c in evidence.category[rows]], dtype=object)
    uniq = sorted(set(nouns.tolist()))
    prompts = [" ".join(template.format(value=value_phrase(name, v), noun=nn).split()) for nn in uniq for v in values]
    emb = np.asarray(evidence.prompt_encoder(prompts), dtype=np.float32).reshape(len(uniq), n_values, -1)
    noun_idx = np.searchsorted(np.array(uniq, dtype=object), nouns)
    logits = CLIP_LOGIT_SCALE * np.einsum("rd,rvd->rv", evidence.image[rows], emb[noun_idx])
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    out[rows] = p / p.sum(axis=1, keepdims=True)
    return out


def literal_mentions(name: str, values: list[str], texts: list[str]) -> np.ndarray:
    """(n, V) 1.0 where the text names the value as a whole word/phrase (case-insensitive), else 0."""
    out = np.zeros((len(texts), len(values)))
    lowered = [t.lower() for t in texts]
    for k, v in enumerate(values):
        phrase = value_phrase(name, v).lower().strip()
        if not phrase:
            continue
        pat = re.compile(r"(?<![\w])" + re.escape(phrase) + r"(?![\w])")
        out[:, k] = [1.0 if pat.search(t) else 0.0 for t in lowered]
    return out


# ----------------------------------------------------------------------------------------------- stacking


def _pair_features(probs: dict[str, np.ndarray], stated: np.ndarray, log_prior: np.ndarray,
                   rows: np.ndarray) -> np.ndarray:
    """(len(rows) * V, F) features of every (item, value) pair, in the order of ``sorted(probs)``."""
    cols = []
    for s in sorted(probs):
        p = probs[s][rows]
        cols.append(p)
        cols.append(np.log(np.clip(p, 1e-4, 1.0)))  # log-linear pooling: sources multiply, like independent evidence
        cols.append((p >= p.max(axis=1, keepdims=True) - 1e-12).astype(np.float64))
    st = stated[rows]
    cols.append(st)
    cols.append(st / np.maximum(st.sum(axis=1, keepdims=True), 1.0))
    cols.append(np.broadcast_to(log_prior, st.shape))
    return np.stack(cols, axis=2).reshape(len(rows) * stated.shape[1], len(cols))


class _Stacker:
    """Binary logistic model over (item, value) pairs; per-item softmax of its logits over the values."""

    def __init__(self, seed: int):
        self.seed = seed
        self.model: Any = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Stacker:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(C=1.0, max_iter=1000, random_state=self.seed).fit(x, y)
        return self

    def scores(self, x: np.ndarray, n_values: int) -> np.ndarray:
        """(items, V) probabilities from (items * V, F) pair features."""
        logits = self.model.decision_function(x).reshape(-1, n_values)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def weights(self, names: list[str]) -> dict[str, float]:
        return {n: round(float(w), 4) for n, w in zip(names, self.model.coef_[0])}


def infer_attribute(
    name: str,
    known: list[str | None],
    targets: np.ndarray,
    evidence: ItemEvidence,
    classifier_x: np.ndarray,
    settings: InferenceSettings,
    threshold: float,
) -> AttributeResult:
    """Infer ``name`` for the ``targets`` items from the items whose value is ``known``.

    Args:
        name: attribute name (``colour``, ``brand``, ``category``, ...).
        known: (n,) the source value per item, ``None`` where absent.
        targets: (n,) bool, items to infer (missing and applicable).
        evidence: shared item evidence.
        classifier_x: (n, p) standardised reduced features for the classifier.
        settings: inference settings.
        threshold: write threshold, for the validation numbers (accuracy and coverage at threshold).
    """
    values = sorted({v for v in known if v is not None})
    vindex = {v: i for i, v in enumerate(values)}
    labels = np.array([-1 if v is None else vindex[v] for v in known], dtype=np.int64)
    lab = labels >= 0
    target_idx = np.flatnonzero(targets & ~lab)
    empty = AttributeResult(name, values, target_idx, np.zeros(0, np.int64), np.zeros(0), {}, {
        "n_labelled": int(lab.sum()), "n_targets": int(len(target_idx)), "n_values": len(values)})
    if len(target_idx) == 0:
        empty.skipped = "no item lacks it"
        return empty
    if len(values) < 2:
        empty.skipped = f"only {len(values)} distinct value(s)"
        return empty
    if lab.sum() < max(settings.min_labelled, settings.folds):
        empty.skipped = f"{int(lab.sum())} items have it (< {settings.min_labelled} needed)"
        return empty
    n_values = len(values)
    seed = _stable_seed(settings.seed, name)
    fold = assign_folds(lab, settings.folds, seed)
    query = np.zeros(len(labels), dtype=bool)
    query[target_idx] = True
    rows_all = np.flatnonzero(lab | query)

    probs: dict[str, np.ndarray] = {}
    if classifier_x.shape[1] > 0 and np.any(classifier_x):
        probs["classifier"] = classifier_source(classifier_x, labels, fold, query, n_values, settings, seed)
    if np.any(evidence.features):
        probs["knn"] = knn_source(evidence.features, labels, query, n_values, settings.knn_k)
    zs = zero_shot_source(name, values, evidence, rows_all, settings.prompt)
    if zs is not None:
        probs["zero_shot"] = zs
    for rel, adj in sorted((evidence.kg_groups | evidence.kg_neighbours).items()):
        if rel == name:  # a brand's own items say nothing about which brand an item has
            continue
        probs[f"kg_{rel}"] = kg_vote_source(adj, labels, n_values, settings.kg_smoothing)
    probs = {s: p for s, p in probs.items() if s not in settings.exclude_sources}
    stated = literal_mentions(name, values, evidence.texts)
    if "text" in settings.exclude_sources:
        stated = np.zeros_like(stated)
    prior = np.bincount(labels[lab], minlength=n_values).astype(np.float64)
    log_prior = np.log((prior + 1.0) / (prior.sum() + n_values))
    # No value is forbidden outright by the item's category (colours cross categories freely): the category vote
    # (kg_category) tells the stacker how much the category constrains each attribute.
    feature_names = [f"{s}:{kind}" for s in sorted(probs) for kind in ("p", "log_p", "is_top")] + [
        "text:stated", "text:stated_share", "log_prior"]

    # ---- validation on hidden known values: stacker out-of-fold, calibrator cross-fitted
    lab_idx = np.flatnonzero(lab)
    x_lab = _pair_features(probs, stated, log_prior, lab_idx)
    y_lab = (np.arange(n_values)[None, :] == labels[lab_idx][:, None]).reshape(-1).astype(np.int64)
    oof = np.zeros((len(lab_idx), n_values))
    lab_fold = fold[lab_idx]
    pair_fold = np.repeat(lab_fold, n_values)
    for f in np.unique(lab_fold):
        tr = pair_fold != f
        stk = _Stacker(seed).fit(x_lab[tr], y_lab[tr])
        te = lab_fold == f
        oof[te] = stk.scores(x_lab[pair_fold == f], n_values)
    top = oof.argmax(axis=1)
    raw = oof[np.arange(len(top)), top]
    correct = top == labels[lab_idx]
    calibrated, calibrator = cross_fitted_calibration(raw, correct, lab_fold)
    curve = reliability_curve(calibrated, correct)
    keep = calibrated >= threshold
    source_acc = {s: round(float(np.mean(p[lab_idx].argmax(axis=1) == labels[lab_idx])), 4)
                  for s, p in probs.items()}
    stated_any = stated[lab_idx].sum(axis=1) > 0
    if stated_any.any():  # accuracy where the text names some value (first named value when several)
        source_acc["text"] = round(float(np.mean(stated[lab_idx][stated_any].argmax(axis=1)
                                                 == labels[lab_idx][stated_any])), 4)

    # ---- the final stacker on every labelled item, applied to the targets
    stacker = _Stacker(seed).fit(x_lab, y_lab)
    if len(target_idx):
        scores = stacker.scores(_pair_features(probs, stated, log_prior, target_idx), n_values)
        predicted = scores.argmax(axis=1)
        confidence = calibrator.predict(scores[np.arange(len(predicted)), predicted])
    else:
        predicted, confidence = np.zeros(0, dtype=np.int64), np.zeros(0)
    validation = {
        "n_labelled": int(lab.sum()),
        "n_targets": int(len(target_idx)),
        "n_values": n_values,
        "chance_accuracy": round(float(prior.max() / prior.sum()), 4),
        "source_accuracy": source_acc,
        "text_mention_rate": round(float(stated_any.mean()), 4),
        "stacked_accuracy": round(float(correct.mean()), 4),
        "accuracy_at_threshold": round(float(correct[keep].mean()), 4) if keep.any() else None,
        "coverage_at_threshold": round(float(keep.mean()), 4),
        "ece": round(curve.ece, 4),
        "stacker_weights": stacker.weights(feature_names),
    }
    logger.info("attribute %s: %d known, %d to infer, held-out accuracy %.3f (%.3f at >= %.2f, coverage %.3f)",
                name, lab.sum(), len(target_idx), correct.mean(),
                validation["accuracy_at_threshold"] or float("nan"), threshold, keep.mean())
    return AttributeResult(name, values, target_idx, predicted, confidence,
                           {s: p[target_idx] for s, p in probs.items()} | {"text": stated[target_idx]},
                           validation, curve, calibrator)


# ----------------------------------------------------------------------------------------------- tasks


@dataclass
class AttributeTask:
    """One attribute to infer: the source value per item (``None`` = absent) and which absent ones to fill."""

    name: str
    known: list[str | None]
    targets: np.ndarray  # (n,) bool


def attribute_tasks(items: Any, attributes: Any, min_share: float) -> list[AttributeTask]:
    """The attributes worth inferring, from the items table and the long (item_id, name, value) attribute table.

    An attribute from ``attributes`` is missing *and applicable* for an item when at least ``min_share`` of the
    items in its category have it (sizes are not missing from mugs), or of the whole catalog when the item has no
    category. ``brand`` and ``category`` are tasks when some items lack them and others have them.
    """
    item_ids = items["item_id"].astype(str).tolist()
    pos = {iid: i for i, iid in enumerate(item_ids)}
    n = len(item_ids)
    cats = np.array([c if isinstance(c, str) and c.strip() else "" for c in items["category"]], dtype=object)
    uniq_cats, cat_idx = np.unique(cats, return_inverse=True)
    cat_size = np.bincount(cat_idx, minlength=len(uniq_cats))
    tasks: list[AttributeTask] = []
    if len(attributes):
        for name, grp in sorted(attributes.groupby("name", sort=True), key=lambda kv: str(kv[0])):
            known: list[str | None] = [None] * n
            for iid, value in zip(grp["item_id"].astype(str), grp["value"]):
                if iid in pos and value is not None and str(value).strip():
                    known[pos[iid]] = str(value)
            has = np.array([v is not None for v in known])
            share_in_cat = np.bincount(cat_idx, weights=has.astype(np.float64), minlength=len(uniq_cats))
            share_in_cat = share_in_cat / np.maximum(cat_size, 1)
            share = np.where(cats == "", has.mean() if n else 0.0, share_in_cat[cat_idx])
            tasks.append(AttributeTask(str(name), known, ~has & (share >= min_share)))
    for column in ("brand", "category"):
        known = [v if isinstance(v, str) and v.strip() else None for v in items[column]]
        has = np.array([v is not None for v in known])
        if has.any() and not has.all():
            tasks.append(AttributeTask(column, known, ~has))
    return tasks
