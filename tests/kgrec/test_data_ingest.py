"""ingest(): atomic output, strict mode, validate-only, and the CLI commands."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kgrec.cli import app
from kgrec.config import DataConfig
from kgrec.data.ingest import ingest
from kgrec.data.schema import Dataset
from kgrec.errors import StrictModeError


def _source(root: Path, bad: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.csv").write_text("item_id,title\nA,a\nB,b\n")
    extra = "u1,NOPE,view,2025-01-01\n" if bad else ""
    (root / "events.csv").write_text("user_id,item_id,type,timestamp\nu1,A,view,2025-01-01\n" + extra)
    return root


def test_strict_mode_writes_nothing_and_keeps_existing_dataset(tmp_path):
    out = tmp_path / "ds"
    ingest(_source(tmp_path / "good", bad=False), out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(StrictModeError, match=r"1 of 4 rows would be quarantined \(unknown_item 1\)"):
        ingest(_source(tmp_path / "bad", bad=True), out, strict=True)
    assert (out / "manifest.json").read_text() == before
    with pytest.raises(StrictModeError):
        ingest(tmp_path / "bad", tmp_path / "other", config=DataConfig(strict=True))
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_failed_dataset_write_keeps_the_existing_dataset_whole(tmp_path):
    import os

    import pyarrow as pa

    out = tmp_path / "ds"
    items = pa.table({"item_id": ["i1"], "title": ["a"]})
    Dataset.write(out, {"items": items})
    (out / "quarantine").mkdir()
    (out / "quarantine" / "events.jsonl").write_text('{"reason": "x"}\n')
    (out / "truth").mkdir()
    (out / "truth" / "answers.json").write_text("{}")
    src = tmp_path / "src" / "images"
    src.mkdir(parents=True)
    os.symlink(tmp_path / "missing.jpg", src / "broken.jpg")  # copytree fails on it
    with pytest.raises(shutil.Error):
        Dataset.write(out, {"items": items}, images_from=tmp_path / "src")
    assert (out / "quarantine" / "events.jsonl").read_text() == '{"reason": "x"}\n'
    assert (out / "truth" / "answers.json").read_text() == "{}"
    # a successful rewrite keeps them too, and the new dataset's files are independent of the staging
    Dataset.write(out, {"items": items})
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".parquet")) == [
        "manifest.json", "quarantine", "truth"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_reingest_replaces_the_dataset_without_stale_files(tmp_path):
    out = tmp_path / "ds"
    ingest(_source(tmp_path / "bad", bad=True), out)
    assert Dataset.open(out).manifest["counts"]["events"] == 1
    (out / "stale.txt").write_text("old")
    report = ingest(_source(tmp_path / "good", bad=False), out)
    assert not (out / "stale.txt").exists()
    assert report.quarantined == 0
    assert json.loads((out / "quarantine" / "report.json").read_text())["quarantined"] == 0
    assert Dataset.open(out).manifest["ingest"]["read"] == report.read == 3


def test_validate_only(tmp_path):
    report = ingest(_source(tmp_path / "bad", bad=True), None)
    assert report.out is None and report.quarantined == 1
    assert report.tables["events"].reasons == {"unknown_item": 1}
    assert "unknown_item" in report.to_text()
    assert not [n for n in report.notes if "timestamp" in n]
    # an events file without a timestamp column is accepted (KGAT-like data), and the report says so
    src = tmp_path / "no-time"
    src.mkdir()
    (src / "items.csv").write_text("item_id,title\nA,a\n")
    (src / "events.csv").write_text("user_id,item_id,type\nu1,A,view\n")
    report = ingest(src, None)
    assert report.quarantined == 0 and report.tables["events"].kept == 1
    assert [n for n in report.notes if "events.csv: no timestamp column" in n]
    assert "no timestamp column" in report.to_text()


def test_demo_dataset_tables_and_truth_copied(demo_dataset, demo_raw_dir):
    assert (demo_dataset.root / "truth" / "duplicates.csv").read_bytes() == \
        (demo_raw_dir / "truth" / "duplicates.csv").read_bytes()
    assert demo_dataset.manifest["source"]["format"] == "native"
    assert demo_dataset.manifest["counts"]["events"] < sum(1 for _ in open(demo_raw_dir / "events.csv")) - 1


def test_cli_ingest_and_strict_exit_codes(tmp_path):
    runner = CliRunner()
    src = _source(tmp_path / "bad", bad=True)
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "ds")])
    assert res.exit_code == 0, res.output
    assert "quarantined by reason" in res.output and "unknown_item" in res.output
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "ds2"), "--strict"])
    assert res.exit_code == 1
    assert not (tmp_path / "ds2").exists()
    res = runner.invoke(app, ["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "ds3")])
    assert res.exit_code == 2


def test_cli_demo_data(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["demo-data", str(tmp_path / "raw"), "--items", "40", "--users", "6", "--seed", "2",
                              "--no-images", "--ingest-to", str(tmp_path / "ds")])
    assert res.exit_code == 0, res.output
    ds = Dataset.open(tmp_path / "ds")
    assert ds.manifest["counts"]["items"] == 40 and ds.manifest["counts"]["users"] == 6
    assert not (tmp_path / "raw" / "images").exists()
    shutil.rmtree(tmp_path / "raw")


def test_atomic_directory_swaps_on_success_and_keeps_the_old_one_on_error(tmp_path) -> None:
    from kgrec.data.schema import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind


def test_table_fingerprint_depends_on_content_not_chunking():
    import numpy as np
    import pyarrow as pa

    from kgrec.data.schema import table_fingerprint

    n = 150_000  # more than one 65,536-row slice
    t = pa.table({"a": np.arange(n), "s": pa.array([None if i % 13 == 0 else str(i % 97) for i in range(n)])})
    rechunked = pa.concat_tables([t.slice(0, 1), t.slice(1, 70_000), t.slice(70_001, n)])
    tiny_chunks = pa.concat_tables([t.slice(i, 1_000) for i in range(0, n, 1_000)])
    assert rechunked.column(0).num_chunks == 3 and tiny_chunks.column(0).num_chunks == 150
    assert table_fingerprint(t) == table_fingerprint(rechunked) == table_fingerprint(tiny_chunks)
    changed = t.set_column(0, "a", pa.array(np.r_[np.arange(n - 1), -1]))
    assert table_fingerprint(changed) != table_fingerprint(t)
