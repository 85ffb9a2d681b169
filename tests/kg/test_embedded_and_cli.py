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
    # no split.parquet: --train-only has no train split to load; it says so and loads nothing
    res = runner.invoke(app, ["kg", "load", str(small_dataset.root), "--backend", "embedded", "--out",
                              str(tmp_path / "g2"), "--train-only"])
    assert res.exit_code == 2 and "has no split.parquet" in res.output and not (tmp_path / "g2").exists()


def test_cli_neo4j_status_without_server(tmp_path, monkeypatch):
    monkeypatch.setenv("KGREC_CACHE_DIR", str(tmp_path))
    res = CliRunner().invoke(app, ["neo4j", "status"])
    assert res.exit_code == 1 and "not running" in res.output


def test_cli_neo4j_import_bulk_loads_then_serves(small_dataset, tmp_path, monkeypatch):
    """`kgrec neo4j import` bulk-loads a fresh home with neo4j-admin, starts the server, records it for `stop`, and
    the store reads back exactly the embedded store's counts; a second import without --overwrite is refused."""
    from kg.neo4j_server import NEO4J_VERSION, cache_dir, fetch, read_state
    from kg.neo4j_store import Neo4jStore

    lib = fetch(NEO4J_VERSION)  # the real jars (cached by `kgrec neo4j fetch` in `make test`)
    real_version_dir = lib.parent
    monkeypatch.setenv("KGREC_CACHE_DIR", str(tmp_path / "cache"))
    (cache_dir() / "neo4j").mkdir(parents=True)
    (cache_dir() / "neo4j" / NEO4J_VERSION).symlink_to(real_version_dir, target_is_directory=True)
    runner = CliRunner()
    home = tmp_path / "home"
    res = runner.invoke(app, ["neo4j", "import", str(small_dataset.root), "--home", str(home)])
    try:
        assert res.exit_code == 0, res.output
        state = read_state()
        assert state is not None and "imported" in res.output and state["uri"] in res.output
        with open(state["password_file"], encoding="utf-8") as fh:
            password = fh.read().strip()
        from neo4j import GraphDatabase

        with GraphDatabase.driver(state["uri"], auth=(state["user"], password)) as driver:  # before any Neo4jStore
            names = {r["name"] for r in driver.execute_query("SHOW CONSTRAINTS YIELD name RETURN name").records}
        assert {"kgrec_item_id", "kgrec_user_id"} <= names  # the import adds the MERGE-loaded graph's constraints
        store = Neo4jStore(state["uri"], state["user"], password)
        try:
            expected = EmbeddedStore()
            expected.load(small_dataset)
            assert store.counts() == expected.counts()
        finally:
            store.close()
        again = runner.invoke(app, ["neo4j", "import", str(small_dataset.root), "--home", str(home)])
        assert again.exit_code != 0 and "neo4j stop" in again.output
    finally:
        stop = runner.invoke(app, ["neo4j", "stop", "--purge"])
    assert stop.exit_code == 0, stop.output
    assert not home.exists()
