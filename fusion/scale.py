"""Training at catalog scale: propagated graph features computed once, then mini-batch two-tower training.

Full-graph propagation per optimiser step (``fusion.train``) costs ~15 s per step on 2 CPU cores at 1M items /
17M KG+interaction edges, so an epoch of a few hundred steps takes hours. Here the graph is propagated once with
sparse matrix products (SGC / SIGN: Wu et al. 2019, Frasca et al. 2020), so each step only gathers feature rows:

* item features: its content vector ``x_i`` (e.g. static text), its knowledge-graph neighbours (brand, category,
  attribute, entity: a row-normalised one-hot profile ``B_i``), and the mean content of the items its training users
  bought (``R^T R x``, two hops item -> users -> items);
* optional image vectors for the items that have an image (zeros + a ``has_image`` indicator for the others);
* user features: the mean content of the user's training items (``R x``) and the mean KG profile of those items
  (``R B``: shares of brands, categories, attributes in the history);

every block standardised per column. Towers: ``MLP(features) (+ optional ID embedding)``, L2-normalised, trained with
sampled softmax (``num_negatives`` uniform negatives shared by the batch, ``temperature``) on mini-batches of training
(user, item) pairs; validation NDCG@20 on sampled users after each epoch keeps the best state. The result is plain
``user_embeddings`` / ``item_embeddings`` arrays like :class:`fusion.train.TrainedModel`'s, so retrieval and ranking
use it unchanged.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from fusion.metrics import evaluate, to_csr
from kgrec.errors import BundleError, DataError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ITEM_KG_TYPES = ("brand", "category", "attribute", "entity")


@dataclass
class ScaleTrainConfig:
    """Settings of :func:`train_scale_model`. Defaults as measured at 100k items / 1M events (docs/scale.md): an
    MLP tower (hidden 128) peaked at valid NDCG@20 0.0031 vs 0.0028-0.0030 for linear towers, text-only or KG-only
    (5,000 validation users; differences near the sampling noise)."""

    dim: int = 64
    hidden: int = 128  # 0: linear towers
    use_id: bool = False  # add per-user/item ID embeddings (sparse Adam); content + graph features alone by default
    epochs: int = 20
    batch_size: int = 4096
    lr: float = 0.002
    num_negatives: int = 2048
    temperature: float = 0.1
    patience: int = 3
    max_eval_users: int = 2000
    # early-stopping metric; at 1M items NDCG@20 of a few thousand users counts a handful of hits (noise), recall at
    # a deeper cut-off ("recall@1000") separates models there
    select_metric: str = "ndcg@20"
    max_kg_nodes: int = 4096  # KG profile width cap (most frequent item-adjacent nodes kept)
    pairs_per_epoch: int | None = None  # sample this many training pairs per epoch (None: all of them)
    time_budget_s: float | None = None  # stop after the epoch that passes this many seconds of training
    seed: int = 2020


@dataclass
class PropagatedFeatures:
    """Raw (unstandardised) input features in one column space (blocks: name -> (start, stop)).

    ``item`` (I, F): each item's own row (content, row-normalised KG profile). ``user_sum`` (U, F): the sum of the
    rows of the user's training items, ``user_count`` (U,) how many: a user's feature is their mean, and during
    training the positive item's own row is taken out of it (leave-one-out), so the user side never contains the
    label. ``item_mean``/``item_std``, ``user_mean``/``user_std`` (F,) standardise each side per column.
    """

    item: np.ndarray
    user_sum: np.ndarray
    user_count: np.ndarray
    item_mean: np.ndarray
    item_std: np.ndarray
    user_mean: np.ndarray
    user_std: np.ndarray
    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def width(self) -> int:
        return int(self.item.shape[1])

    def user_rows(self, users: Tensor, leave_out: Tensor | None = None) -> Tensor:
        """Standardised user features (b, F); ``leave_out`` (b,) items are removed from each user's mean."""
        s = torch.from_numpy(self.user_sum)[users]
        c = torch.from_numpy(self.user_count)[users].unsqueeze(1)
        if leave_out is not None:
            s = s - torch.from_numpy(self.item)[leave_out]
            c = c - 1
        mean = torch.where(c > 0, s / c.clamp(min=1), torch.zeros_like(s))
        return (mean - torch.from_numpy(self.user_mean)) / torch.from_numpy(self.user_std)

    def item_rows(self, items: Tensor) -> Tensor:
        """Standardised item features (b, F)."""
        return (torch.from_numpy(self.item)[items] - torch.from_numpy(self.item_mean)) / torch.from_numpy(self.item_std)


