"""Bulk load with ``neo4j-admin database import full`` (kg/bulk_import.py) into a fresh real Neo4j server: the imported
graph must be exactly the one the embedded store builds (counts, HeteroData export, node properties, paths)."""
from __future__ import annotations

import csv
import shutil
from typing import Iterator

import pandas as pd
import pytest

from kg.bulk_import import bulk_import, bulk_import_dataset, write_import_csv
from kg.export import hetero_equal
from kgrec.errors import GraphStoreError
from tests.kg.conftest import INJECT_ID, INJECT_TITLE, embedded_copy_of


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory) -> Iterator["Neo4jServer"]:  # noqa: F821
    """A second, never-started server home (the session server's database already exists)."""
    from kg.neo4j_server import Neo4jServer

    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the bulk import tests need {' and '.join(missing)} on PATH (OpenJDK 17 + Maven)", pytrace=False)
    server = Neo4jServer(tmp_path_factory.mktemp("bulk") / "home", heap="512m", remove_home=False)
    yield server
    server.kill()  # the data is thrown away: no 10 s clean shutdown
    shutil.rmtree(server.home, ignore_errors=True)


def test_csv_headers_types_and_quoting(tmp_path):
    nodes = {"Item": pd.DataFrame({"id": ["I1", INJECT_ID], "title": ['say "hi", ok', INJECT_TITLE],
                                   "price": [1.5, None]})}
    rels = {"VIEWED": [{"src": "U1", "dst": "I1", "count": 2, "first_ts": "t0"},
                       {"src": "U1", "dst": "I1", "count": 3, "first_ts": "t1"},  # same identity: last wins
                       {"src": "U2", "dst": "I1", "first_ts": "t2"}]}
    args, written = write_import_csv(nodes, rels, tmp_path)
    assert written == {"Item": 2, "VIEWED": 2}
    assert args == [f"--nodes=Item={tmp_path}/nodes/Item.header.csv,{tmp_path}/nodes/Item.csv",
                    f"--relationships=VIEWED={tmp_path}/rels/VIEWED.header.csv,{tmp_path}/rels/VIEWED.csv"]
    assert (tmp_path / "nodes/Item.header.csv").read_text() == "id:ID(Item),title,price:double\n"
    assert (tmp_path / "rels/VIEWED.header.csv").read_text() == ":START_ID(User),:END_ID(Item),count:long,first_ts\n"
    items = list(csv.reader(open(tmp_path / "nodes/Item.csv", newline="")))
    assert items == [["I1", 'say "hi", ok', "1.5"], [INJECT_ID, INJECT_TITLE, ""]]
    assert (tmp_path / "rels/VIEWED.csv").read_text() == "U1,I1,3,t1\nU2,I1,,t2\n"  # missing count: no property
    with pytest.raises(GraphStoreError, match="ENTITY_RELATION rows need"):
        write_import_csv({}, {"ENTITY_RELATION": [{"src": "a", "dst": "b"}]}, tmp_path)
    with pytest.raises(GraphStoreError, match="unknown relationship type"):
        write_import_csv({}, {"KNOWS": [{"src": "a", "dst": "b"}]}, tmp_path)


