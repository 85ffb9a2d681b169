"""``ingest``: raw files -> validated ``Dataset`` directory + quarantine + report.

Output layout (``out``)::

    items.parquet users.parquet events.parquet triples.parquet links.parquet [split.parquet]  manifest.json
    images/...                   referenced images of kept items, same relative paths as in the source
    quarantine/<table>.parquet   table, file, line, reason, message, raw (the row as JSON)
    quarantine/report.json       IngestReport.to_dict()
    truth/                       copied from the source when present (the synthetic catalog's answer keys)

The whole directory is built beside ``out`` and swapped in at the end: an interrupted or strict-mode-failed ingest
leaves an existing ``out`` untouched.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kgrec.config import DataConfig
from kgrec.data.readers import TABLE_NAMES, read_source
from kgrec.data.schema import Dataset, atomic_write_json, replace_directory
from kgrec.data.validation import QUARANTINE_SCHEMA, REASONS, TableResult, validate_source
from kgrec.errors import DataError, StrictModeError

logger = logging.getLogger(__name__)


@dataclass
class TableReport:
    """Counts for one table. Invariants: ``read == kept + quarantined``; ``written == kept - merged``."""

    read: int
    kept: int
    quarantined: int
    merged: int
    written: int
    reasons: dict[str, int] = field(default_factory=dict)
    cleaned: dict[str, int] = field(default_factory=dict)
    blank_rows: int = 0
    files: list[str] = field(default_factory=list)
    implicit: bool = False
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first quarantine message

    @classmethod
    def from_result(cls, r: TableResult, implicit: bool = False) -> TableReport:
        examples: dict[str, str] = {}
        if r.quarantined:
            for reason, message in zip(r.quarantine.column("reason").to_pylist(), r.quarantine.column("message").to_pylist()):
                examples.setdefault(reason, message)
        return cls(r.read, r.kept, r.quarantined, r.merged, r.written, dict(r.reasons), dict(r.cleaned), r.blank_rows,
                   list(r.files), implicit, dict(sorted(examples.items())))


@dataclass
class IngestReport:
    """What ingestion read, kept, merged, cleaned and quarantined, per table and per reason."""

    source: str
    out: str | None
    fmt: str
    tables: dict[str, TableReport]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    strict: bool = False

    @property
    def quarantined(self) -> int:
        return sum(t.quarantined for t in self.tables.values())

    @property
    def read(self) -> int:
        return sum(t.read for t in self.tables.values())

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tables.values():
            for r, n in t.reasons.items():
                out[r] = out.get(r, 0) + n
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "out": self.out, "format": self.fmt, "seconds": round(self.seconds, 3),
            "strict": self.strict, "read": self.read, "quarantined": self.quarantined, "reasons": self.reasons(),
            "tables": {k: vars(v) for k, v in self.tables.items()}, "notes": self.notes,
        }

    def to_text(self) -> str:
        """A fixed-width table: rows per table, then quarantine reasons and cleaning counts."""
        lines = [f"ingest {self.source} ({self.fmt}) -> {self.out or '(not written)'} in {self.seconds:.1f} s", ""]
        head = f"{'table':<9}{'read':>12}{'kept':>12}{'merged':>10}{'written':>12}{'quarantined':>13}"
        lines += [head, "-" * len(head)]
        for name in TABLE_NAMES:
            t = self.tables.get(name)
            if t is None:
                continue
            read = "implicit" if t.implicit else f"{t.read:,}"
            lines.append(f"{name:<9}{read:>12}{t.kept:>12,}{t.merged:>10,}{t.written:>12,}{t.quarantined:>13,}")
        reasons = self.reasons()
        if reasons:
            lines += ["", "quarantined by reason:"]
            for name in TABLE_NAMES:
                t = self.tables.get(name)
                for r, n in (t.reasons.items() if t else []):
                    lines.append(f"  {name:<9}{r:<22}{n:>10,}  {REASONS.get(r, '')}")
                    if r in t.examples:
                        lines.append(f"  {'':<9}{'':<22}{'':>10}  e.g. {t.examples[r][:120]}")
        cleaned = [(name, k, v) for name in TABLE_NAMES if name in self.tables for k, v in self.tables[name].cleaned.items()]
        if cleaned:
            lines += ["", "cleaned (values changed):"]
            lines += [f"  {name:<9}{k:<26}{v:>10,}" for name, k, v in cleaned]
        blank = {n: t.blank_rows for n, t in self.tables.items() if t.blank_rows}
        if blank:
            lines += ["", "blank lines skipped: " + ", ".join(f"{n} {k}" for n, k in blank.items())]
        if self.notes:
            lines += ["", "notes:"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def ingest(
    source: str | Path,
    out: str | Path | None,
    *,
    fmt: str = "auto",
    strict: bool = False,
    config: DataConfig | None = None,
    progress: bool = False,
) -> IngestReport:
    """Read ``source`` (a directory in ``fmt``), validate and clean it, and write a ``Dataset`` to ``out``.

    Args:
        source: directory holding the raw files.
        out: dataset directory to create or replace; ``None`` validates only (report, nothing written).
        fmt: ``auto`` (detect) or one of ``native``, ``recbole``, ``kgat``, ``hm``.
        strict: raise ``StrictModeError`` (and write nothing) when any row would be quarantined; also on when
            ``config.strict`` is set.
        config: validation limits (``DataConfig``).
        progress: show a tqdm bar over the stages.

    Returns:
        ``IngestReport`` with read/kept/merged/written/quarantined counts per table and per reason.
    """
    from tqdm.auto import tqdm

    config = config or DataConfig()
    strict = strict or config.strict
    t0 = time.perf_counter()
    source = Path(source)
    bar = tqdm(total=3 if out is not None else 2, desc="ingest", unit="stage", disable=not progress)
    bar.set_postfix_str("reading")
    raw = read_source(source, fmt)
    bar.update()
    bar.set_postfix_str("validating")
    validated = validate_source(raw, config)
    bar.update()
    results = validated.results
    tables = {name: TableReport.from_result(r, implicit=(name == "users" and not raw.has_users_file))
              for name, r in results.items()}
    report = IngestReport(str(source), str(out) if out is not None else None, raw.fmt, tables, notes=list(raw.notes),
                          strict=strict)
    if validated.implicit_users:
        report.notes.append(f"no users file: {validated.implicit_users:,} users created from the events")
    if strict and report.quarantined:
        report.out = None
        report.seconds = time.perf_counter() - t0
        bar.close()
        examples = [r.quarantine.column("message")[0].as_py() for r in results.values() if r.quarantined]
        raise StrictModeError(
            f"strict mode: {report.quarantined:,} of {report.read:,} rows would be quarantined "
            f"({', '.join(f'{k} {v}' for k, v in report.reasons().items())}); e.g. {examples[0]}. Nothing was "
            f"written; fix the rows or run without --strict to quarantine them."
        )
    if out is not None:
        bar.set_postfix_str("writing")
        _write(Path(out), source, raw.fmt, results, report)
        bar.update()
    bar.close()
    report.seconds = time.perf_counter() - t0
    if out is not None:
        atomic_write_json(Path(out) / "quarantine" / "report.json", report.to_dict())
    logger.info("ingested %s: %s rows read, %s quarantined (%.1f s)", source, report.read, report.quarantined,
                report.seconds)
    return report


def _write(out: Path, source: Path, fmt: str, results: dict[str, TableResult], report: IngestReport) -> Dataset:
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.ingest-"))
    try:
        root = stage / "dataset"
        tables = {name: r.table for name, r in results.items()}
        ds = Dataset.write(
            root, tables,
            source={"path": str(source.resolve()), "format": fmt},
            extra_manifest={"ingest": {"read": report.read, "quarantined": report.quarantined,
                                       "reasons": report.reasons()}},
        )
        qdir = root / "quarantine"
        qdir.mkdir(exist_ok=True)
        for name, r in results.items():
            q = r.quarantine if r.quarantine.num_rows else QUARANTINE_SCHEMA.empty_table()
            pq.write_table(q, qdir / f"{name}.parquet", compression="zstd")
        atomic_write_json(qdir / "report.json", report.to_dict())
        _place_images(source, root, results["items"].table)
        if (source / "truth").is_dir():
            shutil.copytree(source / "truth", root / "truth")
        replace_directory(root, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Dataset(out, ds.manifest)


def _place_images(source: Path, root: Path, items: pa.Table) -> int:
    """Hard-link (or copy) every kept item's image to the same relative path under the dataset root."""
    refs = [r for r in items.column("image").to_pylist() if r]
    n = 0
    for ref in refs:
        src = (source / ref).resolve()
        dst = root / ref
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            try:
                shutil.copyfile(src, dst)
            except OSError as exc:
                raise DataError(f"cannot copy image {src} into the dataset at {dst}: {exc}") from exc
        n += 1
    return n
