"""The enrichment core on arrays: calibration, the evidence sources, stacking, duplicates and relations (fast, no
encoders, numbers computed by hand where they can be)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kgrec.enrichment.attributes import (
    InferenceSettings,
    ItemEvidence,
    attribute_tasks,
    infer_attribute,
    kg_vote_source,
    knn_source,
    literal_mentions,
)
from kgrec.enrichment.calibration import (
    IsotonicCalibrator,
    cross_fitted_calibration,
    plot_reliability,
    reliability_curve,
)
from kgrec.enrichment.relations import (
    DuplicateSettings,
    complement_pairs,
    find_duplicates,
    otsu_threshold,
    similar_pairs,
)

# ----------------------------------------------------------------------------------------------- calibration


def test_reliability_curve_by_hand():
    conf = np.array([0.05, 0.15, 0.95, 0.95])
    correct = np.array([0, 0, 1, 0])
    c = reliability_curve(conf, correct, bins=10)
    assert c.bin_count.tolist() == [1, 1, 2]
    assert c.bin_accuracy.tolist() == [0.0, 0.0, 0.5]
    np.testing.assert_allclose(c.bin_confidence, [0.05, 0.15, 0.95])
    # ECE = (1*0.05 + 1*0.15 + 2*0.45) / 4
    assert c.ece == pytest.approx((0.05 + 0.15 + 0.9) / 4)


def test_isotonic_calibration_fixes_overconfident_scores():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.3, 1.0, size=2000)
    correct = rng.random(2000) < raw**3  # raw scores overstate the chance of being right
    folds = np.arange(2000) % 5
    calibrated, final = cross_fitted_calibration(raw, correct, folds)
    assert reliability_curve(raw, correct).ece > 0.1
    assert reliability_curve(calibrated, correct).ece < 0.03
    # monotone and JSON-friendly
    grid = np.linspace(0, 1, 50)
    assert np.all(np.diff(final.predict(grid)) >= -1e-12)
    d = final.to_dict()
    again = IsotonicCalibrator(np.array(d["x"]), np.array(d["y"]), d["fallback"])
    np.testing.assert_allclose(again.predict(grid), final.predict(grid))


def test_calibrator_without_variation_falls_back_to_the_base_rate():
    cal = IsotonicCalibrator.fit(np.full(10, 0.7), np.array([1] * 7 + [0] * 3))
    assert cal.predict(np.array([0.1, 0.9])).tolist() == [0.7, 0.7]


def test_reliability_png(tmp_path):
    c = reliability_curve(np.array([0.2, 0.8, 0.9]), np.array([0, 1, 1]))
    path = plot_reliability({"colour": c}, tmp_path / "r.png", threshold=0.8)
    assert path.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------- sources


def test_literal_mentions_match_whole_words_only():
    texts = ["Red mug in redwood box", "A blue-ish lamp", "GREY coat", "nothing here", "Shoes: running shoes"]
    m = literal_mentions("colour", ["blue", "grey", "red"], texts)
    assert m.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
    cat = literal_mentions("category", ["Home>Mug", "Shoes>Running"], texts)  # a path reads as its leaf
    assert cat.tolist() == [[1, 0], [0, 0], [0, 0], [0, 0], [0, 1]]


def test_kg_votes_by_group_exclude_the_item_itself():
    # items 0,1,2 share brand 0; item 3 brand 1; item 4 unknown brand. labels: 0:a, 1:a, 2:b, 3:b, 4:?
    codes = np.array([0, 0, 0, 1, -1])
    labels = np.array([0, 0, 1, 1, -1])
    p = kg_vote_source(codes, labels, 2, smoothing=0.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5])  # votes of items 1 (a) and 2 (b)
    np.testing.assert_allclose(p[2], [1.0, 0.0])  # items 0 and 1 both say a
    # item 3 has no other brand member, item 4 no brand: with smoothing 1 they get the prior (a: 2+1, b: 2+1)
    p1 = kg_vote_source(codes, labels, 2, smoothing=1.0)
    np.testing.assert_allclose(p1[4], [0.5, 0.5])
    np.testing.assert_allclose(p1[0], [(1 + 0.5) / 3, (1 + 0.5) / 3])
    # the same through a sparse adjacency (a clique on 0,1,2)
    import scipy.sparse as sp

    adj = sp.csr_matrix(np.array([[0, 1, 1, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0], [0] * 5, [0] * 5], float))
    np.testing.assert_allclose(kg_vote_source(adj, labels, 2, 0.0)[:3], p[:3])


def test_knn_votes_leave_the_item_out():
    f = np.eye(4, dtype=np.float32)
    f[1] = f[0]  # items 0 and 1 identical, labelled a and b
    labels = np.array([0, 1, 1, -1])
    p = knn_source(f, labels, np.array([False, False, False, True]), 2, k=1)
    assert p[0].tolist() == [0.0, 1.0]  # its twin (b), never itself (a)
    assert p[1].tolist() == [1.0, 0.0]


def _synthetic_catalog(n=400, seed=0):
    """Three values a/b/c; features cluster by value (noisy); a third of the texts name the value."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, size=n)
    centres = rng.normal(size=(3, 16))
    feats = centres[truth] + rng.normal(scale=1.2, size=(n, 16))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    names = np.array(["amber", "beige", "cyan"])
    texts = [f"a {names[t]} thing" if rng.random() < 0.33 else "a thing" for t in truth]
    hidden = rng.random(n) < 0.25
    known = [None if h else str(names[t]) for t, h in zip(truth, hidden)]
    evidence = ItemEvidence(
        item_ids=[f"i{k}" for k in range(n)], features=feats.astype(np.float32), image=None,
        has_image=np.zeros(n, bool), texts=texts, category=np.array([None] * n, dtype=object),
        brand=np.array([None] * n, dtype=object),
    )
    return evidence, known, hidden, names[truth]