def _row_normalise(m: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(m, dtype=np.float32)
    s = np.asarray(m.sum(1)).ravel()
    return sp.csr_matrix(sp.diags((1.0 / np.maximum(s, 1e-12)).astype(np.float32)) @ m)


def item_kg_matrix(graph: Any, num_items: int, max_nodes: int = 4096) -> tuple[sp.csr_matrix, list[str]]:
    """(num_items, K) binary CSR of each item's direct KG neighbours (edges item -> brand/category/attribute/entity
    of a ``HeteroData``), K capped at the ``max_nodes`` most frequent nodes; column names ``type:index``."""
    blocks, names = [], []
    for et in graph.edge_types:
        src, _, dst = et
        if src != "item" or dst not in ITEM_KG_TYPES:
            continue
        ei = graph[et].edge_index.cpu().numpy()
        n_dst = int(graph[dst].num_nodes)
        blocks.append(sp.csr_matrix((np.ones(ei.shape[1], np.float32), (ei[0], ei[1])), shape=(num_items, n_dst)))
        names += [f"{dst}:{k}" for k in range(n_dst)]
    if not blocks:
        return sp.csr_matrix((num_items, 0), dtype=np.float32), []
    b = sp.hstack(blocks, format="csr")
    b.data[:] = 1.0
    freq = np.asarray(b.sum(0)).ravel()
    cols = np.flatnonzero(freq > 0)
    if len(cols) > max_nodes:
        cols = np.sort(cols[np.argsort(-freq[cols], kind="stable")[:max_nodes]])
    return sp.csr_matrix(b[:, cols]), [names[c] for c in cols]


def _moments(x: np.ndarray, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    s = np.zeros(x.shape[1], np.float64)
    q = np.zeros(x.shape[1], np.float64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].astype(np.float64)
        s += part.sum(0)
        q += (part * part).sum(0)
    mu = s / max(len(x), 1)
    sd = np.sqrt(np.maximum(q / max(len(x), 1) - mu * mu, 0.0))
    return mu.astype(np.float32), np.maximum(sd, 1e-6).astype(np.float32)


@dataclass
class _ScatteredRows:
    """(num_items, d) zeros except rows ``rows`` = ``vectors`` (never materialised as a dense copy)."""

    rows: np.ndarray
    vectors: np.ndarray
    num_items: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_items, int(self.vectors.shape[1])


def propagate_features(
    num_users: int,
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    *,
    content: np.ndarray | None = None,
    graph: Any | None = None,
    max_kg_nodes: int = 4096,
    image_vectors: np.ndarray | None = None,
    image_items: np.ndarray | None = None,
) -> PropagatedFeatures:
    """Compute item rows and users' sums of them once (sparse products; see the module docstring).

    Args:
        train_users, train_items: (n,) training interactions (only these are propagated: no validation leakage).
        content: optional (num_items, d) float32 item content vectors (e.g. static text vectors).
        graph: optional ``HeteroData`` export with item -> brand/category/attribute/entity edges.
        image_vectors, image_items: optional image vectors (m, d_img) of the items ``image_items`` (m,) (e.g. a
            memory-mapped ``.npy``; catalogs where only some items have an image). They add an ``image`` block
            (zeros for items without an image) and a ``has_image`` indicator column (1.0 / 0.0), so a tower can
            tell "no image" from "an image whose vector is near zero".
    """
    t0 = time.perf_counter()
    if content is None and graph is None and image_vectors is None:
        raise DataError("propagated features need item content vectors, a knowledge graph, or both "
                        "(or image vectors)")
    r = to_csr(np.asarray(train_users), np.asarray(train_items), (num_users, num_items))
    r.data[:] = 1.0
    parts: list[tuple[str, Any]] = []
    if content is not None:
        if content.shape[0] != num_items:
            raise DataError(f"content vectors have {content.shape[0]} rows but there are {num_items} items")
        parts.append(("content", content))
    if graph is not None:
        b, _ = item_kg_matrix(graph, num_items, max_kg_nodes)
        if b.shape[1]:
            parts.append(("kg", _row_normalise(b)))
    if (image_vectors is None) != (image_items is None):
        raise DataError("image features need both image_vectors (m, d) and image_items (m,), or neither")
    if image_vectors is not None:
        rows = np.asarray(image_items, dtype=np.int64)
        if image_vectors.ndim != 2 or len(rows) != image_vectors.shape[0]:
            raise DataError(f"image_vectors {image_vectors.shape} need one row per entry of image_items ({len(rows)})")
        if len(rows) and (rows.min() < 0 or rows.max() >= num_items):
            raise DataError(f"image_items must be item indices in [0, {num_items}); got {rows.min()}..{rows.max()}")
        has = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.zeros(len(rows), np.int64))),
                            shape=(num_items, 1))
        has.data[:] = 1.0  # duplicate indices count once
        parts.append(("image", _ScatteredRows(rows, image_vectors, num_items)))
        parts.append(("has_image", has))
    if not parts:
        raise DataError("the graph has no item -> brand/category/attribute/entity edges and no content was given")
    width = sum(p.shape[1] for _, p in parts)
    item = np.empty((num_items, width), dtype=np.float32)
    blocks, c = {}, 0
    for name, p in parts:
        if isinstance(p, _ScatteredRows):
            item[:, c:c + p.shape[1]] = 0.0
            for s_ in range(0, len(p.rows), 100_000):  # chunks: a memory-mapped source is read piecewise
                item[p.rows[s_:s_ + 100_000], c:c + p.shape[1]] = np.asarray(p.vectors[s_:s_ + 100_000], np.float32)
        else:
            item[:, c:c + p.shape[1]] = p.toarray() if sp.issparse(p) else np.asarray(p, dtype=np.float32)
        blocks[name] = (c, c + p.shape[1])
        c += p.shape[1]
    user_sum = np.asarray(r @ item, dtype=np.float32)
    user_count = np.asarray(r.sum(1), dtype=np.float32).ravel()
    im, isd = _moments(item)
    um, usd = _moments(user_sum / np.maximum(user_count, 1)[:, None])
    return PropagatedFeatures(item, user_sum, user_count, im, isd, um, usd, blocks, time.perf_counter() - t0)


