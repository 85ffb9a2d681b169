"""Small hand-made datasets for the graph store tests (numbers in the tests are computed from these by hand)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest

from kgrec.data.schema import Dataset

INJECT_ID = "x'}) MATCH (n) DETACH DELETE n //"
INJECT_TITLE = '"}) WITH 1 AS x MATCH (n) DETACH DELETE n RETURN 1 //'
INJECT_ATTR = "a`]->() DETACH DELETE n //"


def _ts(s: str) -> pd.Timestamp:
    return pd.Timestamp(s, tz="UTC")


def small_tables() -> dict[str, Any]:
    """6 items (2 brands, categories Shoes>Running / Shoes>Trail / Apparel), 4 users, 3 triples, 2 links."""
    items = pd.DataFrame([
        {"item_id": "I1", "title": "Red runner", "brand": "Acme", "category": "Shoes>Running",
         "attributes": json.dumps({"colour": "red", "size": "42"}), "price": 50.0, "image": None},
        {"item_id": "I2", "title": "Blue runner", "brand": "Acme", "category": "Shoes>Running",
         "attributes": json.dumps({"colour": "blue"}), "price": 55.0, "image": None},
        {"item_id": "I3", "title": "Trail boot", "brand": "Globex", "category": "Shoes>Trail",
         "attributes": json.dumps({"colour": "red"}), "price": 90.0, "image": None},
        {"item_id": "I4", "title": "Tee", "brand": "Globex", "category": "Apparel",
         "attributes": None, "price": 15.0, "image": None},
        {"item_id": "I5", "title": "Socks", "brand": None, "category": None, "attributes": None,
         "price": None, "image": None},
        {"item_id": INJECT_ID, "title": INJECT_TITLE, "brand": "Acme", "category": "Apparel",
         "attributes": json.dumps({INJECT_ATTR: "v'}) DETACH DELETE n //"}), "price": 1.0, "image": None},
    ])
    users = pd.DataFrame({"user_id": ["U1", "U2", "U3", "U4"], "attributes": [None] * 4})
    ev = [
        ("U1", "I1", "view", "2024-01-01T10:00:00"), ("U1", "I1", "view", "2024-01-02T10:00:00"),
        ("U1", "I1", "purchase", "2024-01-03T10:00:00"), ("U1", "I2", "purchase", "2024-01-04T10:00:00"),
        ("U2", "I1", "purchase", "2024-01-05T10:00:00"), ("U2", "I2", "purchase", "2024-01-06T10:00:00"),
        ("U2", "I3", "purchase", "2024-01-07T10:00:00"), ("U3", "I2", "purchase", "2024-01-08T10:00:00"),
        ("U3", "I3", "purchase", "2024-01-09T10:00:00"), ("U4", "I4", "click", "2024-01-10T10:00:00"),
        ("U4", INJECT_ID, "cart", "2024-01-11T10:00:00"),
    ]
    events = pd.DataFrame(ev, columns=["user_id", "item_id", "type", "timestamp"])
    events["timestamp"] = events["timestamp"].map(_ts)
    events["value"] = None
    ratings = pd.DataFrame([
        ("U4", "I5", "rating", _ts("2024-02-01T00:00:00"), 2.0),
        ("U4", "I5", "rating", _ts("2024-02-02T00:00:00"), 5.0),
    ], columns=["user_id", "item_id", "type", "timestamp", "value"])
    events = pd.concat([events, ratings], ignore_index=True)
    events["value"] = events["value"].astype(float)
    events["query"] = None
    triples = pd.DataFrame([("E1", "directed_by", "E2"), ("E1", "starring", "E2"), ("E2", "born.in", "E3")],
                           columns=["head", "relation", "tail"])
    links = pd.DataFrame([("I1", "E1"), ("I3", "E3")], columns=["item_id", "entity_id"])
    return {"items": items, "users": users, "events": events, "triples": triples, "links": links}


# Hand-computed from small_tables():
SMALL_COUNTS = {
    "User": 4, "Item": 6, "Brand": 2, "Category": 4, "AttributeValue": 4, "Entity": 3,
    "VIEWED": 1, "CLICKED": 1, "CARTED": 1, "PURCHASED": 7, "RATED": 1,
    "IN_CATEGORY": 5, "SUBCATEGORY_OF": 2, "MADE_BY": 5, "HAS_ATTRIBUTE": 5, "LINKED_TO": 2,
    "ENTITY_RELATION": 3, "ALSO_BOUGHT": 2, "SIMILAR_TO": 0, "COMPLEMENTS": 0, "DUPLICATE_OF": 0,
}


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    import pyarrow as pa

    root = tmp_path_factory.mktemp("kg_small") / "dataset"
    tables = {k: pa.Table.from_pandas(v, preserve_index=False) for k, v in small_tables().items()}
    return Dataset.write(root, tables, source={"kind": "test"})


RECBOLE_FILES = {
    "mini.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                  "1\t10\t4\t881250949\n1\t11\t5\t881250950\n2\t10\t3\t881250951\n2\t12\t2\t881250952\n"
                  "3\t11\t4\t881250953\n3\t12\t5\t881250954\n",
    "mini.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                 "10\tToy Story\t1995\tAnimation Comedy\n11\tHeat\t1995\tAction Crime\n"
                 "12\tFargo\t1996\tCrime Drama\n",
    "mini.kg": "head_id:token\trelation_id:token\ttail_id:token\n"
               "m.toy\tfilm.film.directed_by\tm.lasseter\nm.heat\tfilm.film.directed_by\tm.mann\n"
               "m.heat\tfilm.film.starring\tm.deniro\nm.fargo\tfilm.film.directed_by\tm.coen\n"
               "m.lasseter\tpeople.person.nationality\tm.usa\nm.mann\tpeople.person.nationality\tm.usa\n",
    "mini.link": "item_id:token\tentity_id:token\n10\tm.toy\n11\tm.heat\n12\tm.fargo\n",
}


@pytest.fixture(scope="session")
def recbole_dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from kgrec.data.ingest import ingest

    raw = tmp_path_factory.mktemp("recbole_raw")
    for name, text in RECBOLE_FILES.items():
        (raw / name).write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("recbole_ds") / "dataset"
    ingest(raw, out, fmt="recbole")
    return Dataset.open(out)


@pytest.fixture(params=["embedded", "neo4j"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each contract test runs on both implementations."""
    if request.param == "embedded":
        from kg.embedded_store import EmbeddedStore

        yield EmbeddedStore()
    else:
        yield request.getfixturevalue("neo4j_store")


def embedded_copy_of(dataset: Dataset, events: Any = None) -> Any:
    from kg.embedded_store import EmbeddedStore

    s = EmbeddedStore()
    s.load(dataset, events=events)
    return s


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    return tmp_path
