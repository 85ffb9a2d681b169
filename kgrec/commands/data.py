"""``kgrec demo-data`` and ``kgrec ingest``."""
from __future__ import annotations

from pathlib import Path

import typer

from kgrec.commands._common import CONFIG_OPTION, clean_errors, load_config


def register(app: typer.Typer) -> None:
    app.command("demo-data")(demo_data)
    app.command("ingest")(ingest_command)


@clean_errors
def demo_data(
    out: Path = typer.Argument(..., help="Directory to write the raw synthetic catalog to."),
    items: int = typer.Option(1000, "--items", min=10, help="Number of item listings (about 2% planted near-duplicates)."),
    users: int = typer.Option(300, "--users", min=1, help="Number of users."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed writes identical files."),
    images: bool = typer.Option(True, "--images/--no-images", help="Draw a 64x64 PNG per item."),
    events: int | None = typer.Option(None, "--events", min=1, help="Exact number of events (default: ~12 sessions per user)."),
    parquet: bool = typer.Option(False, "--parquet", help="Write Parquet tables instead of JSONL/CSV (big runs)."),
    noise: float = typer.Option(0.0, "--noise", min=0.0, max=0.5,
                                help="Share of event rows to corrupt on purpose (plus 4 bad items), listed in "
                                     "truth/planted_errors.csv, so the ingest report shows quarantining."),
    ingest_to: Path | None = typer.Option(None, "--ingest-to", help="Also ingest the catalog into this dataset directory."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Generate the synthetic demo catalog (raw files + truth/), optionally ingesting it."""
    from kgrec.data.synthetic import generate_catalog

    cfg = load_config(config)
    summary = generate_catalog(out, n_items=items, n_users=users, seed=seed, images=images, n_events=events,
                               fmt="parquet" if parquet else "text", noise=noise, progress=True)
    counts = ", ".join(f"{k} {v:,}" for k, v in summary.counts.items())
    typer.echo(f"wrote {out}: {counts} ({summary.seconds:.1f} s)")
    if ingest_to is not None:
        from kgrec.data.ingest import ingest

        report = ingest(out, ingest_to, config=cfg.data, progress=True)
        typer.echo(report.to_text())


@clean_errors
def ingest_command(
    source: Path = typer.Argument(..., help="Directory holding the raw files."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory to write (replaced atomically)."),
    fmt: str = typer.Option("auto", "--format", "-f", help="auto | native | recbole | kgat | hm"),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 1, nothing written) if any row would be quarantined."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Read, validate and clean raw data into a dataset; print what was kept and quarantined (and why)."""
    from kgrec.data.ingest import ingest
    from kgrec.errors import StrictModeError

    cfg = load_config(config)
    try:
        report = ingest(source, out, fmt=fmt, strict=strict, config=cfg.data, progress=True)
    except StrictModeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    typer.echo(report.to_text())
    typer.echo(f"\nquarantine: {out / 'quarantine'} (report.json, <table>.parquet)")
