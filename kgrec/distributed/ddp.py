"""GNN training with ``torch.distributed`` DistributedDataParallel (gloo on CPU, NCCL on GPU).

The single-process loop (``fusion.train.fit_embeddings``) shuffles the training pairs each epoch and steps once per
batch of ``batch_size`` pairs, each step propagating the full graph. Here every rank holds the graph and the model
(DDP replicates it), draws the **same** permutation and negatives from the same seeded generator, and takes its
contiguous shard of each global batch (``torch.tensor_split``); each rank's loss is scaled by
``shard / batch * world_size`` so that DDP's gradient average equals the gradient of the single-process batch loss.
With the same ``batch_size`` (the global batch) the two runs therefore take the same optimisation steps, up to
floating-point summation order (the tests check embeddings within atol 1e-4 after several epochs).

What is split across ranks is the loss/gradient work over training edges; the full-graph propagation itself runs
on every rank (LightGCN's way; it is one sparse product per layer). Early stopping on validation NDCG@20 is decided
on rank 0 and broadcast, so all ranks stop together and keep the same best state.

Launch:
  * ``torchrun --nproc-per-node 2 -m kgrec.distributed.ddp --dataset DS --out model_dir [--embeddings DIR]``
    (multi-node: ``--nnodes N --node-rank R --rdzv-endpoint host:port``); NCCL is used when CUDA is present.
  * from Python/tests: :func:`spawn` (``torch.multiprocessing.spawn`` on 127.0.0.1 with a free port).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch import nn

from fusion.train import EpochRecord, TrainedModel, _loss, _rows_only, adam, seed_everything
from kgrec.config import FusionConfig
from kgrec.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- process group
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``). Returns ``(rank, world_size, device)``; ``backend="auto"`` picks NCCL with
    one GPU per local rank when CUDA is available, else gloo on CPU."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(
                f"torch.distributed environment incomplete (missing {', '.join(missing)}): launch with "
                "`torchrun --nproc-per-node N -m kgrec.distributed.ddp ...`"
            )
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _spawn_entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), *, threads_per_rank: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes on 127.0.0.1 (a free port).

    ``fn`` must be importable (a module-level function); results travel back through files it writes.
    """
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(world_size, free_port(), fn, args, threads_per_rank), nprocs=world_size, join=True)