def test_stacked_inference_is_accurate_and_calibrated():
    evidence, known, hidden, truth = _synthetic_catalog()
    z = evidence.features / evidence.features.std(axis=0)
    res = infer_attribute("colour", known, hidden, evidence, z, InferenceSettings(seed=1), threshold=0.8)
    assert res.skipped is None
    assert set(res.source_probs) == {"classifier", "knn", "text"}
    pred = np.array(res.predicted_values())
    acc = float(np.mean(pred == truth[res.targets]))
    v = res.validation
    assert v["chance_accuracy"] < 0.4
    assert acc >= 0.8 and v["stacked_accuracy"] >= 0.8
    # text mentions are stacked in: where the text names the value the prediction follows it
    named = np.array([t != "a thing" for t in np.array(evidence.texts)[res.targets]])
    assert np.mean(pred[named] == truth[res.targets][named]) == 1.0
    # calibrated on hidden known values: confident predictions are right about as often as claimed
    sure = res.confidence >= 0.8
    assert sure.sum() > 10 and np.mean(pred[sure] == truth[res.targets][sure]) >= 0.85
    assert v["ece"] < 0.08
    assert v["accuracy_at_threshold"] >= 0.85


def test_too_few_known_values_are_skipped():
    evidence, known, hidden, _ = _synthetic_catalog(n=40)
    res = infer_attribute("colour", known, hidden, evidence, evidence.features, InferenceSettings(min_labelled=50),
                          threshold=0.8)
    assert res.skipped and "50 needed" in res.skipped and len(res.predicted) == 0


