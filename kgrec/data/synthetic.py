"""Synthetic demo catalog: the embedded default that every stage can be run and tested on.

``generate_catalog`` writes *raw* files (what a user would bring), not a dataset; run ``ingest`` on the directory.

Layout of ``out_dir`` (``fmt="text"``, the default; ``fmt="parquet"`` writes ``.parquet`` instead of ``.jsonl/.csv``
for the item/user/event/triple/link tables, for benchmark-sized runs)::

    items.jsonl      item_id, title, description, brand, category, attributes{colour, material, pattern[, size]},
                     price, image ("images/<item_id>.png")
    users.csv        user_id, age_band, region
    events.csv       user_id, item_id, type (view|click|cart|purchase|rating), timestamp (ISO-8601 UTC),
                     value (rating 1-5), query (text typed before some purchases)
    triples.csv      head, relation, tail           (external knowledge about brands, materials, styles)
    links.csv        item_id, entity_id             (item -> its brand entity and its listed material entity)
    images/<item_id>.png   64x64: shape by category, filled with the item's colour, pattern overlaid
    truth/missing_attributes.csv   item_id, name, value   (attribute values removed from the listing)
    truth/duplicates.csv           item_id, duplicate_of  (planted near-duplicate listings)
    truth/user_tastes.csv          user_id, categories, brands, colours, price_level ("|"-separated lists)
    truth/planted_errors.csv       file, line, reason     (rows corrupted on purpose with ``noise > 0``)

What the generator guarantees (tests and other stages rely on it):
  * the image shows the item's category (shape, see ``CATEGORY_SHAPES``) and colour (``COLOURS`` RGB with a
    jitter of at most 12 per channel) and pattern; titles and descriptions name colour, material and pattern in words
    even when the value was removed from ``attributes``;
  * users' events follow their latent tastes (category, brand, colour, price level): taste-matching items are
    viewed more often and go further down the view -> click -> cart -> purchase funnel;
  * a fixed ``seed`` gives byte-identical tables and images.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kgrec.data.schema import atomic_write_bytes

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class CategorySpec:
    path: str
    shape: str
    nouns: tuple[str, ...]
    materials: tuple[str, ...]
    sizes: tuple[str, ...]
    base_price: float
    weight: float


_SHOE_SIZES = tuple(str(s) for s in range(38, 47))
_CLOTHES_SIZES = ("XS", "S", "M", "L", "XL")

CATEGORIES: tuple[CategorySpec, ...] = (
    CategorySpec("Shoes>Running", "triangle", ("running shoes", "trainers", "runners"), ("mesh", "leather", "synthetic"), _SHOE_SIZES, 85.0, 0.16),
    CategorySpec("Shoes>Boots", "square", ("boots", "ankle boots", "hiking boots"), ("leather", "suede", "rubber"), _SHOE_SIZES, 120.0, 0.12),
    CategorySpec("Bags>Backpack", "pentagon", ("backpack", "rucksack", "daypack"), ("canvas", "nylon", "leather"), (), 65.0, 0.12),
    CategorySpec("Apparel>Jacket", "diamond", ("jacket", "coat", "windbreaker"), ("leather", "cotton", "wool", "nylon"), _CLOTHES_SIZES, 150.0, 0.14),
    CategorySpec("Apparel>T-Shirt", "tshape", ("t-shirt", "tee", "crew-neck shirt"), ("cotton", "linen", "polyester"), _CLOTHES_SIZES, 25.0, 0.16),
    CategorySpec("Home>Mug", "circle", ("mug", "coffee mug", "cup"), ("ceramic", "glass", "metal"), (), 15.0, 0.10),
    CategorySpec("Home>Lamp", "hexagon", ("lamp", "desk lamp", "table lamp"), ("metal", "glass", "wood"), (), 70.0, 0.08),
    CategorySpec("Accessories>Watch", "star", ("watch", "wristwatch", "timepiece"), ("metal", "leather", "plastic"), (), 180.0, 0.12),
)
CATEGORY_SHAPES: dict[str, str] = {c.path: c.shape for c in CATEGORIES}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 160, 70),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (130, 60, 170),
    "pink": (240, 130, 180),
    "grey": (128, 128, 128),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")
_PATTERN_P = (0.6, 0.25, 0.15)
MATERIALS: tuple[str, ...] = tuple(sorted({m for c in CATEGORIES for m in c.materials}))
PRICE_LEVELS: tuple[str, ...] = ("budget", "mid", "premium")
_TIER_MULT = np.array([0.6, 1.0, 1.8])
BACKGROUND_RGB = (236, 236, 232)
IMAGE_SIZE = 64
COLOUR_JITTER = 12

_BRAND_NAMES = (
    "Northpeak", "Stridewell", "Urbanloom", "Kilnworks", "Lumora", "Tempo", "Arcadia", "Ferrovia", "Bluefin",
    "Cedar & Co", "Halden", "Marlowe", "Quill", "Rivet", "Solstice", "Terrane", "Vantage", "Wren", "Zephyr",
    "Oakhaven",
)
_COUNTRIES = ("italy", "germany", "japan", "usa", "sweden", "france", "uk", "denmark")
_GROUPS = ("alder_group", "meridian_holdings", "koru_brands", "independent", "vesta_retail")
_STYLES = ("outdoor", "urban", "classic", "minimalist", "sporty")


@dataclass(frozen=True)
class BrandSpec:
    name: str
    categories: tuple[int, ...]  # indices into CATEGORIES: where this brand sells
    tier: int  # index into PRICE_LEVELS
    country: str
    group: str
    style: str


BRANDS: tuple[BrandSpec, ...] = tuple(
    BrandSpec(
        name,
        (i % len(CATEGORIES), (i + 3) % len(CATEGORIES)),
        i % 3,
        _COUNTRIES[(i * 5) % len(_COUNTRIES)],
        _GROUPS[i % len(_GROUPS)],
        _STYLES[(i * 2) % len(_STYLES)],
    )
    for i, name in enumerate(_BRAND_NAMES)
)

_MATERIAL_SEASON = {
    "leather": ("autumn", "winter"), "suede": ("autumn",), "wool": ("winter",), "cotton": ("summer", "spring"),
    "linen": ("summer",), "mesh": ("summer",), "canvas": ("spring", "summer"), "rubber": ("winter",),
    "nylon": ("spring", "autumn"), "polyester": ("all_year",), "synthetic": ("all_year",),
    "ceramic": ("all_year",), "glass": ("all_year",), "metal": ("all_year",), "wood": ("all_year",),
    "plastic": ("all_year",),
}
_MATERIAL_SOURCE = {
    "leather": "animal_hide", "suede": "animal_hide", "wool": "animal_fibre", "cotton": "plant_fibre",
    "linen": "plant_fibre", "mesh": "petroleum", "canvas": "plant_fibre", "rubber": "latex", "nylon": "petroleum",
    "polyester": "petroleum", "synthetic": "petroleum", "ceramic": "clay", "glass": "sand", "metal": "ore",
    "wood": "timber", "plastic": "petroleum",
}
_STYLE_RELATED = {"outdoor": "sporty", "urban": "minimalist", "classic": "minimalist", "sporty": "outdoor",
                  "minimalist": "classic"}

_TITLE_TEMPLATES = (
    "{brand} {colour} {material} {noun}",
    "{Colour} {pattern_adj}{material} {noun} by {brand}",
    "{brand} {noun} - {colour}, {material}",
    "{pattern_adj}{colour} {noun} in {material} | {brand}",
    "{brand} {Pattern} {colour} {noun} ({material})",
)
_DESC_TEMPLATES = (
    "A {pattern} {colour} {noun} made of {material}. {size_sentence}{extra}",
    "Crafted from {material}, this {colour} {noun} from {brand} has a {pattern} finish. {size_sentence}{extra}",
    "{brand}'s {noun} in {colour}: {material} construction with a {pattern} look. {extra}{size_sentence}",
    "{extra}This {noun} comes in {colour} with a {pattern} pattern; the {material} is easy to care for. {size_sentence}",
)
_EXTRAS = {
    "Shoes>Running": ("Light enough for long runs. ", "Cushioned sole for daily training. "),
    "Shoes>Boots": ("Built for wet trails. ", "A sturdy sole for cold days. "),
    "Bags>Backpack": ("Fits a 15-inch laptop. ", "Padded straps for the commute. "),
    "Apparel>Jacket": ("Keeps the wind out. ", "A relaxed fit for layering. "),
    "Apparel>T-Shirt": ("A regular fit for every day. ", "Soft on the skin. "),
    "Home>Mug": ("Holds 350 ml. ", "Dishwasher safe. "),
    "Home>Lamp": ("Warm light for reading. ", "Takes an E27 bulb. "),
    "Accessories>Watch": ("Water resistant to 50 m. ", "A quartz movement that keeps time. "),
}
_QUERY_TEMPLATES = ("{colour} {material} {noun}", "{colour} {noun}", "{material} {noun} {colour}", "{brand} {noun}")

_T0 = int(datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp())  # start of the 90-day window, unix seconds
_WINDOW_S = 90 * 86_400
MISSING_SHARE = 0.15
DUPLICATE_SHARE = 0.02


@dataclass
class CatalogSummary:
    """What ``generate_catalog`` wrote: row counts and the directory."""

    out_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- images


def _regular_polygon(n: int, radius: float, cx: float, cy: float, rot: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(rot + 2 * math.pi * k / n), cy + radius * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = outer if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def shape_mask(shape: str, dx: int = 0, dy: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a category's shape, shifted by (dx, dy) pixels."""
    from PIL import Image, ImageDraw

    s = size / 64.0
    c = 32 * s
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)

    def P(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * s + dx, y * s + dy) for x, y in pts]

    if shape == "circle":
        d.ellipse((10 * s + dx, 10 * s + dy, 54 * s + dx, 54 * s + dy), fill=255)
    elif shape == "square":
        d.rectangle((12 * s + dx, 12 * s + dy, 52 * s + dx, 52 * s + dy), fill=255)
    elif shape == "triangle":
        d.polygon(P([(32, 8), (57, 54), (7, 54)]), fill=255)
    elif shape == "diamond":
        d.polygon(P([(32, 5), (59, 32), (32, 59), (5, 32)]), fill=255)
    elif shape == "tshape":
        d.polygon(P([(7, 10), (57, 10), (57, 25), (40, 25), (40, 57), (24, 57), (24, 25), (7, 25)]), fill=255)
    elif shape == "pentagon":
        d.polygon([(x + dx, y + dy) for x, y in _regular_polygon(5, 26 * s, c, c + 2 * s)], fill=255)
    elif shape == "hexagon":
        d.polygon([(x + dx, y + dy) for x, y in _regular_polygon(6, 26 * s, c, c, rot=0.0)], fill=255)
    elif shape == "star":
        d.polygon([(x + dx, y + dy) for x, y in _star(c, c + 2 * s, 28 * s, 12 * s)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {sorted(set(CATEGORY_SHAPES.values()))}")
    return np.asarray(img) > 127


def render_item_image(shape: str, rgb: tuple[int, int, int] | np.ndarray, pattern: str, dx: int = 0, dy: int = 0,
                      phase: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """``(size, size, 3) uint8`` picture: the shape filled with ``rgb``, the pattern overlaid, on a light background.

    Stripes and dots are a 45 % blend towards a contrasting tone, so the mean colour of the shape stays close to
    ``rgb`` in hue.
    """
    mask = shape_mask(shape, dx, dy, size)
    out = np.empty((size, size, 3), dtype=np.float32)
    out[:] = BACKGROUND_RGB
    fill = np.empty((size, size, 3), dtype=np.float32)
    fill[:] = np.asarray(rgb, dtype=np.float32)
    rgb_arr = np.asarray(rgb, dtype=np.float32)
    lum = 0.299 * rgb_arr[0] + 0.587 * rgb_arr[1] + 0.114 * rgb_arr[2]
    contrast = np.array([255.0, 255.0, 255.0] if lum < 140 else [20.0, 20.0, 20.0], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "striped":
        overlay = ((yy + phase) // 4) % 2 == 0
    elif pattern == "dotted":
        overlay = ((xx + phase) % 8 - 3.5) ** 2 + ((yy + phase) % 8 - 3.5) ** 2 <= 2.5
    else:
        overlay = np.zeros((size, size), dtype=bool)
    fill[overlay] = 0.55 * fill[overlay] + 0.45 * contrast
    out[mask] = fill[mask]
    # thin dark outline so white items stay visible on the light background
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    out[edge] = (70.0, 70.0, 70.0)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- generator


def _ids(prefix: str, n: int) -> list[str]:
    width = max(5, len(str(max(n - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _group_index(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, counts): items sorted by key, and where each key's run starts and how long it is."""
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=n_keys)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order, starts, counts


def _sample_in_group(rng: np.random.Generator, group: tuple[np.ndarray, np.ndarray, np.ndarray], keys: np.ndarray,
                     fallback: np.ndarray) -> np.ndarray:
    """One member of group ``keys[i]`` for every i, or ``fallback[i]`` where that group is empty."""
    order, starts, counts = group
    c = counts[keys]
    pick = starts[keys] + np.floor(rng.random(len(keys)) * np.maximum(c, 1)).astype(np.int64)
    pick = np.minimum(pick, len(order) - 1)
    return np.where(c > 0, order[pick], fallback)


def generate_catalog(
    out_dir: str | Path,
    n_items: int = 1000,
    n_users: int = 300,
    seed: int = 0,
    images: bool | int = True,
    *,
    n_events: int | None = None,
    sessions_per_user: float = 12.0,
    fmt: Literal["text", "parquet"] = "text",
    noise: float = 0.0,
    progress: bool = False,
) -> CatalogSummary:
    """Write a synthetic raw catalog (items, users, events, knowledge triples, links, images, truth) to ``out_dir``.

    Args:
        out_dir: directory to create/overwrite files in.
        n_items: number of item listings, planted near-duplicates included (~2 %).
        n_users: number of users.
        seed: everything (tables and images) is a deterministic function of the seed.
        images: draw ``images/<item_id>.png`` (64x64); without, ``image`` is empty. An int ``N`` draws images for
            the ``N`` items with the smallest ids only (a random subset: ids are shuffled over items) and leaves
            ``image`` empty for the rest; tables and images of those items are the same as with ``True``.
        n_events: exact number of events to produce (sessions are added until reached); default: about
            ``sessions_per_user`` sessions per user, each a few events.
        fmt: ``"text"`` (items.jsonl + CSV) or ``"parquet"`` (one .parquet per table, for big runs).
        noise: share of event rows to corrupt (unknown item, bad timestamp, invalid type, empty user), plus four
            bad item rows (duplicate id, missing title, path-traversal image, non-numeric price), so the ingest
            report has something to quarantine; every planted error is listed in ``truth/planted_errors.csv``
            (file, line, reason). Text format only; the clean rows do not change with ``noise``.
        progress: show a tqdm bar while drawing images.
    """
    import time

    t_start = time.perf_counter()
    if n_items < 10 or n_users < 1:
        raise ValueError("generate_catalog needs n_items >= 10 and n_users >= 1")
    if fmt not in ("text", "parquet"):
        raise ValueError(f"fmt must be 'text' or 'parquet', got {fmt!r}")
    if noise and fmt != "text":
        raise ValueError("noise needs fmt='text' (typed Parquet columns cannot hold malformed values)")
    if not 0.0 <= noise <= 0.5:
        raise ValueError(f"noise must be in [0, 0.5], got {noise}")
    # images=True/False: all/none; an int N: the N items with the smallest ids
    n_images = (n_items if images else 0) if isinstance(images, bool) else int(images)
    if n_images < 0:
        raise ValueError(f"images must be a bool or a non-negative number of items, got {images!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    n_cat, n_brand, n_col = len(CATEGORIES), len(BRANDS), len(COLOURS)

    # ---------------- items: base listings, then near-duplicates re-listed from random base items
    n_dup = int(round(DUPLICATE_SHARE * n_items)) if n_items >= 50 else 0
    n_base = n_items - n_dup
    cat = rng.choice(n_cat, size=n_base, p=np.array([c.weight for c in CATEGORIES]) / sum(c.weight for c in CATEGORIES))
    cat_brands = [np.array([b for b, spec in enumerate(BRANDS) if c in spec.categories]) for c in range(n_cat)]
    brand = np.empty(n_base, dtype=np.int64)
    material_name = np.empty(n_base, dtype=object)
    size_name = np.empty(n_base, dtype=object)
    r_brand, r_mat, r_size = rng.random(n_base), rng.random(n_base), rng.random(n_base)
    for c in range(n_cat):
        m = cat == c
        cb = cat_brands[c]
        brand[m] = cb[(r_brand[m] * len(cb)).astype(np.int64)]
        mats = np.array(CATEGORIES[c].materials, dtype=object)
        material_name[m] = mats[(r_mat[m] * len(mats)).astype(np.int64)]
        sizes = CATEGORIES[c].sizes
        size_name[m] = np.array(sizes, dtype=object)[(r_size[m] * len(sizes)).astype(np.int64)] if sizes else None
    colour = rng.integers(0, n_col, size=n_base)
    pattern = rng.choice(len(PATTERNS), size=n_base, p=_PATTERN_P)
    tier = np.array([b.tier for b in BRANDS])[brand]
    base_price = np.array([c.base_price for c in CATEGORIES])[cat]
    price = np.floor(base_price * _TIER_MULT[tier] * rng.lognormal(0.0, 0.2, size=n_base)) + 0.99

    src = rng.choice(n_base, size=n_dup, replace=False) if n_dup else np.zeros(0, dtype=np.int64)
    cat = np.concatenate([cat, cat[src]])
    brand = np.concatenate([brand, brand[src]])
    material_name = np.concatenate([material_name, material_name[src]])
    size_name = np.concatenate([size_name, size_name[src]])
    colour = np.concatenate([colour, colour[src]])
    pattern = np.concatenate([pattern, pattern[src]])
    tier = np.concatenate([tier, tier[src]])
    price = np.concatenate([price, price[src]])
    # item index -> id: shuffle so duplicates are not recognisable by id
    perm = rng.permutation(n_items)
    item_ids = np.array(_ids("I", n_items), dtype=object)[perm]  # item k gets id item_ids[k]
    title_tpl = rng.integers(0, len(_TITLE_TEMPLATES), size=n_items)
    title_tpl[n_base:] = (title_tpl[src] + 1 + rng.integers(0, len(_TITLE_TEMPLATES) - 1, size=n_dup)) % len(_TITLE_TEMPLATES)
    desc_tpl = rng.integers(0, len(_DESC_TEMPLATES), size=n_items)
    noun_pick = rng.integers(0, 3, size=n_items)
    extra_pick = rng.integers(0, 2, size=n_items)
    drop_colour = rng.random(n_items) < MISSING_SHARE
    drop_material = rng.random(n_items) < MISSING_SHARE
    img_dx = rng.integers(-2, 3, size=n_items)
    img_dy = rng.integers(-2, 3, size=n_items)
    img_phase = rng.integers(0, 4, size=n_items)
    img_jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=(n_items, 3))

    titles, descs, attrs_json, images_col, nouns = [], [], [], [], []
    missing_rows: list[tuple[str, str, str]] = []
    attr_cache: dict[tuple, str] = {}
    ids_l = item_ids.tolist()
    item_number = perm.tolist()  # item k has the item_number[k]-th smallest id
    # plain lists: indexing numpy arrays element by element is what makes a per-item loop slow
    for k, (c, b, ci, mat, pi, size, np_k, ep, tt, dt, dc, dm) in enumerate(zip(
            cat.tolist(), brand.tolist(), colour.tolist(), material_name.tolist(), pattern.tolist(),
            size_name.tolist(), noun_pick.tolist(), extra_pick.tolist(), title_tpl.tolist(), desc_tpl.tolist(),
            drop_colour.tolist(), drop_material.tolist())):
        spec = CATEGORIES[c]
        noun = spec.nouns[np_k]
        col = COLOUR_NAMES[ci]
        pat = PATTERNS[pi]
        words = {
            "brand": BRANDS[b].name, "colour": col, "Colour": col.capitalize(), "material": mat, "noun": noun,
            "pattern": pat, "Pattern": pat.capitalize(), "pattern_adj": "" if pat == "solid" else f"{pat} ",
            "size_sentence": f"Available in size {size}. " if size else "",
            "extra": _EXTRAS[spec.path][ep],
        }
        titles.append(_TITLE_TEMPLATES[tt].format_map(words))
        descs.append(_DESC_TEMPLATES[dt].format_map(words).strip())
        nouns.append(noun)
        key = (col, mat, pat, size, dc, dm)
        text = attr_cache.get(key)
        if text is None:
            attrs = {"colour": col, "material": mat, "pattern": pat}
            if size:
                attrs["size"] = size
            if dc:
                del attrs["colour"]
            if dm:
                del attrs["material"]
            text = attr_cache[key] = json.dumps(attrs, sort_keys=True)
        attrs_json.append(text)
        if dc:
            missing_rows.append((ids_l[k], "colour", col))
        if dm:
            missing_rows.append((ids_l[k], "material", mat))
        images_col.append(f"images/{ids_l[k]}.png" if item_number[k] < n_images else None)

    order = np.argsort(item_ids.astype(str), kind="stable")  # write items sorted by id
    items_tbl = pa.table(
        {
            "item_id": pa.array(item_ids[order].tolist(), pa.string()),
            "title": pa.array([titles[i] for i in order], pa.string()),
            "description": pa.array([descs[i] for i in order], pa.string()),
            "brand": pa.array([BRANDS[b].name for b in brand[order]], pa.string()),
            "category": pa.array([CATEGORIES[c].path for c in cat[order]], pa.string()),
            "attributes": pa.array([attrs_json[i] for i in order], pa.string()),
            "price": pa.array(price[order], pa.float64()),
            "image": pa.array([images_col[i] for i in order], pa.string()),
        }
    )

    if n_images:
        from tqdm.auto import tqdm

        (out / "images").mkdir(exist_ok=True)
        palette = np.array(list(COLOURS.values()), dtype=np.int64)
        drawn = range(n_items) if n_images >= n_items else np.flatnonzero(perm < n_images).tolist()
        for k in tqdm(drawn, desc="images", unit="img", disable=not progress):
            rgb = np.clip(palette[colour[k]] + img_jitter[k], 0, 255)
            px = render_item_image(CATEGORIES[cat[k]].shape, rgb, PATTERNS[pattern[k]], int(img_dx[k]), int(img_dy[k]),
                                   int(img_phase[k]))
            atomic_write_bytes(out / "images" / f"{item_ids[k]}.png", _png_bytes(px))

    # ---------------- users and their latent tastes
    user_ids = np.array(_ids("U", n_users), dtype=object)
    fav_cats = np.argsort(rng.random((n_users, n_cat)), axis=1)[:, :2]
    n_fav_cats = 1 + (rng.random(n_users) < 0.5)
    fav_cols = np.argsort(rng.random((n_users, n_col)), axis=1)[:, :2]
    n_fav_cols = 1 + (rng.random(n_users) < 0.5)
    r_b = rng.random((n_users, 2))
    fav_brands = np.empty((n_users, 2), dtype=np.int64)
    for j in range(2):
        cats_j = fav_cats[:, 0] if j == 0 else np.where(n_fav_cats == 2, fav_cats[:, 1], fav_cats[:, 0])
        for c in range(n_cat):
            m = cats_j == c
            fav_brands[m, j] = cat_brands[c][(r_b[m, j] * len(cat_brands[c])).astype(np.int64)]
    n_fav_brands = np.where(fav_brands[:, 0] == fav_brands[:, 1], 1, 1 + (rng.random(n_users) < 0.6))
    price_level = rng.integers(0, 3, size=n_users)
    age_band = np.array(["18-24", "25-34", "35-44", "45-54", "55+"], dtype=object)[rng.integers(0, 5, size=n_users)]
    region = np.array(["north", "south", "east", "west"], dtype=object)[rng.integers(0, 4, size=n_users)]

    # ---------------- sessions -> events
    per_session = 2.6  # measured mean events per session with the funnel below
    if n_events is None:
        sess_per_user = np.maximum(1, rng.poisson(sessions_per_user, size=n_users))
        sess_user = np.repeat(np.arange(n_users), sess_per_user)
    else:
        n_sess = int(math.ceil(n_events / per_session * 1.08)) + 10
        sess_user = np.sort(rng.integers(0, n_users, size=n_sess))
    S = len(sess_user)
    choose_second = rng.random(S) < 0.5
    fav_c = np.where(choose_second & (n_fav_cats[sess_user] == 2), fav_cats[sess_user, 1], fav_cats[sess_user, 0])
    s_cat = np.where(rng.random(S) < 0.8, fav_c, rng.integers(0, n_cat, size=S))
    cat_group = _group_index(cat, n_cat)
    col_group = _group_index(cat * n_col + colour, n_cat * n_col)
    brand_group = _group_index(cat * n_brand + brand, n_cat * n_brand)
    fav_col_s = np.where((rng.random(S) < 0.5) & (n_fav_cols[sess_user] == 2), fav_cols[sess_user, 1], fav_cols[sess_user, 0])
    fav_brand_s = np.where((rng.random(S) < 0.5) & (n_fav_brands[sess_user] == 2), fav_brands[sess_user, 1], fav_brands[sess_user, 0])
    cands, scores = [], []
    for _ in range(3):
        any_in_cat = _sample_in_group(rng, cat_group, s_cat, rng.integers(0, n_items, size=S))
        mode = rng.random(S)
        by_col = _sample_in_group(rng, col_group, s_cat * n_col + fav_col_s, any_in_cat)
        by_brand = _sample_in_group(rng, brand_group, s_cat * n_brand + fav_brand_s, any_in_cat)
        cand = np.where(mode < 0.45, by_col, np.where(mode < 0.75, by_brand, any_in_cat))
        cands.append(cand)
        scores.append(_taste_match(cand, sess_user, colour, brand, tier, fav_cols, n_fav_cols, fav_brands, n_fav_brands, price_level)
                      + rng.random(S) * 0.5)
    best = np.argmax(np.stack(scores, axis=1), axis=1)
    target = np.stack(cands, axis=1)[np.arange(S), best]
    match = _taste_match(target, sess_user, colour, brand, tier, fav_cols, n_fav_cols, fav_brands, n_fav_brands, price_level)

    start = _T0 + (rng.random(S) * _WINDOW_S).astype(np.int64)
    n_browse = rng.poisson(0.8, size=S)
    b_sess = np.repeat(np.arange(S), n_browse)
    b_item = _sample_in_group(rng, cat_group, s_cat[b_sess], rng.integers(0, n_items, size=len(b_sess)))
    b_ts = start[b_sess] + rng.integers(5, 240, size=len(b_sess))
    t_view = start + 250 + rng.integers(0, 60, size=S)
    click = rng.random(S) < np.minimum(0.95, 0.35 + 0.15 * match)
    cart = click & (rng.random(S) < np.minimum(0.95, 0.2 + 0.15 * match))
    purchase = cart & (rng.random(S) < np.minimum(0.95, 0.45 + 0.12 * match))
    rated = purchase & (rng.random(S) < 0.25)
    t_click = t_view + rng.integers(5, 60, size=S)
    t_cart = t_click + rng.integers(30, 300, size=S)
    t_buy = t_cart + rng.integers(60, 900, size=S)
    t_rate = t_buy + rng.integers(86_400, 3 * 86_400, size=S)
    rating = np.clip(np.rint(2.2 + 0.8 * match + rng.normal(0, 0.7, size=S)), 1, 5)

    ev_sess = np.concatenate([b_sess, np.arange(S), np.flatnonzero(click), np.flatnonzero(cart), np.flatnonzero(purchase),
                              np.flatnonzero(rated)])
    ev_item = np.concatenate([b_item, target, target[click], target[cart], target[purchase], target[rated]])
    ev_type = np.concatenate([np.zeros(len(b_sess) + S, np.int8), np.full(click.sum(), 1, np.int8),
                              np.full(cart.sum(), 2, np.int8), np.full(purchase.sum(), 3, np.int8),
                              np.full(rated.sum(), 4, np.int8)])
    ev_ts = np.concatenate([b_ts, t_view, t_click[click], t_cart[cart], t_buy[purchase], t_rate[rated]])
    ev_value = np.concatenate([np.full(len(ev_sess) - rated.sum(), np.nan), rating[rated]])
    # some purchases carry the text the user searched for before buying
    n_ev = len(ev_sess)
    has_query = (ev_type == 3) & (rng.random(n_ev) < 0.3)
    q_tpl = rng.integers(0, len(_QUERY_TEMPLATES), size=n_ev)
    # a few events are logged twice (exact duplicates; ingestion merges them)
    dup = rng.random(n_ev) < 0.003
    ev_order = np.concatenate([np.arange(n_ev), np.flatnonzero(dup)])
    ev_order = ev_order[np.lexsort((ev_type[ev_order], ev_ts[ev_order]))]  # by time, stable
    if n_events is not None:
        ev_order = ev_order[:n_events]
    ev_user = sess_user[ev_sess[ev_order]]
    e_item, e_type, e_ts, e_val = ev_item[ev_order], ev_type[ev_order], ev_ts[ev_order], ev_value[ev_order]
    q_idx = np.flatnonzero(has_query[ev_order])
    queries = np.full(len(ev_order), None, dtype=object)
    for j in q_idx:
        k = e_item[j]
        queries[j] = _QUERY_TEMPLATES[q_tpl[ev_order[j]]].format(
            colour=COLOUR_NAMES[colour[k]], material=material_name[k], noun=nouns[k], brand=BRANDS[brand[k]].name
        ).lower()
    item_id_arr = pa.array(item_ids.tolist(), pa.string())
    user_id_arr = pa.array(user_ids.tolist(), pa.string())
    types_arr = pa.array(["view", "click", "cart", "purchase", "rating"], pa.string())
    events_tbl = pa.table(
        {
            "user_id": user_id_arr.take(pa.array(ev_user)),
            "item_id": item_id_arr.take(pa.array(e_item)),
            "type": types_arr.take(pa.array(e_type.astype(np.int64))),
            "timestamp": pa.array(e_ts * 1_000_000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "value": pa.array(e_val, pa.float64(), from_pandas=True),
            "query": pa.array(queries.tolist(), pa.string()),
        }
    )
    users_tbl = pa.table({"user_id": user_ids.tolist(), "age_band": age_band.tolist(), "region": region.tolist()})

    # ---------------- external knowledge
    triples: list[tuple[str, str, str]] = []
    for b in BRANDS:
        e = brand_entity(b.name)
        triples += [(e, "founded_in", f"country:{b.country}"), (e, "owned_by", f"group:{b.group}"),
                    (e, "has_style", f"style:{b.style}")]
    for m in MATERIALS:
        triples += [(f"material:{m}", "suited_for", f"season:{s}") for s in _MATERIAL_SEASON[m]]
        triples.append((f"material:{m}", "derived_from", f"source:{_MATERIAL_SOURCE[m]}"))
    for s, r in _STYLE_RELATED.items():
        triples.append((f"style:{s}", "related_to", f"style:{r}"))
    triples_tbl = pa.table({k: [t[i] for t in triples] for i, k in enumerate(("head", "relation", "tail"))})
    brand_ent = np.array([brand_entity(b.name) for b in BRANDS], dtype=object)
    link_item = np.concatenate([item_ids[order], item_ids[order][~drop_material[order]]])
    link_ent = np.concatenate([brand_ent[brand[order]], np.array([f"material:{m}" for m in material_name[order]], dtype=object)[~drop_material[order]]])
    links_tbl = pa.table({"item_id": link_item.tolist(), "entity_id": link_ent.tolist()})

    # ---------------- truth
    missing_tbl = pa.table({"item_id": [r[0] for r in missing_rows], "name": [r[1] for r in missing_rows],
                            "value": [r[2] for r in missing_rows]}, schema=pa.schema([("item_id", pa.string()), ("name", pa.string()), ("value", pa.string())]))
    dups_tbl = pa.table({"item_id": item_ids[n_base:].tolist(), "duplicate_of": item_ids[src].tolist()},
                        schema=pa.schema([("item_id", pa.string()), ("duplicate_of", pa.string())]))

    def join(rows: np.ndarray, n: np.ndarray, names: tuple[str, ...] | list[str]) -> list[str]:
        return ["|".join(names[v] for v in rows[u, : n[u]]) for u in range(len(n))]

    tastes_tbl = pa.table({
        "user_id": user_ids.tolist(),
        "categories": join(fav_cats, n_fav_cats, [c.path for c in CATEGORIES]),
        "brands": join(fav_brands, n_fav_brands, [b.name for b in BRANDS]),
        "colours": join(fav_cols, n_fav_cols, COLOUR_NAMES),
        "price_level": [PRICE_LEVELS[p] for p in price_level],
    })

    _write_csv(out / "truth" / "missing_attributes.csv", missing_tbl)
    _write_csv(out / "truth" / "duplicates.csv", dups_tbl)
    _write_csv(out / "truth" / "user_tastes.csv", tastes_tbl)
    if fmt == "parquet":
        for name, tbl in (("items", items_tbl), ("users", users_tbl), ("events", events_tbl), ("triples", triples_tbl),
                          ("links", links_tbl)):
            _write_parquet(out / f"{name}.parquet", tbl)
    else:
        lines = []
        for row in items_tbl.to_pylist():
            row["attributes"] = json.loads(row["attributes"])
            lines.append(json.dumps(row, ensure_ascii=False))
        ts_text = pc.strftime(events_tbl.column("timestamp").cast(pa.timestamp("s", tz="UTC")), format="%Y-%m-%dT%H:%M:%SZ")
        events_txt = events_tbl.set_column(3, "timestamp", ts_text)
        planted: list[tuple[str, int, str]] = []
        if noise > 0:
            events_txt, lines, planted = _plant_errors(events_txt, lines, noise, seed)
        _write_csv(out / "truth" / "planted_errors.csv", pa.table(
            {"file": [p[0] for p in planted], "line": [p[1] for p in planted], "reason": [p[2] for p in planted]},
            schema=pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])))
        atomic_write_bytes(out / "items.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
        _write_csv(out / "users.csv", users_tbl)
        _write_csv(out / "events.csv", events_txt)
        _write_csv(out / "triples.csv", triples_tbl)
        _write_csv(out / "links.csv", links_tbl)

    counts = {"items": n_items, "users": n_users, "events": events_tbl.num_rows, "triples": triples_tbl.num_rows,
              "links": links_tbl.num_rows, "missing_attributes": missing_tbl.num_rows, "duplicates": n_dup}
    summary = CatalogSummary(out, counts, time.perf_counter() - t_start)
    logger.info("wrote synthetic catalog to %s: %s (%.1f s)", out, counts, summary.seconds)
    return summary


def _plant_errors(events: pa.Table, item_lines: list[str], noise: float, seed: int
                  ) -> tuple[pa.Table, list[str], list[tuple[str, int, str]]]:
    """Corrupt a share of event rows and append bad item rows; returns the planted (file, line, reason)."""
    rng = np.random.default_rng([seed, 7919])  # own stream: the clean data does not depend on noise
    cols = {c: events.column(c).to_pylist() for c in events.column_names}
    n = events.num_rows
    k = min(n, max(1, int(round(noise * n))))
    kinds = [("item_id", "I_UNKNOWN", "unknown_item"), ("timestamp", "not-a-date", "bad_timestamp"),
             ("type", "teleport", "invalid_event_type"), ("user_id", "", "missing_required")]
    planted: list[tuple[str, int, str]] = []
    for j, i in enumerate(np.sort(rng.choice(n, size=k, replace=False))):
        col, value, reason = kinds[j % len(kinds)]
        cols[col][i] = value
        planted.append(("events.csv", int(i) + 2, reason))  # header is line 1
    first = json.loads(item_lines[0])
    bad_items = [
        ({**first, "title": first["title"] + " (re-listed)"}, "duplicate_id"),
        ({**first, "item_id": "I_NO_TITLE", "title": "  "}, "missing_required"),
        ({**first, "item_id": "I_TRAVERSAL", "image": "../../etc/passwd"}, "image_outside_root"),
        ({**first, "item_id": "I_BAD_PRICE", "price": "free"}, "bad_type"),
    ]
    lines = list(item_lines)
    for row, reason in bad_items:
        lines.append(json.dumps(row, ensure_ascii=False))
        planted.append(("items.jsonl", len(lines), reason))
    return pa.table(cols, schema=events.schema), lines, planted


def brand_entity(name: str) -> str:
    """External entity id of a brand: ``brand:<lower-case name, spaces and & as underscores>``."""
    return "brand:" + "".join(ch if ch.isalnum() else "_" for ch in name.lower()).replace("___", "_")


def _taste_match(items: np.ndarray, users: np.ndarray, colour: np.ndarray, brand: np.ndarray, tier: np.ndarray,
                 fav_cols: np.ndarray, n_fav_cols: np.ndarray, fav_brands: np.ndarray, n_fav_brands: np.ndarray,
                 price_level: np.ndarray) -> np.ndarray:
    """0..3: how many of (favourite colour, favourite brand, price level) an item matches for a user."""
    c = colour[items]
    b = brand[items]
    col_ok = (c == fav_cols[users, 0]) | ((n_fav_cols[users] == 2) & (c == fav_cols[users, 1]))
    brand_ok = (b == fav_brands[users, 0]) | ((n_fav_brands[users] == 2) & (b == fav_brands[users, 1]))
    price_ok = tier[items] == price_level[users]
    return col_ok.astype(np.int64) + brand_ok + price_ok


def _write_csv(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, write_options=pacsv.WriteOptions(quoting_style="needed"))
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
