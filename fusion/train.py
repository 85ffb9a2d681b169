"""Training: mini-batches of training edges over full-graph propagation, BPR or sampled-softmax loss, early stopping
on validation NDCG@20, and the ``TrainedModel`` the rest of the system uses.

Every epoch shuffles the (user, item) training pairs into batches of ``batch_size``; each batch propagates the whole
graph once (LightGCN's way, sparse, scales to millions of edges on CPU), then
  * ``loss="bpr"``: ``-log sigmoid(s(u,i) - s(u,j))`` with ``num_negatives`` uniform negatives ``j`` per positive;
  * ``loss="softmax"``: cross-entropy of the positive against ``num_negatives`` uniform negatives shared by the
    batch, logits divided by ``temperature``;
plus ``weight_decay * (|e_u|^2 + |e_i|^2 + |e_j|^2) / (2 * batch)`` on the layer-0 vectors of the batch. After each epoch
the model is evaluated on the validation split (train items masked); the best NDCG@20 state (``>=`` counts, as in
RecBole) is kept and training stops after ``patience`` epochs without improvement.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from kgrec.config import FusionConfig
from kgrec.errors import BundleError, ConfigError, DataError
from fusion.fusion import MODALITIES, ModalityFusion
from fusion.gnn import KGFusionGNN, build_relational_graph
from fusion.metrics import evaluate, to_csr

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_seconds: float
    valid: dict[str, float] = field(default_factory=dict)


def _loss(u: Tensor, pos: Tensor, neg: Tensor, cfg: FusionConfig) -> Tensor:
    """u, pos (b, d); neg (b, n, d) for bpr or (n, d) shared for softmax (the per-positive form; ``batch_loss``
    computes the same softmax loss with its negative scores per user)."""
    pos_s = (u * pos).sum(-1)
    if cfg.loss == "bpr":
        neg_s = torch.einsum("bd,bnd->bn", u, neg)
        return -torch.nn.functional.logsigmoid(pos_s.unsqueeze(1) - neg_s).mean()
    neg_s = u @ neg.T
    logits = torch.cat([pos_s.unsqueeze(1), neg_s], dim=1) / cfg.temperature
    return torch.nn.functional.cross_entropy(logits, torch.zeros(len(u), dtype=torch.long, device=u.device))


def batch_loss(users: Tensor, items: Tensor, bu: Tensor, bi: Tensor, bj: Tensor, cfg: FusionConfig) -> Tensor:
    """Loss of a batch: ``users`` (U, d), ``items`` (I, d) final vectors; ``bu``, ``bi`` (b,) positive pairs; ``bj``
    (b, n) negatives per positive for bpr, or (n,) negatives shared by the batch for softmax.

    Softmax: ``-log(e^{s_ui} / (e^{s_ui} + sum_j e^{s_uj}))`` with ``s = u . i / temperature``, computed as
    ``logaddexp(s_ui, lse_u) - s_ui`` where ``lse_u = logsumexp_j s_uj`` is computed once per user (U x n scores)
    rather than once per positive (b x n): the same number, ~b/U times less work (ml-100k: 8192 positives, 943 users).
    """
    if cfg.loss == "bpr":
        return _loss(users[bu], items[bi], items[bj], cfg)
    pos_s = (users[bu] * items[bi]).sum(-1) / cfg.temperature
    if users.shape[0] <= len(bu):
        lse = torch.logsumexp((users @ items[bj].T) / cfg.temperature, dim=1)[bu]
    else:  # more users than positives (large data): score only the batch's users
        uniq, inverse = torch.unique(bu, return_inverse=True)
        lse = torch.logsumexp((users[uniq] @ items[bj].T) / cfg.temperature, dim=1)[inverse]
    return (torch.logaddexp(pos_s, lse) - pos_s).mean()


def adam(params: Any, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel on CPU and CUDA (one pass over the ~N x dim embedding table instead of a dozen
    elementwise ops: ml-100k + KG, 2.4M parameters, optimizer step 6.9 -> 2.6 ms, measured)."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))


@contextlib.contextmanager
def deterministic_torch(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside (warnings, not errors, for ops without a deterministic
    kernel), the previous setting restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def fit_embeddings(
    model: nn.Module,
    num_users: int,
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    cfg: FusionConfig,
    *,
    valid: sp.csr_matrix | None = None,
    forward_kwargs: Callable[[bool], dict[str, Any]] | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    distributed: bool = False,
) -> list[EpochRecord]:
    """Train any module whose ``forward(**kw)`` returns ``(users (U,d), items (I,d), ego (U+I+.., d), extra)``.

    ``ego`` rows ``[0, U)`` are users' and ``[U, U+I)`` items' layer-0 vectors (regularised). The best validation
    state is loaded back into ``model`` at the end. Returns the per-epoch history.

    ``distributed=True`` (inside an initialised ``torch.distributed`` process group; ``kgrec.distributed.ddp``):
    ``model`` is wrapped in ``DistributedDataParallel``; every rank draws the same permutation and negatives from the
    same seeded generator and takes its contiguous shard of each global batch (``torch.tensor_split``), its loss
    scaled by ``shard / batch * world_size`` so that DDP's gradient average equals the single-process batch gradient;
    early stopping is decided on rank 0 and broadcast. With one process the two paths are the same computation.

    ``cfg.deterministic`` (default on) runs it under ``torch.use_deterministic_algorithms``: the scatter-adds of
    the propagation otherwise sum in thread-timing order, so two runs on 2 threads differed at ~1e-9, enough to flip
    the re-ranker's early stopping downstream (measured); the setting is restored afterwards.
    """
    with deterministic_torch(cfg.deterministic):
        if distributed:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel as DDP

            if not dist.is_initialized():
                raise ConfigError("distributed training needs a process group: call init_distributed() or use spawn()")
            rank, world = dist.get_rank(), dist.get_world_size()
            device = device or torch.device("cpu")
        else:
            rank, world = 0, 1
            device = device or resolve_device(cfg.device)
        seed_everything(cfg.seed)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        model.to(device)
        net: nn.Module = model
        if distributed:
            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        # copies: the caller's arrays may be read-only views (pandas / pyarrow), which torch warns about sharing
        tu = torch.tensor(np.asarray(train_users, dtype=np.int64))
        ti = torch.tensor(np.asarray(train_items, dtype=np.int64))
        n = len(tu)
        if n == 0:
            raise DataError("no training interactions to learn from")
        opt = adam(net.parameters(), cfg.lr, device)
        train_csr = to_csr(tu.numpy(), ti.numpy(), (num_users, num_items))
        eval_users = None
        if valid is not None and valid.nnz:
            have = np.flatnonzero(np.diff(sp.csr_matrix(valid).indptr) > 0)
            if len(have) > cfg.max_eval_users:
                eval_users = np.sort(np.random.default_rng(cfg.seed).choice(have, cfg.max_eval_users, replace=False))
        history: list[EpochRecord] = []
        best, best_state, since_best = -1.0, None, 0
        kw = forward_kwargs or (lambda training: {})
        epochs = range(cfg.epochs)
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm

            epochs = bar = tqdm(epochs, desc="train" if world == 1 else f"train (ddp x{world})", unit="epoch")
        for epoch in epochs:
            net.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=gen)
            total = torch.zeros(1, dtype=torch.float64)
            for start in range(0, n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                b = len(idx)
                # negatives for the whole (global) batch, drawn identically on every rank, sharded with the rows
                if cfg.loss == "bpr":
                    neg = torch.randint(0, num_items, (b, cfg.num_negatives), generator=gen)
                else:
                    neg = torch.randint(0, num_items, (cfg.num_negatives,), generator=gen)
                rows = torch.tensor_split(torch.arange(b), world)[rank] if distributed else None
                users, items, ego, _ = net(**kw(True))
                if rows is not None and len(rows) == 0:  # fewer rows than ranks in a last batch: a zero gradient
                    loss = 0.0 * (users.sum() + items.sum())
                else:
                    sel = idx if rows is None else idx[rows]
                    bu, bi = tu[sel].to(device), ti[sel].to(device)
                    bj = (neg if rows is None or cfg.loss != "bpr" else neg[rows]).to(device)
                    loss = batch_loss(users, items, bu, bi, bj, cfg)
                    if rows is not None:
                        loss = loss * (len(sel) / b)
                    if cfg.weight_decay:
                        reg = ego[bu].pow(2).sum() + ego[num_users + bi].pow(2).sum() + ego[num_users + bj].pow(2).sum()
                        loss = loss + cfg.weight_decay * reg / (2 * b)
                    total += float(loss.detach()) * b
                opt.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks: x world turns the average into the batch sum
                (loss * world if distributed else loss).backward()
                opt.step()
            if distributed:
                dist.all_reduce(total)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rec = EpochRecord(epoch, float(total.item()) / n, time.perf_counter() - t0)
            if valid is not None and valid.nnz:
                decision = torch.zeros(1, dtype=torch.float64)
                if rank == 0:
                    model.eval()
                    with torch.no_grad():
                        users, items, _, _ = model(**kw(False))
                    heldout = valid if eval_users is None else _rows_only(valid, eval_users)
                    rec.valid = evaluate(lambda u: users[u.to(device)] @ items.T, heldout, train_csr, ks=(20,),
                                         device=device)
                    decision[0] = rec.valid["ndcg@20"]
                if distributed:
                    dist.broadcast(decision, src=0)
                score = float(decision[0])
                rec.valid = rec.valid or {"ndcg@20": score}
                if score >= best:
                    best, best_state, since_best = score, copy.deepcopy(model.state_dict()), 0
                else:
                    since_best += 1
                if rank == 0:
                    # per epoch at DEBUG (and in the progress bar); one summary line at INFO after the loop
                    logger.debug("epoch %d loss %.4f (%.2fs) valid ndcg@20 %.4f", epoch, rec.loss, rec.train_seconds,
                                 score)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec.loss:.4f}", ndcg20=f"{score:.4f}", best=f"{best:.4f}",
                                        refresh=False)
            elif bar is not None:
                bar.set_postfix(loss=f"{rec.loss:.4f}", refresh=False)
            history.append(rec)
            if valid is not None and valid.nnz and since_best >= cfg.patience:
                break
        if bar is not None:
            bar.close()
        if rank == 0 and history:
            scored = [r for r in history if r.valid]
            if scored:
                top = scored[0]
                for r in scored:  # the one kept: the last of equal bests, as in the loop
                    top = r if r.valid["ndcg@20"] >= top.valid["ndcg@20"] else top
                logger.info("trained %d epochs (%.1fs); best valid ndcg@20 %.4f at epoch %d, kept", len(history),
                            sum(r.train_seconds for r in history), top.valid["ndcg@20"], top.epoch + 1)  # 1-based
            else:
                logger.info("trained %d epochs (%.1fs), final loss %.4f", len(history),
                            sum(r.train_seconds for r in history), history[-1].loss)
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        if distributed:
            # Free the DDP wrapper (its reducer holds the process group and sits in reference cycles) while the group
            # is alive: left to the interpreter's exit, its teardown after destroy_process_group() aborted a gloo rank
            # ("terminate called without an active exception") in about one run of two ranks in twenty-five.
            del net, opt
            gc.collect()
            dist.barrier()
        return history


def _rows_only(m: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    keep = np.zeros(m.shape[0], dtype=bool)
    keep[rows] = True
    return sp.csr_matrix(sp.diags(keep.astype(np.float32)) @ m)


@dataclass
class TrainedModel:
    """A trained model as plain arrays: what retrieval, ranking and the bundle need.

    Attributes:
        config: the ``FusionConfig`` fields used (JSON-able dict).
        user_embeddings: (num_users, dim) float32.
        item_embeddings: (num_items, dim) float32.
        modality_weights: (num_items, 3) float32, attention weights over ``MODALITIES`` (text, image, graph).
        history: per-epoch ``{"epoch", "loss", "train_seconds", "valid": {...}}``.
        relation_weights: learned gate per graph relation.
        train_matrix: (num_users, num_items) CSR of training positives (masking, hybrid term).
        fusion: the fusion layer (cold-start items and content queries go through it).
        item_item: optional (num_items, num_items) EASE matrix; ``hybrid_weight`` scales its term.
    """

    config: dict[str, Any]
    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    modality_weights: np.ndarray
    history: list[dict[str, Any]]
    relation_weights: dict[str, float]
    train_matrix: sp.csr_matrix
    fusion: ModalityFusion
    num_layers: int
    item_item: np.ndarray | None = None
    hybrid_weight: float = 0.0
    ease_lambda: float | None = None
    hybrid_relative_weight: float | None = None  # the weight as chosen (1 = EASE and embeddings equal on average);
    # None in models saved before it was recorded

    @property
    def kept_epochs(self) -> int:
        """Epochs behind the kept state: up to the best validation epoch (the last of equal bests), else all run."""
        scored = [h for h in self.history if h.get("valid")]
        if not scored:
            return len(self.history)
        top = scored[0]
        for h in scored:
            top = h if h["valid"]["ndcg@20"] >= top["valid"]["ndcg@20"] else top
        return int(top["epoch"]) + 1

    @property
    def num_users(self) -> int:
        return self.user_embeddings.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_embeddings.shape[0]

    # ------------------------------------------------------------------ scoring
    def score_all(self, users: np.ndarray | Tensor, device: str | torch.device = "cpu") -> Tensor:
        """Scores (b, num_items) float32 of users against every item (embedding dot product + hybrid term)."""
        u = np.asarray(torch.as_tensor(users).cpu(), dtype=np.int64)
        ue = torch.as_tensor(self.user_embeddings[u], device=device)
        out = ue @ torch.as_tensor(self.item_embeddings, device=device).T
        if self.item_item is not None and self.hybrid_weight:
            x = torch.as_tensor(self.train_matrix[u].toarray(), device=device)
            out = out + self.hybrid_weight * (x @ torch.as_tensor(self.item_item, device=device))
        return out

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Scores (n,) of paired ``users[k]``, ``items[k]``."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        out = np.einsum("nd,nd->n", self.user_embeddings[users], self.item_embeddings[items])
        if self.item_item is not None and self.hybrid_weight:
            x = self.train_matrix[users]
            out = out + self.hybrid_weight * np.asarray(x.multiply(self.item_item[:, items].T).sum(1)).ravel()
        return out.astype(np.float32)

    def recommend(self, users: np.ndarray, k: int = 10, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items (b, k) int64 and scores (b, k) for each user, training items excluded by default."""
        from fusion.retrieve import topk_from_scores

        users = np.asarray(users, dtype=np.int64)
        scores = self.score_all(users)
        exclude = self.train_matrix[users] if exclude_seen else None
        return topk_from_scores(scores, k, exclude)

    def similar_items(self, item_idx: int | np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Items most similar (cosine of item vectors) to each given item, itself excluded."""
        from fusion.retrieve import similar_items

        return similar_items(self.item_embeddings, item_idx, k)

    # ------------------------------------------------------------------ cold start
    def item_vectors_from_content(self, text: np.ndarray | None = None, image: np.ndarray | None = None,
                                  image_present: np.ndarray | None = None) -> np.ndarray:
        """Vectors (n, dim) for items unseen in training, from content alone.

        Equals what the model computes for an item with no interactions or KG edges: the fused layer-0 vector
        (no ID embedding) divided by ``num_layers + 1`` (LightGCN's layer mean, where all propagated layers are 0).
        ``image_present`` (n,) bool marks the rows of ``image`` that are real pictures, as in training: the others
        (zero rows of items without an image) get no image weight.
        """
        if text is None and image is None:
            raise DataError("a cold-start item needs text or image vectors")
        if text is not None and self.fusion.text_proj is None:
            raise DataError("this model was trained without text vectors; give image vectors or retrain with text")
        if image is not None and self.fusion.image_proj is None:
            raise DataError("this model was trained without image vectors; give text vectors or retrain with images")
        with torch.no_grad():
            t = None if text is None else torch.as_tensor(np.asarray(text, dtype=np.float32))
            i = None if image is None else torch.as_tensor(np.asarray(image, dtype=np.float32))
            fused, _ = self.fusion(None, t, i, present=content_present(t, i, image_present))
        return (fused / (self.num_layers + 1)).numpy().astype(np.float32)

    def user_vector_from_items(self, items: np.ndarray) -> np.ndarray:
        """A vector (dim,) for a user without history, from a few chosen items (mean of their vectors)."""
        items = np.asarray(items, dtype=np.int64)
        if items.size == 0:
            raise DataError("give at least one item to build a user vector from")
        return self.item_embeddings[items].mean(0)

    def user_vector_from_content(self, text: np.ndarray | None = None, image: np.ndarray | None = None) -> np.ndarray:
        """A vector (dim,) for a user without history, from a text and/or image query vector (encoder output)."""
        t = None if text is None else np.asarray(text, dtype=np.float32).reshape(1, -1)
        i = None if image is None else np.asarray(image, dtype=np.float32).reshape(1, -1)
        return self.item_vectors_from_content(t, i)[0] * (self.num_layers + 1)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` (config, history, relation weights) and ``model.safetensors``; atomic rename."""
        from safetensors.numpy import save_file

        from kgrec.data.schema import atomic_directory

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            tensors = {
                "user_embeddings": self.user_embeddings.astype(np.float32),
                "item_embeddings": self.item_embeddings.astype(np.float32),
                "modality_weights": self.modality_weights.astype(np.float32),
                "train_indptr": self.train_matrix.indptr.astype(np.int64),
                "train_indices": self.train_matrix.indices.astype(np.int64),
            }
            for name, value in self.fusion.state_dict().items():
                tensors[f"fusion.{name}"] = value.detach().cpu().numpy()
            if self.item_item is not None:
                tensors["item_item"] = self.item_item.astype(np.float32)
            # safetensors writes raw buffers: make every array C-contiguous (a transposed view would load transposed)
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"))
            meta = {
                "format_version": FORMAT_VERSION,
                "config": self.config,
                "num_layers": self.num_layers,
                "num_users": self.num_users,
                "num_items": self.num_items,
                "dim": int(self.item_embeddings.shape[1]),
                "text_dim": 0 if self.fusion.text_proj is None else self.fusion.text_proj.in_features,
                "image_dim": 0 if self.fusion.image_proj is None else self.fusion.image_proj.in_features,
                "attention_dim": self.fusion.att.out_features,
                "hybrid_weight": self.hybrid_weight,
                "ease_lambda": self.ease_lambda,
                "hybrid_relative_weight": self.hybrid_relative_weight,
                "relation_weights": self.relation_weights,
                "modalities": list(MODALITIES),
                "history": self.history,
            }
            (tmp / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TrainedModel:
        """Read a directory written by ``save``."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        cfg_path, weights = directory / "config.json", directory / "model.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise BundleError(f"{directory} is not a saved fusion model (needs config.json and model.safetensors); "
                              "write one with TrainedModel.save")
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{cfg_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}; retrain")
        t = load_file(str(weights))
        fusion = ModalityFusion(meta["dim"], meta["text_dim"], meta["image_dim"], meta["attention_dim"])
        fusion.load_state_dict({k[len("fusion."):]: torch.as_tensor(v) for k, v in t.items() if k.startswith("fusion.")})
        fusion.eval()
        train = sp.csr_matrix(
            (np.ones(len(t["train_indices"]), dtype=np.float32), t["train_indices"], t["train_indptr"]),
            shape=(meta["num_users"], meta["num_items"]),
        )
        return cls(
            config=meta["config"],
            user_embeddings=t["user_embeddings"],
            item_embeddings=t["item_embeddings"],
            modality_weights=t["modality_weights"],
            history=meta["history"],
            relation_weights=meta["relation_weights"],
            train_matrix=train,
            fusion=fusion,
            num_layers=meta["num_layers"],
            item_item=t.get("item_item"),
            hybrid_weight=meta["hybrid_weight"],
            ease_lambda=meta["ease_lambda"],
            hybrid_relative_weight=meta.get("hybrid_relative_weight"),
        )


def content_present(text: Any, image: Any, image_present: np.ndarray | None) -> Any:
    """(n, 3) bool ``present`` mask for the fusion layer on content alone (text, image, no graph), or None when
    every given image row is a real picture."""
    if image is None or image_present is None:
        return None
    n = image.shape[0]
    present = torch.zeros(n, 3, dtype=torch.bool)
    present[:, 0] = text is not None
    # without a text tower an item with no picture keeps its (zero) image row: one modality must remain
    present[:, 1] = torch.as_tensor(np.asarray(image_present, dtype=bool)) | (text is None)
    return present


def train_model(
    num_users: int,
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    *,
    graph: Any | None = None,
    text: np.ndarray | None = None,
    image: np.ndarray | None = None,
    image_present: np.ndarray | None = None,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    config: FusionConfig | None = None,
    progress: bool = False,
    device: torch.device | None = None,
    distributed: bool = False,
) -> TrainedModel:
    """Train the relation-aware GNN with fused item inputs and return a ``TrainedModel``.

    Args:
        num_users, num_items: index space sizes.
        train_users, train_items: (n,) int arrays of training interactions (implicit positives).
        graph: optional ``HeteroData`` with KG node/edge types (see ``fusion.gnn.build_relational_graph``).
        text: optional (num_items, d_t) float32 item text vectors.
        image: optional (num_items, d_i) float32 item image vectors.
        image_present: optional (num_items,) bool, False for items whose image row is a placeholder.
        valid: optional (users, items) validation pairs for early stopping (and the hybrid weight choice).
        config: ``FusionConfig``; ``use_kg`` / ``use_text`` / ``use_image`` switch the ablations.
        device: default ``config.device`` resolved (``cpu`` when distributed).
        distributed: train with DDP inside an initialised process group (``fit_embeddings``); every rank returns the
            same model. The EASE hybrid term is not fitted then (a single-machine dense inverse): add it afterwards
            with ``add_ease_term`` if wanted.
    """
    cfg = config or FusionConfig()
    with deterministic_torch(cfg.deterministic):  # same result every run (fit_embeddings)
        if cfg.trainer == "scale" and not distributed:
            return train_scale_as_trained_model(
                num_users, num_items, train_users, train_items, graph=graph, text=text, image=image,
                image_present=image_present, valid=valid, config=cfg, progress=progress)
        device = device or (torch.device("cpu") if distributed else resolve_device(cfg.device))
        seed_everything(cfg.seed)
        text = text if (cfg.use_text and text is not None) else None
        image = image if (cfg.use_image and image is not None) else None
        for name, arr in (("text", text), ("image", image)):
            if arr is not None and arr.shape[0] != num_items:
                raise DataError(f"{name} vectors have {arr.shape[0]} rows but there are {num_items} items")
        rg = build_relational_graph(num_users, num_items, train_users, train_items, graph, use_kg=cfg.use_kg,
                                    prune_leaves=cfg.prune_kg_leaves).to(device)
        model = KGFusionGNN(
            rg, cfg.dim, cfg.num_layers,
            0 if text is None else text.shape[1], 0 if image is None else image.shape[1],
        ).to(device)
        t_text = None if text is None else torch.as_tensor(np.asarray(text, dtype=np.float32), device=device)
        t_image = None if image is None else torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)
        present = torch.ones(num_items, 3, dtype=torch.bool, device=device)
        if image_present is not None:
            present[:, 1] = torch.as_tensor(np.asarray(image_present, dtype=bool), device=device)
        has_content = t_text is not None or t_image is not None
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

        if has_content and cfg.id_dropout >= 1.0:  # content-only items: no ID modality at training or inference
            present[:, 2] = False

        def forward_kwargs(training: bool) -> dict[str, Any]:
            p = present
            if training and has_content and 0 < cfg.id_dropout < 1:
                p = present.clone()
                p[:, 2] = torch.rand(num_items, generator=gen).to(device) >= cfg.id_dropout
            return {"text": t_text, "image": t_image, "present": p}

        valid_csr = None if valid is None else to_csr(valid[0], valid[1], (num_users, num_items))
        train_csr = to_csr(np.asarray(train_users), np.asarray(train_items), (num_users, num_items))
        history = fit_embeddings(
            model, num_users, num_items, train_users, train_items, cfg,
            valid=valid_csr, forward_kwargs=forward_kwargs, device=device, progress=progress, distributed=distributed,
        )
        with torch.no_grad():
            users, items, _, weights = model(**forward_kwargs(False))
        tm = TrainedModel(
            config=cfg.model_dump(mode="json"),
            user_embeddings=users.cpu().numpy().astype(np.float32),
            item_embeddings=items.cpu().numpy().astype(np.float32),
            modality_weights=weights.cpu().numpy().astype(np.float32),
            history=[{"epoch": h.epoch, "loss": h.loss, "train_seconds": h.train_seconds, "valid": h.valid}
                     for h in history],
            relation_weights=dict(zip(rg.relations, model.relation_weights().detach().cpu().tolist())),
            train_matrix=train_csr,
            fusion=model.fusion.cpu().eval(),
            num_layers=cfg.num_layers,
        )
        if cfg.hybrid_ease and valid_csr is not None and num_items <= cfg.max_ease_items and not distributed:
            add_ease_term(tm, valid_csr, cfg, device=device)
        return tm


def add_ease_term(tm: TrainedModel, valid: sp.csr_matrix, cfg: FusionConfig, device: torch.device | str = "cpu",
                  *, setting: tuple[float, float] | None = None, absolute_weight: float | None = None) -> None:
    """Fit EASE on the training matrix and choose (lambda, weight) of the hybrid term by validation NDCG@20.

    The embedding scores are rescaled per model so that weight 1 means "EASE and the GNN contribute equally on
    average" (ratio of mean absolute score over validation users); ``hybrid_weight`` stores the absolute factor,
    ``hybrid_relative_weight`` the weight chosen. ``setting=(lambda, relative weight)`` uses that one setting
    without a search (another model's choice); ``valid`` then only names the users the scales are measured on, and
    ``absolute_weight`` (a model saved before the relative weight was kept) replaces the rescaled factor.
    """
    from fusion.baselines import EASE

    users = np.flatnonzero(np.diff(valid.indptr) > 0)
    emb_scale = float(np.abs(tm.score_all(users[:512]).numpy()).mean()) if tm.hybrid_weight == 0 else 1.0
    x = torch.as_tensor(tm.train_matrix[users[:512]].toarray())

    def fit(lam: float) -> tuple[np.ndarray, float]:
        """EASE's item-item matrix and its mean absolute score (weight w means ``w * emb_scale / ease_scale``)."""
        b = EASE(lam, device=str(device)).fit(tm.train_matrix).B.cpu().numpy()
        return b, float((x @ torch.as_tensor(b)).abs().mean()) or 1.0

    if setting is not None:
        lam, w = setting
        b, ease_scale = fit(lam)
        tm.item_item, tm.ease_lambda, tm.hybrid_relative_weight = b, lam, float(w)
        tm.hybrid_weight = w * emb_scale / ease_scale if absolute_weight is None else absolute_weight
        logger.debug("EASE term: lambda %.0f, weight %.2f given", lam, w)
    else:
        best: tuple[float, Any, float, Any, float] = (-1.0, None, 0.0, None, 0.0)  # score, B, weight, lambda, w
        for lam in cfg.ease_lambdas:
            b, ease_scale = fit(lam)
            for w in cfg.hybrid_weights:
                tm.item_item, tm.hybrid_weight = b, w * emb_scale / ease_scale
                res = evaluate(lambda u: tm.score_all(u), valid, tm.train_matrix, ks=(20,))
                logger.debug("hybrid lambda %.0f weight %.2f: valid ndcg@20 %.4f", lam, w, res["ndcg@20"])
                if res["ndcg@20"] > best[0]:
                    best = (res["ndcg@20"], b, tm.hybrid_weight, lam, w)
        score, tm.item_item, tm.hybrid_weight, tm.ease_lambda, chosen = best
        tm.hybrid_relative_weight = float(chosen)
        tried = len(cfg.ease_lambdas) * len(cfg.hybrid_weights)
        if score < 0:  # nothing tried, or no setting scored (NaN): no EASE term
            logger.info("EASE term: not used, no setting scored on valid (%d settings tried)", tried)
        elif chosen:
            logger.info("EASE term: lambda %.0f, weight %.2f, chosen on valid ndcg@20 %.4f (%d settings tried)",
                        tm.ease_lambda, chosen, score, tried)
        else:
            logger.info("EASE term: not used, weight 0 is best on valid ndcg@20 %.4f (%d settings tried)", score, tried)
    if tm.hybrid_weight == 0:
        tm.item_item, tm.ease_lambda = None, None


def train_scale_as_trained_model(
    num_users: int,
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    *,
    graph: Any | None = None,
    text: np.ndarray | None = None,
    image: np.ndarray | None = None,
    image_present: np.ndarray | None = None,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    config: FusionConfig | None = None,
    progress: bool = False,
) -> TrainedModel:
    """``fusion.trainer: scale``: the ``fusion.scale`` two-tower trainer behind ``train_model``'s interface.

    Arguments as :func:`train_model`. The result is a :class:`TrainedModel` (saved and loaded like the GNN's) whose
    ``modality_weights`` are uniform over the modalities used (the towers have no per-item attention), whose
    ``fusion`` layer has no content projections (cold-start items need a retrain: ``item_vectors_from_content``
    says so), and without an EASE term.
    """
    from fusion.scale import ScaleTrainConfig, propagate_features, train_scale_model

    cfg = config or FusionConfig(trainer="scale")
    text = text if (cfg.use_text and text is not None) else None
    image = image if (cfg.use_image and image is not None) else None
    image_vectors = image_items = None
    if image is not None:
        if image.shape[0] != num_items:
            raise DataError(f"image vectors have {image.shape[0]} rows but there are {num_items} items")
        image_items = (np.flatnonzero(np.asarray(image_present, dtype=bool)) if image_present is not None
                       else np.arange(num_items))
        image_vectors = np.asarray(image, dtype=np.float32)[image_items]
    kg = graph if cfg.use_kg else None
    features = propagate_features(num_users, num_items, np.asarray(train_users), np.asarray(train_items),
                                  content=None if text is None else np.asarray(text, dtype=np.float32), graph=kg,
                                  image_vectors=image_vectors, image_items=image_items)
    known = {f.name for f in dataclasses.fields(ScaleTrainConfig)}
    unknown = sorted(set(cfg.scale_options) - known)
    if unknown:
        raise ConfigError(f"fusion.scale_options has unknown keys {unknown}; known: {sorted(known)}")
    scale_cfg = ScaleTrainConfig(**{"dim": cfg.dim, "max_eval_users": cfg.max_eval_users, "seed": cfg.seed,
                                    **cfg.scale_options})
    m = train_scale_model(num_users, num_items, train_users, train_items, features=features, valid=valid,
                          config=scale_cfg, progress=progress)
    used = np.array([text is not None, image_vectors is not None, "kg" in features.blocks], dtype=np.float32)
    weights = np.tile(used / max(float(used.sum()), 1.0), (num_items, 1)).astype(np.float32)
    train_csr = to_csr(np.asarray(train_users), np.asarray(train_items), (num_users, num_items))
    train_csr.data[:] = 1.0
    return TrainedModel(
        config={**cfg.model_dump(mode="json"), "scale": m.config, "feature_blocks": {k: list(v) for k, v in features.blocks.items()}},
        user_embeddings=m.user_embeddings, item_embeddings=m.item_embeddings, modality_weights=weights,
        history=[{k: v for k, v in h.items() if k in ("epoch", "loss", "train_seconds", "valid")} for h in m.history],
        relation_weights={}, train_matrix=train_csr, fusion=ModalityFusion(cfg.dim).eval(), num_layers=0,
    )
