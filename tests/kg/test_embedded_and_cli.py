"""Embedded store persistence (no pickle, atomic) and the `kgrec kg load` / `kgrec neo4j status` commands."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from kg.embedded_store import EmbeddedStore
from kg.export import hetero_equal
from kg.loading import category_prefixes, train_events
from kgrec.cli import app
from kgrec.errors import GraphStoreError
from tests.kg.conftest import SMALL_COUNTS


def test_save_open_roundtrip_without_pickle(small_dataset, tmp_path):
    store = EmbeddedStore(tmp_path / "g")
    store.load(small_dataset)
    store.write_enrichment([{"kind": "relation", "type": "SIMILAR_TO", "src": "I1", "dst": "I2",
                             "confidence": 0.5, "evidence": {"why": "test"}}], {"run_id": "r"})
    store.close()  # close() saves a dirty store bound to a path
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["edges.parquet", "meta.json", "nodes.parquet"]
    assert json.loads((tmp_path / "g" / "meta.json").read_text())["counts"]["SIMILAR_TO"] == 1
    assert pq.read_table(tmp_path / "g" / "edges.parquet").num_rows == sum(
        v for k, v in store.counts().items() if k.isupper())
    again = EmbeddedStore.open(tmp_path / "g")
    assert again.counts() == store.counts()
    assert hetero_equal(again.to_hetero_data()[0], store.to_hetero_data()[0])
    assert again.paths(("User", "U1"), ("Item", "I3")) == store.paths(("User", "U1"), ("Item", "I3"))
    assert again.node(("Item", "I1"))["title"] == "Red runner"
    # saving over an existing store swaps directories: no temporary leftovers
    again.save()
    assert [p.name for p in tmp_path.iterdir()] == ["g"]
    # a directory that is not a store is never replaced
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("keep me")
    with pytest.raises(GraphStoreError, match="refusing to replace"):
        again.save(tmp_path / "precious")
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "keep me"


def test_category_prefixes_and_train_split(small_dataset):
    assert category_prefixes(" Shoes > Running>>Trail ") == ["Shoes", "Shoes>Running", "Shoes>Running>Trail"]
    assert len(train_events(small_dataset)) == len(small_dataset.events)  # no split.parquet: everything


def test_cli_kg_load_embedded(small_dataset, tmp_path):
    out = tmp_path / "graph"
    runner = CliRunner()
    res = runner.invoke(app, ["kg", "load", str(small_dataset.root), "--backend", "embedded", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "PURCHASED" in res.output and f"{SMALL_COUNTS['PURCHASED']:>12,}" in res.output
    assert EmbeddedStore.open(out).counts() == SMALL_COUNTS
    res = runner.invoke(app, ["kg", "load", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 2 and "not a kgrec dataset" in res.output


def test_cli_neo4j_status_without_server(tmp_path, monkeypatch):
    monkeypatch.setenv("KGREC_CACHE_DIR", str(tmp_path))
    res = CliRunner().invoke(app, ["neo4j", "status"])
    assert res.exit_code == 1 and "not running" in res.output
