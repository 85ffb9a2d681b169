"""Scale-out commands: ``kgrec encode-dask``, ``kgrec validate-events`` (``--engine local|dask --scheduler ADDR``)
and ``kgrec train-ddp`` (prints/execs the torchrun line for DDP GNN training)."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from kgrec.commands._common import CONFIG_OPTION, clean_errors, load_config

ENGINE_OPTION = typer.Option("local", "--engine", help="local (this process) | dask (a Dask cluster).")
SCHEDULER_OPTION = typer.Option(
    None, "--scheduler", help="Dask scheduler address (tcp://host:8786); without it a LocalCluster is started."
)
WORKERS_OPTION = typer.Option(2, "--workers", min=1, help="Workers of the LocalCluster started when no --scheduler.")


def register(app: typer.Typer) -> None:
    app.command("encode-dask")(encode_dask_command)
    app.command("validate-events")(validate_events_command)
    app.command("train-ddp")(train_ddp_command)
    app.command("distill-static")(distill_static_command)


@clean_errors
def distill_static_command(
    out: Path = typer.Argument(..., help="Directory to write the static encoder to."),
    base: str = typer.Option("packaged:all-MiniLM-L6-v2", "--base", help="Text model to distil from."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Dataset whose item texts give the token weights."),
    vocabulary: str = typer.Option("all", "--vocabulary", help="all (every token) | corpus (tokens of --dataset)."),
    pca_dims: int = typer.Option(256, "--pca-dims", min=0, help="PCA dimensions (0: keep the model's width)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Distil a static (Model2Vec-style) text encoder for big catalogs; use it with
    `encoders.text_model: static:OUT` (thousands of items/s on CPU instead of tens)."""
    from encoders.static import StaticTextEncoder

    load_config(config)
    corpus = None
    if dataset is not None:
        from encoders.items import item_text
        from kgrec.data.schema import Dataset

        corpus = [item_text(r) for r in Dataset.open(dataset).items.to_dict("records")]
    t = time.perf_counter()
    enc = StaticTextEncoder.distill(base, corpus=corpus, vocabulary=vocabulary, pca_dims=pca_dims or None,
                                    show_progress=True)
    enc.save(out)
    typer.echo(f"distilled {enc.info['tokens']:,} tokens from {base} into {enc.dim}-d rows in "
               f"{time.perf_counter() - t:.1f} s -> {out}; set encoders.text_model: static:{out}")


@clean_errors
def encode_dask_command(
    dataset: Path = typer.Argument(..., help="Dataset directory (from `kgrec ingest`)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Item embeddings directory [DATASET/embeddings]."),
    engine: str = ENGINE_OPTION,
    scheduler: str | None = SCHEDULER_OPTION,
    workers: int = WORKERS_OPTION,
    text_model: str | None = typer.Option(None, "--text-model", help="packaged:all-MiniLM-L6-v2 or a directory every worker can read."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (per worker)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Encode item text with one model per Dask worker (or locally) and save the item embeddings (text only;
    images and CLIP text go through `kgrec encode`)."""
    import numpy as np

    from encoders.items import STATUS_FAILED, STATUS_TEXT_ONLY, ItemEmbeddings, item_text
    from kgrec.data.schema import Dataset
    from kgrec.distributed.dask_jobs import TextEncoderSpec, check_engine, dask_client, encode_items_dask

    check_engine(engine)
    cfg = load_config(config, **{"encoders.text_model": text_model, "encoders.device": device})
    ds = Dataset.open(dataset)
    spec = TextEncoderSpec(model=cfg.encoders.text_model, max_length=cfg.encoders.text_max_length,
                           batch_size=cfg.encoders.text_batch_size, device=cfg.encoders.device, torch_threads=None)
    t0 = time.perf_counter()
    if engine == "dask":
        with dask_client(scheduler, n_workers=workers) as client:
            ids, vecs, model_id = encode_items_dask(client, ds.root / "items.parquet", spec)  # resolves the path
    else:
        enc = spec.build()
        enc.show_progress = True
        rows = ds.table("items").to_pylist()
        ids, texts = [r["item_id"] for r in rows], [item_text(r) for r in rows]
        vecs, model_id = enc.encode(texts), enc.model_id
        vecs[np.array([not t.strip() for t in texts], dtype=bool)] = 0.0
    seconds = time.perf_counter() - t0
    has_text = np.abs(vecs).sum(axis=1) > 0
    n = len(ids)
    emb = ItemEmbeddings(
        item_ids=ids, text=vecs, image=np.zeros((n, 0), np.float32), clip_text=np.zeros((n, 0), np.float32),
        status=[STATUS_TEXT_ONLY if h else STATUS_FAILED for h in has_text],
        reason=["" if h else "no text and no image encoder" for h in has_text],
        model_ids={"text": model_id},
    )
    target = out or ds.root / "embeddings"
    emb.save(target)
    typer.echo(f"encoded {n:,} items with {engine} in {seconds:.1f} s ({n / max(seconds, 1e-9):,.0f} items/s) -> {target}")


@clean_errors
def validate_events_command(
    events: Path = typer.Argument(..., help="Raw events Parquet file (one task per row group)."),
    dataset: Path = typer.Option(..., "--dataset", help="Dataset whose items (and users) the events must reference."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the kept events here (Parquet)."),
    engine: str = ENGINE_OPTION,
    scheduler: str | None = SCHEDULER_OPTION,
    workers: int = WORKERS_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Validate a large raw events file against a dataset's catalog, per partition on Dask (or locally)."""
    import pyarrow.parquet as pq

    from kgrec.data.readers import RawTable, read_parquet
    from kgrec.data.schema import Dataset
    from kgrec.data.validation import validate_events
    from kgrec.distributed.dask_jobs import check_engine, dask_client, validate_events_dask

    check_engine(engine)
    cfg = load_config(config)
    ds = Dataset.open(dataset)
    items = ds.table("items").column("item_id").combine_chunks()
    users = ds.table("users").column("user_id").combine_chunks()
    t0 = time.perf_counter()
    if engine == "dask":
        with dask_client(scheduler, n_workers=workers) as client:
            res = validate_events_dask(client, events, items, users, config=cfg.data)  # resolves the path
        kept, reasons, read = res.table, res.reasons(), res.read
    else:
        raw = read_parquet(events)
        r = validate_events(RawTable("events", raw.table), cfg.data, items, users)
        kept, reasons, read = r.table, r.reasons, r.read
    seconds = time.perf_counter() - t0
    if out is not None:
        pq.write_table(kept, out)
    typer.echo(f"{read:,} events read, {kept.num_rows:,} written, {sum(reasons.values()):,} quarantined "
               f"({engine}, {seconds:.1f} s)")
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        typer.echo(f"  {reason:<22} {count:,}")


@clean_errors
def train_ddp_command(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the trained fusion model."),
    nproc: int = typer.Option(2, "--nproc-per-node", min=1, help="Processes (ranks) on this node."),
    embeddings: Path | None = typer.Option(None, "--embeddings", help="Item embeddings directory."),
    run: bool = typer.Option(False, "--run", help="Launch torchrun now instead of printing the command."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """The torchrun command line that trains the GNN with DDP (gloo on CPU, NCCL on GPU); --run executes it."""
    import shlex
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "-m", "kgrec.distributed.ddp", "--dataset", str(dataset), "--out", str(out)]
    if embeddings is not None:
        cmd += ["--embeddings", str(embeddings)]
    if config is not None:
        cmd += ["--config", str(config)]
    typer.echo(shlex.join(cmd))
    if run:
        raise typer.Exit(subprocess.call(cmd))
