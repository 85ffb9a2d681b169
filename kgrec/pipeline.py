"""The ``Recommender``: the one object most users touch. It wires data -> kg + encoders -> fusion -> ranking.

``Recommender.fit(dataset, config)`` does, in order:

1. **graph**: load the whole dataset into the configured ``GraphStore`` (embedded by default, Neo4j with
   ``kg.backend: neo4j``) and export it to ``HeteroData``;
2. **split** the events into train / valid / test (the dataset's own ``split.parquet`` when it has one, else a
   per-user temporal split of the (user, item) pairs by first interaction, 80/10/10); the GNN's graph gets its
   interaction-derived edges (ALSO_BOUGHT) rebuilt from the train events (``training_graph``);
3. **encode** every item (BERT text, CLIP image and CLIP text; cached by content hash);
4. **GNN + fusion** on the train pairs and the KG relations, early-stopped on valid NDCG@20;
5. **ranker**: LightGBM LambdaRank on the GNN's top candidates of each user, labelled by the user's valid events
   (graded purchase > cart > click > view), features computed from train-only interactions (no leakage), its tree
   count chosen by cross-validation over those users (``ranking.cv_folds``); with
   ``ranking.label_source`` "fold" / "valid+fold" it also (or instead) learns from a held-out fold of train, with a
   GNN refitted on the rest of train (``fold_holdout``);
6. **evaluate** on test (history = train + valid masked): popularity, EASE, GNN retrieval, GNN + ranker.

The fitted object serves ``recommend`` / ``similar`` / ``search`` / ``explain`` with every event as history, and
``save`` / ``load`` it as a bundle directory (see ``kgrec.bundle``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from kgrec import __version__
from kgrec.bundle import read_idmap, read_manifest, write_bundle, write_idmap
from kgrec.config import Config, RankingConfig
from kgrec.data.schema import Dataset
from kgrec.errors import BundleError, DataError, UnknownIdError

logger = logging.getLogger(__name__)

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
KS = (10, 20)
QUERY_CACHE_SIZE = 1024  # recent query texts whose vectors are kept, per encoder
INT8_MAX_CANDIDATES = 20000  # rows of a search with more candidates than this take the float32 products
TOP_K_SLACK = 32  # extra values asked of torch.topk per row so that ties at the k-th value are resolved exactly
# below this standard deviation of a query's similarities, the moment formula's rounding (~1e-8) could matter:
# such rows are z-scored from the similarities themselves
_MOMENT_MIN_SD = 1e-6
_MEMO_USERS = 256  # _candidates keeps its scores for the feature build when it scored at most this many users


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Recommendation:
    """One recommended (or found) item. ``explanation`` follows ``ranking/explanation.schema.json``."""

    item_id: str
    score: float
    rank: int
    title: str = ""
    image: str | None = None
    explanation: dict[str, Any] | None = None
    sources: dict[str, float] = field(default_factory=dict)  # per-signal scores (search: text / clip)

    def to_dict(self) -> dict[str, Any]:
        out = {"item_id": self.item_id, "score": self.score, "rank": self.rank, "title": self.title,
               "image": self.image}
        if self.sources:
            out["sources"] = self.sources
        if self.explanation is not None:
            out["explanation"] = self.explanation
        return out


# ---------------------------------------------------------------------------------------------------- helpers
def _index(ids: Sequence[str]) -> dict[str, int]:
    return {v: i for i, v in enumerate(ids)}


def _event_pairs(events: pd.DataFrame, user_pos: dict[str, int], item_pos: dict[str, int]) -> pd.DataFrame:
    """Unique (user, item) pairs with the first interaction time; unknown ids dropped (logged)."""
    u = events["user_id"].astype(str).map(user_pos)
    i = events["item_id"].astype(str).map(item_pos)
    ok = u.notna() & i.notna()
    if (~ok).any():
        logger.warning("%d events reference users/items missing from the graph; ignored", int((~ok).sum()))
    df = pd.DataFrame({
        "u": u[ok].astype(np.int64).to_numpy(),
        "i": i[ok].astype(np.int64).to_numpy(),
        "ts": pd.to_datetime(events.loc[ok, "timestamp"], utc=True).astype("int64").to_numpy() // 10**9,
    })
    return df.groupby(["u", "i"], as_index=False)["ts"].min()


def split_pairs(dataset: Dataset, events: pd.DataFrame, user_pos: dict[str, int], item_pos: dict[str, int],
                seed: int = 2020) -> pd.DataFrame:
    """(u, i, ts, split) for every interacted pair: the dataset's own split if present, else per-user temporal."""
    pairs = _event_pairs(events, user_pos, item_pos)
    given = dataset.split
    if given is not None and len(given):
        g = pd.DataFrame({
            "u": given["user_id"].astype(str).map(user_pos),
            "i": given["item_id"].astype(str).map(item_pos),
            "split": given["split"].map(SPLIT_CODES),
        }).dropna()
        g = g.astype({"u": np.int64, "i": np.int64, "split": np.int8}).drop_duplicates(["u", "i"])
        pairs = pairs.merge(g, on=["u", "i"], how="right").fillna({"ts": 0}).astype({"ts": np.int64})
        logger.info("using the dataset's own split: %s", pairs["split"].value_counts().to_dict())
        return pairs
    pairs["split"] = temporal_pair_split(pairs)
    return pairs


def temporal_pair_split(pairs: pd.DataFrame) -> np.ndarray:
    """Split codes of ``pairs`` (u, i, ts) by per-user time, 80/10/10 (equal timestamps ordered by item index):
    what ``fit`` uses for a dataset without a split of its own."""
    from fusion.splits import temporal_split

    return temporal_split(pairs["u"].to_numpy(), pairs["ts"].to_numpy() * 1000 + pairs["i"].to_numpy() % 1000)


def split_is_temporal(pairs: pd.DataFrame, min_share: float = 0.9) -> bool:
    """Whether ``pairs``' valid split comes after train in time: for at least ``min_share`` of the users with both,
    every valid pair is no earlier than every train pair (true of the split ``fit`` makes itself)."""
    tr, va = pairs[pairs["split"] == 0], pairs[pairs["split"] == 1]
    last = tr.groupby("u")["ts"].max()
    first = va.groupby("u")["ts"].min()
    both = last.index.intersection(first.index)
    if len(both) == 0:
        return False
    return bool((first[both] >= last[both]).mean() >= min_share)


def fold_holdout(train_pairs: pd.DataFrame, kind: str, share: float, seed: int = 2020) -> np.ndarray:
    """(n,) bool: the train pairs (u, i, ts) held out as the ranker's fold, ``int(share * n)`` of each user's ``n``
    (users with fewer than ``1 / share`` pairs keep all): the latest ones (``kind="temporal"``, ties by item as in
    ``temporal_pair_split``) or a seeded random sample (``"random"``)."""
    from fusion.splits import random_split, temporal_split

    u = train_pairs["u"].to_numpy()
    if kind == "temporal":
        codes = temporal_split(u, train_pairs["ts"].to_numpy() * 1000 + train_pairs["i"].to_numpy() % 1000,
                               ratios=(1.0 - share, share, 0.0))
    elif kind == "random":
        codes = random_split(u, ratios=(1.0 - share, share, 0.0), seed=seed)
    else:
        raise ValueError(f"fold kind must be temporal or random, got {kind!r}")
    return codes == 1


def aligned_content(embeddings: Any, item_ids: Sequence[str]) -> tuple[Any, Any, Any]:
    """(text, image, image_present) rows of ``embeddings`` in ``item_ids`` order; None for a missing modality."""
    pos = _index(embeddings.item_ids)
    order = np.array([pos[i] for i in item_ids], dtype=np.int64)
    text = embeddings.text[order] if embeddings.text.shape[1] else None
    image = embeddings.image[order] if embeddings.image.shape[1] else None
    return text, image, (embeddings.has_image[order] if image is not None else None)


def event_split_codes(events: pd.DataFrame, pairs: pd.DataFrame, user_pos: dict[str, int],
                      item_pos: dict[str, int]) -> np.ndarray:
    """Split code per event row, from its (user, item) pair (events of pairs without a split: train)."""
    n_items = len(item_pos)
    u = events["user_id"].astype(str).map(user_pos).fillna(-1).astype(np.int64).to_numpy()
    i = events["item_id"].astype(str).map(item_pos).fillna(-1).astype(np.int64).to_numpy()
    lookup = pd.Series(pairs["split"].to_numpy(), index=pairs["u"].to_numpy() * n_items + pairs["i"].to_numpy())
    lookup = lookup[~lookup.index.duplicated()]
    return lookup.reindex(u * n_items + i).fillna(0).astype(np.int8).to_numpy()


def training_graph(hetero: Any, id_maps: dict[str, list[str]], events: pd.DataFrame, pairs: pd.DataFrame,
                   also_bought_min_count: int, codes: np.ndarray | None = None) -> Any:
    """The graph the GNN trains on: ``hetero`` with its interaction and ALSO_BOUGHT edges rebuilt from the training
    events only (ALSO_BOUGHT derived from every purchase would carry valid / test purchases into training).
    ``codes``: the events' split codes when the caller has them (``event_split_codes``), else computed here."""
    if codes is None:
        codes = event_split_codes(events, pairs, _index(id_maps.get("user", [])), _index(id_maps.get("item", [])))
    return interaction_view(hetero, id_maps, events[codes == 0], also_bought_min_count)


def interaction_view(hetero: Any, id_maps: dict[str, list[str]], events: pd.DataFrame,
                     also_bought_min_count: int) -> Any:
    """A copy of ``hetero`` whose user->item edges and ALSO_BOUGHT edges come from ``events`` only.

    Used so that ranker features for training see only the training history (no leakage of the labels' events).
    """
    import copy

    import torch

    from kg.schema import INTERACTION_RELS

    out = copy.copy(hetero)
    out = out.clone() if hasattr(out, "clone") else out
    user_pos, item_pos = _index(id_maps.get("user", [])), _index(id_maps.get("item", []))
    n_users, n_items = len(user_pos), len(item_pos)
    u = events["user_id"].astype(str).map(user_pos)
    i = events["item_id"].astype(str).map(item_pos)
    ok = (u.notna() & i.notna()).to_numpy()
    df = pd.DataFrame({"u": u[ok].astype(np.int64).to_numpy(), "i": i[ok].astype(np.int64).to_numpy(),
                       "type": events["type"].to_numpy()[ok]})
    for etype, rel in INTERACTION_RELS.items():
        key = ("user", rel.lower(), "item")
        sub = df[df["type"] == etype].groupby(["u", "i"]).size().reset_index(name="n")
        sub = sub.sort_values(["u", "i"])
        out[key].edge_index = torch.as_tensor(np.stack([sub["u"].to_numpy(), sub["i"].to_numpy()]).astype(np.int64)
                                              if len(sub) else np.zeros((2, 0), dtype=np.int64))
        out[key].edge_weight = torch.as_tensor(sub["n"].to_numpy(dtype=np.float32))
    bought = df[df["type"] == "purchase"].drop_duplicates(["u", "i"])
    key = ("item", "also_bought", "item")
    if len(bought):
        p = sp.csr_matrix((np.ones(len(bought), dtype=np.float32), (bought["u"], bought["i"])), shape=(n_users, n_items))
        co = sp.triu(p.T @ p, k=1).tocoo()
        keep = co.data >= also_bought_min_count
        order = np.lexsort((co.col[keep], co.row[keep]))
        out[key].edge_index = torch.as_tensor(np.stack([co.row[keep][order], co.col[keep][order]]).astype(np.int64))
        out[key].edge_weight = torch.as_tensor(co.data[keep][order].astype(np.float32))
    else:
        out[key].edge_index = torch.zeros((2, 0), dtype=torch.long)
        out[key].edge_weight = torch.zeros(0)
    return out