def test_attribute_tasks_only_where_the_attribute_applies():
    items = pd.DataFrame({
        "item_id": ["s1", "s2", "s3", "m1", "m2", "x1"],
        "brand": ["A", "A", None, "B", "B", "B"],
        "category": ["Shoes", "Shoes", "Shoes", "Home>Mug", "Home>Mug", None],
    })
    attrs = pd.DataFrame([("s1", "size", "42"), ("s2", "size", "43"), ("s1", "colour", "red"),
                          ("m1", "colour", "blue"), ("m2", "colour", "red")], columns=["item_id", "name", "value"])
    tasks = {t.name: t for t in attribute_tasks(items, attrs, min_share=0.5)}
    # shoes: 2 of 3 have a size -> s3 lacks one; mugs never have sizes -> not missing there
    assert tasks["size"].targets.tolist() == [False, False, True, False, False, False]
    # colour: shoes 1/3 < 0.5 -> not asked; mugs all have it; x1 (no category): 3/6 of the catalog -> asked
    assert tasks["colour"].targets.tolist() == [False, False, False, False, False, True]
    assert tasks["brand"].targets.tolist() == [False, False, True, False, False, False]
    assert "category" in tasks and tasks["category"].targets.tolist() == [False] * 5 + [True]


# ----------------------------------------------------------------------------------------------- relations


def _dup_world():
    rng = np.random.default_rng(3)
    n = 60
    text = rng.normal(size=(n, 32)).astype(np.float32)
    image = rng.normal(size=(n, 24)).astype(np.float32)
    brand = np.array(["B%d" % (i % 5) for i in range(n)], dtype=object)
    cat = np.array(["C%d" % (i % 3) for i in range(n)], dtype=object)
    price = np.round(rng.uniform(10, 100, size=n), 2)
    attrs = [{"colour": "c%d" % (i % 7)} for i in range(n)]
    # planted: 0~1 (true duplicate), 2~3 (same vectors but another colour), 4~5 (same vectors, other price)
    for a, b in ((0, 1), (2, 3), (4, 5)):
        text[b] = text[a] + rng.normal(scale=0.05, size=32)
        image[b] = image[a] + rng.normal(scale=0.05, size=24)
        brand[b], cat[b], price[b], attrs[b] = brand[a], cat[a], price[a], dict(attrs[a])
    attrs[3] = {"colour": "other"}
    price[5] = price[4] * 1.5
    ids = [f"i{k:02d}" for k in range(n)]
    return ids, text, image, brand, cat, price, attrs


def test_duplicates_need_similar_content_and_no_contradicting_facts():
    ids, text, image, brand, cat, price, attrs = _dup_world()
    res = find_duplicates(ids, text, image, brand, cat, price, DuplicateSettings(k=5), attributes=attrs)
    pairs = list(zip(res.pairs["src"], res.pairs["dst"]))
    assert pairs == [("i00", "i01")]
    row = res.pairs.iloc[0]
    assert row["text_cosine"] > 0.9 and row["image_cosine"] > 0.9
    assert row["same_brand"] and row["same_category"] and row["same_price"]
    assert row["attributes_agree"] == 1 and row["attributes_conflict"] == 0
    assert 0.5 <= row["confidence"] <= 1.0
    assert res.n_candidates <= 60 * 5
    # without the structured checks the look-alikes come back
    loose = DuplicateSettings(k=5, require_same_price=False, require_no_conflict=False)
    pairs = find_duplicates(ids, text, image, brand, cat, price, loose, attributes=attrs).pairs
    found = set(zip(pairs["src"], pairs["dst"]))
    assert {("i00", "i01"), ("i02", "i03"), ("i04", "i05")} <= found


def test_otsu_splits_a_bimodal_sample():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0.2, 0.05, 500), rng.normal(0.9, 0.03, 30)]
    assert 0.35 < otsu_threshold(x) < 0.8