class TwoTower(nn.Module):
    """``MLP(features) (+ ID embedding)`` per side, L2-normalised outputs of size ``dim``."""

    def __init__(self, user_in: int, item_in: int, num_users: int, num_items: int, cfg: ScaleTrainConfig):
        super().__init__()

        def mlp(n_in: int) -> nn.Module:
            if cfg.hidden <= 0:  # a linear tower: user . item is then a bilinear form of the two feature vectors
                return nn.Linear(n_in, cfg.dim)
            return nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))

        self.user_mlp, self.item_mlp = mlp(user_in), mlp(item_in)
        self.user_id = nn.Embedding(num_users, cfg.dim, sparse=True) if cfg.use_id else None
        self.item_id = nn.Embedding(num_items, cfg.dim, sparse=True) if cfg.use_id else None
        for e in (self.user_id, self.item_id):
            if e is not None:
                nn.init.normal_(e.weight, std=0.01)

    def users(self, feats: Tensor, idx: Tensor) -> Tensor:
        h = self.user_mlp(feats)
        if self.user_id is not None:
            h = h + self.user_id(idx)
        return nn.functional.normalize(h, dim=-1)

    def items(self, feats: Tensor, idx: Tensor) -> Tensor:
        h = self.item_mlp(feats)
        if self.item_id is not None:
            h = h + self.item_id(idx)
        return nn.functional.normalize(h, dim=-1)


