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
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fusion.train import EpochRecord, TrainedModel, fit_embeddings, train_model
from kgrec.config import FusionConfig
from kgrec.errors import ConfigError

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
    **kwargs: Any,
) -> list[EpochRecord]:
    """``fusion.train.fit_embeddings`` with DDP (``distributed=True``): same arguments, same history, each rank a
    shard of every batch. Must run inside an initialised process group."""
    return fit_embeddings(model, num_users, num_items, train_users, train_items, cfg, distributed=True, **kwargs)


def train_model_ddp(num_users: int, num_items: int, train_users: np.ndarray, train_items: np.ndarray,
                    **kwargs: Any) -> TrainedModel:
    """``fusion.train.train_model`` (same arguments and result) trained with DDP inside a process group.

    Every rank returns the same ``TrainedModel``; save it from rank 0. The EASE hybrid term is not fitted here
    (it is a single-machine dense inverse): train it afterwards with ``fusion.train.add_ease_term`` if wanted.
    """
    return train_model(num_users, num_items, train_users, train_items, distributed=True, **kwargs)


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
    from kgrec.pipeline import _index, open_store, split_pairs, training_graph

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
        len(user_ids), len(item_ids), tr["u"].to_numpy(), tr["i"].to_numpy(),
        graph=training_graph(hetero, id_maps, ds.events, pairs, cfg.kg.also_bought_min_count), text=text, image=image,
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
