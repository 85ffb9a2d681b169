"""The GraphStore contract, run on both implementations (embedded networkx and the real Neo4j server)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from kg.export import hetero_equal
from kg.loading import build_graph_rows
from kg.paths import describe
from kg.schema import entity_relation_pyg_name
from kgrec.errors import GraphStoreError
from tests.kg.conftest import INJECT_ATTR, INJECT_ID, INJECT_TITLE, SMALL_COUNTS, embedded_copy_of


def test_load_small_counts_exact(store, small_dataset):
    written = store.load(small_dataset)
    assert written["PURCHASED"] == 7 and written["Item"] == 6
    assert store.counts() == SMALL_COUNTS
    assert build_graph_rows(small_dataset).counts() == SMALL_COUNTS


def test_interaction_aggregates_and_derived_edges(store, small_dataset):
    store.load(small_dataset)
    sub = store.subgraph("U1", hops=1)
    viewed = [e for e in sub["edges"] if e["type"] == "VIEWED"]
    assert viewed == [{"type": "VIEWED", "src": ["User", "U1"], "dst": ["Item", "I1"], "count": 2,
                       "first_ts": "2024-01-01T10:00:00.000000Z", "last_ts": "2024-01-02T10:00:00.000000Z"}]
    rated = [e for e in store.subgraph("U4", hops=1)["edges"] if e["type"] == "RATED"]
    assert rated[0]["count"] == 2 and rated[0]["value"] == 5.0  # the last rating, not the first
    data, ids = store.to_hetero_data()
    ab = data["item", "also_bought", "item"]
    pairs = [(ids["item"][s], ids["item"][d]) for s, d in ab.edge_index.t().tolist()]
    assert pairs == [("I1", "I2"), ("I2", "I3")]  # I1-I3 has one common buyer < min count 2
    assert ab.edge_weight.tolist() == [2.0, 2.0]
    assert store.neighbours(("Category", "Shoes>Running"), ["SUBCATEGORY_OF"]) == [("Category", "Shoes")]
    assert store.neighbours(("Brand", "Acme"), ["MADE_BY"], direction="in") == [
        ("Item", "I1"), ("Item", "I2"), ("Item", INJECT_ID)]
    assert store.neighbours(("Brand", "Acme"), ["MADE_BY"], direction="out") == []


def test_load_twice_adds_nothing(store, small_dataset):
    store.load(small_dataset)
    first_counts = store.counts()
    first, _ = store.to_hetero_data()
    store.load(small_dataset)
    assert store.counts() == first_counts == SMALL_COUNTS
    assert hetero_equal(first, store.to_hetero_data()[0])


def test_export_layout(store, small_dataset):
    store.load(small_dataset)
    data, ids = store.to_hetero_data()
    assert ids["item"] == sorted(ids["item"]) and len(ids["item"]) == 6
    assert {t: data[t].num_nodes for t in data.node_types} == {
        "user": 4, "item": 6, "brand": 2, "category": 4, "attribute": 4, "entity": 3}
    for et in data.edge_types:
        ei = data[et].edge_index
        assert ei.dtype == torch.long and ei.shape[0] == 2
        keys = (ei[0] * 10_000 + ei[1]).tolist()
        assert keys == sorted(keys)
    # external triples: one edge type per relation
    assert ("entity", entity_relation_pyg_name("born.in"), "entity") in data.edge_types
    assert data["entity", "rel_directed_by", "entity"].edge_index.tolist() == [[0], [1]]
    viewed = data["user", "viewed", "item"]
    assert viewed.edge_weight.tolist() == [2.0]  # count


def test_relations_that_read_alike_stay_apart(store):
    # "is a" / "is-a", "Director" / "director" and non-ASCII relations: one edge type each, no duplicate edges
    rels = ["is a", "is-a", "Director", "director", "作者", "出版社"]
    store.upsert_edges("ENTITY_RELATION", [{"src": "a", "dst": "b", "relation": r} for r in rels])
    data, _ = store.to_hetero_data()
    names = [entity_relation_pyg_name(r) for r in rels]
    assert len(set(names)) == 6 and all(n.isascii() and n.replace("_", "").isalnum() for n in names)
    assert names[3] == "rel_director" and names[0].startswith("rel_is_a_")
    assert sorted(r for _, r, _ in data.edge_types) == sorted(names)
    assert all(data["entity", n, "entity"].edge_index.tolist() == [[0], [1]] for n in names)


def test_paths_small(store, small_dataset):
    store.load(small_dataset)
    paths = store.paths(("User", "U1"), ("Item", "I3"), max_hops=3, limit=4)
    assert [describe(p) for p in paths] == [
        "User 'U1' -[PURCHASED]-> Item 'I2' -[ALSO_BOUGHT]-> Item 'I3'",
        "User 'U1' -[PURCHASED]-> Item 'I1' -[ALSO_BOUGHT]-> Item 'I2' -[ALSO_BOUGHT]-> Item 'I3'",
        "User 'U1' -[PURCHASED]-> Item 'I1' -[HAS_ATTRIBUTE]-> AttributeValue 'colour=red' "
        "<-[HAS_ATTRIBUTE]- Item 'I3'",
        "User 'U1' -[PURCHASED]-> Item 'I1' <-[PURCHASED]- User 'U2' -[PURCHASED]-> Item 'I3'",
    ]
    # "you bought X — same brand — Y"
    brand = store.paths(("Item", "I1"), ("Item", "I2"), max_hops=2, limit=10)
    assert ("MADE_BY", "MADE_BY") in [p.rel_types for p in brand]
    assert all(len(set(p.nodes())) == len(p.nodes()) for p in paths)  # simple paths
    assert store.paths(("User", "U1"), ("Item", "I3"), max_hops=1) == []
    assert store.paths(("User", "nobody"), ("Item", "I3")) == []


def test_injection_is_inert(store, small_dataset):
    store.load(small_dataset)
    assert store.counts() == SMALL_COUNTS  # nothing was deleted
    sub = store.subgraph("U4", hops=1)
    titles = {n["id"]: n.get("title") for n in sub["nodes"] if n["label"] == "Item"}
    assert titles[INJECT_ID] == INJECT_TITLE
    attrs = store.neighbours(("Item", INJECT_ID), ["HAS_ATTRIBUTE"])
    assert attrs == [("AttributeValue", f"{INJECT_ATTR}=v'}}) DETACH DELETE n //")]
    store.upsert_nodes("Item", [{"id": "I9", "title": "') DETACH DELETE n", INJECT_ATTR: "x"}])
    assert store.counts()["Item"] == 7


def test_unknown_labels_and_types_rejected(store):
    with pytest.raises(GraphStoreError, match="unknown node label"):
        store.upsert_nodes("Item) DETACH DELETE (n", [{"id": "a"}])
    with pytest.raises(GraphStoreError, match="unknown relationship type"):
        store.upsert_edges("PURCHASED]->() DETACH DELETE n //", [{"src": "a", "dst": "b"}])
    with pytest.raises(GraphStoreError, match="unknown relationship type"):
        store.neighbours(("Item", "a"), ["NOT_A_TYPE"])
    with pytest.raises(GraphStoreError, match="unknown node label"):
        store.paths(("Person", "a"), ("Item", "b"))
    assert sum(store.counts().values()) == 0


def test_upsert_merges(store):
    assert store.upsert_nodes("Item", [{"id": "A", "title": "t1", "price": 3.0}]) == 1
    store.upsert_nodes("Item", [{"id": "A", "title": "t2", "price": None}])
    store.upsert_edges("ENTITY_RELATION", [{"src": "e1", "dst": "e2", "relation": "r1"},
                                           {"src": "e1", "dst": "e2", "relation": "r2"},
                                           {"src": "e1", "dst": "e2", "relation": "r1"}])
    store.upsert_edges("ALSO_BOUGHT", [{"src": "A", "dst": "B", "weight": 3}, {"src": "A", "dst": "B", "weight": 4}])
    c = store.counts()
    assert (c["Item"], c["Entity"], c["ENTITY_RELATION"], c["ALSO_BOUGHT"]) == (2, 2, 2, 1)
    node = store.node(("Item", "A"))
    assert node["title"] == "t2" and "price" not in node
    data, ids = store.to_hetero_data()
    assert data["item", "also_bought", "item"].edge_weight.tolist() == [4.0]


def test_enrichment_write_back(store, small_dataset):
    store.load(small_dataset)
    records = [
        {"kind": "attribute", "item_id": "I1", "name": "colour", "value": "green", "confidence": 0.9},  # data wins
        {"kind": "attribute", "item_id": "I2", "name": "size", "value": "42", "confidence": 0.7},  # new
        {"kind": "attribute", "item_id": "I4", "name": "material", "value": "cotton", "confidence": 0.8},  # new
        {"kind": "attribute", "item_id": "I3", "name": "colour", "value": "red", "confidence": 0.9},  # is data
        {"kind": "attribute", "item_id": "missing", "name": "colour", "value": "red", "confidence": 0.9},
        {"kind": "relation", "type": "SIMILAR_TO", "src": "I1", "dst": "I2", "confidence": 0.75,
         "evidence": {"cosine": 0.93}},
        {"kind": "relation", "type": "COMPLEMENTS", "src": "I1", "dst": "I5", "confidence": 0.5},
        {"kind": "relation", "type": "COMPLEMENTS", "src": "I1", "dst": "nope", "confidence": 0.5},
    ]
    prov = {"run_id": "run-1", "model_ids": ["minilm", "clip"], "created": "2026-11-23T00:00:00Z"}
    first = store.write_enrichment(records, prov)
    assert first == {"written": 4, "skipped": 4, "attributes": 2, "relations": 2}
    c = store.counts()
    assert (c["HAS_ATTRIBUTE"], c["AttributeValue"], c["SIMILAR_TO"], c["COMPLEMENTS"]) == (7, 5, 1, 1)
    assert store.neighbours(("Item", "I1"), ["HAS_ATTRIBUTE"]) == [
        ("AttributeValue", "colour=red"), ("AttributeValue", "size=42")]
    edges = {(e["type"], e["dst"][1]): e for e in store.subgraph("U1", hops=2)["edges"]
             if e["src"] == ["Item", "I1"]}
    sim = edges[("SIMILAR_TO", "I2")]
    assert sim["source"] == "enrichment" and sim["run_id"] == "run-1" and sim["model_ids"] == ["minilm", "clip"]
    assert sim["confidence"] == 0.75 and '"cosine": 0.93' in sim["evidence"]
    assert edges[("HAS_ATTRIBUTE", "colour=red")]["source"] == "data"
    data, ids = store.to_hetero_data()
    assert data["item", "similar_to", "item"].edge_weight.tolist() == [0.75]
    again = store.write_enrichment(records, {**prov, "run_id": "run-2"})
    assert again["written"] == 0 and again["skipped"] == len(records)
    assert store.counts() == c
    with pytest.raises(GraphStoreError, match="run_id"):
        store.write_enrichment(records, {})
    with pytest.raises(GraphStoreError, match="not one of"):
        store.write_enrichment([{"kind": "relation", "type": "PURCHASED", "src": "I1", "dst": "I2"}], prov)
    for bad in (float("nan"), 1.5, -0.2):
        with pytest.raises(GraphStoreError, match=r"not in \[0, 1\]"):
            store.write_enrichment([{**records[5], "confidence": bad}], prov)
    assert store.counts() == c


def test_train_events_replace_dataset_events(store, small_dataset):
    train = small_dataset.events
    train = train[train["user_id"] != "U3"]
    store.load(small_dataset, events=train)
    c = store.counts()
    assert c["PURCHASED"] == 5 and c["ALSO_BOUGHT"] == 1 and c["User"] == 4  # U3 still in users.parquet


def test_events_without_timestamps_count_every_event(store, small_dataset):
    # KGAT data and event files without a timestamp column: the count is the number of events, and no
    # first_ts / last_ts properties are written (not NaN)
    ev = small_dataset.events.copy()
    ev["timestamp"] = pd.NaT
    store.load(small_dataset, events=ev)
    viewed = [e for e in store.subgraph("U1", hops=1)["edges"] if e["type"] == "VIEWED"]
    assert viewed == [{"type": "VIEWED", "src": ["User", "U1"], "dst": ["Item", "I1"], "count": 2}]
    data, ids = store.to_hetero_data()
    assert data["user", "viewed", "item"].edge_weight.tolist() == [2.0]
    assert data["user", "purchased", "item"].edge_weight.tolist() == [1.0] * 7


@pytest.mark.neo4j
def test_demo_catalog_both_stores_agree(neo4j_store, demo_dataset):
    emb = embedded_copy_of(demo_dataset)
    neo4j_store.load(demo_dataset)
    assert neo4j_store.counts() == emb.counts()
    assert emb.counts()["PURCHASED"] > 0 and emb.counts()["ALSO_BOUGHT"] > 0
    a, ids_a = emb.to_hetero_data()
    b, ids_b = neo4j_store.to_hetero_data()
    assert ids_a == ids_b
    assert hetero_equal(a, b)
    users, items = ids_a["user"], ids_a["item"]
    for u, i in [(users[0], items[0]), (users[3], items[50]), (users[10], items[-1])]:
        pa = emb.paths(("User", u), ("Item", i), max_hops=3, limit=10)
        pb = neo4j_store.paths(("User", u), ("Item", i), max_hops=3, limit=10)
        assert [(p.steps, [s.properties for s in p.steps]) for p in pa] == \
               [(p.steps, [s.properties for s in p.steps]) for p in pb]
        assert len(pa) == 10
    assert emb.subgraph(users[1], 2) == neo4j_store.subgraph(users[1], 2)


@pytest.mark.neo4j
def test_recbole_kg_sample_both_stores_agree(neo4j_store, recbole_dataset):
    emb = embedded_copy_of(recbole_dataset)
    neo4j_store.load(recbole_dataset)
    counts = emb.counts()
    assert neo4j_store.counts() == counts
    assert (counts["Entity"], counts["ENTITY_RELATION"], counts["LINKED_TO"], counts["RATED"]) == (8, 6, 3, 6)
    a, ids = emb.to_hetero_data()
    b, _ = neo4j_store.to_hetero_data()
    assert hetero_equal(a, b)
    directed = a["entity", entity_relation_pyg_name("film.film.directed_by"), "entity"].edge_index
    assert directed.shape == (2, 3)
    # item 10 (Toy Story) and item 11 (Heat): directors share a nationality
    p = neo4j_store.paths(("Item", "10"), ("Entity", "m.usa"), max_hops=3)
    assert [x.rel_types for x in p] == [("LINKED_TO", "ENTITY_RELATION", "ENTITY_RELATION")]
    assert [s.properties["relation"] for s in p[0].steps[1:]] == ["film.film.directed_by",
                                                                  "people.person.nationality"]
    assert p == emb.paths(("Item", "10"), ("Entity", "m.usa"), max_hops=3)


@pytest.mark.neo4j
def test_per_row_upsert_keeps_one_relationship_per_relation(neo4j_store):
    # the one-transaction-per-row baseline of the bulk benchmark builds the same graph as upsert_edges
    rows = [{"src": "e1", "dst": "e2", "relation": "director"}, {"src": "e1", "dst": "e2", "relation": "producer"},
            {"src": "e1", "dst": "e2", "relation": "director"}]
    assert neo4j_store.upsert_edges_per_row("ENTITY_RELATION", rows) == 3
    assert neo4j_store.counts()["ENTITY_RELATION"] == 2
    per_row, _ = neo4j_store.to_hetero_data()
    with pytest.raises(GraphStoreError, match="need a 'relation'"):
        neo4j_store.upsert_edges_per_row("ENTITY_RELATION", [{"src": "e1", "dst": "e2"}])
    emb = embedded_copy_of_rows("ENTITY_RELATION", rows)
    assert hetero_equal(per_row, emb.to_hetero_data()[0])


def embedded_copy_of_rows(rel: str, rows: list[dict]) -> object:
    from kg.embedded_store import EmbeddedStore

    s = EmbeddedStore()
    s.upsert_edges(rel, rows)
    return s