def test_similar_pairs_once_per_pair_above_the_cut():
    v = np.array([[1, 0], [0.99, 0.14], [0, 1], [-1, 0]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    f = similar_pairs(["a", "b", "c", "d"], v, k=2, min_similarity=0.5)
    assert list(zip(f["src"], f["dst"])) == [("a", "b")]
    assert f["confidence"].iloc[0] == pytest.approx(0.99, abs=1e-2) and f["rank"].iloc[0] == 1
    assert similar_pairs(["a", "b", "c", "d"], v, k=2, min_similarity=0.5, exclude={("a", "b")}).empty


def test_complements_are_cross_category_co_purchases():
    ev = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u2", "u2", "u2", "u3", "u3", "u4"],
        "item_id": ["A", "B", "C", "A", "B", "C", "A", "D", "B"],
        "type": ["purchase"] * 6 + ["purchase", "view", "purchase"],
    })
    cats = {"A": "Shoes", "B": "Socks", "C": "Shoes", "D": "Hats"}
    f = complement_pairs(ev, cats, min_users=2)
    # A-B: u1,u2 (cross-category); B-C: u1,u2 (cross); A-C: same category; A-D: only a view
    assert list(zip(f["src"], f["dst"])) == [("A", "B"), ("B", "C")]
    ab = f.iloc[0]
    assert ab["co_buyers"] == 2 and ab["buyers_src"] == 3 and ab["buyers_dst"] == 3
    assert ab["confidence"] == pytest.approx(2 / 3, abs=1e-4)  # 2 / sqrt(3 * 3)
    assert ab["lift"] == pytest.approx(2 * 4 / 9, abs=1e-3)  # 4 buyers in all
    assert complement_pairs(ev, cats, min_users=3).empty


def test_provenance_model_ids_given_as_one_string_is_one_id():
    from kg.enrichment import plan_enrichment

    plan = plan_enrichment([{"kind": "relation", "type": "SIMILAR_TO", "src": "a", "dst": "b", "confidence": 1.0000001}],
                           {"run_id": "r1", "model_ids": "clip"})
    props = [row["props"] for rows in plan.relations.values() for row in rows]
    assert props and all(p["model_ids"] == ["clip"] and p["confidence"] == 1.0 for p in props)


# ----------------------------------------------------------------------------------------------- report text


def _report(dry_run: bool):
    from kgrec.enrichment.job import EnrichmentReport

    attrs = {"colour": {"n_labelled": 120, "n_targets": 150, "stacked_accuracy": 0.91234, "accuracy_at_threshold":
                        0.97, "coverage_at_threshold": 0.93, "n_written": 140},
             "material": {"n_labelled": 3, "n_targets": 9, "skipped": "too few labelled items"}}
    return EnrichmentReport(run_id="abc123", created="2024-01-01T00:00:00+00:00", threshold=0.9, dry_run=dry_run,
                            provenance={}, attributes=attrs,
                            duplicates={"n": 4, "n_candidates": 147,
                                        "thresholds": {"text_cosine": np.float64(0.81234567890123456),
                                                       "image_cosine": 0.7499999999999999}},
                            written=None if dry_run else {"written": 160})


def test_dry_run_text_says_would_write_and_thresholds_are_readable():
    """A dry run writes nothing: its per-attribute count is labelled "would write", not "written"; the duplicate
    thresholds print as "text cosine >= 0.812", not as a dict of 17-digit (or np.float64) values."""
    text = _report(dry_run=True).to_text()
    lines = text.splitlines()
    assert "dry run, nothing written" in lines[0]
    header = next(line for line in lines if line.startswith("attribute"))
    assert header.split()[-2:] == ["would", "write"] and "written" not in header
    colour = next(line for line in lines if line.startswith("colour"))
    assert colour.split()[-1] == "140" and len(colour) == len(header)  # the count sits under its label
    assert "thresholds: text cosine >= 0.812, image cosine >= 0.750)" in text
    assert "{" not in text and "np.float64" not in text and "0.8123456" not in text and "store:" not in text


def test_written_run_text_keeps_the_written_column_and_store_counts():
    text = _report(dry_run=False).to_text()
    header = next(line for line in text.splitlines() if line.startswith("attribute"))
    assert header.split()[-1] == "written" and "would" not in text
    assert "thresholds: text cosine >= 0.812, image cosine >= 0.750)" in text
    assert "store: {'written': 160}" in text