# ---------------------------------------------------------------------------------------------------- training loop
def fit_embeddings_ddp(
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
) -> list[EpochRecord]:
    """``fusion.train.fit_embeddings`` with DDP: same arguments, same history, each rank a shard of every batch.

    Must run inside an initialised process group; ``model`` is wrapped in ``DistributedDataParallel`` here and the
    best validation state is loaded back into it on every rank.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fusion.metrics import evaluate, to_csr

    if not dist.is_initialized():
        raise ConfigError("fit_embeddings_ddp needs a process group: call init_distributed() or use spawn()")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = device or torch.device("cpu")
    seed_everything(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    model.to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    tu = torch.as_tensor(np.asarray(train_users), dtype=torch.long)
    ti = torch.as_tensor(np.asarray(train_items), dtype=torch.long)
    n = len(tu)
    if n == 0:
        raise DataError("no training interactions to learn from")
    opt = adam(ddp.parameters(), cfg.lr, device)
    train_csr = to_csr(tu.numpy(), ti.numpy(), (num_users, num_items))
    eval_users = None
    if valid is not None and valid.nnz:
        have = np.flatnonzero(np.diff(sp.csr_matrix(valid).indptr) > 0)
        if len(have) > cfg.max_eval_users:
            eval_users = np.sort(np.random.default_rng(cfg.seed).choice(have, cfg.max_eval_users, replace=False))
    kw = forward_kwargs or (lambda training: {})
    history: list[EpochRecord] = []
    best, best_state, since_best = -1.0, None, 0
    epochs = range(cfg.epochs)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"train (ddp x{world})", unit="epoch")
    for epoch in epochs:
        ddp.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total = torch.zeros(1, dtype=torch.float64)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            b = len(idx)
            # Negatives for the whole global batch, drawn identically on every rank, then sharded with the rows.
            if cfg.loss == "bpr":
                neg = torch.randint(0, num_items, (b, cfg.num_negatives), generator=gen)
            else:
                neg = torch.randint(0, num_items, (cfg.num_negatives,), generator=gen)
            rows = torch.tensor_split(torch.arange(b), world)[rank]
            share = len(rows)
            users, items, ego, _ = ddp(**kw(True))
            if share == 0:  # fewer rows than ranks in a last batch: contribute a zero gradient
                loss = 0.0 * (users.sum() + items.sum())
            else:
                bu, bi = tu[idx[rows]].to(device), ti[idx[rows]].to(device)
                bj = (neg[rows] if cfg.loss == "bpr" else neg).to(device)
                loss = _loss(users[bu], items[bi], items[bj], cfg) * (share / b)
                if cfg.weight_decay:
                    reg = ego[bu].pow(2).sum() + ego[num_users + bi].pow(2).sum() + ego[num_users + bj].pow(2).sum()
                    loss = loss + cfg.weight_decay * reg / (2 * b)
                total += float(loss.detach()) * b
            opt.zero_grad(set_to_none=True)
            (loss * world).backward()  # DDP averages over ranks: x world turns the average into the batch sum
            opt.step()
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
                rec.valid = evaluate(lambda u: users[u.to(device)] @ items.T, heldout, train_csr, ks=(20,), device=device)
                decision[0] = rec.valid["ndcg@20"]
            dist.broadcast(decision, src=0)
            score = float(decision[0])
            rec.valid = rec.valid or {"ndcg@20": score}
            if score >= best:
                best, best_state, since_best = score, copy.deepcopy(model.state_dict()), 0
            else:
                since_best += 1
            if rank == 0:
                logger.info("epoch %d loss %.4f (%.2fs) valid ndcg@20 %.4f", epoch, rec.loss, rec.train_seconds, score)
        history.append(rec)
        if valid is not None and valid.nnz and since_best >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def train_model_ddp(
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
    device: torch.device | None = None,
    progress: bool = False,
) -> TrainedModel:
    """``fusion.train.train_model`` (same arguments and result) trained with DDP inside a process group.

    Every rank returns the same ``TrainedModel``; save it from rank 0. The EASE hybrid term is not fitted here
    (it is a single-machine dense inverse): train it afterwards with ``fusion.train.add_ease_term`` if wanted.
    """
    from fusion.gnn import KGFusionGNN, build_relational_graph
    from fusion.metrics import to_csr

    cfg = config or FusionConfig()
    device = device or torch.device("cpu")
    # The same RNG calls in the same order as train_model, so initial weights match the single-process run.
    seed_everything(cfg.seed)
    text = text if (cfg.use_text and text is not None) else None
    image = image if (cfg.use_image and image is not None) else None
    for name, arr in (("text", text), ("image", image)):
        if arr is not None and arr.shape[0] != num_items:
            raise DataError(f"{name} vectors have {arr.shape[0]} rows but there are {num_items} items")
    rg = build_relational_graph(num_users, num_items, train_users, train_items, graph, use_kg=cfg.use_kg).to(device)
    model = KGFusionGNN(
        rg, cfg.dim, cfg.num_layers, 0 if text is None else text.shape[1], 0 if image is None else image.shape[1]
    ).to(device)
    t_text = None if text is None else torch.as_tensor(np.asarray(text, dtype=np.float32), device=device)
    t_image = None if image is None else torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)
    present = torch.ones(num_items, 3, dtype=torch.bool, device=device)
    if image_present is not None:
        present[:, 1] = torch.as_tensor(np.asarray(image_present, dtype=bool), device=device)
    has_content = t_text is not None or t_image is not None
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

    def forward_kwargs(training: bool) -> dict[str, Any]:
        p = present
        if training and has_content and cfg.id_dropout > 0:
            p = present.clone()
            p[:, 2] = torch.rand(num_items, generator=gen).to(device) >= cfg.id_dropout
        return {"text": t_text, "image": t_image, "present": p}

    valid_csr = None if valid is None else to_csr(valid[0], valid[1], (num_users, num_items))
    train_csr = to_csr(np.asarray(train_users), np.asarray(train_items), (num_users, num_items))
    history = fit_embeddings_ddp(
        model, num_users, num_items, train_users, train_items, cfg,
        valid=valid_csr, forward_kwargs=forward_kwargs, device=device, progress=progress,
    )
    with torch.no_grad():
        users, items, _, weights = model(**forward_kwargs(False))
    return TrainedModel(
        config=cfg.model_dump(mode="json"),
        user_embeddings=users.cpu().numpy().astype(np.float32),
        item_embeddings=items.cpu().numpy().astype(np.float32),
        modality_weights=weights.cpu().numpy().astype(np.float32),
        history=[{"epoch": h.epoch, "loss": h.loss, "train_seconds": h.train_seconds, "valid": h.valid} for h in history],
        relation_weights=dict(zip(rg.relations, model.relation_weights().detach().cpu().tolist())),
        train_matrix=train_csr,
        fusion=model.fusion.cpu().eval(),
        num_layers=cfg.num_layers,
    )


# ---------------------------------------------------------------------------------------------------- torchrun entry
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kgrec.distributed.ddp",
                                description="Train the GNN on a dataset with DDP (launch with torchrun).")
    p.add_argument("--dataset", required=True, help="dataset directory (kgrec ingest output)")
    p.add_argument("--out", required=True, help="directory for the trained fusion model (written by rank 0)")
    p.add_argument("--config", default=None, help="YAML config (the fusion section is used)")
    p.add_argument("--embeddings", default=None, help="item embeddings directory (kgrec encode output)")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: every rank reads the dataset and graph, trains with DDP; rank 0 saves the model."""
    from encoders.items import ItemEmbeddings
    from kgrec.config import Config
    from kgrec.data.schema import Dataset
    from kgrec.pipeline import _index, open_store, split_pairs

    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world, device = init_distributed(args.backend)
    cfg = Config.load(args.config)
    ds = Dataset.open(args.dataset)
    store = open_store(cfg)
    store.load(ds)
    hetero, id_maps = store.to_hetero_data()
    user_ids, item_ids = list(id_maps["user"]), list(id_maps["item"])
    pairs = split_pairs(ds, ds.events, _index(user_ids), _index(item_ids), seed=cfg.fusion.seed)
    tr, va = pairs[pairs["split"] == 0], pairs[pairs["split"] == 1]
    text = image = present = None
    if args.embeddings:
        emb = ItemEmbeddings.load(args.embeddings)
        pos = _index(emb.item_ids)
        order = np.array([pos[i] for i in item_ids], dtype=np.int64)
        text = emb.text[order] if emb.text.shape[1] else None
        image = emb.image[order] if emb.image.shape[1] else None
        present = emb.has_image[order] if image is not None else None
    model = train_model_ddp(
        len(user_ids), len(item_ids), tr["u"].to_numpy(), tr["i"].to_numpy(), graph=hetero, text=text, image=image,
        image_present=present, valid=(va["u"].to_numpy(), va["i"].to_numpy()) if len(va) else None,
        config=cfg.fusion, device=device, progress=True,
    )
    if rank == 0:
        model.save(Path(args.out))
        logger.info("rank 0 saved the model (%d ranks) to %s", world, args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover - torchrun entry
    raise SystemExit(main())
