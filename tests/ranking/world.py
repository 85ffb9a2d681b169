"""A small generated shop with planted preferences, for ranking tests (and the benchmark at large sizes).

Users prefer two brands, a category and a colour; purchases, carts, clicks and views are drawn with probability
rising with that affinity, so KG features (same brand / category / attribute as bought items) carry real signal.
The held-out events come from the same preferences. Everything is seeded and built as plain arrays plus a PyG
``HeteroData`` that follows ``kg.schema`` (node indices in sorted id order), and can be written into any
``GraphStore`` with ``load_into_store``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd

COLOURS = ["red", "blue", "green", "black", "white", "grey", "yellow", "pink"]
MATERIALS = ["leather", "cotton", "mesh", "wool", "nylon"]
NOUNS = ["Runner", "Jacket", "Boot", "Tee", "Pack", "Cap", "Sock", "Short"]


@dataclass
class World:
    user_ids: list[str]
    item_ids: list[str]
    items: pd.DataFrame  # item_id, title, brand, category, attributes(dict), price, image
    train_events: pd.DataFrame  # user_id, item_id, type, timestamp
    test_events: pd.DataFrame
    user_vectors: np.ndarray
    item_vectors: np.ndarray
    item_text: np.ndarray
    item_image: np.ndarray
    modality_weights: np.ndarray
    also_bought: list[tuple[str, str, int]]
    links: list[tuple[str, str]]  # item -> entity
    extra: dict[str, Any] = field(default_factory=dict)

    def hetero(self) -> tuple[Any, dict[str, list[str]]]:
        """HeteroData + id maps, exactly as ``GraphStore.to_hetero_data`` describes them."""
        import torch
        from torch_geometric.data import HeteroData

        items = self.items
        attr_rows = [(r.item_id, f"{k}={v}") for r in items.itertuples() for k, v in r.attributes.items()]
        ids = {
            "user": sorted(self.user_ids),
            "item": sorted(self.item_ids),
            "brand": sorted(set(items["brand"])),
            "category": sorted(set(items["category"])),
            "attribute": sorted({a for _, a in attr_rows}),
            "entity": sorted({e for _, e in self.links}),
        }
        pos = {t: {x: i for i, x in enumerate(v)} for t, v in ids.items()}
        data = HeteroData()
        for t, v in ids.items():
            data[t].num_nodes = len(v)

        def put(src: str, rel: str, dst: str, pairs: list[tuple[str, str]], weights: list[float] | None = None) -> None:
            if not pairs:
                return
            ei = torch.tensor([[pos[src][a] for a, _ in pairs], [pos[dst][b] for _, b in pairs]], dtype=torch.long)
            data[(src, rel, dst)].edge_index = ei
            w = [1.0] * len(pairs) if weights is None else weights
            data[(src, rel, dst)].edge_weight = torch.tensor(w, dtype=torch.float32)

        ev = self.train_events
        for etype, rel in [("view", "viewed"), ("click", "clicked"), ("cart", "carted"), ("purchase", "purchased")]:
            g = ev[ev["type"] == etype].groupby(["user_id", "item_id"]).size()
            put("user", rel, "item", list(g.index), [float(x) for x in g.to_numpy()])
        put("item", "made_by", "brand", list(zip(items["item_id"], items["brand"])))
        put("item", "in_category", "category", list(zip(items["item_id"], items["category"])))
        put("item", "has_attribute", "attribute", attr_rows)
        put("item", "linked_to", "entity", self.links)
        put("item", "also_bought", "item", [(a, b) for a, b, _ in self.also_bought], [float(w) for *_, w in self.also_bought])
        return data, ids


    def write_dataset(self, root: Any) -> Any:
        """Write the world as a kgrec ``Dataset`` (train and test events, a split table) for GraphStore.load."""
        from kgrec.data.schema import Dataset

        events = pd.concat([self.train_events, self.test_events], ignore_index=True)
        split = pd.concat(
            [self.train_events.assign(split="train"), self.test_events.assign(split="test")], ignore_index=True
        )[["user_id", "item_id", "split"]].drop_duplicates(["user_id", "item_id"], keep="last")
        tables = {
            "items": self.items,
            "users": pd.DataFrame({"user_id": self.user_ids, "attributes": [None] * len(self.user_ids)}),
            "events": events,
            "triples": pd.DataFrame({"head": [], "relation": [], "tail": []}, dtype=str),
            "links": pd.DataFrame(self.links, columns=["item_id", "entity_id"]),
            "split": split,
        }
        return Dataset.write(root, tables, source={"generator": "tests.ranking.world"})


def make_world(
    n_users: int = 200,
    n_items: int = 400,
    n_brands: int = 16,
    n_categories: int = 10,
    n_entities: int = 24,
    dim: int = 16,
    seed: int = 0,
    purchases: tuple[int, int] = (3, 7),
    views: tuple[int, int] = (6, 14),
    test_events: int = 4,
) -> World:
    rng = np.random.default_rng(seed)
    width_u, width_i = len(str(n_users)), len(str(n_items))
    user_ids = [f"u{k:0{width_u}d}" for k in range(n_users)]
    item_ids = [f"i{k:0{width_i}d}" for k in range(n_items)]
    brands = [f"Brand{k:02d}" for k in range(n_brands)]
    cats = [f"Dept{k % 3}>Cat{k:02d}" for k in range(n_categories)]
    ib = rng.integers(0, n_brands, n_items)
    ic = rng.integers(0, n_categories, n_items)
    icol = rng.integers(0, len(COLOURS), n_items)
    imat = rng.integers(0, len(MATERIALS), n_items)
    price = np.round(rng.lognormal(3.5, 0.6, n_items), 2)
    titles = [f"{brands[ib[k]]} {COLOURS[icol[k]].title()} {NOUNS[k % len(NOUNS)]} {k}" for k in range(n_items)]
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "title": titles,
            "brand": [brands[b] for b in ib],
            "category": [cats[c] for c in ic],
            "attributes": [{"colour": COLOURS[a], "material": MATERIALS[m]} for a, m in zip(icol, imat)],
            "price": price,
            "image": [None] * n_items,
        }
    )
    # Preferences and affinity (users x items)
    pref_b = np.stack([rng.choice(n_brands, 2, replace=False) for _ in range(n_users)])
    pref_c = rng.integers(0, n_categories, n_users)
    pref_col = rng.integers(0, len(COLOURS), n_users)
    latent_u = rng.normal(size=(n_users, dim)).astype(np.float32)
    latent_i = rng.normal(size=(n_items, dim)).astype(np.float32)
    aff = (
        2.0 * (ib[None, :] == pref_b[:, :1]) + 1.6 * (ib[None, :] == pref_b[:, 1:2])
        + 1.2 * (ic[None, :] == pref_c[:, None])
        + 0.8 * (icol[None, :] == pref_col[:, None])
        + 0.25 * (latent_u @ latent_i.T) / np.sqrt(dim)
    )
    prob = np.exp(aff)
    prob /= prob.sum(axis=1, keepdims=True)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    train_rows, test_rows = [], []
    for u in range(n_users):
        n_buy = rng.integers(*purchases)
        n_view = rng.integers(*views)
        chosen = rng.choice(n_items, n_buy + n_view + test_events, replace=False, p=prob[u])
        for k, it in enumerate(chosen[: n_buy + n_view]):
            ts = t0 + timedelta(days=float(rng.uniform(0, 60)))
            kind = "purchase" if k < n_buy else ("click" if rng.random() < 0.4 else "view")
            train_rows.append((user_ids[u], item_ids[it], "view", ts - timedelta(minutes=5)))
            if kind != "view":
                train_rows.append((user_ids[u], item_ids[it], kind, ts))
            if kind == "purchase" and rng.random() < 0.5:
                train_rows.append((user_ids[u], item_ids[it], "cart", ts - timedelta(minutes=2)))
        for it in chosen[n_buy + n_view :]:
            ts = t0 + timedelta(days=float(rng.uniform(60, 70)))
            kind = rng.choice(["purchase", "cart", "click", "view"], p=[0.4, 0.2, 0.2, 0.2])
            test_rows.append((user_ids[u], item_ids[it], str(kind), ts))
    cols = ["user_id", "item_id", "type", "timestamp"]
    train = pd.DataFrame(train_rows, columns=cols).assign(value=np.nan, query=None)
    test = pd.DataFrame(test_rows, columns=cols).assign(value=np.nan, query=None)
    # Co-purchases -> ALSO_BOUGHT (count >= 2)
    bought = train[train["type"] == "purchase"][["user_id", "item_id"]].drop_duplicates()
    pairs = bought.merge(bought, on="user_id")
    pairs = pairs[pairs["item_id_x"] < pairs["item_id_y"]]
    co = pairs.groupby(["item_id_x", "item_id_y"]).size()
    also = [(a, b, int(w)) for (a, b), w in co.items() if w >= 2]
    ents = [f"Q{k:03d}" for k in range(n_entities)]
    links = [(item_ids[k], ents[(ib[k] * 3 + ic[k]) % n_entities]) for k in range(n_items) if rng.random() < 0.5]
    # "GNN" vectors: noisy views of the preference structure (retrieval is informative, not perfect).
    brand_emb = rng.normal(size=(n_brands, dim)).astype(np.float32)
    cat_emb = rng.normal(size=(n_categories, dim)).astype(np.float32)
    item_vec = 0.6 * brand_emb[ib] + 0.4 * cat_emb[ic] + 0.5 * latent_i
    user_vec = 0.5 * brand_emb[pref_b[:, 0]] + 0.3 * cat_emb[pref_c] + 0.3 * latent_u
    user_vec += rng.normal(scale=1.0, size=user_vec.shape)
    col_emb = rng.normal(size=(len(COLOURS), 12)).astype(np.float32)
    text = np.concatenate([cat_emb[ic], brand_emb[ib]], axis=1) + rng.normal(scale=0.5, size=(n_items, 2 * dim))
    image = col_emb[icol] + rng.normal(scale=0.4, size=(n_items, 12))
    mw = rng.dirichlet([2, 2, 3], n_items).astype(np.float32)
    return World(
        user_ids=user_ids,
        item_ids=item_ids,
        items=items,
        train_events=train,
        test_events=test,
        user_vectors=user_vec.astype(np.float32),
        item_vectors=item_vec.astype(np.float32),
        item_text=text.astype(np.float32),
        item_image=image.astype(np.float32),
        modality_weights=mw,
        also_bought=also,
        links=links,
        extra={"pref_brand": pref_b, "pref_category": pref_c, "brands": brands},
    )


def context_kwargs(world: World) -> dict[str, Any]:
    """The vectors, ids and tables a RankingContext takes from a world (in the world's id order)."""
    return dict(user_vectors=world.user_vectors, item_vectors=world.item_vectors, user_ids=world.user_ids,
                item_ids=world.item_ids, item_text=world.item_text, item_image=world.item_image,
                modality_weights=world.modality_weights, items=world.items, events=world.train_events)


def context_from_world(world: World, hetero: Any = None, id_maps: dict[str, list[str]] | None = None):
    """RankingContext of a world built from its HeteroData export."""
    from ranking.context import RankingContext

    if hetero is None:
        hetero, id_maps = world.hetero()
    return RankingContext.from_hetero(hetero, id_maps, **context_kwargs(world))
