"""generate_catalog(images=N): images for the N items with the smallest ids only; everything else unchanged."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kgrec.data.synthetic import generate_catalog


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _items(root: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines()]
    return {r["item_id"]: r for r in rows}


def test_image_subset_draws_only_n_images_and_keeps_the_rest_identical(tmp_path):
    full = generate_catalog(tmp_path / "full", n_items=50, n_users=10, seed=7, images=True).out_dir
    part = generate_catalog(tmp_path / "part", n_items=50, n_users=10, seed=7, images=12).out_dir
    none = generate_catalog(tmp_path / "none", n_items=50, n_users=10, seed=7, images=0).out_dir
    off = generate_catalog(tmp_path / "off", n_items=50, n_users=10, seed=7, images=False).out_dir
    d_full, d_part, d_none, d_off = _digest(full), _digest(part), _digest(none), _digest(off)

    pngs = sorted(k for k in d_part if k.startswith("images/"))
    assert len(pngs) == 12
    ids = sorted(_items(full))
    assert pngs == [f"images/{i}.png" for i in ids[:12]]  # the 12 smallest ids
    # the subset's images are byte-identical to the ones drawn with images=True
    assert all(d_part[k] == d_full[k] for k in pngs)
    items = _items(part)
    assert sum(1 for r in items.values() if r["image"]) == 12
    assert all((items[i]["image"] == f"images/{i}.png") == (i in ids[:12]) for i in ids)
    assert all(items[i]["image"] is None for i in ids[12:])
    # apart from the image column, tables are the same as with images=True; images=0 is images=False
    for i in ids:
        assert {**items[i], "image": None} == {**_items(full)[i], "image": None}
    for name in ("events.csv", "users.csv", "triples.csv", "links.csv"):
        assert d_part[name] == d_full[name]
    assert d_none == d_off and not any(k.startswith("images/") for k in d_off)
    # images >= n_items is everything
    assert _digest(generate_catalog(tmp_path / "all", n_items=50, n_users=10, seed=7, images=500).out_dir) == d_full
    with pytest.raises(ValueError, match="non-negative"):
        generate_catalog(tmp_path / "bad", n_items=50, n_users=10, seed=7, images=-1)