def _to_csr(u: np.ndarray, i: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    from fusion.metrics import to_csr

    return to_csr(np.asarray(u, dtype=np.int64), np.asarray(i, dtype=np.int64), shape)


def top_k_stable(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``scores``, best first, ties by lower index.

    Equals ``np.argsort(-scores, kind="stable")[:k]`` (the reference it is tested against) without sorting the
    whole array: an ``argpartition`` finds the k-th value, then only the values at or above it are sorted
    (O(n + m log m), m = k plus ties at the threshold). Arrays with NaN take the full sort.
    """
    neg = -np.asarray(scores)
    n = neg.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n or np.isnan(neg).any():
        return np.argsort(neg, kind="stable")[:k]
    if neg.dtype in (np.float32, np.float64):  # torch's top-k finds the k-th value ~5x faster than argpartition
        import torch

        threshold = -float(torch.topk(torch.as_tensor(np.ascontiguousarray(scores)), k).values[-1])
    else:
        threshold = neg[np.argpartition(neg, k - 1)[:k]].max()
    top = np.flatnonzero(neg <= threshold)  # every tie at the threshold, in index order
    return top[np.argsort(neg[top], kind="stable")[:k]]


def _top_k_rows(scores: np.ndarray, ks: Sequence[int]) -> list[np.ndarray]:
    """``top_k_stable(scores[j], ks[j])`` for every row of a (n, I) float array of finite values, with one
    ``torch.topk`` over the whole batch.

    ``torch.topk`` orders ties arbitrarily, so it is asked for ``TOP_K_SLACK`` more values than the largest k.
    For row j with k-th value v: when the last value returned is below v, every item scoring >= v was returned
    (ties at v included), so the row's top k are those items in (value descending, index) order — exact; only a
    row whose ties at v run past the returned width takes :func:`top_k_stable` (a catalog with many identical
    item vectors ties often, so the slack is what keeps those rows off the full pass).
    """
    import torch

    n_items = scores.shape[1]
    if not len(ks):
        return []
    width = min(max(int(k) for k in ks) + TOP_K_SLACK, n_items)
    vals, idx = (t.numpy() for t in torch.topk(torch.as_tensor(scores), width, dim=1))
    out = []
    for j, k in enumerate(ks):
        k = min(int(k), n_items)
        if k <= 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        v = vals[j, k - 1]
        if k < width and vals[j, width - 1] == v:
            out.append(top_k_stable(scores[j], k))  # the ties at v may go on past what topk returned
            continue
        keep = vals[j] >= v  # the k best and every tie with the k-th (all of them: see above)
        sel, sv = idx[j][keep], vals[j][keep]
        out.append(sel[np.lexsort((sel, -sv))][:k])
    return out


def _candidates(g: np.ndarray, vals: np.ndarray, idx: np.ndarray, k: int, margin: float) -> np.ndarray:
    """Indices (ascending) of every item of a row whose float32 score ``g`` is within ``margin`` of the k-th.

    ``vals`` / ``idx`` are the row's ``torch.topk`` answer (width >= k). When its last value is still inside the
    margin, the items tied or close past what topk returned are found by one pass over ``g``."""
    cut = float(vals[k - 1]) - margin
    lo = np.float32(cut)  # compared with float32 values: round the threshold down, never up
    if lo > cut:
        lo = np.nextafter(lo, np.float32(-np.inf))
    if k < len(vals) and vals[-1] >= lo:
        return np.flatnonzero(g >= lo)
    return np.sort(idx[vals >= lo])


def _int8_matrix(m: np.ndarray, used: np.ndarray) -> dict[str, Any]:
    """Per-row int8 form of an (I, dim) float32 matrix for :func:`_int8_coarse`.

    Row i is stored as ``x8 = rint(x / s_i)``, ``s_i = max|x| / 127``, so ``x = s_i (x8 + d_i)`` with the exact
    residual ``d_i``. Kept: the (dim, I) int8 array, the scales, and the maxima over the ``used`` rows of
    ``s_i |d_i|`` and ``s_i |x8_i|`` (L2 norms, float64) that bound the error of a product; ``rows`` is a
    row-major float32 copy for the exact rescoring of candidates.
    """
    import torch

    amax = np.abs(m).max(axis=1) if m.shape[1] else np.zeros(len(m), dtype=np.float32)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    x8 = np.clip(np.rint(m / scale[:, None]), -127, 127).astype(np.int8)
    s64 = scale.astype(np.float64)
    resid = np.linalg.norm(m.astype(np.float64) / s64[:, None] - x8, axis=1) * s64
    norm8 = np.linalg.norm(x8.astype(np.float64), axis=1) * s64
    return {"x8": torch.from_numpy(np.ascontiguousarray(x8.T)), "scale": scale,
            "resid": float(resid[used].max(initial=0.0)), "norm8": float(norm8[used].max(initial=0.0)),
            "rows": m}


def _int8_coarse(queries: np.ndarray, items: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(approximate similarities (n, I) float32, per-row error bound (n,) float64) from an :func:`_int8_matrix`.

    With the query stored the same way, ``q = t (q8 + e)``, the exact product is
    ``t s_i (q8 . x8_i + q8 . d_i + e . x8_i + e . d_i)``; the int32 part ``q8 . x8_i`` is exact (``torch._int_mm``)
    and, by Cauchy-Schwarz, the rest is at most ``t (|q8| max s|d| + |e| max s|x8| + |e| max s|d|)`` for every
    used item (norms in float64 from the float32 values; x 1.00001 for their rounding), plus the float32 rounding
    of ``t s_i (q8 . x8_i)`` (two products: relative 2^-23, bounded with ``|q8| max s|x8|``)."""
    import torch

    q64 = queries.astype(np.float64)
    amax = np.abs(queries).max(axis=1)
    t = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q8 = np.clip(np.rint(queries / t[:, None]), -127, 127).astype(np.int8)
    t64 = t.astype(np.float64)
    e = np.linalg.norm(q64 / t64[:, None] - q8, axis=1)
    n8 = np.linalg.norm(q8.astype(np.float64), axis=1)
    acc = torch._int_mm(torch.from_numpy(q8), items["x8"]).numpy()  # (n, I) int32, exact
    approx = acc.astype(np.float32)  # exact: |acc| <= 127^2 dim < 2^24 for dim <= 1040
    approx *= items["scale"][None, :]
    approx *= t[:, None]
    bound = t64 * (n8 * items["resid"] + e * items["norm8"] + e * items["resid"]) * 1.00001
    bound += 2.0 ** -21 * t64 * n8 * items["norm8"] + 1e-30
    return approx, bound


def _column_moments(xt: np.ndarray, cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean (dim,) and population covariance (dim, dim), float64, of the columns ``cols`` (default all) of a
    (dim, I) array, accumulated in float64 chunks (exact to ~1e-15)."""
    n = xt.shape[1] if cols is None else len(cols)
    dim = xt.shape[0]
    mu = np.zeros(dim, dtype=np.float64)
    cov = np.zeros((dim, dim), dtype=np.float64)
    if n == 0:
        return mu, cov
    chunks = [(a, min(a + 16384, n)) for a in range(0, n, 16384)]
    take = (lambda a, b: xt[:, a:b]) if cols is None else (lambda a, b: xt[:, cols[a:b]])
    for a, b in chunks:
        mu += np.add.reduce(take(a, b), axis=1, dtype=np.float64)
    mu /= n
    for a, b in chunks:
        c = take(a, b).astype(np.float64)
        c -= mu[:, None]
        cov += c @ c.T
    return mu, cov / n


def _zscore_rows(x: np.ndarray) -> np.ndarray:
    """Row-wise :func:`_zscore` of a (n, I) array, as float64, bit-equal to ``_zscore`` of each row.

    The same reductions as ``np.std`` / ``np.mean`` per row (tested), with the centred rows computed once and the
    arithmetic in place: at 100,000 items a row is 0.8 MB, and fresh temporaries cost more than the arithmetic.
    """
    out = np.array(x, dtype=np.float64)  # own copy, worked on in place
    n = out.shape[1]
    out -= np.add.reduce(out, axis=1, keepdims=True) / n  # x - mean (np.mean = sum / n)
    sq = np.multiply(out, out)
    sd = np.sqrt(np.add.reduce(sq, axis=1) / n)  # np.std: sqrt(sum((x - mean)^2) / n)
    del sq
    scale = sd > 1e-12
    np.divide(out, sd[:, None], out=out, where=scale[:, None])
    return out


def _mean_parts(parts: list[np.ndarray]) -> np.ndarray:
    """``np.mean(parts, axis=0)`` (the same additions in the same order) without stacking the parts."""
    acc = np.array(parts[0], dtype=np.float64)
    for p in parts[1:]:
        acc += p
    acc /= len(parts)
    return acc


class _quiet_all_nan:
    """Silence numpy's "All-NaN slice" warning (rows without any finite value are handled by the caller)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message="All-NaN slice encountered", category=RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def encode_clip_queries(clip_encoder: Any, texts: Sequence[str]) -> np.ndarray:
    """``clip_encoder.encode_texts(texts)`` for short query texts, without the padding to the context length.

    open_clip's Hugging Face tokenizer pads every text to the model's context length (64 tokens for the default
    CLIP), and the text tower masks the pad tokens out of attention and pooling: cutting the token batch after its
    last non-pad column gives the same vectors (to float rounding, ~1e-7) for a few-word query at a fraction of the
    cost (10 ms instead of 25 ms on one CPU thread). Encoders whose text tower is not a Hugging Face model (the
    tiny open_clip test models) take ``encode_texts`` as is. Returns (n, dim) float32, L2-normalised.
    """
    model, tokenizer = getattr(clip_encoder, "model", None), getattr(clip_encoder, "tokenizer", None)
    text_tower = getattr(model, "text", None)
    pad = getattr(getattr(text_tower, "config", None), "pad_token_id", None)
    device = getattr(clip_encoder, "device", None)
    if (pad is None or tokenizer is None or type(text_tower).__name__ != "HFTextEncoder"
            or getattr(device, "type", "cpu") != "cpu"):
        return np.asarray(clip_encoder.encode_texts(list(texts)), dtype=np.float32)
    import torch

    tokens = tokenizer(list(texts))
    width = int((tokens != pad).any(dim=0).nonzero().max()) + 1
    with torch.inference_mode():
        feats = model.encode_text(tokens[:, :width], normalize=True)
    return feats.float().numpy()


def _model_scores(model: Any, users: np.ndarray, candidates: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(n, C) ``model.score_all`` scores of each user's candidates (-1 pads score as item 0)."""
    out = np.empty(candidates.shape, dtype=np.float32) if out is None else out
    for s in range(0, len(users), 256):
        scores = model.score_all(np.asarray(users[s : s + 256])).numpy()
        out[s : s + 256] = np.take_along_axis(scores, np.maximum(candidates[s : s + 256], 0), axis=1)
    return out


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else x - x.mean()


# ---------------------------------------------------------------------------------------------------- Recommender
class Recommender:
    """Fit, serve, explain, save and load the whole recommender.

    Build one with :meth:`fit` or :meth:`load`; the constructor only assembles fitted parts.
    """

    def __init__(
        self,
        *,
        config: Config,
        user_ids: list[str],
        item_ids: list[str],
        model: Any,
        ranker: Any | None,
        store: Any,
        embeddings: Any,
        items: pd.DataFrame,
        events: pd.DataFrame,
        hetero: Any,
        id_maps: dict[str, list[str]],
        dataset_root: Path | None,
        metrics: dict[str, Any] | None = None,
        encoder_spec: dict[str, Any] | None = None,
        data_fingerprint: str = "",
    ):
        self.config = config
        self.user_ids, self.item_ids = list(user_ids), list(item_ids)
        self.user_pos, self.item_pos = _index(self.user_ids), _index(self.item_ids)
        self.model = model
        self.ranker = ranker
        self.store = store
        self.embeddings = embeddings
        self.items = items.set_index("item_id", drop=False) if "item_id" in items else items
        self.events = events
        self.hetero, self.id_maps = hetero, id_maps
        self.dataset_root = dataset_root
        self.metrics = metrics or {}
        self.encoder_spec = encoder_spec or {}
        self.data_fingerprint = data_fingerprint
        self._text_encoder: Any = None
        self._clip_encoder: Any = None
        self._bundle_path: Path | None = None  # the bundle this model was loaded from (absolute)
        self._context: Any = None
        self._explainer: Any = None
        self._seen: sp.csr_matrix | None = None
        self._aligned: dict[str, np.ndarray] | None = None
        # serving caches (rebuilt when what they derive from changes): feature builder, result titles/images,
        # recent query vectors (LRU of ``QUERY_CACHE_SIZE`` texts per encoder)
        self._builder: Any = None
        self._display: tuple[Any, list[str], list[str | None]] | None = None
        self._query_cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._query_lock = threading.Lock()
        self._onnx_queries: dict[str, Any] = {}  # kind -> ONNX Runtime query encoder (use_onnx_queries)
        self._scores_memo = threading.local()  # (users, (n, I) scores) of the last _candidates call, per thread

    # ------------------------------------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, dataset: Dataset | str | Path, config: Config | None = None, *, progress: bool = True,
            store: Any | None = None, encoders: tuple[Any, Any] | None = None) -> Recommender:
        """Train every stage on ``dataset`` (see the module docstring). ``store`` overrides the configured graph
        store; ``encoders`` = (text_encoder, clip_encoder) overrides the configured encoders (tests use tiny ones).
        """
        from fusion.train import train_model

        cfg = config or Config()
        ds = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}

        # 1. graph ---------------------------------------------------------------------------------------------
        store = store if store is not None else open_store(cfg)
        events = ds.events
        store.load(ds)
        hetero, id_maps = store.to_hetero_data()
        user_ids, item_ids = list(id_maps["user"]), list(id_maps["item"])
        if not item_ids:
            raise DataError(f"{ds.root}: the dataset has no items")
        user_pos, item_pos = _index(user_ids), _index(item_ids)
        timings["graph_s"] = time.perf_counter() - t0

        # 2. split ---------------------------------------------------------------------------------------------
        pairs = split_pairs(ds, events, user_pos, item_pos, seed=cfg.fusion.seed)
        n_u, n_i = len(user_ids), len(item_ids)
        tr, va, te = (pairs[pairs["split"] == c] for c in (0, 1, 2))
        codes = event_split_codes(events, pairs, user_pos, item_pos)  # per event row: its pair's split
        logger.info("pairs: train %d, valid %d, test %d", len(tr), len(va), len(te))
        if len(tr) == 0:
            raise DataError(f"{ds.root}: no training interactions; the dataset needs events")

        # 3. encoders ------------------------------------------------------------------------------------------
        t1 = time.perf_counter()
        text_enc, clip_enc = encoders if encoders is not None else build_encoders(cfg, ds)
        embeddings = encode_items(ds, text_enc, clip_enc, cfg)
        text, image, image_present = aligned_content(embeddings, item_ids)
        timings["encode_s"] = time.perf_counter() - t1

        # 4. GNN + fusion --------------------------------------------------------------------------------------
        t2 = time.perf_counter()
        model = train_model(
            n_u, n_i, tr["u"].to_numpy(), tr["i"].to_numpy(),
            graph=training_graph(hetero, id_maps, events, pairs, cfg.kg.also_bought_min_count, codes), text=text,
            image=image,
            image_present=image_present,
            valid=(va["u"].to_numpy(), va["i"].to_numpy()) if len(va) else None,
            config=cfg.fusion, progress=progress,
        )
        timings["train_gnn_s"] = time.perf_counter() - t2

        items_df = ds.items
        rec = cls(
            config=cfg, user_ids=user_ids, item_ids=item_ids, model=model, ranker=None, store=store,
            embeddings=embeddings, items=items_df, events=events, hetero=hetero, id_maps=id_maps,
            dataset_root=ds.root, encoder_spec=_encoder_spec(cfg, text_enc, clip_enc, custom=encoders is not None),
            data_fingerprint=ds.fingerprint,
        )
        rec._text_encoder, rec._clip_encoder = text_enc, clip_enc

        # 5. ranker on valid labels, features from train-only history; 6. evaluation on test ---------------------
        timings.update(rec._rank_and_evaluate(events, pairs, codes))
        timings["total_s"] = time.perf_counter() - t0
        rec.metrics["timings"] = timings
        rec.metrics["counts"] = {"users": n_u, "items": n_i, "train_pairs": len(tr), "valid_pairs": len(va),
                                 "test_pairs": len(te), "events": len(events)}
        return rec

    def refit_ranker(self, ranking: RankingConfig | None = None, *,
                     dataset: Dataset | str | Path | None = None) -> dict[str, Any]:
        """Retrain only the LightGBM re-ranker, the GNN, encoders and graph unchanged, and evaluate on test again.

        The split is the one :meth:`fit` used (recomputed from ``dataset``, by default the one the model was trained
        on): the ranker learns from the valid events of users whose GNN candidates contain them, with features from
        the train history, exactly as in :meth:`fit`. ``ranking`` replaces ``config.ranking`` (another tree size,
        candidate count, ...). Updates :attr:`ranker` and :attr:`metrics` (``ranker_training``, ``test``) and returns
        ``{"ranker_training": report or None, "test": metrics or None, "timings": {...}}``; ``save`` it afterwards
        to keep it. The ranker is ``None`` afterwards when there is nothing to learn from (no valid events).
        """
        ds = dataset if dataset is not None else self.dataset_root
        if ds is None:
            raise DataError("refit_ranker needs the dataset the model was trained on; pass dataset=...")
        ds = ds if isinstance(ds, Dataset) else Dataset.open(ds)
        if self.data_fingerprint and ds.fingerprint != self.data_fingerprint:
            logger.warning("refit_ranker: %s is not the dataset this model was trained on (fingerprints differ); "
                           "its split decides the ranker's labels and the test metrics", ds.root)
        if ranking is not None:
            self.config.ranking = RankingConfig.model_validate(ranking.model_dump())
        events = ds.events
        pairs = split_pairs(ds, events, self.user_pos, self.item_pos, seed=self.config.fusion.seed)
        timings = self._rank_and_evaluate(events, pairs)
        self.metrics.setdefault("timings", {}).update(timings)
        return {"ranker_training": self.metrics.get("ranker_training"), "test": self.metrics.get("test"),
                "timings": timings}

    def _rank_and_evaluate(self, events: pd.DataFrame, pairs: pd.DataFrame, ev_split: np.ndarray | None = None
                           ) -> dict[str, float]:
        """Fit the ranker on valid labels (features from the train history) and evaluate on test (fit's steps 5
        and 6); replaces the ranker, its training report and the test metrics. Returns the two stages' seconds.
        ``ev_split``: the events' split codes when the caller already has them (``event_split_codes``)."""
        tr, va, te = (pairs[pairs["split"] == c] for c in (0, 1, 2))
        self.ranker = None  # the setter drops the serving caches built for the old ranker's columns
        self.metrics.pop("ranker_training", None)
        self.metrics.pop("test", None)
        t0 = time.perf_counter()
        if ev_split is None:
            ev_split = event_split_codes(events, pairs, self.user_pos, self.item_pos)
        if len(va) or "fold" in self.config.ranking.label_source:
            self.ranker = self._fit_ranker(events, ev_split, pairs)
        t1 = time.perf_counter()
        if len(te):
            self.metrics.update(self._evaluate(events[ev_split <= 1], tr, va, te))
        return {"train_ranker_s": t1 - t0, "evaluate_s": time.perf_counter() - t1}

    def _context_for(self, events: pd.DataFrame, model: Any = None) -> Any:
        """Ranking context with ``events`` as the history and ``model``'s vectors (default: the fitted GNN)."""
        from ranking.context import RankingContext

        own = model is None
        model = self.model if own else model

        hetero = interaction_view(self.hetero, self.id_maps, events, self.config.kg.also_bought_min_count)
        text, image, _ = aligned_content(self.embeddings, self.item_ids)
        ctx = RankingContext.from_hetero(
            hetero, self.id_maps,
            user_vectors=model.user_embeddings, item_vectors=model.item_embeddings,
            user_ids=self.user_ids, item_ids=self.item_ids,
            item_text=text, item_image=image, modality_weights=model.modality_weights,
            items=self.items.reset_index(drop=True), events=events,
            columns=self.ranker.feature_names if self.ranker is not None else self.config.ranking.feature_names,
        )
        ctx.retrieval_scorer = self._retrieval_scores if own else (
            lambda users, candidates: _model_scores(model, users, candidates))
        return ctx

    def _retrieval_scores(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(n, C) retrieval-model scores (embeddings + hybrid item-item term) of each user's candidates."""
        out = np.empty(candidates.shape, dtype=np.float32)
        memo = getattr(self._scores_memo, "value", None)
        self._scores_memo.value = None
        if memo is not None and len(users) <= _MEMO_USERS and memo[0] == np.asarray(users, dtype=np.int64).tobytes():
            # the same users' scores that _candidates just computed (same product shape: the same numbers)
            out[:] = np.take_along_axis(memo[1], np.maximum(candidates, 0), axis=1)
            return out
        return _model_scores(self.model, users, candidates, out)

    def _candidates(self, users: np.ndarray, exclude: sp.csr_matrix | None, c: int, model: Any = None) -> np.ndarray:
        """(n, c) top GNN items per user (``exclude``: (U, I) CSR over all users; -1 pads when too few);
        ``model``: another retrieval model than the fitted one (its scores are not memoised)."""
        from fusion.retrieve import topk_from_scores

        own = model is None
        model = self.model if own else model
        out = []
        for s in range(0, len(users), 512):
            b = users[s : s + 512]
            scores = model.score_all(b)
            if own and len(users) <= _MEMO_USERS:  # kept for _retrieval_scores (the gnn_score feature) on this thread
                self._scores_memo.value = (np.asarray(b, dtype=np.int64).tobytes(), scores.numpy())
            idx, _ = topk_from_scores(scores, c, None if exclude is None else exclude[b])
            out.append(idx)
        return np.concatenate(out) if out else np.zeros((0, c), dtype=np.int64)

    def _fit_ranker(self, events: pd.DataFrame, ev_split: np.ndarray, pairs: pd.DataFrame) -> Any:
        """LightGBM LambdaRank on the GNN's candidates for users with valid events (features: train history only),
        and / or on a held-out fold of train (``ranking.label_source``, ``_fold_inputs``). Without valid events the
        fold's users also choose the tree count (``ranking.cv_folds``)."""
        from ranking.features import FeatureBuilder
        from ranking.ranker import build_training_set
        from ranking.train import fit_ranker

        cfg = self.config.ranking
        tr = pairs[pairs["split"] == 0]
        valid_events = events[ev_split == 1]
        users = np.unique(valid_events["user_id"].astype(str).map(self.user_pos).dropna().astype(np.int64))
        fold, fold_report = None, None
        if "fold" in cfg.label_source:
            fold, fold_report = self._fold_inputs(events, ev_split, pairs)
        try:
            if len(users):
                builder = FeatureBuilder(self._context_for(events[ev_split == 0]), cfg.feature_names)
                train_csr = _to_csr(tr["u"], tr["i"], (len(self.user_ids), len(self.item_ids)))
                cand = self._candidates(users, train_csr, min(cfg.num_candidates, len(self.item_ids)))
                extra = [] if fold is None else [("fold", build_training_set(*fold))]
                ranker, report = fit_ranker(builder, users, cand, valid_events, config=cfg, extra_train=extra,
                                            learn_from_heldout="valid" in cfg.label_source or fold is None)
            elif fold is not None:
                logger.info("no valid events: the ranker learns from the train fold and its users choose the tree count")
                ranker, report = fit_ranker(*fold, config=cfg)
            else:
                raise DataError("no valid events and no train fold to learn from")
        except DataError as exc:
            logger.warning("no ranker: %s", exc)
            return None
        if fold_report is not None:
            report["fold"] = fold_report
        self.metrics["ranker_training"] = report
        return ranker

    def _fold_inputs(self, events: pd.DataFrame, ev_split: np.ndarray, pairs: pd.DataFrame
                     ) -> tuple[tuple[Any, np.ndarray, np.ndarray, pd.DataFrame] | None, dict[str, Any]]:
        """A held-out fold of train for the ranker to learn from: the GNN refitted (same config, the epochs the
        fitted GNN kept, its EASE setting) on the rest of train. Returns ``((feature builder over the rest's
        history and the refitted GNN, users with fold pairs, their candidates, the fold's events) or None, report)``.
        """
        from fusion.train import add_ease_term, train_model
        from ranking.features import FeatureBuilder

        t0 = time.perf_counter()
        cfg = self.config
        tr = pairs[pairs["split"] == 0].reset_index(drop=True)
        n_va = int((pairs["split"] == 1).sum())
        kind = cfg.ranking.fold_split
        if kind == "auto":
            kind = "temporal" if split_is_temporal(pairs) else "random"
        share = cfg.ranking.fold_share or (n_va / (len(tr) + n_va) if n_va else 0.1)
        hold = fold_holdout(tr, kind, share, seed=cfg.ranking.seed)
        report: dict[str, Any] = {"split": kind, "share": round(float(share), 4), "held_pairs": int(hold.sum()),
                                  "users": int(tr.loc[hold, "u"].nunique())}
        if not hold.any():
            logger.warning("ranker fold: no train pairs to hold out (%s, share %.2f: a user needs %d train pairs); "
                           "the ranker learns from the valid events only", kind, share, int(np.ceil(1 / share)))
            return None, report
        train_events = events[ev_split == 0]
        fold_pairs = tr.assign(split=np.where(hold, 1, 0).astype(np.int8))
        codes = event_split_codes(train_events, fold_pairs, self.user_pos, self.item_pos)
        rest_events, fold_events = train_events[codes == 0], train_events[codes == 1]
        rest = tr[~hold]
        n_u, n_i = len(self.user_ids), len(self.item_ids)
        text, image, present = aligned_content(self.embeddings, self.item_ids)
        epochs = max(1, self.model.kept_epochs)
        model = train_model(
            n_u, n_i, rest["u"].to_numpy(), rest["i"].to_numpy(),
            graph=interaction_view(self.hetero, self.id_maps, rest_events, cfg.kg.also_bought_min_count),
            text=text, image=image, image_present=present, valid=None,
            config=cfg.fusion.with_epochs(epochs),
            progress=False,
        )
        if self.model.item_item is not None and self.model.hybrid_weight:
            held = _to_csr(tr.loc[hold, "u"], tr.loc[hold, "i"], (n_u, n_i))  # users the EASE scale is measured on
            rel = self.model.hybrid_relative_weight  # None: a model saved before it was kept; its absolute weight
            add_ease_term(model, held, cfg.fusion, setting=(self.model.ease_lambda, 1.0 if rel is None else rel),
                          absolute_weight=self.model.hybrid_weight if rel is None else None)
        builder = FeatureBuilder(self._context_for(rest_events, model), cfg.ranking.feature_names)
        users = np.unique(tr.loc[hold, "u"].to_numpy())
        rest_csr = _to_csr(rest["u"], rest["i"], (n_u, n_i))
        cand = self._candidates(users, rest_csr, min(cfg.ranking.num_candidates, n_i), model=model)
        report.update(gnn_epochs=int(epochs), seconds=round(time.perf_counter() - t0, 2))
        logger.info("ranker fold: %d of %d train pairs held out (%s, share %.2f) from %d users; GNN refitted on the "
                    "rest (%d epochs, %.1fs)", report["held_pairs"], len(tr), kind, share, report["users"], epochs,
                    report["seconds"])
        return (builder, users, cand, fold_events), report

    def _evaluate(self, history_events: pd.DataFrame, tr: pd.DataFrame, va: pd.DataFrame, te: pd.DataFrame) -> dict[str, Any]:
        """Test metrics (RecBole definitions, train+valid masked) for baselines, the GNN and GNN + ranker."""
        import torch

        from fusion.baselines import EASE, Popularity
        from fusion.metrics import evaluate, rank_metrics
        from ranking.features import FeatureBuilder

        shape = (len(self.user_ids), len(self.item_ids))
        train_csr = _to_csr(tr["u"], tr["i"], shape)
        seen = _to_csr(np.r_[tr["u"], va["u"]], np.r_[tr["i"], va["i"]], shape)
        test = _to_csr(te["u"], te["i"], shape)
        rows: dict[str, dict[str, float]] = {}
        baselines = [("popularity", Popularity())]
        if len(self.item_ids) <= 20_000:  # EASE inverts an (I, I) matrix
            baselines.append(("ease", EASE()))
        for name, base in baselines:
            try:
                base.fit(train_csr)
                rows[name] = evaluate(lambda u, b=base: torch.as_tensor(b.score(u.numpy())), test, seen, KS)
            except Exception as exc:  # a baseline must never break training
                logger.warning("baseline %s failed: %s", name, exc)
        rows["gnn"] = evaluate(lambda u: self.model.score_all(u), test, seen, KS)
        if self.ranker is not None:
            ctx = self._context_for(history_events)
            builder = FeatureBuilder(ctx, self.ranker.feature_names)
            users = np.flatnonzero(np.diff(test.indptr) > 0)
            c = min(self.config.ranking.num_candidates, len(self.item_ids))
            cand = self._candidates(users, seen, c)
            reranked = np.full((len(users), max(KS)), -1, dtype=np.int64)  # -1: fewer candidates than k
            for s in range(0, len(users), 256):
                fm = builder.build(users[s : s + 256], cand[s : s + 256])
                sc = self.ranker.predict(fm).reshape(-1, c)
                sc[cand[s : s + 256] < 0] = -np.inf
                top = np.argsort(-sc, axis=1, kind="stable")[:, : max(KS)]
                reranked[s : s + 256, : top.shape[1]] = np.take_along_axis(cand[s : s + 256], top, axis=1)
            truth = test[users]
            hits = np.zeros(reranked.shape, dtype=bool)
            for r in range(len(users)):
                hits[r] = np.isin(reranked[r], truth.indices[truth.indptr[r] : truth.indptr[r + 1]])
            vals = rank_metrics(hits, np.diff(truth.indptr), KS)
            rows["gnn+ranker"] = {k: float(np.mean(v)) for k, v in vals.items()}
            for k in KS:
                top_k = reranked[:, :k]
                rows["gnn+ranker"][f"item_coverage@{k}"] = len(np.unique(top_k[top_k >= 0])) / len(self.item_ids)
        return {"test": rows}

    # ------------------------------------------------------------------------------------------------ serving
    @property
    def ranker(self) -> Any:
        """The LightGBM re-ranker (``ranking.ranker.Ranker``), or None: recommendations in retrieval order."""
        return self._ranker

    @ranker.setter
    def ranker(self, value: Any) -> None:
        # the serving context, feature builder and explainer follow the ranker's columns: rebuilt on next use
        self._ranker = value
        self._context = self._builder = self._explainer = None

    @property
    def context(self) -> Any:
        """Ranking context over every event (serving history)."""
        if self._context is None:
            self._context = self._context_for(self.events)
        return self._context

    @property
    def seen(self) -> sp.csr_matrix:
        """(U, I) CSR of every (user, item) with any event: excluded from recommendations."""
        if self._seen is None:
            p = _event_pairs(self.events, self.user_pos, self.item_pos)
            self._seen = _to_csr(p["u"], p["i"], (len(self.user_ids), len(self.item_ids)))
        return self._seen

    @property
    def explainer(self) -> Any:
        if self._explainer is None:
            if self.ranker is None:
                raise BundleError("this model has no trained ranker (no validation events); explanations need one")
            from ranking.explain import Explainer

            self._explainer = Explainer(self.context, self.ranker, self.store, config=self.config.ranking,
                                        builder=self.feature_builder)
        return self._explainer

    @property
    def feature_builder(self) -> Any:
        """The ranking :class:`~ranking.features.FeatureBuilder` over :attr:`context`, built once per context (its
        set-up transposes the (users, items) history: tens of milliseconds at 100,000 items)."""
        ctx = self.context  # a new ranker drops both (the ``ranker`` setter): the builder follows its columns
        if self._builder is None or self._builder.ctx is not ctx:
            from ranking.features import FeatureBuilder

            self._builder = FeatureBuilder(ctx, None if self.ranker is None else self.ranker.feature_names)
        return self._builder

    def has_history(self, user_id: str) -> bool:
        """Whether ``user_id`` is a known user with at least one event: such users get personal recommendations
        and explanations; the others (unknown, or listed without events, whose vector is untrained) need a query."""
        u = self.user_pos.get(user_id)
        return u is not None and self.seen.indptr[u + 1] > self.seen.indptr[u]

    def _user_index(self, user_id: str, hint: bool = True) -> int:
        if user_id not in self.user_pos:
            # said in words that fit the Python API, the CLI and HTTP alike (all three show this message)
            raise UnknownIdError(f"unknown user {user_id!r}: not in the training data" + (
                "; a user without history is served from a text query or a few chosen items (search, a "
                "recommendation with a query, or one from items)" if hint else ""))
        return self.user_pos[user_id]

    def _item_index(self, item_id: str) -> int:
        if item_id not in self.item_pos:
            raise UnknownIdError(f"unknown item {item_id!r}: not in the catalog of this bundle")
        return self.item_pos[item_id]

    def _display_columns(self) -> tuple[list[str], list[str | None]]:
        """(titles, images) per dense item index from the catalog ("" / None when unknown), built once per catalog."""
        key = (len(self.item_ids), id(self.items))
        if self._display is None or self._display[0] != key:
            items = self.items[~self.items.index.duplicated()]

            def column(name: str) -> list[Any]:
                if name not in items:
                    return [None] * len(self.item_ids)
                return items[name].reindex(self.item_ids).tolist()

            titles = ["" if pd.isna(v) else str(v) for v in column("title")]
            images = [None if pd.isna(v) else str(v) for v in column("image")]
            self._display = (key, titles, images)
        return self._display[1], self._display[2]

    def _result(self, i: int, score: float, rank: int, **kw: Any) -> Recommendation:
        titles, images = self._display_columns()
        return Recommendation(item_id=self.item_ids[i], score=float(score), rank=rank, title=titles[i],
                              image=images[i], **kw)

    def recommend(self, user_id: str | None, k: int = 10, query: str | None = None, explain: bool = False,
                  exclude_seen: bool = True) -> list[Recommendation]:
        """Top-``k`` items for a user: GNN candidates (plus query matches when ``query`` is given), re-ranked by
        the LightGBM ranker, optionally explained. A user without history (unknown, or known without events)
        needs a ``query``. With a query, the list is ordered by ``z(ranker score) + ranking.query_weight *
        z(query match)`` over the candidates (z: per-list standard score); ``score`` is that sum and ``sources``
        holds its two parts (``ranker``, ``query``); an explanation explains the ranker part."""
        if k < 1:
            raise DataError(f"k must be at least 1, got {k}")
        if user_id is None or (query and not self.has_history(user_id)):
            if not query:
                raise DataError("recommend needs a user id or a query")
            return self.search(text=query, k=k)
        u = self._user_index(user_id)
        if not self.has_history(user_id):
            raise DataError(f"user {user_id!r} has no events, so no trained vector: pass query=... or use "
                            "search / similar")
        c = min(max(self.config.ranking.num_candidates, k), len(self.item_ids))
        exclude = self.seen if exclude_seen else None
        cand = self._candidates(np.array([u]), exclude, c)[0]
        qvec = None
        if query:
            qvec = self._query_text_vector(query)
            qscores, _ = self._search_scores(text=query)
            if exclude is not None:
                qscores[exclude[u].indices] = -np.inf
            extra = top_k_stable(qscores, c)
            cand = np.unique(np.r_[cand[cand >= 0], extra[np.isfinite(qscores[extra])]])
        cand = cand[cand >= 0]
        if not len(cand):  # the user has seen every item
            return []
        if self.ranker is None:
            scores = self.model.score(np.full(len(cand), u), cand)
            X = None
        else:
            fm = self.feature_builder.build(np.array([u]), cand.reshape(1, -1), qvec)
            X = fm.X
            scores = self.ranker.predict(fm)
        parts: dict[str, np.ndarray] = {}
        if query:
            match = qscores[cand]
            parts = {"ranker": scores, "query": match}
            scores = _zscore(scores) + self.config.ranking.query_weight * _zscore(match)
        order = np.argsort(-scores, kind="stable")[:k]
        out = [self._result(int(cand[j]), scores[j], r + 1, sources={n: float(v[j]) for n, v in parts.items()})
               for r, j in enumerate(order)]
        if explain and self.ranker is not None:
            exps = self.explainer.explain_rows(u, cand[order], X[order])
            for rec, e in zip(out, exps):
                rec.explanation = e.to_dict()
        return out

    def recommend_from_items(self, item_ids: Sequence[str], k: int = 10, exclude_chosen: bool = True
                             ) -> list[Recommendation]:
        """Top-``k`` items for someone without history who picked a few items (onboarding, a wish list): the
        user vector is the mean of the chosen items' vectors (``TrainedModel.user_vector_from_items``), scored
        against every item by dot product, as a trained user's vector is; the chosen items are left out unless
        ``exclude_chosen`` is False."""
        if k < 1:
            raise DataError(f"k must be at least 1, got {k}")
        if not len(item_ids):
            raise DataError("recommend_from_items needs at least one item id")
        chosen = np.array([self._item_index(i) for i in item_ids], dtype=np.int64)
        scores = self.model.item_embeddings @ self.model.user_vector_from_items(chosen)
        if exclude_chosen:
            scores[chosen] = -np.inf
        top = top_k_stable(scores, min(k, len(scores)))
        return [self._result(int(j), scores[j], r + 1) for r, j in enumerate(t for t in top if np.isfinite(scores[t]))]

    def recommend_batch(self, user_ids: Sequence[str], k: int | Sequence[int] = 10, explain: bool = False
                        ) -> list[list[Recommendation]]:
        """``recommend(u, k, explain=explain)`` for many known users at once (the service batches concurrent
        requests): one candidate product, one feature build and one LightGBM call for the whole batch, so the
        per-call overheads are paid once. Results equal :meth:`recommend`'s up to float rounding of the batched
        GNN product (~1e-6 on the gnn_score feature). Unknown users raise ``UnknownIdError``.
        """
        ks = [int(k)] * len(user_ids) if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        if len(ks) != len(user_ids):
            raise DataError(f"recommend_batch got {len(user_ids)} users but {len(ks)} values of k")
        if any(x < 1 for x in ks):
            raise DataError(f"k must be at least 1, got {min(ks)}")
        users = np.array([self._user_index(u) for u in user_ids], dtype=np.int64)
        indptr = self.seen.indptr
        for u, ui in zip(user_ids, users):
            if indptr[ui + 1] == indptr[ui]:
                raise DataError(f"user {u!r} has no events, so no trained vector: pass query=... to recommend")
        out: list[list[Recommendation] | None] = [None] * len(user_ids)
        if self.ranker is None or len(users) <= 1:
            return [self.recommend(u, kk, explain=explain) for u, kk in zip(user_ids, ks)]
        n_items = len(self.item_ids)
        sizes = np.array([min(max(self.config.ranking.num_candidates, kk), n_items) for kk in ks])
        for c in np.unique(sizes):
            rows = np.flatnonzero(sizes == c)
            cand = self._candidates(users[rows], self.seen, int(c))
            full = (cand >= 0).all(axis=1)  # users with fewer unseen items than C go one by one
            for r in rows[~full]:
                out[r] = self.recommend(user_ids[r], ks[r], explain=explain)
            rows, cand = rows[full], cand[full]
            if not len(rows):
                continue
            fm = self.feature_builder.build(users[rows], cand)
            scores = self.ranker.predict(fm, num_threads=1).reshape(len(rows), int(c))
            for b, r in enumerate(rows):
                order = np.argsort(-scores[b], kind="stable")[: ks[r]]
                recs = [self._result(int(cand[b, j]), scores[b, j], n + 1) for n, j in enumerate(order)]
                if explain:
                    X = fm.X[b * int(c) : (b + 1) * int(c)]
                    for rec, e in zip(recs, self.explainer.explain_rows(int(users[r]), cand[b, order], X[order])):
                        rec.explanation = e.to_dict()
                out[r] = recs
        return out  # type: ignore[return-value]

    def explain(self, user_id: str, item_id: str, query: str | None = None) -> Any:
        """The :class:`ranking.explain.Explanation` of why ``item_id`` suits ``user_id``. For an item that is not
        among the user's recommendations (the re-ranked ``ranking.num_candidates``, steered by ``query`` if given)
        the sentence says so — already in the history, or not among the candidates — instead of "is recommended"."""
        u = self._user_index(user_id, hint=False)
        i = self._item_index(item_id)
        qvec = self._query_text_vector(query) if query else None
        e = self.explainer.explain(user_id, item_id, query_vector=qvec)
        if not self.has_history(user_id):
            return e
        if self.seen[u, i]:
            return e.with_standing("is already in your history, so it is not recommended again")
        c = min(self.config.ranking.num_candidates, len(self.item_ids))
        # without a query the recommendable items are exactly the retrieval candidates (no ranker pass needed);
        # a query adds its own matches, so then the steered list is asked
        listed = (i in self._candidates(np.array([u]), self.seen, c)[0] if not query
                  else item_id in {r.item_id for r in self.recommend(user_id, c, query=query)})
        if not listed:
            return e.with_standing(f"is not among your top {c} candidates, so it is not recommended")
        return e

    def similar(self, item_id: str, k: int = 10) -> list[Recommendation]:
        """Items closest to ``item_id`` by the fused GNN item vectors (cosine), itself excluded."""
        i = self._item_index(item_id)
        idx, sc = self.model.similar_items(i, k)
        idx, sc = np.atleast_2d(idx)[0], np.atleast_2d(sc)[0]
        return [self._result(int(j), s, r + 1) for r, (j, s) in enumerate(zip(idx, sc)) if j >= 0]

    # ------------------------------------------------------------------------------------------------ search
    def _item_order(self) -> np.ndarray:
        pos = _index(self.embeddings.item_ids)
        return np.array([pos[i] for i in self.item_ids], dtype=np.int64)

    @property
    def text_encoder(self) -> Any:
        if self._text_encoder is None:
            self._text_encoder, self._clip_encoder = build_encoders(self.config, None, spec=self.encoder_spec,
                                                                    bundle=self._bundle_path)
        return self._text_encoder

    @property
    def clip_encoder(self) -> Any:
        if self._clip_encoder is None:
            _ = self.text_encoder
        return self._clip_encoder

    def _query_text_vector(self, text: str) -> np.ndarray | None:
        if self.text_encoder is None or not self.embeddings.text.shape[1]:
            return None
        return self._query_vectors("text", [text])[0]

    def _query_vectors(self, kind: str, texts: Sequence[str], bf16: bool = False) -> list[np.ndarray]:
        """Query vectors of ``texts`` by the text encoder (``kind="text"``) or the CLIP text tower (``"clip"``).

        The last ``QUERY_CACHE_SIZE`` distinct texts per encoder are kept (read-only arrays); the texts not cached
        are encoded in one call. ``bf16``: the encoder runs under CPU bfloat16 autocast (an approximation, see
        ``serve.query_bf16``; cached apart from the float32 vectors). Thread-safe.
        """
        key = f"{kind}:bf16" if bf16 else kind
        out: list[np.ndarray | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        with self._query_lock:
            for r, t in enumerate(texts):
                v = self._query_cache.get((key, t))
                if v is None:
                    todo.setdefault(t, []).append(r)
                else:
                    self._query_cache.move_to_end((key, t))
                    out[r] = v
        if todo:
            import torch

            fresh = list(todo)
            onnx = None if bf16 else self._onnx_queries.get(kind)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if onnx is not None:
                    vecs = onnx.encode(fresh)
                elif kind == "text":
                    vecs = np.asarray(self.text_encoder.encode(fresh), dtype=np.float32)
                else:
                    vecs = encode_clip_queries(self.clip_encoder, fresh)
            with self._query_lock:
                for t, v in zip(fresh, vecs):
                    v = np.asarray(v, dtype=np.float32).copy()
                    v.setflags(write=False)
                    self._query_cache[(key, t)] = v
                    for r in todo[t]:
                        out[r] = v
                while len(self._query_cache) > QUERY_CACHE_SIZE:
                    self._query_cache.popitem(last=False)
        return out  # type: ignore[return-value]

    def use_onnx_queries(self, threads: int = 1) -> dict[str, float]:
        """Encode text queries (BERT and CLIP text tower) with ONNX Runtime instead of torch, on CPU.

        Each ONNX encoder is checked at construction against torch on probe texts (max abs difference <= 1e-5;
        ~2e-7 measured); one that cannot be built is logged and its queries stay on torch (see
        :mod:`encoders.onnx`). Cached query vectors are dropped. Returns ``{kind: max abs difference}`` of the
        encoders in use. ``serve.query_runtime: onnx`` (the default) calls this when the service starts.
        """
        from encoders.onnx import onnx_query_encoders

        encoders = onnx_query_encoders(self.text_encoder, self.clip_encoder, threads=threads)
        with self._query_lock:
            self._onnx_queries = encoders
            self._query_cache.clear()
        return {kind: enc.max_abs_diff for kind, enc in encoders.items()}

    @property
    def aligned_vectors(self) -> dict[str, np.ndarray]:
        """Item text / image vectors and image presence in the model's item order (computed once, not per query).

        The (I, dim) matrices are stored column-major (a C-contiguous (dim, I) array, transposed): a batch of
        queries is scored as ``Q @ vec["text"].T``, a product with a contiguous (dim, I) right-hand side, which
        BLAS runs ~1.5x faster at 100,000 items than with the row-major (I, dim) matrix transposed.
        """
        if self._aligned is None:
            order = self._item_order()
            self._aligned = {"text": np.ascontiguousarray(self.embeddings.text[order].T).T,
                             "image": np.ascontiguousarray(self.embeddings.image[order].T).T,
                             "has_image": self.embeddings.has_image[order]}
        return self._aligned

    def _text_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (dim,) and centred second moment (dim, dim) of the item text vectors, float64 (computed once).

        For a query q the similarities s_i = q . x_i have mean q . mu and variance q^T C q (C the population
        covariance of the x_i): the z-score of a few chosen items needs no pass over all I similarities.
        """
        vec = self.aligned_vectors
        if "text_moments" not in vec:
            vec["text_moments"] = _column_moments(vec["text"].T)
        return vec["text_moments"]

    def _image_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and centred second moment (float64) of the image vectors of the items that have an image."""
        vec = self.aligned_vectors
        if "image_moments" not in vec:
            vec["image_moments"] = _column_moments(vec["image"].T, np.flatnonzero(vec["has_image"]))
        return vec["image_moments"]

    def _max_norms(self) -> tuple[float, float]:
        """Largest L2 norm of an item text vector and of an item image vector (bounds for rounding errors)."""
        vec = self.aligned_vectors
        if "max_norms" not in vec:
            vec["max_norms"] = tuple(float(np.sqrt(np.max(np.einsum("di,di->i", m.T, m.T), initial=0.0)))
                                     for m in (vec["text"], vec["image"]))
        return vec["max_norms"]

    def _image_index(self) -> np.ndarray:
        """Positions of the items with an image (and, as ``aligned_vectors["no_image"]``, of those without)."""
        vec = self.aligned_vectors
        if "image_idx" not in vec:
            vec["no_image"] = np.flatnonzero(~vec["has_image"])
            vec["image_idx"] = np.flatnonzero(vec["has_image"])
        return vec["image_idx"]

    def _two_space_moments(self, q64: np.ndarray, p64: np.ndarray, floor: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean_s, sd_s, mean_f, sd_f), (n,) float64 each: mean and spread over all items of each query's text
        similarities (from the text moments) and of its CLIP similarities with items without an image set to
        ``floor`` (the image moments mixed with that constant)."""
        has = self.aligned_vectors["has_image"]
        n_img, n_items = int(has.sum()), len(has)
        mu_t, cov_t = self._text_moments()
        mean_s = q64 @ mu_t
        sd_s = np.sqrt(np.maximum(np.einsum("nd,nd->n", q64 @ cov_t, q64), 0.0))
        mu_y, cov_y = self._image_moments()
        mean_img = p64 @ mu_y
        var_img = np.maximum(np.einsum("nd,nd->n", p64 @ cov_y, p64), 0.0)
        fl64 = floor.astype(np.float64)
        mean_f = (n_img * mean_img + (n_items - n_img) * fl64) / n_items
        sd_f = np.sqrt(np.maximum((n_img * (var_img + (mean_img - mean_f) ** 2)
                                   + (n_items - n_img) * (fl64 - mean_f) ** 2) / n_items, 0.0))
        return mean_s, sd_s, mean_f, sd_f

    def _int8_items(self) -> dict[str, Any] | None:
        """Per-item int8 copies of the text and image matrices for a coarse first pass, or None when unusable.

        One :func:`_int8_matrix` per matrix (int8 rows with per-item scales, the residual norms that bound a
        product's error in :func:`_int8_coarse`, a row-major float32 copy for the exact rescoring of candidates).
        None when a matrix has a non-finite value, more than 1,040 dimensions (int32 sums could round in float32)
        or ``torch._int_mm`` is missing.
        """
        vec = self.aligned_vectors
        if "int8" not in vec:
            import torch

            out: dict[str, Any] | None = {}
            for name in ("text", "image"):
                m = np.ascontiguousarray(vec[name], dtype=np.float32)
                if not np.isfinite(m).all() or not hasattr(torch, "_int_mm") or m.shape[1] > 1040:
                    out = None
                    break
                used = vec["has_image"] if name == "image" else np.ones(len(m), dtype=bool)
                out[name] = _int8_matrix(m, used)
            vec["int8"] = out
        return vec["int8"]

    def _search_scores(self, text: str | None = None, image: Any = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(I,) combined z-scored similarities (BERT text space + CLIP text->image, image->image) and the raw
        per-source similarities. Thread-safe: nothing is stored on the instance."""
        vec = self.aligned_vectors
        parts: list[np.ndarray] = []
        sources: dict[str, np.ndarray] = {}
        if text:
            rows, row_sources = self._text_query_parts([text])
            parts = [p[0] for p in rows]
            sources = {n: v[0] for n, v in row_sources.items()}
        if image is not None:
            if self.clip_encoder is None or not vec["image"].shape[1]:
                raise DataError("image search needs a CLIP encoder in the bundle")
            vecs, status = self.clip_encoder.encode_images_with_status([image])
            if status[0]:
                raise DataError(f"the query image cannot be used: {status[0]}")
            s = vec["image"] @ vecs[0]
            sources["image"] = s
            parts.append(_zscore(s))
        if not parts:
            raise DataError("search needs text or an image")
        return _mean_parts(parts), sources

    def _text_search_sources(self) -> tuple[bool, bool]:
        """(BERT text space usable, CLIP text->image usable) for text queries."""
        vec = self.aligned_vectors
        return (self.text_encoder is not None and bool(vec["text"].shape[1]),
                self.clip_encoder is not None and bool(vec["image"].shape[1]))

    def _clip_part_is_zero(self) -> bool:
        """True when no item has an image. The CLIP text->image part of a text query is then exactly zero for
        every query (every item gets the same fill value, whose z-score is 0): it still counts in the mean of the
        parts (scores are unchanged) but the CLIP text tower and the (I, dim) product are skipped."""
        return not bool(self.aligned_vectors["has_image"].any())

    def _text_query_parts(self, texts: Sequence[str], bf16: bool = False
                          ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """z-scored parts ((n, I) float64 each) and raw per-source similarities ((n, I) float32) of text queries.

        One (n, dim) x (dim, I) product per signal; then, row by row with the same reductions as for one query:
        the BERT similarities z-scored; the CLIP text->image similarities with items without an image set to NaN,
        NaN filled with the row's minimum, z-scored.
        """
        use_text, use_clip = self._text_search_sources()
        vec = self.aligned_vectors
        parts: list[np.ndarray] = []
        sources: dict[str, np.ndarray] = {}
        if use_text:
            s = np.stack(self._query_vectors("text", texts, bf16)) @ vec["text"].T
            sources["text"] = s
            parts.append(_zscore_rows(s))
        if use_clip and self._clip_part_is_zero():  # no signal, no per-source similarity (all NaN before)
            parts.append(np.zeros((len(texts), vec["image"].shape[0]), dtype=np.float64))
        elif use_clip:
            s = np.stack(self._query_vectors("clip", texts, bf16)) @ vec["image"].T
            image_idx = self._image_index()
            s[:, vec["no_image"]] = np.nan
            sources["clip_image"] = s
            with_image = s[:, image_idx]
            if np.isfinite(with_image).all():  # the usual case: NaN exactly where there is no image
                floor = (with_image.min(axis=1) if with_image.shape[1] else np.zeros(len(s))).astype(s.dtype)
                filled = s.copy()
                filled[:, vec["no_image"]] = floor[:, None]
                parts.append(_zscore_rows(filled))  # finite in, finite out: nan_to_num has nothing to do
            else:
                finite = np.isfinite(s).any(axis=1)
                with np.errstate(all="ignore"), _quiet_all_nan():
                    floor = np.where(finite, np.nanmin(s, axis=1), 0.0).astype(s.dtype)
                filled = np.where(np.isnan(s), floor[:, None], s)
                parts.append(np.nan_to_num(_zscore_rows(np.nan_to_num(filled, copy=False)), nan=0.0, copy=False))
        if not parts:
            raise DataError("search needs text or an image")
        return parts, sources

    def _found(self, scores: np.ndarray, sources: dict[str, np.ndarray], k: int) -> list[Recommendation]:
        return [
            self._result(int(i), scores[i], r + 1,
                         sources={n: float(v[i]) for n, v in sources.items() if np.isfinite(v[i])})
            for r, i in enumerate(top_k_stable(scores, k))
        ]

    def search(self, text: str | None = None, image: Any = None, k: int = 10) -> list[Recommendation]:
        """Cross-modal search: free text (BERT text space + CLIP text->image) and/or an image (CLIP)."""
        if k < 1:
            raise DataError(f"k must be at least 1, got {k}")
        if text and image is None:
            return self.search_batch([text], k)[0]
        scores, sources = self._search_scores(text=text, image=image)
        return self._found(scores, sources, k)

    def search_batch(self, texts: Sequence[str], k: int | Sequence[int] = 10, *, query_bf16: bool = False
                     ) -> list[list[Recommendation]]:
        """``search(text=t, k=k)`` for many text queries at once (the service batches concurrent requests).

        The queries are encoded in one call per encoder (a transformer reads its weights once per call) and scored
        with one (n, dim) x (dim, items) product per signal (the item matrices are read once per batch). Results
        equal :meth:`search`'s up to float rounding of the batched products (~1e-6 on scores).

        ``query_bf16=True`` is an approximation (``serve.query_bf16``, off by default): the query encoders run in
        bfloat16 (about twice as fast on CPUs with AVX512-BF16); item vectors and scoring stay float32. Its
        agreement with the float32 answer is measured, not guaranteed (``bench_serve --recall``).
        """
        ks = [int(k)] * len(texts) if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        if len(ks) != len(texts):
            raise DataError(f"search_batch got {len(texts)} texts but {len(ks)} values of k")
        if any(x < 1 for x in ks):
            raise DataError(f"k must be at least 1, got {min(ks)}")
        if any(not t for t in texts):
            raise DataError("search needs text or an image")
        if not texts:
            return []
        use_text, use_clip = self._text_search_sources()
        if use_text and (not use_clip or self._clip_part_is_zero()):
            return self._search_text_space(texts, ks, n_parts=2 if use_clip else 1, bf16=query_bf16)
        if use_text and use_clip:
            return self._search_two_spaces(texts, ks, bf16=query_bf16)
        return self._search_full(texts, ks, query_bf16)

    def _search_full(self, texts: Sequence[str], ks: Sequence[int], bf16: bool = False) -> list[list[Recommendation]]:
        """Text search by the full computation: every part z-scored over all items, mean of the parts, top-k."""
        parts, sources = self._text_query_parts(texts, bf16)
        scores = _mean_parts(parts)
        return [self._found(scores[j], {n: v[j] for n, v in sources.items()}, kk) for j, kk in enumerate(ks)]

    def _search_two_spaces(self, texts: Sequence[str], ks: Sequence[int], bf16: bool = False, *,
                           int8_first: bool = True) -> list[list[Recommendation]]:
        """Text search over the BERT text space and CLIP text->image, when some items have an image.

        The full computation's score is the mean of two z-scores: ``(s_i - m_s) / d_s`` of the text similarity and
        ``(f_i - m_f) / d_f`` of the CLIP similarity f (items without an image take the row's minimum over items
        with one). Both z-scores are increasing in ``g_i = s_i / d_s + f_i / d_f``, so the top k are found on g
        (float32, one pass) and only the candidates are scored exactly (float64), with means and deviations from
        the item moments (text: all items; images: the items with one, mixed with the minimum for the rest)
        instead of float64 passes over (n, I). Candidates are every item whose float32 g is within twice a
        bound on its rounding error (``2^-20 * (||q|| max|x| / d_s + ||p|| max|y| / d_f)``, 4x the worst case)
        of the k-th: the exact top k are among them, ties included (ordered by item index). Rows with
        (near-)constant or non-finite similarities take the full computation; a row with more candidates than
        ``torch.topk`` returned (many identical items) takes them from one pass over its g. Same items in the
        same order as :meth:`_search_full`; scores equal to the float32 rounding of the similarities (~3e-7 relative; tested, with exact ties and image subsets).
        """
        import torch

        vec = self.aligned_vectors
        has = vec["has_image"]
        n_items = len(has)
        q = np.stack(self._query_vectors("text", texts, bf16))
        p = np.stack(self._query_vectors("clip", texts, bf16))
        int8 = self._int8_items() if int8_first else None
        if int8 is not None and np.isfinite(q).all() and np.isfinite(p).all():
            return self._search_two_spaces_int8(texts, ks, q, p, int8, bf16)
        s = q @ vec["text"].T  # (n, I) float32
        c = p @ vec["image"].T  # (n, I) float32; rows of items without an image are not used
        floor = np.where(has, c, np.float32(np.inf)).min(axis=1)  # the full computation's fill value, float32
        f = np.where(has, c, floor[:, None])
        finite = np.isfinite(np.add.reduce(s, axis=1)) & np.isfinite(np.add.reduce(f, axis=1))
        q64, p64 = q.astype(np.float64), p.astype(np.float64)
        mean_s, sd_s, mean_f, sd_f = self._two_space_moments(q64, p64, floor)
        ok = finite & (sd_s > _MOMENT_MIN_SD) & (sd_f > _MOMENT_MIN_SD)
        a = np.where(ok, 1.0 / np.where(ok, sd_s, 1.0), 0.0)
        b = np.where(ok, 1.0 / np.where(ok, sd_f, 1.0), 0.0)
        g = s * a.astype(np.float32)[:, None]
        g += f * b.astype(np.float32)[:, None]
        max_x, max_y = self._max_norms()
        err = 2.0 ** -20 * (np.linalg.norm(q64, axis=1) * max_x * a + np.linalg.norm(p64, axis=1) * max_y * b)
        width = min(max(ks) + TOP_K_SLACK, n_items)
        vals, idx = (t.numpy() for t in torch.topk(torch.as_tensor(g), width, dim=1))
        out: list[list[Recommendation] | None] = [None] * len(texts)
        full: list[int] = []
        for j, k in enumerate(ks):
            k = min(k, n_items)
            if not ok[j]:
                full.append(j)
                continue
            cand = _candidates(g[j], vals[j], idx[j], k, 2.0 * err[j])
            out[j] = self._two_space_results(cand, s[j, cand], c[j, cand], floor[j], k, mean_s[j], sd_s[j],
                                             mean_f[j], sd_f[j])
        if full:
            for j, res in zip(full, self._search_full([texts[j] for j in full], [ks[j] for j in full], bf16)):
                out[j] = res
        return out  # type: ignore[return-value]

    def _two_space_results(self, cand: np.ndarray, sim: np.ndarray, clip: np.ndarray, floor: float, k: int,
                           mean_s: float, sd_s: float, mean_f: float, sd_f: float) -> list[Recommendation]:
        """The top ``k`` of candidate items ``cand`` by the exact score: the mean of the text z-score of ``sim`` and
        the CLIP z-score of ``clip`` (``floor`` for items without an image), float64; ties by item index."""
        with_image = self.aligned_vectors["has_image"][cand]
        f = np.where(with_image, clip, floor).astype(np.float64)
        z = ((sim - mean_s) / sd_s + (f - mean_f) / sd_f) / 2.0
        return [self._result(int(cand[r]), float(z[r]), rank + 1,
                             sources={"text": float(sim[r]), **({"clip_image": float(clip[r])} if with_image[r] else {})})
                for rank, r in enumerate(np.lexsort((cand, -z))[:k])]

    def _search_two_spaces_int8(self, texts: Sequence[str], ks: Sequence[int], q: np.ndarray, p: np.ndarray,
                                int8: dict[str, Any], bf16: bool = False) -> list[list[Recommendation]]:
        """:meth:`_search_two_spaces` with an int8 first pass: the same answer with ~4x fewer bytes read.

        Both item products are int8 (:func:`_int8_coarse`: approximations with a proven per-row bound ``e``). The
        CLIP fill value (the minimum over items with an image) is made exact by rescoring, in float32, every item
        with an image whose coarse value is within ``2 e_c`` of the coarse minimum; then the coarse
        ``g = s / d_s + f / d_f`` is within ``E = e_s / d_s + e_c / d_f`` (+ float32 rounding) of the exact one, and
        every item within ``2 E`` of the k-th coarse g is rescored exactly (float32 similarities from row-major
        copies, float64 z-scores as in :meth:`_search_two_spaces`). Rows whose candidates would exceed
        ``INT8_MAX_CANDIDATES`` or whose spread is (near) zero take the float32 path.
        """
        import torch

        vec = self.aligned_vectors
        has = vec["has_image"]
        img_idx = self._image_index()
        n_img, n_items = len(img_idx), len(has)
        xs, ys = int8["text"]["rows"], int8["image"]["rows"]
        s8, e_s = _int8_coarse(q, int8["text"])
        c8, e_c = _int8_coarse(p, int8["image"])
        q64, p64 = q.astype(np.float64), p.astype(np.float64)
        c_img = c8 if n_img == n_items else c8[:, img_idx]  # a copy only when some items have no image
        coarse_min = c_img.min(axis=1)
        floor = np.empty(len(texts), dtype=np.float32)
        for j in range(len(texts)):  # exact minimum: rescore every item that could hold it
            near = img_idx[np.flatnonzero(c_img[j] <= coarse_min[j] + np.float32(2.0 * e_c[j] + 1e-6))]
            floor[j] = np.einsum("id,d->i", ys[near], p[j]).min()  # as the candidates' below: ties stay exact
        mean_s, sd_s, mean_f, sd_f = self._two_space_moments(q64, p64, floor)
        ok = (sd_s > _MOMENT_MIN_SD) & (sd_f > _MOMENT_MIN_SD)
        a = np.where(ok, 1.0 / np.where(ok, sd_s, 1.0), 0.0)
        b = np.where(ok, 1.0 / np.where(ok, sd_f, 1.0), 0.0)
        if n_img < n_items:
            c8[:, ~has] = floor[:, None]  # f: the exact fill value where there is no image
        g = s8
        g *= a.astype(np.float32)[:, None]
        c8 *= b.astype(np.float32)[:, None]
        g += c8
        max_x, max_y = self._max_norms()
        err = (a * e_s + b * e_c + 2.0 ** -20 * (np.linalg.norm(q64, axis=1) * max_x * a
                                                 + np.linalg.norm(p64, axis=1) * max_y * b))
        width = min(max(ks) + TOP_K_SLACK, n_items)
        vals, idx = (t.numpy() for t in torch.topk(torch.as_tensor(g), width, dim=1))
        out: list[list[Recommendation] | None] = [None] * len(texts)
        slow: list[int] = []
        for j, k in enumerate(ks):
            k = min(k, n_items)
            if not ok[j]:
                slow.append(j)
                continue
            cand = _candidates(g[j], vals[j], idx[j], k, 2.0 * err[j])
            if len(cand) > INT8_MAX_CANDIDATES:
                slow.append(j)
                continue
            # row by row, the same reduction for every row: identical item vectors get identical similarities
            out[j] = self._two_space_results(cand, np.einsum("id,d->i", xs[cand], q[j]),
                                             np.einsum("id,d->i", ys[cand], p[j]), floor[j], k, mean_s[j], sd_s[j],
                                             mean_f[j], sd_f[j])
        if slow:
            for j, res in zip(slow, self._search_two_spaces([texts[j] for j in slow], [ks[j] for j in slow], bf16,
                                                            int8_first=False)):
                out[j] = res
        return out  # type: ignore[return-value]

    def _search_text_space(self, texts: Sequence[str], ks: Sequence[int], n_parts: int, bf16: bool = False
                           ) -> list[list[Recommendation]]:
        """Text search when the BERT text space is the only signal (``n_parts - 1`` parts are exactly zero).

        The score of an item is ``z / n_parts`` with ``z`` the z-score of its similarity over all items, a
        strictly increasing function of the similarity: so the top-k is taken on the float32 similarities, and
        only those k are z-scored, with the mean and standard deviation of the row from the query and the item
        moments (:meth:`_text_moments`) instead of two float64 passes over the (n, I) similarities. Same items
        in the same order as the full computation, scores equal to ~1e-9 (tested); a row whose similarities are
        (near) constant or not finite takes the full computation.
        """
        vec = self.aligned_vectors
        q = np.stack(self._query_vectors("text", texts, bf16))  # (n, dim) float32
        s = q @ vec["text"].T  # (n, I) float32
        mu, cov = self._text_moments()
        q64 = q.astype(np.float64)
        mean = q64 @ mu
        sd = np.sqrt(np.maximum(np.einsum("nd,nd->n", q64 @ cov, q64), 0.0))
        # a row with NaN or inf has a non-finite sum (a finite row can only overflow it past 1e33 per similarity,
        # and then merely takes the full computation): one cheap pass instead of isfinite over (n, I)
        finite = np.isfinite(np.add.reduce(s, axis=1))
        tops = _top_k_rows(s, ks)
        out: list[list[Recommendation]] = []
        for j, k in enumerate(ks):
            row = s[j]
            if not (finite[j] and sd[j] > _MOMENT_MIN_SD):
                scores = _mean_parts([_zscore_rows(row[None, :])[0]] + [np.zeros(len(row))] * (n_parts - 1))
                out.append(self._found(scores, {"text": row}, k))
                continue
            top = tops[j]
            z = (row[top].astype(np.float64) - mean[j]) / sd[j] / n_parts
            out.append([self._result(int(i), z[r], r + 1, sources={"text": float(row[i])})
                        for r, i in enumerate(top)])
        return out

    # ------------------------------------------------------------------------------------------------ enrich
    def enrich(self, dry_run: bool = True, out_dir: str | Path | None = None, threshold: float | None = None,
               dataset: Dataset | str | Path | None = None) -> Any:
        """Offline catalog enrichment (missing attributes, duplicates, SIMILAR_TO / COMPLEMENTS) written to the
        graph store with provenance, or with ``dry_run`` to review files in ``out_dir``. See ``kgrec.enrichment``."""
        from kgrec.enrichment.job import enrich

        ds = dataset if dataset is not None else self.dataset_root
        if ds is None:
            raise DataError("enrich needs the dataset the bundle was trained on; pass dataset=...")
        ds = ds if isinstance(ds, Dataset) else Dataset.open(ds)
        report = enrich(ds, self.embeddings, self.store, clip_encoder=self.clip_encoder,
                        text_encoder=self.text_encoder, threshold=threshold, dry_run=dry_run, out_dir=out_dir,
                        config=self.config.enrichment, also_bought_min_count=self.config.kg.also_bought_min_count)
        if not dry_run:
            self.hetero, self.id_maps = self.store.to_hetero_data()
            self._context = self._explainer = None
        return report

    # ------------------------------------------------------------------------------------------------ update
    def update(self, new_data: Dataset | str | Path, *, retrain_threshold: float = 0.25) -> dict[str, Any]:
        """Add new items, users and events without retraining the GNN.

        ``new_data`` is a dataset (``kgrec ingest``) of new items and events; its events may reference items and
        users already in the model (list such items in its items file too; known ids are not re-added). New items
        are encoded, loaded into the graph and get vectors from their content (the fusion layer's cold-start path)
        blended with the mean vector of their KG neighbours (items of the same brand and category); new users get
        the mean vector of the items they interacted with. Returns a report with a drift measure: the share of
        events and items that the GNN never saw; above ``retrain_threshold`` a full retrain is suggested.
        """
        ds = new_data if isinstance(new_data, Dataset) else Dataset.open(new_data)
        new_items = ds.items
        self._refuse_changed_items(new_items[new_items["item_id"].isin(self.item_pos)])
        new_items = new_items[~new_items["item_id"].isin(self.item_pos)].reset_index(drop=True)
        new_events = ds.events
        if len(new_items):  # checked before anything is written: a refusal changes nothing
            f = self.model.fusion
            if f.text_proj is None and f.image_proj is None:
                raise DataError(
                    f"{len(new_items)} new item(s) (e.g. {new_items['item_id'].iloc[0]!r}), but this model has no "
                    f"content projection (fusion.trainer: {self.model.config.get('trainer', 'gnn')} learns item "
                    "vectors from the graph only) to give them vectors from their text or image: retrain (`kgrec "
                    "train`) on data that includes them. Nothing was changed; an update with events on known items "
                    "only still works.")
            # the encoders are built here (a bundle of code-built encoders loaded without them raises now)
            if not ((f.text_proj is not None and self.text_encoder is not None)
                    or (f.image_proj is not None and self.clip_encoder is not None)):
                raise DataError(f"{len(new_items)} new item(s), but no encoder for a modality this model was trained "
                                "on (text or image): load it with its encoders. Nothing was changed.")
        self.store.load(ds)  # MERGE: idempotent, adds nodes, relationships and refreshes ALSO_BOUGHT
        n_old_items, n_old_users = len(self.item_ids), len(self.user_ids)

        if len(new_items):
            import tempfile

            cfg = self.config
            if not cfg.encoders.cache_dir:  # the cache lives with the update's dataset, not in the scratch directory
                enc = cfg.encoders.model_copy(update={"cache_dir": str(ds.root / ".cache" / "embeddings")})
                cfg = cfg.model_copy(update={"encoders": enc})
            with tempfile.TemporaryDirectory(prefix="kgrec-update-") as scratch:  # removed when encoded
                sub = Dataset.write(Path(scratch) / "new-items", {"items": new_items},
                                    images_from=ds.root if (ds.root / "images").is_dir() else None)
                emb = encode_items(sub, self.text_encoder, self.clip_encoder, cfg)
            content = self.model.item_vectors_from_content(
                emb.text if emb.text.shape[1] and self.model.fusion.text_proj is not None else None,
                emb.image if emb.image.shape[1] and self.model.fusion.image_proj is not None else None,
                image_present=emb.has_image,
            )
            vecs = self._blend_with_kg_neighbours(new_items, content)
            _, weights = self._content_modality_weights(emb)
            # images of new items live in the update's dataset: keep absolute paths
            new_items["image"] = [None if not isinstance(im, str) or not im else str((ds.root / im).resolve())
                                  for im in new_items["image"]]  # a missing image reads back as NaN
            self._append_items(new_items, emb, vecs, weights)
        new_user_ids = sorted(set(new_events["user_id"].astype(str)) - set(self.user_pos))
        if new_user_ids:
            self._append_users(new_user_ids, new_events)
        # the delta's events not already known (anti-join on the columns both have; new rows need not come first)
        cols = list(self.events.columns.intersection(new_events.columns))
        delta = new_events[cols].drop_duplicates(ignore_index=True)
        known = delta.merge(self.events[cols].drop_duplicates(), on=cols, how="left", indicator=True)["_merge"]
        new_events = delta[(known == "left_only").to_numpy()]
        self.events = pd.concat([self.events, new_events], ignore_index=True)
        self.hetero, self.id_maps = self.store.to_hetero_data()
        self._context = self._explainer = self._seen = self._aligned = None
        unseen_events = int((~new_events["item_id"].isin(self.item_ids[:n_old_items])
                             | ~new_events["user_id"].astype(str).isin(self.user_ids[:n_old_users])).sum())
        trained_events = int(self.metrics.get("counts", {}).get("events", len(self.events) - len(new_events)))
        drift = {
            "new_items": int(len(self.item_ids) - n_old_items),
            "new_users": int(len(self.user_ids) - n_old_users),
            "new_events": int(len(new_events)),
            "new_item_share": (len(self.item_ids) - n_old_items) / max(len(self.item_ids), 1),
            "untrained_event_share": (len(self.events) - trained_events) / max(len(self.events), 1),
            "events_on_untrained_items_or_users": unseen_events,
        }
        drift["drift"] = max(drift["new_item_share"], drift["untrained_event_share"])
        drift["retrain_suggested"] = bool(drift["drift"] > retrain_threshold)
        self.metrics.setdefault("updates", []).append(drift)
        if drift["retrain_suggested"]:
            logger.warning("drift %.2f > %.2f: %d%% of items and %d%% of events were never seen by the GNN; "
                           "a full retrain (`kgrec train`) is suggested", drift["drift"], retrain_threshold,
                           100 * drift["new_item_share"], 100 * drift["untrained_event_share"])
        return drift

    def _refuse_changed_items(self, known: pd.DataFrame) -> None:
        """Raise (before anything is written) when items the model knows come back with another brand, category or
        attribute value: the graph's MERGE would keep the old relationships next to the new ones (two brands, two
        categories), and the item's vectors would describe the old item. A value the update leaves out (null, or
        an attribute key it does not list) is "not given", not a change: re-listing an item with only its id and
        title is fine."""
        from kg.loading import category_prefixes

        ours = self.items[~self.items.index.duplicated()]
        known = known[known["item_id"].isin(ours.index)]  # items known from events / links only have no row
        cols = [c for c in ("brand", "category", "attributes") if c in known.columns and c in ours.columns]
        if not len(known) or not cols:
            return

        def missing(v: Any) -> bool:
            return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())

        def attrs(v: Any) -> dict[str, Any]:
            if missing(v):
                return {}
            try:
                d = json.loads(v) if isinstance(v, str) else dict(v)
            except (TypeError, ValueError):
                return {"": str(v)}
            return {k: x for k, x in d.items() if not missing(x)}

        def changed(col: str, new: Any, old: Any) -> str | None:
            if col == "attributes":
                n, o = attrs(new), attrs(old)
                keys = sorted(k for k in n if k in o and str(n[k]) != str(o[k]))
                return f"attribute {keys[0]}: {o[keys[0]]!r} -> {n[keys[0]]!r}" if keys else None
            if missing(new):
                return None
            norm = (lambda v: (category_prefixes(str(v)) or [""])[-1]) if col == "category" else (lambda v: str(v))
            if missing(old) or norm(new) != norm(old):
                return f"{col}: {None if missing(old) else old!r} -> {new!r}"
            return None

        found = []
        for row in known.itertuples(index=False):
            item = row.item_id
            for c in cols:
                what = changed(c, getattr(row, c), ours.at[item, c])
                if what:
                    found.append((item, what))
                    break
        if found:
            item, what = found[0]
            raise DataError(
                f"{len(found)} item(s) the model already knows come with a changed brand, category or attribute value "
                f"(e.g. {item!r}, {what}): an update adds new items, users and events; changed items need a retrain "
                "(`kgrec train` on the corrected catalog), or leave them out of the update's items (listing a known "
                "item with only its id and title is fine). Spellings count: ingest unifies the case of a brand "
                "within one dataset, not against the model's. Nothing was changed.")

    def _content_modality_weights(self, emb: Any) -> tuple[Any, np.ndarray]:
        import torch

        f = self.model.fusion
        t = torch.as_tensor(emb.text) if emb.text.shape[1] and f.text_proj is not None else None
        i = torch.as_tensor(emb.image) if emb.image.shape[1] and f.image_proj is not None else None
        from fusion.train import content_present

        with torch.no_grad():
            fused, weights = f(None, t, i, present=content_present(t, i, emb.has_image))
        return fused, weights.numpy().astype(np.float32)

    def _blend_with_kg_neighbours(self, new_items: pd.DataFrame, content: np.ndarray) -> np.ndarray:
        """Average the content vector with the mean trained vector of items sharing brand and category."""
        known = self.items.reset_index(drop=True)
        known = known[known["item_id"].isin(self.item_pos)]
        key = known["brand"].fillna("") + "\x1f" + known["category"].fillna("")
        groups = pd.Series(known["item_id"].map(self.item_pos).to_numpy()).groupby(key.to_numpy()).apply(list).to_dict()
        cat_groups = pd.Series(known["item_id"].map(self.item_pos).to_numpy()).groupby(known["category"].fillna("").to_numpy()).apply(list).to_dict()
        out = content.copy()
        for r, row in enumerate(new_items.itertuples(index=False)):
            brand = row.brand if isinstance(row.brand, str) else ""  # missing: None or NaN
            category = row.category if isinstance(row.category, str) else ""
            idx = groups.get(f"{brand}\x1f{category}") or cat_groups.get(category)
            if idx:
                out[r] = 0.5 * content[r] + 0.5 * self.model.item_embeddings[idx].mean(0)
        return out.astype(np.float32)

    def _append_items(self, new_items: pd.DataFrame, emb: Any, vecs: np.ndarray, weights: np.ndarray) -> None:
        from encoders.items import ItemEmbeddings

        m = self.model
        n_new = len(new_items)
        m.item_embeddings = np.vstack([m.item_embeddings, vecs])
        m.modality_weights = np.vstack([m.modality_weights, weights])
        m.train_matrix = sp.csr_matrix(sp.hstack([m.train_matrix, sp.csr_matrix((m.train_matrix.shape[0], n_new), dtype=np.float32)]), dtype=np.float32)
        if m.item_item is not None:
            ii = np.zeros((m.item_item.shape[0] + n_new,) * 2, dtype=np.float32)
            ii[: m.item_item.shape[0], : m.item_item.shape[1]] = m.item_item
            m.item_item = ii
        old = self.embeddings

        def cat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.vstack([a, b]) if a.shape[1] == b.shape[1] else a

        self.embeddings = ItemEmbeddings(
            old.item_ids + list(emb.item_ids), cat(old.text, emb.text), cat(old.image, emb.image),
            cat(old.clip_text, emb.clip_text), old.status + list(emb.status), old.reason + list(emb.reason),
            old.model_ids,
        )
        self.item_ids += new_items["item_id"].astype(str).tolist()
        self.item_pos = _index(self.item_ids)
        self.items = pd.concat([self.items.reset_index(drop=True), new_items], ignore_index=True)
        self.items = self.items.set_index("item_id", drop=False)

    def _append_users(self, new_user_ids: list[str], events: pd.DataFrame) -> None:
        m = self.model
        vecs = np.zeros((len(new_user_ids), m.user_embeddings.shape[1]), dtype=np.float32)
        for r, u in enumerate(new_user_ids):
            items = events.loc[events["user_id"].astype(str) == u, "item_id"].astype(str).map(self.item_pos).dropna()
            if len(items):
                vecs[r] = m.user_vector_from_items(items.astype(np.int64).to_numpy())
        m.user_embeddings = np.vstack([m.user_embeddings, vecs])
        m.train_matrix = sp.csr_matrix(sp.vstack([m.train_matrix, sp.csr_matrix((len(new_user_ids), m.train_matrix.shape[1]), dtype=np.float32)]), dtype=np.float32)
        self.user_ids += new_user_ids
        self.user_pos = _index(self.user_ids)

    # ------------------------------------------------------------------------------------------------ bundle
    def save(self, path: str | Path) -> Path:
        """Write the bundle atomically (see ``kgrec.bundle``)."""
        from kg.embedded_store import EmbeddedStore

        def writer(tmp: Path) -> dict[str, Any]:
            write_idmap(tmp / "idmaps" / "users.parquet", self.user_ids)
            write_idmap(tmp / "idmaps" / "items.parquet", self.item_ids)
            self.model.save(tmp / "fusion")
            self.embeddings.save(tmp / "embeddings")
            components = ["idmaps", "fusion", "embeddings", "graph", "encoders", "data"]
            if self.ranker is not None:
                self.ranker.save(tmp / "ranker")
                components.append("ranker")
            if isinstance(self.store, EmbeddedStore):
                bound = self.store.path
                self.store.save(tmp / "graph")
                self.store.path = bound  # save(path) rebinds the store: not to this temporary directory
                graph = {"backend": "embedded"}
            else:
                from kgrec.config import neo4j_settings

                s = neo4j_settings(self.config.kg)  # the server this model's store talks to (no password)
                graph = {"backend": "neo4j", "uri": getattr(self.store, "uri", s["uri"]),
                         "database": getattr(self.store, "database", s["database"]),
                         "user": getattr(self.store, "user", s["user"])}
            (tmp / "graph").mkdir(exist_ok=True)
            (tmp / "graph" / "graph.json").write_text(json.dumps(graph, indent=2), encoding="utf-8")
            enc_dir = tmp / "encoders"
            enc_dir.mkdir()
            spec = dict(self.encoder_spec)
            if spec.get("clip_checkpoint_dir"):
                # a loaded bundle names its own copy relative to itself; a fresh fit names the fit-clip output
                src = Path(spec["clip_checkpoint_dir"])
                if not src.is_absolute() and self._bundle_path is not None:
                    src = Path(self._bundle_path) / src
                if not src.is_dir():
                    raise BundleError(f"the CLIP checkpoint {src} this model was trained with is gone: cannot write a "
                                      "bundle that needs it (restore it, or retrain with `kgrec train`)")
                shutil.copytree(src, enc_dir / "clip")
                spec["clip_checkpoint_dir"] = "encoders/clip"
            (enc_dir / "encoders.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
            data = tmp / "data"
            data.mkdir()
            self.items.reset_index(drop=True).to_parquet(data / "items.parquet", index=False)
            self.events[["user_id", "item_id", "type", "timestamp"]].to_parquet(data / "events.parquet", index=False)
            (tmp / "evaluation.json").write_text(json.dumps(self.metrics, indent=2, default=float), encoding="utf-8")
            return {"components": components,
                    "dataset_root": None if self.dataset_root is None else str(Path(self.dataset_root).resolve())}

        out = write_bundle(path, writer, data_fingerprint=self.data_fingerprint, config_yaml=self.config.to_yaml())
        logger.info("saved bundle %s", out)
        return out

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True, encoders: tuple[Any, Any] | None = None) -> Recommender:
        """Open a bundle written by :meth:`save` (clear errors when incomplete or from another format version).

        ``encoders`` = (text, clip) replaces the encoders named in the bundle (needed when the bundle was trained
        with encoders built in code rather than named models, e.g. tiny test models).
        """
        from encoders.items import ItemEmbeddings
        from fusion.train import TrainedModel

        info = read_manifest(path, verify=verify)
        root = info.path
        for comp in ("fusion", "embeddings", "graph", "encoders", "data"):
            if not info.has(comp):
                raise BundleError(f"bundle {root} has no {comp!r} component; re-run `kgrec train`")
        cfg = bundle_config(root)
        model = TrainedModel.load(root / "fusion")
        ranker = None
        if info.has("ranker"):
            from ranking.features import ALL_FEATURES, check_feature_names
            from ranking.ranker import Ranker

            ranker = Ranker.load(root / "ranker")
            try:  # serving builds the ranker's own columns, by name and in its order
                check_feature_names(ranker.feature_names)
            except ValueError:
                raise BundleError(f"{root / 'ranker'} was trained on features {list(ranker.feature_names)}; this "
                                  f"version builds {list(ALL_FEATURES)}; retrain it (`kgrec train`)") from None
        graph = json.loads((root / "graph" / "graph.json").read_text(encoding="utf-8"))
        if graph["backend"] == "embedded":
            from kg.embedded_store import EmbeddedStore

            store = EmbeddedStore.open(root / "graph", also_bought_min_count=cfg.kg.also_bought_min_count)
            store.path = None  # unbound: a bundle's graph is written only by save() (its manifest hashes it)
        else:
            from kg.neo4j_store import Neo4jStore

            use_bundle_graph(cfg.kg, graph)
            store = Neo4jStore.from_config(cfg.kg)
        hetero, id_maps = store.to_hetero_data()
        user_ids = read_idmap(root / "idmaps" / "users.parquet")
        item_ids = read_idmap(root / "idmaps" / "items.parquet")
        rec = cls(
            config=cfg, user_ids=user_ids, item_ids=item_ids, model=model, ranker=ranker, store=store,
            embeddings=ItemEmbeddings.load(root / "embeddings"),
            items=pd.read_parquet(root / "data" / "items.parquet"),
            events=pd.read_parquet(root / "data" / "events.parquet"),
            hetero=hetero, id_maps=id_maps,
            dataset_root=Path(info.manifest["dataset_root"]) if info.manifest.get("dataset_root") else None,
            metrics=json.loads((root / "evaluation.json").read_text(encoding="utf-8")) if (root / "evaluation.json").is_file() else {},
            encoder_spec=json.loads((root / "encoders" / "encoders.json").read_text(encoding="utf-8")),
            data_fingerprint=info.manifest.get("data_fingerprint", ""),
        )
        rec._bundle_path = Path(root).resolve()  # relative checkpoint names resolve here, whatever the cwd later
        if encoders is not None:
            rec._text_encoder, rec._clip_encoder = encoders
        return rec

    def __repr__(self) -> str:
        return (f"Recommender(users={len(self.user_ids)}, items={len(self.item_ids)}, "
                f"ranker={'yes' if self.ranker is not None else 'no'}, store={type(self.store).__name__})")


# ---------------------------------------------------------------------------------------------------- wiring
def bundle_config(root: str | Path) -> Config:
    """The resolved config a bundle was trained with (its ``config.yaml``)."""
    import yaml

    return Config.model_validate(yaml.safe_load((Path(root) / "config.yaml").read_text(encoding="utf-8")))


def use_bundle_graph(kg: Any, graph: dict[str, Any]) -> None:
    """Point the ``kg`` config section at the Neo4j server a bundle's store used (``graph/graph.json``: URI,
    database, user) when ``NEO4J_URI`` is not set; it wins over the bundle's config.yaml. The password only ever
    comes from ``NEO4J_PASSWORD``. Nothing changes for an embedded bundle."""
    if graph.get("backend") == "neo4j" and graph.get("uri") and not os.environ.get("NEO4J_URI"):
        kg.uri, kg.user = graph["uri"], graph.get("user") or kg.user
        kg.database = graph.get("database") or kg.database
        logger.info("NEO4J_URI is not set: using the bundle's graph server %s", kg.uri)


def open_store(cfg: Config, path: str | Path | None = None) -> Any:
    """The configured ``GraphStore`` (see ``kg.factory.open_store``)."""
    from kg.factory import open_store as _open

    return _open(cfg.kg, path)


def build_encoders(cfg: Config, dataset: Dataset | None, *, spec: dict[str, Any] | None = None,
                   bundle: Path | None = None) -> tuple[Any, Any]:
    """(text encoder, CLIP encoder) from the config, or from a bundle's encoder spec."""
    from encoders.clip import ClipEncoder
    from encoders.factory import text_encoder_from_config

    ec = cfg.encoders
    spec = spec or {}
    if spec.get("custom"):
        raise BundleError(
            "this bundle was trained with encoders built in code (Recommender.fit(encoders=...)); open it with "
            "Recommender.load(path, encoders=(text_encoder, clip_encoder)) to search or to update it"
        )
    text_model = spec.get("text_model", ec.text_model)
    text = None
    if text_model:  # through the factory: it also knows "static:<DIR or base>" models
        text = text_encoder_from_config(ec.model_copy(update={"text_model": text_model}))
    ckpt = spec.get("clip_checkpoint_dir", ec.clip_checkpoint)
    if ckpt and bundle is not None and not Path(ckpt).is_absolute():
        ckpt = str(bundle / ckpt)
    clip_model = spec.get("clip_model", ec.clip_model)
    clip = ClipEncoder(clip_model, ec.clip_pretrained, checkpoint=ckpt, device=ec.device,
                       batch_size=ec.image_batch_size, num_workers=ec.num_workers) if clip_model else None
    return text, clip


def _encoder_spec(cfg: Config, text: Any, clip: Any, custom: bool = False) -> dict[str, Any]:
    return {
        "custom": custom,  # built in code (fit(encoders=...)): load() needs the same encoders passed in
        "text_model": cfg.encoders.text_model if text is not None else None,
        "text_model_id": getattr(text, "model_id", None),
        "clip_model": cfg.encoders.clip_model if clip is not None else None,
        "clip_model_id": getattr(clip, "model_id", None),
        "clip_checkpoint_dir": cfg.encoders.clip_checkpoint,
        "package_version": __version__,
    }


def encode_items(ds: Dataset, text_enc: Any, clip_enc: Any, cfg: Config) -> Any:
    from encoders.items import encode_dataset

    cache = Path(cfg.encoders.cache_dir) if cfg.encoders.cache_dir else ds.root / ".cache" / "embeddings"
    return encode_dataset(ds, text_enc, clip_enc, cache)
