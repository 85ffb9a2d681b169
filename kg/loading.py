"""Turn a ``Dataset`` into node and relationship rows, shared by every ``GraphStore`` so both build the same graph.

Rows are plain dicts: nodes ``{"id": ..., <property>: ...}``, relationships ``{"src": ..., "dst": ..., <property>:
...}`` (``ENTITY_RELATION`` rows also carry ``relation``, part of their identity). ``None`` values are left out,
as Neo4j stores no nulls.

Derived parts:
  * interactions are aggregated per (user, item, type): ``count``, ``first_ts``/``last_ts`` (ISO-8601 UTC,
    fixed width ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` so that strings sort like times), ``value`` = the last non-null
    value (the last rating);
  * ``ALSO_BOUGHT``: item pairs purchased by at least ``also_bought_min_count`` common users, ``weight`` = that
    number, stored once per unordered pair with ``src < dst``;
  * categories: every prefix of a ``>``-separated path is a ``Category`` (``SUBCATEGORY_OF`` child -> parent), the
    item links to its leaf.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd

from kg.schema import EDGE_TYPES, INTERACTION_RELS, NODE_LABELS
from kgrec.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from kgrec.data.schema import Dataset

logger = logging.getLogger(__name__)

TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
CATEGORY_SEP = ">"
DATA_SOURCE = "data"
ENRICHMENT_SOURCE = "enrichment"


@dataclass
class GraphRows:
    """Every node and relationship row of a dataset's graph, keyed by label / relationship type."""

    nodes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    edges: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Expected ``GraphStore.counts()`` after loading these rows into an empty store."""
        out = {label: 0 for label in NODE_LABELS} | {rel: 0 for rel in EDGE_TYPES}
        for label, rows in self.nodes.items():
            out[label] = len({r["id"] for r in rows})
        for rel, rows in self.edges.items():
            out[rel] = len({edge_key(rel, r) for r in rows})
        return out

    def iter_nodes(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        for label in NODE_LABELS:
            if self.nodes.get(label):
                yield label, self.nodes[label]

    def iter_edges(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        for rel in EDGE_TYPES:
            if self.edges.get(rel):
                yield rel, self.edges[rel]


def edge_key(rel: str, row: dict[str, Any]) -> tuple[str, str, str]:
    """Identity of a relationship within its type: (src, dst) plus ``relation`` for external triples."""
    return (row["src"], row["dst"], row.get("relation", "") if rel == "ENTITY_RELATION" else "")


def clean(d: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` and NaN values (Neo4j stores no nulls; both stores must hold the same properties)."""
    out = {}
    for k, v in d.items():
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        out[k] = v
    return out


def format_ts(ts: pd.Series) -> pd.Series:
    """UTC timestamps -> fixed-width ISO strings (sortable as text)."""
    ts = pd.to_datetime(ts, utc=True)
    return ts.dt.strftime(TS_FORMAT)


def category_prefixes(path: str) -> list[str]:
    """``"A>B>C"`` -> ``["A", "A>B", "A>B>C"]`` (whitespace around segments removed, empty segments dropped)."""
    parts = [p.strip() for p in path.split(CATEGORY_SEP)]
    parts = [p for p in parts if p]
    return [CATEGORY_SEP.join(parts[: i + 1]) for i in range(len(parts))]