@pytest.mark.neo4j
def test_bulk_import_equals_embedded_store(fresh_server, demo_dataset, small_dataset, tmp_path):
    from kg.neo4j_store import Neo4jStore

    # 1) importer failure: a relationship to a missing node -> GraphStoreError with the importer's output tail
    with pytest.raises(GraphStoreError, match="import .*failed") as bad:
        bulk_import(fresh_server, {"User": [{"id": "U1"}], "Item": [{"id": "I1"}]}, {"VIEWED": [{"src": "U1", "dst": "nope"}]},
                    work_dir=tmp_path / "bad", heap="256m", start=False)
    assert "nope" in str(bad.value)
    assert not fresh_server.is_running()

    # 2) the demo catalog, bulk imported, read back by Neo4jStore
    emb = embedded_copy_of(demo_dataset)
    info = bulk_import_dataset(fresh_server, demo_dataset, heap="256m", overwrite=True)
    assert fresh_server.is_running() and info["store_bytes"] > 0
    expected = emb.counts()
    assert expected["PURCHASED"] > 0 and expected["ALSO_BOUGHT"] > 0 and expected["HAS_ATTRIBUTE"] > 0
    assert info["written"] == {k: v for k, v in expected.items() if v}
    with Neo4jStore(fresh_server.uri, fresh_server.user, fresh_server.password, progress=False) as store:
        assert store.counts() == expected
        a, ids_a = emb.to_hetero_data()
        b, ids_b = store.to_hetero_data()
        assert ids_a == ids_b and hetero_equal(a, b)
        users, items = ids_a["user"], ids_a["item"]
        for i in (items[0], items[77], items[-1]):
            assert store.node(("Item", i)) == emb.node(("Item", i))
        pa = emb.paths(("User", users[3]), ("Item", items[50]), max_hops=3, limit=10)
        pb = store.paths(("User", users[3]), ("Item", items[50]), max_hops=3, limit=10)
        assert [(p.steps, [s.properties for s in p.steps]) for p in pa] == \
               [(p.steps, [s.properties for s in p.steps]) for p in pb]
        # the store's uniqueness constraints now hold on the imported nodes: MERGE finds, does not duplicate
        store.upsert_nodes("Item", [{"id": items[0], "title": "renamed"}])
        assert store.counts()["Item"] == expected["Item"]

    # 3) the database exists now: no silent re-import
    fresh_server.kill()  # it is overwritten below, so no clean shutdown is needed
    with pytest.raises(GraphStoreError, match="already exists"):
        bulk_import_dataset(fresh_server, small_dataset)

    # 4) overwrite with the hand-made catalog (Cypher-injection strings in ids, titles and attributes)
    emb = embedded_copy_of(small_dataset)
    bulk_import_dataset(fresh_server, small_dataset, heap="256m", overwrite=True)
    with Neo4jStore(fresh_server.uri, fresh_server.user, fresh_server.password, progress=False) as store:
        assert store.counts() == emb.counts()
        assert store.node(("Item", INJECT_ID)) == emb.node(("Item", INJECT_ID))
        assert store.node(("Item", INJECT_ID))["title"] == INJECT_TITLE
        assert store.node(("Item", "I5")) == emb.node(("Item", "I5")) == {"id": "I5", "title": "Socks"}
        a, _ = emb.to_hetero_data()
        b, _ = store.to_hetero_data()
        assert hetero_equal(a, b)


def _canon(frames):
    out = {}
    for name, df in frames.items():
        keys = ["id"] if "id" in df.columns else ["src", "dst"] + (["relation"] if "relation" in df.columns else [])
        recs = [{k: v for k, v in r.items() if v is not None and v == v}
                for r in df.astype(object).to_dict("records")]
        out[name] = sorted(recs, key=lambda r: tuple(str(r[k]) for k in keys))
    return out


def test_columnar_frames_equal_graph_rows(demo_dataset, small_dataset):
    """``dataset_frames`` (column operations, for 1M-item graphs) == ``build_graph_rows`` (per-row dicts)."""
    from kg.bulk_import import dataset_frames, graph_rows_frames
    from kg.loading import build_graph_rows

    for ds in (demo_dataset, small_dataset):
        fast = dataset_frames(ds)
        slow = graph_rows_frames(build_graph_rows(ds))
        assert sorted(fast[0]) == sorted(slow[0]) and sorted(fast[1]) == sorted(slow[1])
        assert _canon(fast[0]) == _canon(slow[0])
        assert _canon(fast[1]) == _canon(slow[1])


def test_columnar_frames_count_events_without_timestamps(small_dataset):
    """Events with no timestamp (KGAT data) still count: both row builders give count = events, no timestamps."""
    from kg.bulk_import import dataset_frames, graph_rows_frames
    from kg.loading import build_graph_rows

    ev = small_dataset.events.copy()
    ev["timestamp"] = pd.NaT
    fast = _canon(dataset_frames(small_dataset, events=ev)[1])
    assert fast == _canon(graph_rows_frames(build_graph_rows(small_dataset, events=ev))[1])
    assert fast["VIEWED"] == [{"src": "U1", "dst": "I1", "count": 2}]
    assert sorted(r["count"] for r in fast["PURCHASED"]) == [1] * 7
