"""Bundle manifests that are damaged in ways JSON parsing alone does not catch are refused with a BundleError (and
a one-line CLI error), never a traceback or an unverified load. Bundles here are written by ``write_bundle`` with a
tiny writer: no model is fitted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kgrec.bundle import read_manifest, write_bundle
from kgrec.errors import BundleError

METRICS = {"test": {"fused": {"recall@10": 0.5, "ndcg@10": 0.25}}}


def _bundle(path: Path) -> Path:
    def writer(tmp: Path) -> dict:
        (tmp / "idmaps").mkdir()
        (tmp / "idmaps" / "items.txt").write_text("a\nb\n", encoding="utf-8")
        (tmp / "evaluation.json").write_text(json.dumps(METRICS), encoding="utf-8")
        return {"components": ["idmaps"]}

    return write_bundle(path, writer, data_fingerprint="fp", config_yaml="{}\n")


def _edit_manifest(path: Path, edit) -> None:
    mf = path / "manifest.json"
    mf.write_text(json.dumps(edit(json.loads(mf.read_text()))), encoding="utf-8")


def test_an_intact_bundle_reads_and_a_changed_file_is_caught(tmp_path):
    path = _bundle(tmp_path / "b")
    assert set(read_manifest(path).manifest["files"]) == {"config.yaml", "evaluation.json", "idmaps/items.txt"}
    (path / "idmaps" / "items.txt").write_text("a\nc\n", encoding="utf-8")
    with pytest.raises(BundleError, match="damaged: idmaps/items.txt changed"):
        read_manifest(path)


@pytest.mark.parametrize("body", ["[]", "3", '"manifest"', "null"])
def test_a_manifest_that_is_not_a_json_object_is_a_bundle_error(tmp_path, body):
    path = _bundle(tmp_path / "b")
    (path / "manifest.json").write_text(body, encoding="utf-8")
    with pytest.raises(BundleError, match=r"manifest.json holds a JSON \w+, not an object; the bundle is damaged"):
        read_manifest(path)


@pytest.mark.parametrize("files", [None, [], "x", {"config.yaml": 3}], ids=["absent", "list", "str", "non-str-hash"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_manifest_without_a_files_map_is_refused_not_loaded_unverified(tmp_path, files, verify):
    path = _bundle(tmp_path / "b")

    def edit(m: dict) -> dict:
        m.pop("files")
        if files is not None:
            m["files"] = files
        return m

    _edit_manifest(path, edit)
    (path / "idmaps" / "items.txt").write_text("tampered", encoding="utf-8")  # would go unnoticed without the map
    with pytest.raises(BundleError, match='no valid "files" map .* cannot be verified'):
        read_manifest(path, verify=verify)


@pytest.mark.parametrize("body", ['{"test": {', "", "[1, 2]"], ids=["truncated", "empty", "not-an-object"])
def test_cli_evaluate_on_a_damaged_evaluation_json_is_a_one_line_error(tmp_path, body):
    from kgrec.cli import app

    path = _bundle(tmp_path / "b")
    ok = CliRunner().invoke(app, ["evaluate", "-b", str(path)])
    assert ok.exit_code == 0, ok.output
    assert "| fused | 0.5000 |" in ok.output
    (path / "evaluation.json").write_text(body, encoding="utf-8")
    res = CliRunner().invoke(app, ["evaluate", "-b", str(path)])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path / "evaluation.json") in lines[0]
    assert "damaged" in lines[0]


def test_cli_evaluate_on_a_bundle_without_evaluation_json_names_the_file(tmp_path):
    from kgrec.cli import app

    path = _bundle(tmp_path / "b")
    _edit_manifest(path, lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != "evaluation.json"}})
    (path / "evaluation.json").unlink()
    res = CliRunner().invoke(app, ["evaluate", "-b", str(path)])
    assert res.exit_code == 2 and f"{path / 'evaluation.json'} is missing" in res.output


def test_cli_evaluate_on_a_manifest_that_is_a_list_is_a_one_line_error(tmp_path):
    from kgrec.cli import app

    path = _bundle(tmp_path / "b")
    (path / "manifest.json").write_text("[]", encoding="utf-8")
    res = CliRunner().invoke(app, ["evaluate", "-b", str(path)])
    assert res.exit_code == 2 and "not an object" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("argv", [["evaluate", "{b}"], ["train", "{b}", "--out", "{tmp}/out"], ["encode", "{b}"],
                                  ["enrich", "{b}", "--no-encoders"], ["encoders", "fit-clip", "{b}", "--out", "{tmp}/clip"]],
                         ids=lambda a: " ".join(a[:2]).replace(" {b}", ""))
def test_a_bundle_given_where_a_dataset_is_expected_says_so(tmp_path, argv):
    """`kgrec evaluate demo/bundle` said "dataset schema version None is not supported": the directory has a
    manifest, but a bundle's. Every command that opens a dataset now names the mix-up."""
    from kgrec.cli import app
    from kgrec.data.schema import Dataset
    from kgrec.errors import DataError

    path = _bundle(tmp_path / "b")
    with pytest.raises(DataError, match=r"b is a model bundle, not a dataset: give a dataset directory .* --bundle/-b"):
        Dataset.open(path)
    res = CliRunner().invoke(app, [a.format(b=path, tmp=tmp_path) for a in argv])
    assert res.exit_code == 2, res.output
    assert f"error: {path} is a model bundle, not a dataset: give a dataset directory" in " ".join(res.output.split())
    assert "schema version" not in res.output


@pytest.mark.parametrize("body", ["{", "[]"])
def test_a_dataset_manifest_that_is_not_a_json_object_is_a_data_error(tmp_path, body):
    from kgrec.data.schema import Dataset
    from kgrec.errors import DataError

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match="manifest.json .*the dataset is damaged"):
        Dataset.open(tmp_path / "ds")