def aggregate_interactions(events: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Events -> one row per (user, item, type) per relationship type, with count, first/last ts, last value."""
    out: dict[str, list[dict[str, Any]]] = {}
    if events is None or len(events) == 0:
        return out
    ev = events[["user_id", "item_id", "type", "timestamp", "value"]].copy()
    ev["timestamp"] = pd.to_datetime(ev["timestamp"], utc=True)
    unknown = set(ev["type"].unique()) - set(INTERACTION_RELS)
    if unknown:
        logger.warning("ignoring events of unknown type(s) %s", sorted(map(str, unknown)))
        ev = ev[ev["type"].isin(list(INTERACTION_RELS))]
    ev = ev.sort_values(["user_id", "item_id", "type", "timestamp"], kind="stable")
    keys = ["user_id", "item_id", "type"]
    g = ev.groupby(keys, sort=True, observed=True)
    # "size", not "count": events without a timestamp (KGAT has none) are interactions all the same
    agg = g["timestamp"].agg(["size", "min", "max"]).rename(columns={"size": "count"}).reset_index()
    last_value = ev.dropna(subset=["value"]).groupby(keys, sort=True, observed=True)["value"].last()
    agg = agg.merge(last_value.rename("value").reset_index(), on=keys, how="left")
    agg["first_ts"] = format_ts(agg["min"])
    agg["last_ts"] = format_ts(agg["max"])
    for etype, part in agg.groupby("type", sort=True, observed=True):
        rel = INTERACTION_RELS[str(etype)]
        values = part["value"].to_numpy(dtype=float)
        rows = []
        for u, i, c, f, la, v in zip(part["user_id"], part["item_id"], part["count"], part["first_ts"],
                                     part["last_ts"], values):
            row = {"src": str(u), "dst": str(i), "count": int(c)}
            if isinstance(f, str):  # no timestamp: the properties are left out, not stored as NaN
                row["first_ts"], row["last_ts"] = f, la
            if not np.isnan(v):
                row["value"] = float(v)
            rows.append(row)
        out[rel] = rows
    return out


def also_bought(events: pd.DataFrame, min_count: int) -> list[dict[str, Any]]:
    """Item pairs purchased by >= ``min_count`` common users; ``weight`` = that number; ``src < dst``.

    Computed as the upper triangle of ``X^T X`` for the binary (users, items) purchase matrix (scipy sparse), so
    it scales to millions of purchases.
    """
    import scipy.sparse as sp

    if events is None or len(events) == 0:
        return []
    buys = events.loc[events["type"] == "purchase", ["user_id", "item_id"]].drop_duplicates()
    if len(buys) == 0:
        return []
    users = np.sort(buys["user_id"].astype(str).unique())
    items = np.sort(buys["item_id"].astype(str).unique())  # sorted: index order == id order, so i < j => src < dst
    ui = np.searchsorted(users, buys["user_id"].astype(str).to_numpy())
    ii = np.searchsorted(items, buys["item_id"].astype(str).to_numpy())
    x = sp.csr_matrix((np.ones(len(buys), dtype=np.int32), (ui, ii)), shape=(len(users), len(items)))
    co = sp.triu(x.T @ x, k=1).tocoo()
    keep = co.data >= max(1, min_count)
    rows_i, cols_i, w = co.row[keep], co.col[keep], co.data[keep]
    order = np.lexsort((cols_i, rows_i))
    return [
        {"src": str(items[a]), "dst": str(items[b]), "weight": int(c)}
        for a, b, c in zip(rows_i[order], cols_i[order], w[order])
    ]


def build_graph_rows(dataset: Dataset, *, events: pd.DataFrame | None = None,
                     also_bought_min_count: int = 2) -> GraphRows:
    """All node and relationship rows for ``dataset`` (``events`` replaces ``dataset.events`` when given)."""
    rows = GraphRows()
    items = dataset.items
    users = dataset.users
    ev = dataset.events if events is None else events
    triples = dataset.triples
    links = dataset.links

    # ---- nodes
    item_ids = set(items["item_id"].astype(str))
    user_ids = set(users["user_id"].astype(str)) | set(ev["user_id"].astype(str) if len(ev) else [])
    rows.nodes["User"] = [{"id": u} for u in sorted(user_ids)]
    item_rows = []
    brands: set[str] = set()
    categories: set[str] = set()
    made_by, in_category = [], []
    for r in items.itertuples(index=False):
        iid = str(r.item_id)
        brand = r.brand if isinstance(r.brand, str) and r.brand.strip() else None
        cat_path = category_prefixes(r.category) if isinstance(r.category, str) else []
        item_rows.append(clean({
            "id": iid, "title": r.title, "price": r.price, "image": r.image, "brand": brand,
            "category": cat_path[-1] if cat_path else None,
        }))
        if brand is not None:
            brands.add(brand)
            made_by.append({"src": iid, "dst": brand})
        if cat_path:
            categories.update(cat_path)
            in_category.append({"src": iid, "dst": cat_path[-1]})
    # Items that only appear in events (not in the catalog) still get nodes so no interaction is lost.
    for iid in sorted(set(ev["item_id"].astype(str)) - item_ids if len(ev) else []):
        item_rows.append({"id": iid})
    rows.nodes["Item"] = sorted(item_rows, key=lambda r: r["id"])
    rows.nodes["Brand"] = [{"id": b, "name": b} for b in sorted(brands)]
    rows.nodes["Category"] = [{"id": c, "name": c.rsplit(CATEGORY_SEP, 1)[-1]} for c in sorted(categories)]
    rows.edges["MADE_BY"] = made_by
    rows.edges["IN_CATEGORY"] = in_category
    rows.edges["SUBCATEGORY_OF"] = [
        {"src": c, "dst": c.rsplit(CATEGORY_SEP, 1)[0]} for c in sorted(categories) if CATEGORY_SEP in c
    ]

    attrs = dataset.item_attributes()
    av_nodes: dict[str, dict[str, Any]] = {}
    has_attr = []
    for iid, name, value in attrs.itertuples(index=False):
        name, value = str(name), str(value)
        av_id = attribute_value_id(name, value)
        av_nodes[av_id] = {"id": av_id, "name": name, "value": value}
        has_attr.append({"src": str(iid), "dst": av_id, "source": DATA_SOURCE})
    rows.nodes["AttributeValue"] = [av_nodes[k] for k in sorted(av_nodes)]
    rows.edges["HAS_ATTRIBUTE"] = has_attr

    entities: set[str] = set()
    ent_rel = []
    for h, rel, t in triples.itertuples(index=False):
        h, rel, t = str(h), str(rel), str(t)
        entities.update((h, t))
        ent_rel.append({"src": h, "dst": t, "relation": rel})
    linked = []
    for iid, eid in links.itertuples(index=False):
        entities.add(str(eid))
        linked.append({"src": str(iid), "dst": str(eid)})
    rows.nodes["Entity"] = [{"id": e} for e in sorted(entities)]
    rows.edges["ENTITY_RELATION"] = ent_rel
    rows.edges["LINKED_TO"] = linked

    # ---- interactions and derived edges
    rows.edges.update(aggregate_interactions(ev))
    rows.edges["ALSO_BOUGHT"] = also_bought(ev, also_bought_min_count)
    # Items linked to entities but absent from the catalog and the events.
    known_items = {r["id"] for r in rows.nodes["Item"]}
    extra = sorted({r["src"] for r in linked} - known_items)
    if extra:
        rows.nodes["Item"] = sorted(rows.nodes["Item"] + [{"id": i} for i in extra], key=lambda r: r["id"])
    return rows


def attribute_value_id(name: str, value: str) -> str:
    """Key of an ``AttributeValue`` node: ``"name=value"`` (ingest turns ``=`` in names into ``_``, so the first
    ``=`` separates them; a name with ``=`` would share ids with another pair and is refused)."""
    if "=" in name:
        raise DataError(f"attribute name {name!r} contains '='; ingest the dataset again (names get '_' for '=')")
    return f"{name}={value}"


def evidence_json(evidence: Any) -> str | None:
    """Relationship properties cannot hold maps in Neo4j: evidence is stored as compact JSON text."""
    if evidence is None:
        return None
    return json.dumps(evidence, sort_keys=True, ensure_ascii=False, default=str)


def train_events(dataset: Dataset) -> pd.DataFrame:
    """The dataset's events restricted to its train split (all events when it has no ``split.parquet``).

    A (user, item) pair belongs to the split named in ``split.parquet``; evaluation loads only train pairs so
    held-out interactions never leak into graph features.
    """
    events = dataset.events
    split = dataset.split
    if split is None:
        return events
    train = split.loc[split["split"] == "train", ["user_id", "item_id"]].drop_duplicates()
    return events.merge(train, on=["user_id", "item_id"], how="inner")
