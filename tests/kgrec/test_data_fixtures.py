"""The shared data fixtures are what other stages build on: check their shape with numbers."""
from __future__ import annotations

import json


def test_demo_dataset_counts_and_invariants(demo_dataset):
    ds = demo_dataset
    c = ds.manifest["counts"]
    assert c["items"] == 200 and c["users"] == 80
    assert c["events"] > 1000
    report = json.loads((ds.root / "quarantine" / "report.json").read_text())
    for name, t in report["tables"].items():
        assert t["kept"] + t["quarantined"] == t["read"] or t["implicit"], name
        assert t["written"] == t["kept"] - t["merged"], name
    items = ds.items
    assert items["image"].map(lambda p: (ds.root / p).is_file()).all()
    assert set(ds.events["type"]) <= {"view", "click", "cart", "purchase", "rating"}
    assert (ds.root / "truth" / "missing_attributes.csv").is_file()
    assert len(ds.item_attributes()) > 3 * 200 * 0.8
