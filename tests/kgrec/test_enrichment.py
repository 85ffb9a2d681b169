"""Offline catalog enrichment on the demo catalog (200 items, seed 0) against the truth the generator keeps, and
the write-back on both graph stores (the real Neo4j included).

Embeddings come from the packaged encoders (MiniLM text, EfficientNet-Lite0 CLIP image tower at 64 px, which is
the demo images' size), computed once per module.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgrec.config import EnrichmentConfig
from kgrec.enrichment import RECORD_COLUMNS, enrich, read_review_file

THRESHOLD = 0.8


class PromptMemo:
    """A ClipEncoder whose ``encode_texts`` remembers the prompts it already embedded (the zero-shot prompts are
    the same in every run of this module; the CLIP text tower is the slow part on a busy CPU)."""

    def __init__(self, clip):
        self.clip = clip
        self.memo: dict[str, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self.clip, name)

    def encode_texts(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.clip.encode_texts(todo)))
        return np.stack([self.memo[t] for t in texts])


@pytest.fixture(scope="module")
def encoders():
    from encoders.clip import ClipEncoder
    from encoders.text import TextEncoder

    clip = ClipEncoder(device="cpu", image_size=64, batch_size=64, seed=0)
    return TextEncoder(device="cpu", batch_size=64), PromptMemo(clip)


@pytest.fixture(scope="module")
def demo_embeddings(demo_dataset, encoders, tmp_path_factory):
    from encoders.items import encode_dataset

    text_encoder, clip = encoders
    return encode_dataset(demo_dataset, text_encoder, clip, tmp_path_factory.mktemp("enrich-cache"))


@pytest.fixture(scope="module")
def dry_report(demo_dataset, demo_embeddings, encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("enrich-dry")
    report = enrich(demo_dataset, demo_embeddings, None, clip_encoder=encoders[1], threshold=THRESHOLD,
                    dry_run=True, out_dir=out)
    return report, out


def _truth(dataset, name: str) -> pd.DataFrame:
    return pd.read_csv(Path(dataset.root) / "truth" / name, dtype=str)


# ----------------------------------------------------------------------------------------------- quality


def test_inferred_attributes_match_the_planted_truth(dry_report, demo_dataset):
    report, _ = dry_report
    truth = _truth(demo_dataset, "missing_attributes.csv")
    attrs = report.records[report.records["kind"] == "attribute"]
    merged = attrs.merge(truth, on=["item_id", "name"], how="left", suffixes=("", "_true"))
    # everything written was missing in the source, and is in the truth file
    assert merged["value_true"].notna().all()
    for name in ("colour", "material"):
        m = merged[merged["name"] == name]
        n_missing = int((truth["name"] == name).sum())
        accuracy = float((m["value"] == m["value_true"]).mean())
        coverage = len(m) / n_missing
        chance = report.attributes[name]["chance_accuracy"]
        assert n_missing >= 20
        assert chance < 0.3
        assert accuracy >= 0.9, (name, accuracy)
        assert coverage >= 0.8, (name, coverage)
        # validation on hidden known values agrees, and the written ones all reached the threshold
        assert report.attributes[name]["stacked_accuracy"] >= 0.9
        assert (m["confidence"] >= THRESHOLD).all()


def test_stacking_beats_chance_without_text_mentions(demo_dataset, demo_embeddings, encoders):
    """Leave the literal text mentions out: embeddings (of the listing text without its attributes, and of the
    image) + KG votes still infer colour and material."""
    cfg = EnrichmentConfig(exclude_sources=["text"])
    report = enrich(demo_dataset, demo_embeddings, None, config=cfg, dry_run=True, text_encoder=encoders[0])
    assert any(m.startswith("classifier_text=") for m in report.provenance["model_ids"])
    truth = _truth(demo_dataset, "missing_attributes.csv")
    for name in ("colour", "material"):
        a = report.attributes[name]
        assert "text" not in a["source_accuracy"]
        assert a["stacked_accuracy"] >= 3 * a["chance_accuracy"], (name, a)
        attrs = report.records[(report.records["kind"] == "attribute") & (report.records["name"] == name)]
        merged = attrs.merge(truth, on=["item_id", "name"], suffixes=("", "_true"))
        if len(merged):  # calibrated: what passes the 0.8 threshold is right at least ~80% of the time
            assert (merged["value"] == merged["value_true"]).mean() >= 0.75


def test_duplicates_precision_and_recall(dry_report, demo_dataset):
    report, _ = dry_report
    truth = _truth(demo_dataset, "duplicates.csv")
    planted = {tuple(sorted(p)) for p in zip(truth["item_id"], truth["duplicate_of"])}
    dups = report.records[report.records["type"] == "DUPLICATE_OF"]
    found = {tuple(sorted(p)) for p in zip(dups["src"], dups["dst"])}
    assert len(planted) >= 3
    recall = len(found & planted) / len(planted)
    precision = len(found & planted) / max(1, len(found))
    assert recall >= 0.75, (found, planted)
    assert precision >= 0.5, (found, planted)
    for ev in dups["evidence"].map(json.loads):
        assert ev["same_category"] and ev["same_price"] and ev["attributes_conflict"] == 0
        assert ev["text_cosine"] >= report.duplicates["thresholds"]["text_cosine"]
        assert ev["image_cosine"] >= report.duplicates["thresholds"]["image_cosine"]
    # blocking by neighbours: far fewer candidates than all pairs
    n = len(demo_dataset.items)
    assert report.duplicates["n_candidates"] < n * (n - 1) / 2 / 10


def test_similar_to_pairs_are_content_neighbours(dry_report):
    report, _ = dry_report
    sim = report.records[report.records["type"] == "SIMILAR_TO"]
    assert len(sim) > 0
    cfg = EnrichmentConfig()
    assert (sim["confidence"] >= cfg.similar_min_cosine).all()
    assert (sim["src"] < sim["dst"]).all()  # once per unordered pair
    assert not sim.duplicated(["src", "dst"]).any()
    dups = report.records[report.records["type"] == "DUPLICATE_OF"]
    assert not set(zip(sim["src"], sim["dst"])) & set(zip(dups["src"], dups["dst"]))


def test_records_never_touch_source_values(dry_report, demo_dataset):
    report, _ = dry_report
    source = demo_dataset.item_attributes()
    present = set(zip(source["item_id"], source["name"]))
    attrs = report.records[report.records["kind"] == "attribute"]
    assert len(attrs) > 0
    assert not set(zip(attrs["item_id"], attrs["name"])) & present
    # inapplicable attributes are not "missing": no size is invented for mugs, lamps, watches or bags
    assert "size" not in set(attrs["name"])


def test_reliability_numbers_and_plot(dry_report):
    report, out = dry_report
    png = Path(report.files["reliability_png"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("colour", "material"):
        rel = report.attributes[name]["reliability"]
        assert sum(rel["bin_count"]) == report.attributes[name]["n_labelled"]
        assert 0.0 <= rel["ece"] <= 0.1
    saved = json.loads((out / "report.json").read_text())
    assert saved["run_id"] == report.run_id and saved["dry_run"] is True


def test_dry_run_review_files_hold_every_record(dry_report):
    report, out = dry_report
    csv = pd.read_csv(out / "enrichment.csv", dtype={"item_id": str, "src": str, "dst": str})
    parquet = pd.read_parquet(out / "enrichment.parquet")
    assert list(csv.columns) == RECORD_COLUMNS == list(parquet.columns)
    assert len(csv) == len(parquet) == len(report.records) > 0
    assert report.counts() == parquet.assign(
        k=np.where(parquet["kind"] == "attribute", "attribute", parquet["type"])).groupby("k").size().to_dict()
    back = read_review_file(out / "enrichment.parquet")
    assert len(back) == len(report.records)
    assert back[0]["kind"] == "attribute" and isinstance(back[0]["evidence"], dict)


def test_rerun_is_deterministic_and_the_threshold_filters(dry_report, demo_dataset, demo_embeddings, encoders):
    report, _ = dry_report
    strict = enrich(demo_dataset, demo_embeddings, None, clip_encoder=encoders[1], threshold=0.97, dry_run=True)
    assert strict.run_id != report.run_id  # the threshold is part of what a run is
    attr = lambda r: r.records[r.records["kind"] == "attribute"].reset_index(drop=True)  # noqa: E731
    rel = lambda r: r.records[r.records["kind"] == "relation"].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(rel(strict), rel(report))  # same relations, same order
    loose = attr(report)
    pd.testing.assert_frame_equal(attr(strict), loose[loose["confidence"] >= 0.97].reset_index(drop=True))


# ----------------------------------------------------------------------------------------------- write-back


@pytest.fixture(params=["embedded", pytest.param("neo4j", marks=pytest.mark.neo4j)])
def loaded_store(request, demo_dataset):
    if request.param == "embedded":
        from kg.embedded_store import EmbeddedStore

        store = EmbeddedStore()
    else:
        store = request.getfixturevalue("neo4j_store")
    store.load(demo_dataset)
    return store


def _has_attribute_hops(store, item_ids: list[str]) -> dict[str, list[tuple[str, dict]]]:
    hops = store.expand([("Item", i) for i in item_ids])
    return {i: sorted(((h.other[1], dict(h.properties)) for h in hops[("Item", i)] if h.rel == "HAS_ATTRIBUTE"),
                      key=lambda t: t[0]) for i in item_ids}


def test_dry_run_writes_nothing_to_the_store(loaded_store, demo_dataset, demo_embeddings, tmp_path):
    before = loaded_store.counts()
    report = enrich(demo_dataset, demo_embeddings, loaded_store, dry_run=True, out_dir=tmp_path)
    assert len(report.records) > 0 and report.written is None
    assert loaded_store.counts() == before
    assert (tmp_path / "enrichment.csv").is_file() and (tmp_path / "enrichment.parquet").is_file()


def test_write_back_with_provenance_is_idempotent(loaded_store, demo_dataset, demo_embeddings):
    item_ids = demo_dataset.items["item_id"].tolist()
    before_counts = loaded_store.counts()
    before = _has_attribute_hops(loaded_store, item_ids)

    report = enrich(demo_dataset, demo_embeddings, loaded_store, dry_run=False, threshold=THRESHOLD)
    counts = report.counts()
    assert report.written["written"] == len(report.records) and report.written["skipped"] == 0
    after_counts = loaded_store.counts()
    assert after_counts["HAS_ATTRIBUTE"] == before_counts["HAS_ATTRIBUTE"] + counts["attribute"]
    for rel in ("DUPLICATE_OF", "SIMILAR_TO"):
        assert after_counts[rel] == before_counts[rel] + counts.get(rel, 0)
    assert after_counts["Item"] == before_counts["Item"]

    # source values untouched, inferred ones carry provenance and confidence
    after = _has_attribute_hops(loaded_store, item_ids)
    n_enriched = 0
    for iid in item_ids:
        data_before = [(av, p) for av, p in before[iid] if p.get("source") == "data"]
        data_after = [(av, p) for av, p in after[iid] if p.get("source") == "data"]
        assert data_after == data_before
        data_names = {av.split("=", 1)[0] for av, _ in data_after}
        for av, p in after[iid]:
            if p.get("source") != "enrichment":
                continue
            n_enriched += 1
            assert av.split("=", 1)[0] not in data_names
            assert p["run_id"] == report.run_id
            assert p["confidence"] >= THRESHOLD
            assert p["created"] and any(m.startswith("text=") for m in p["model_ids"])
    assert n_enriched == counts["attribute"]

    # the second run changes nothing
    again = enrich(demo_dataset, demo_embeddings, loaded_store, dry_run=False, threshold=THRESHOLD)
    assert again.run_id == report.run_id
    assert again.written["written"] == 0
    assert loaded_store.counts() == after_counts
    assert _has_attribute_hops(loaded_store, item_ids) == after


def test_relations_carry_evidence_in_the_store(loaded_store, demo_dataset, demo_embeddings):
    report = enrich(demo_dataset, demo_embeddings, loaded_store, dry_run=False)
    dups = report.records[report.records["type"] == "DUPLICATE_OF"]
    assert len(dups) > 0
    src, dst = dups.iloc[0]["src"], dups.iloc[0]["dst"]
    hops = loaded_store.expand([("Item", src)])[("Item", src)]
    rel = [h for h in hops if h.rel == "DUPLICATE_OF" and h.other == ("Item", dst)]
    assert len(rel) == 1
    props = rel[0].properties
    assert props["source"] == "enrichment" and props["run_id"] == report.run_id
    assert json.loads(props["evidence"])["same_price"] is True


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_dry_run_then_write_then_rerun(demo_dataset, demo_embeddings, tmp_path):
    from typer.testing import CliRunner

    from kg.embedded_store import EmbeddedStore
    from kgrec.cli import app

    emb_dir, graph, out = tmp_path / "emb", tmp_path / "graph", tmp_path / "out"
    demo_embeddings.save(emb_dir)
    runner = CliRunner()
    base = ["enrich", str(demo_dataset.root), "--embeddings", str(emb_dir), "--no-encoders", "--out", str(out)]

    dry = runner.invoke(app, base + ["--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output and "colour" in dry.output
    n_records = len(pd.read_parquet(out / "enrichment.parquet"))
    assert not graph.exists()

    first = runner.invoke(app, base + ["--graph", str(graph), "--threshold", "0.9"])
    assert first.exit_code == 0, first.output
    counts = EmbeddedStore.open(graph).counts()
    assert counts["Item"] == len(demo_dataset.items) and counts["SIMILAR_TO"] > 0
    second = runner.invoke(app, base + ["--graph", str(graph), "--threshold", "0.9"])
    assert second.exit_code == 0, second.output
    assert "'written': 0" in second.output
    assert EmbeddedStore.open(graph).counts() == counts
    assert n_records >= counts["SIMILAR_TO"] + counts["DUPLICATE_OF"]

    bad = runner.invoke(app, ["enrich", str(demo_dataset.root), "--embeddings", str(tmp_path / "nope"),
                              "--no-encoders", "--dry-run"])
    assert bad.exit_code == 2 and "kgrec encode" in bad.output


def test_cli_enrich_uses_the_bundles_own_encoders(demo_dataset, demo_embeddings, tmp_path):
    """`kgrec enrich --bundle B` builds the encoders B names, with B's own settings (as Recommender.enrich does),
    not the configured defaults: otherwise their model ids differ from the embeddings' and the CLIP zero-shot
    source is lost. A bundle without a text (or CLIP) model is fine."""
    from typer.testing import CliRunner

    from encoders.clip import ClipEncoder
    from encoders.text import TextEncoder
    from kgrec.cli import app
    from kgrec.commands.enrich import _encoders_for
    from kgrec.config import Config

    def bundle(name: str, spec: dict, **encoders: object) -> Path:
        (tmp_path / name / "encoders").mkdir(parents=True)
        (tmp_path / name / "encoders" / "encoders.json").write_text(json.dumps({"custom": False, **spec}))
        cfg = Config.load(env={})
        cfg.encoders = cfg.encoders.model_copy(update=encoders)
        (tmp_path / name / "config.yaml").write_text(cfg.to_yaml())
        return tmp_path / name

    cfg = Config.load(env={})
    assert cfg.encoders.clip_model != "kgrec-tiny-test" and cfg.encoders.text_max_length != 77
    text, clip = _encoders_for(cfg, bundle("clip-only", {"text_model": None, "clip_model": "kgrec-tiny-test",
                                                         "clip_checkpoint_dir": None}))
    assert text is None and clip.model_id == ClipEncoder("kgrec-tiny-test", device="cpu").model_id
    text, clip = _encoders_for(cfg, bundle("text-only", {"text_model": cfg.encoders.text_model, "clip_model": None},
                                           text_max_length=77))
    assert clip is None and text.max_length == 77  # the bundle's setting, not the CLI config's
    assert text.model_id == TextEncoder(cfg.encoders.text_model, max_length=77).model_id

    emb_dir = tmp_path / "emb"
    demo_embeddings.save(emb_dir)
    res = CliRunner().invoke(app, ["enrich", str(demo_dataset.root), "--bundle", str(tmp_path / "clip-only"),
                                   "--embeddings", str(emb_dir), "--dry-run", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "no text encoder" in res.output and (tmp_path / "out" / "enrichment.parquet").is_file()


@pytest.mark.neo4j
def test_cli_enrich_with_a_neo4j_bundle_writes_to_its_server(demo_dataset, demo_embeddings, neo4j_store, neo4j_server,
                                                            tmp_path, monkeypatch):
    """`kgrec enrich DS --bundle B` with B's graph in Neo4j writes back to the server B's graph.json names (no
    --backend, NEO4J_URI unset; password from NEO4J_PASSWORD), with provenance on every record."""
    from typer.testing import CliRunner

    from kgrec.cli import app

    neo4j_store.load(demo_dataset)
    before = neo4j_store.counts()
    b = tmp_path / "b"
    (b / "graph").mkdir(parents=True)
    (b / "graph" / "graph.json").write_text(json.dumps(
        {"backend": "neo4j", "uri": neo4j_server.uri, "database": "neo4j", "user": neo4j_server.user}))
    demo_embeddings.save(tmp_path / "emb")
    monkeypatch.delenv("NEO4J_URI", raising=False)
    monkeypatch.setenv("NEO4J_PASSWORD", neo4j_server.password)
    res = CliRunner().invoke(app, ["enrich", str(demo_dataset.root), "--bundle", str(b), "--embeddings",
                                   str(tmp_path / "emb"), "--no-encoders", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    after = neo4j_store.counts()
    assert after["SIMILAR_TO"] > before.get("SIMILAR_TO", 0)
    assert not (b / "graph" / "nodes.parquet").exists()  # nothing went to an embedded store in the bundle
    rows = neo4j_store._read("MATCH ()-[r:SIMILAR_TO]->() RETURN count(r) AS n, "
                             "count(r.confidence) AS c, count(r.run_id) AS runs")
    assert rows[0]["n"] == rows[0]["c"] == rows[0]["runs"] == after["SIMILAR_TO"]
