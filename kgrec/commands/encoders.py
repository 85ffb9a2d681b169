"""``kgrec encode``, ``kgrec encoders fit-clip`` and ``kgrec encoders fit-text``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from kgrec.commands._common import CONFIG_OPTION, clean_errors, load_config

encoders_app = typer.Typer(help="Fine-tune the text and CLIP encoders on a catalog.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("encode")(encode_command)
    encoders_app.command("fit-clip")(fit_clip_command)
    encoders_app.command("fit-text")(fit_text_command)
    app.add_typer(encoders_app, name="encoders")


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    width = {c: max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(str(c).ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


@clean_errors
def encode_command(
    dataset: Path = typer.Argument(..., help="Dataset directory (from `kgrec ingest` / `kgrec demo-data`)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write the item embeddings [DATASET/embeddings]."),
    text: bool = typer.Option(True, "--text/--no-text", help="Encode item text with the BERT encoder."),
    images: bool = typer.Option(True, "--images/--no-images", help="Encode images (+ CLIP text) with the CLIP encoder."),
    clip_checkpoint: Path | None = typer.Option(None, "--clip-checkpoint", help="A `kgrec encoders fit-clip` output."),
    text_model: str | None = typer.Option(None, "--text-model", help="packaged:all-MiniLM-L6-v2, a local dir (e.g. a fit-text output) or a hub name."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Embedding cache [DATASET/.cache/embeddings]."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Encode every item (text, image, CLIP text), cached by content; print per-status counts."""
    import time

    from encoders.factory import clip_encoder_from_config, default_cache_dir, text_encoder_from_config
    from encoders.items import encode_dataset
    from kgrec.data.schema import Dataset

    cfg = load_config(config, **{"encoders.clip_checkpoint": str(clip_checkpoint) if clip_checkpoint else None,
                                 "encoders.text_model": text_model, "encoders.device": device,
                                 "encoders.cache_dir": str(cache_dir) if cache_dir else None})
    ds = Dataset.open(dataset)
    t0 = time.perf_counter()
    text_enc = text_encoder_from_config(cfg.encoders, show_progress=True) if text else None
    clip_enc = clip_encoder_from_config(cfg.encoders, show_progress=True) if images else None
    emb = encode_dataset(ds, text_enc, clip_enc, default_cache_dir(cfg.encoders, ds.root))
    target = out or ds.root / "embeddings"
    emb.save(target)
    typer.echo(f"encoded {len(emb):,} items in {time.perf_counter() - t0:.1f} s -> {target}")
    typer.echo(f"text {emb.text.shape}, image {emb.image.shape}, clip_text {emb.clip_text.shape}")
    for status, count in sorted(emb.status_counts().items()):
        typer.echo(f"  {status:10s} {count:,}")
    shown = 0
    for item_id, status, reason in zip(emb.item_ids, emb.status, emb.reason):
        if status != "embedded" and shown < 10:
            typer.echo(f"  {item_id}: {status}: {reason}")
            shown += 1


@clean_errors
def fit_clip_command(
    dataset: Path = typer.Argument(..., help="Dataset directory with images."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write (replaced atomically)."),
    model: str | None = typer.Option(None, "--model", help="open_clip config name (default: the configured encoders.clip_model)."),
    pretrained: str | None = typer.Option(None, "--pretrained", help="open_clip tag or local checkpoint file."),
    mode: str = typer.Option("auto", "--mode", help="auto | heads (frozen trunks, cached features) | full"),
    top_blocks: int = typer.Option(0, "--top-blocks", min=0, help="heads mode: also train the last N EfficientNet blocks."),
    epochs: int = typer.Option(40, "--epochs", min=1),
    batch_size: int = typer.Option(128, "--batch-size", min=2),
    lr: float = typer.Option(2e-3, "--lr"),
    image_size: int = typer.Option(128, "--image-size", min=16, help="Input size (px) used in training and saved for encoding."),
    seed: int = typer.Option(0, "--seed"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Align CLIP image and text towers on the catalog (InfoNCE, learnable temperature); print held-out quality."""
    from encoders.fit_clip import FitClipConfig, fit_clip
    from kgrec.data.schema import Dataset

    cfg = load_config(config)
    fc = FitClipConfig(model=model or cfg.encoders.clip_model, pretrained=pretrained or cfg.encoders.clip_pretrained,
                       mode=mode, top_blocks=top_blocks, epochs=epochs, batch_size=batch_size, lr=lr,
                       image_size=image_size, seed=seed, device=device or cfg.encoders.device)
    result = fit_clip(Dataset.open(dataset), out, fc)
    typer.echo(fit_clip_report(result, out))
    typer.echo(f"use it: kgrec encode DATASET --clip-checkpoint {out}")


def fit_clip_report(result: Any, out: Path) -> str:
    """What ``fit_clip`` did, in the lines ``kgrec encoders fit-clip`` and ``kgrec demo`` print: one line on the
    run, then per attribute the held-out zero-shot accuracy and P@10 before / after (``summary_table``)."""
    from encoders.fit_clip import summary_table

    m = result.metrics
    return "\n".join([f"fit-clip ({m['mode']}) on {m['train']} pairs, {m['held_out']} held out, "
                      f"{m['epochs_run']} epochs, {result.seconds:.1f} s -> {out}", _table(summary_table(m))])


@clean_errors
def fit_text_command(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write (a Hugging Face model dir)."),
    model: str | None = typer.Option(None, "--model", help="Base text model (default: the configured encoders.text_model)."),
    epochs: int = typer.Option(4, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=2),
    lr: float = typer.Option(3e-5, "--lr"),
    train_layers: int = typer.Option(2, "--train-layers", min=0, help="Top transformer layers to train (0 = all)."),
    max_length: int = typer.Option(64, "--max-length", min=8),
    seed: int = typer.Option(0, "--seed"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Fine-tune the BERT encoder on title↔description and query↔purchase pairs; print the held-out gain."""
    from encoders.fit_text import FitTextConfig, fit_text, summary_table
    from kgrec.data.schema import Dataset

    cfg = load_config(config)
    ft = FitTextConfig(model=model or cfg.encoders.text_model, epochs=epochs, batch_size=batch_size, lr=lr,
                       train_layers=train_layers, max_length=max_length, seed=seed,
                       device=device or cfg.encoders.device)
    result = fit_text(Dataset.open(dataset), out, ft)
    m = result.metrics
    typer.echo(f"fit-text on {m['train_pairs']} pairs, {m['held_out_pairs']} held out, {m['epochs_run']} epochs, "
               f"{result.seconds:.1f} s -> {out}")
    typer.echo(_table(summary_table(m)))
    typer.echo(f"use it: kgrec encode DATASET --text-model {out}")