@dataclass
class ScaleModel:
    """Trained vectors: ``user_embeddings`` (U, dim), ``item_embeddings`` (I, dim) float32 L2-normalised; score =
    dot product. ``history``: per-epoch loss, seconds and validation metrics."""

    config: dict[str, Any]
    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    history: list[dict[str, Any]]
    feature_seconds: float = 0.0

    def recommend(self, users: np.ndarray, k: int = 10, exclude: sp.csr_matrix | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items (b, k) and scores for each user; ``exclude`` (b, I) non-zeros are never returned."""
        from fusion.retrieve import topk_from_scores

        users = np.asarray(users, dtype=np.int64)
        scores = torch.as_tensor(self.user_embeddings[users] @ self.item_embeddings.T)
        return topk_from_scores(scores, k, exclude)

    def save(self, directory: str | Path) -> Path:
        """``config.json`` + ``model.safetensors``, written to a temporary directory and renamed into place."""
        from safetensors.numpy import save_file

        from kgrec.data.schema import atomic_directory

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            save_file({"user_embeddings": np.ascontiguousarray(self.user_embeddings, np.float32),
                       "item_embeddings": np.ascontiguousarray(self.item_embeddings, np.float32)},
                      str(tmp / "model.safetensors"))
            meta = {"format_version": FORMAT_VERSION, "kind": "scale_two_tower", "config": self.config,
                    "history": self.history, "feature_seconds": self.feature_seconds}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ScaleModel:
        from safetensors.numpy import load_file

        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise BundleError(f"{directory} is not a saved scale model (needs config.json and model.safetensors)")
        meta = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{directory}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
        t = load_file(str(directory / "model.safetensors"))
        return cls(meta["config"], t["user_embeddings"], t["item_embeddings"], meta["history"],
                   meta.get("feature_seconds", 0.0))


def _all_vectors(tower: Any, rows: Any, n: int, chunk: int = 65_536) -> np.ndarray:
    """``tower(rows(idx), idx)`` for every index in ``[0, n)``, in chunks: (n, dim) float32."""
    out = []
    with torch.no_grad():
        for s in range(0, n, chunk):
            idx = torch.arange(s, min(s + chunk, n))
            out.append(tower(rows(idx), idx).numpy())
    return np.concatenate(out).astype(np.float32)


def train_scale_model(
    num_users: int,
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    *,
    features: PropagatedFeatures,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    config: ScaleTrainConfig | None = None,
    progress: bool = False,
) -> ScaleModel:
    """Mini-batch sampled-softmax training of the two towers over precomputed ``features``.

    Args:
        train_users, train_items: (n,) int training pairs (the same ones ``features`` were propagated from).
        valid: optional (users, items) pairs for per-epoch NDCG@20 on up to ``max_eval_users`` sampled users and
            early stopping (``patience``); the best epoch's state is kept.
    """
    cfg = config or ScaleTrainConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tu = torch.as_tensor(np.array(train_users, dtype=np.int64))  # a copy: the input may be read-only
    ti = torch.as_tensor(np.array(train_items, dtype=np.int64))
    n = len(tu)
    if n == 0:
        raise DataError("no training interactions to learn from")
    f = features
    model = TwoTower(f.width, f.width, num_users, num_items, cfg)
    dense = [p for name, p in model.named_parameters() if not name.endswith("_id.weight")]
    opt = torch.optim.Adam(dense, lr=cfg.lr)
    sparse_opt = (torch.optim.SparseAdam([model.user_id.weight, model.item_id.weight], lr=cfg.lr)
                  if cfg.use_id else None)
    train_csr = to_csr(tu.numpy(), ti.numpy(), (num_users, num_items))
    valid_csr, eval_rows = None, None
    if valid is not None and len(valid[0]):
        valid_csr = to_csr(np.asarray(valid[0]), np.asarray(valid[1]), (num_users, num_items))
        have = np.flatnonzero(np.diff(valid_csr.indptr) > 0)
        if len(have) > cfg.max_eval_users:
            have = np.sort(np.random.default_rng(cfg.seed).choice(have, cfg.max_eval_users, replace=False))
        keep = np.zeros(num_users, dtype=bool)
        keep[have] = True
        valid_csr = sp.csr_matrix(sp.diags(keep.astype(np.float32)) @ valid_csr)
        eval_rows = have
    try:
        ks = tuple(sorted({20, int(cfg.select_metric.split("@")[1])}))
    except (IndexError, ValueError):
        raise DataError(f"select_metric {cfg.select_metric!r} is not of the form recall@K / ndcg@K") from None
    history: list[dict[str, Any]] = []
    best, best_state, since = -1.0, None, 0
    t_train = time.perf_counter()
    epochs = range(cfg.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="train", unit="epoch")
    for epoch in epochs:
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        if cfg.pairs_per_epoch is not None and cfg.pairs_per_epoch < n:
            perm = perm[: cfg.pairs_per_epoch]
        total = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            bu, bi = tu[idx], ti[idx]
            neg = torch.randint(0, num_items, (cfg.num_negatives,), generator=gen)
            u = model.users(f.user_rows(bu, leave_out=bi), bu)
            both = torch.cat([bi, neg])
            items = model.items(f.item_rows(both), both)
            pos, negv = items[: len(bi)], items[len(bi):]
            logits = torch.cat([(u * pos).sum(-1, keepdim=True), u @ negv.T], dim=1) / cfg.temperature
            loss = nn.functional.cross_entropy(logits, torch.zeros(len(bu), dtype=torch.long))
            opt.zero_grad(set_to_none=True)
            if sparse_opt is not None:
                sparse_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sparse_opt is not None:
                sparse_opt.step()
            total += float(loss.detach()) * len(bu)
        rec: dict[str, Any] = {"epoch": epoch, "loss": total / len(perm), "pairs": len(perm), "train_seconds": time.perf_counter() - t0}
        if valid_csr is not None:
            model.eval()
            t1 = time.perf_counter()
            iv = torch.from_numpy(_all_vectors(model.items, f.item_rows, num_items))
            with torch.no_grad():
                uv = model.users(f.user_rows(torch.as_tensor(eval_rows)), torch.as_tensor(eval_rows))
            pos_of = {int(r): k for k, r in enumerate(eval_rows)}

            def score(users: Tensor) -> Tensor:
                rows = torch.as_tensor([pos_of[int(x)] for x in users])
                return uv[rows] @ iv.T

            rec["valid"] = evaluate(score, valid_csr, train_csr, ks=ks, batch_size=256)
            rec["eval_seconds"] = time.perf_counter() - t1
            value = rec["valid"][cfg.select_metric]
            if value > best:
                best, best_state, since = value, copy.deepcopy(model.state_dict()), 0
            else:
                since += 1
            logger.info("epoch %d loss %.4f (%.1f s) valid %s %.4f", epoch, rec["loss"], rec["train_seconds"],
                        cfg.select_metric, value)
        history.append(rec)
        if valid_csr is not None and since >= cfg.patience:
            break
        if cfg.time_budget_s is not None and time.perf_counter() - t_train > cfg.time_budget_s:
            logger.info("training time budget of %.0f s reached after epoch %d", cfg.time_budget_s, epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    ue = _all_vectors(model.users, f.user_rows, num_users)
    ie = _all_vectors(model.items, f.item_rows, num_items)
    return ScaleModel(asdict(cfg), ue, ie, history, features.seconds)
