"""The synthetic catalog: deterministic per seed, images show category and colour, truth files are consistent."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kgrec.data.synthetic import (
    BACKGROUND_RGB,
    CATEGORIES,
    CATEGORY_SHAPES,
    COLOURS,
    generate_catalog,
    shape_mask,
)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _items(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines()]


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _digest(generate_catalog(tmp_path / "a", n_items=60, n_users=15, seed=3).out_dir)
    b = _digest(generate_catalog(tmp_path / "b", n_items=60, n_users=15, seed=3).out_dir)
    c = _digest(generate_catalog(tmp_path / "c", n_items=60, n_users=15, seed=4).out_dir)
    assert a == b
    assert len(a) == 60 + 9  # images + items, users, events, triples, links, 4 truth files
    assert a["items.jsonl"] != c["items.jsonl"] and a["events.csv"] != c["events.csv"]


def _truth_attrs(root: Path) -> dict[str, dict[str, str]]:
    attrs = {it["item_id"]: dict(it["attributes"]) for it in _items(root)}
    for row in _csv(root / "truth" / "missing_attributes.csv"):
        assert row["name"] not in attrs[row["item_id"]]
        attrs[row["item_id"]][row["name"]] = row["value"]
    return attrs


def test_image_colour_matches_attribute(demo_raw_dir):
    attrs = _truth_attrs(demo_raw_dir)
    palette = np.array(list(COLOURS.values()), dtype=float)
    names = list(COLOURS)
    checked = 0
    for item in _items(demo_raw_dir):
        a = attrs[item["item_id"]]
        if a["pattern"] != "solid":
            continue
        px = np.asarray(Image.open(demo_raw_dir / item["image"]).convert("RGB"), dtype=float)
        centre = np.median(px[29:35, 29:35].reshape(-1, 3), axis=0)
        nearest = names[int(np.argmin(((palette - centre) ** 2).sum(1)))]
        assert nearest == a["colour"], (item["item_id"], centre, a["colour"])
        assert np.abs(centre - np.array(COLOURS[a["colour"]])).max() <= 13
        checked += 1
    assert checked > 80


def _foreground(px: np.ndarray) -> np.ndarray:
    return np.abs(px.astype(int) - np.array(BACKGROUND_RGB)).max(axis=2) > 25


def _best_iou(fg: np.ndarray, shape: str) -> float:
    best = 0.0
    for dx in range(-2, 3):
        for dy in range(-2, 3):
            m = shape_mask(shape, dx, dy)
            best = max(best, (fg & m).sum() / (fg | m).sum())
    return best


def test_image_shape_identifies_category(demo_raw_dir):
    attrs = _truth_attrs(demo_raw_dir)
    shapes = sorted(set(CATEGORY_SHAPES.values()))
    items = [it for it in _items(demo_raw_dir) if attrs[it["item_id"]]["colour"] != "white"][:40]
    correct = 0
    for item in items:
        fg = _foreground(np.asarray(Image.open(demo_raw_dir / item["image"]).convert("RGB")))
        ious = {s: _best_iou(fg, s) for s in shapes}
        correct += max(ious, key=ious.get) == CATEGORY_SHAPES[item["category"]]
        assert ious[CATEGORY_SHAPES[item["category"]]] > 0.85
    assert correct == len(items)
    # and two colours / two categories really give different pixels
    red = np.asarray(Image.new("RGB", (1, 1), COLOURS["red"]))
    assert red.tolist() != np.asarray(Image.new("RGB", (1, 1), COLOURS["blue"])).tolist()


def test_truth_files_consistent(demo_raw_dir):
    items = {it["item_id"]: it for it in _items(demo_raw_dir)}
    attrs = _truth_attrs(demo_raw_dir)
    missing = _csv(demo_raw_dir / "truth" / "missing_attributes.csv")
    share = {name: sum(r["name"] == name for r in missing) / len(items) for name in ("colour", "material")}
    assert 0.07 < share["colour"] < 0.25 and 0.07 < share["material"] < 0.25
    for r in missing:  # the text still tells what the listing leaves out
        assert r["value"] in items[r["item_id"]]["description"]
    dups = _csv(demo_raw_dir / "truth" / "duplicates.csv")
    assert len(dups) == 4  # 2 % of 200
    for d in dups:
        a, b = items[d["item_id"]], items[d["duplicate_of"]]
        assert a["category"] == b["category"] and a["brand"] == b["brand"] and a["price"] == b["price"]
        assert attrs[d["item_id"]] == attrs[d["duplicate_of"]]
        assert a["title"] != b["title"]


def test_events_follow_user_tastes(demo_raw_dir):
    items = {it["item_id"]: it for it in _items(demo_raw_dir)}
    tastes = {r["user_id"]: r for r in _csv(demo_raw_dir / "truth" / "user_tastes.csv")}
    events = _csv(demo_raw_dir / "events.csv")
    assert {e["type"] for e in events} == {"view", "click", "cart", "purchase", "rating"}
    buys = [e for e in events if e["type"] == "purchase"]
    in_fav = np.mean([items[e["item_id"]]["category"] in tastes[e["user_id"]]["categories"].split("|") for e in buys])
    assert in_fav > 0.6  # chance would be about 1/8 .. 2/8
    views = [e for e in events if e["type"] == "view"]
    assert len(buys) < len(views)
    assert sum(bool(e["query"]) for e in buys) > 0.1 * len(buys)
    ratings = [float(e["value"]) for e in events if e["type"] == "rating"]
    assert ratings and all(1 <= r <= 5 for r in ratings)
    ts = [e["timestamp"] for e in events]
    assert ts == sorted(ts) and ts[0] >= "2025-06-01" and ts[-1] < "2025-09-05"


def test_parquet_format_and_exact_event_count(tmp_path):
    s = generate_catalog(tmp_path, n_items=300, n_users=40, seed=1, images=False, n_events=2500, fmt="parquet")
    assert s.counts["events"] == 2500
    assert pq.read_table(tmp_path / "events.parquet").num_rows == 2500
    items = pq.read_table(tmp_path / "items.parquet").to_pylist()
    assert len(items) == 300 and all(it["image"] is None for it in items)
    assert {c.path for c in CATEGORIES} >= {it["category"] for it in items}


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_catalog(tmp_path, n_items=5)
    with pytest.raises(ValueError):
        generate_catalog(tmp_path, fmt="xml")  # type: ignore[arg-type]


def test_planted_errors_are_exactly_what_ingest_quarantines(tmp_path):
    from kgrec.data.ingest import ingest

    generate_catalog(tmp_path / "raw", n_items=80, n_users=12, seed=5, images=True, noise=0.02)
    clean = generate_catalog(tmp_path / "clean", n_items=80, n_users=12, seed=5, images=False)
    planted = {(r["file"], int(r["line"])): r["reason"] for r in _csv(tmp_path / "raw" / "truth" / "planted_errors.csv")}
    assert len(planted) >= 4 + 4 and set(planted.values()) >= {"unknown_item", "bad_timestamp", "duplicate_id",
                                                                "image_outside_root"}
    report = ingest(tmp_path / "raw", tmp_path / "ds")
    found = {}
    for p in (tmp_path / "ds" / "quarantine").glob("*.parquet"):
        found.update({(r["file"], r["line"]): r["reason"] for r in pq.read_table(p).to_pylist()})
    assert found == planted
    assert report.tables["events"].read == clean.counts["events"]
