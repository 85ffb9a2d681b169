"""End to end on the small generated catalog with tiny seeded encoders: fit, recommend, explain, search, bundle."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kgrec.config import Config
from kgrec.errors import BundleError, DataError, UnknownIdError
from kgrec.pipeline import Recommender

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_encoders():
    from encoders.clip import ClipEncoder
    from encoders.text import TextEncoder

    text = TextEncoder.from_config(TINY_BERT, seed=0, max_length=32, batch_size=16, device="cpu")
    clip = ClipEncoder("kgrec-tiny-test", device="cpu", batch_size=32, seed=0)
    return text, clip


@pytest.fixture(scope="module")
def fitted(demo_dataset, tiny_encoders, tmp_path_factory):
    cfg = Config.load(env={}, overrides={"fusion.epochs": 15, "fusion.dim": 32, "ranking.num_candidates": 50,
                                          "encoders.cache_dir": str(tmp_path_factory.mktemp("cache"))})
    return Recommender.fit(demo_dataset, cfg, progress=False, encoders=tiny_encoders)


def test_fit_reports_metrics_and_beats_popularity(fitted):
    test = fitted.metrics["test"]
    assert {"popularity", "gnn", "gnn+ranker"} <= set(test)
    for row in test.values():
        assert 0.0 <= row["ndcg@20"] <= 1.0 and 0.0 <= row["recall@20"] <= 1.0
    best = max(test["gnn"]["ndcg@20"], test["gnn+ranker"]["ndcg@20"])
    assert best > test["popularity"]["ndcg@20"]
    c = fitted.metrics["counts"]
    assert c["train_pairs"] > c["valid_pairs"] > 0 and c["test_pairs"] > 0
    # what the ranker's trees rest on: gain shares of its own columns, largest first, summing to 1
    share = fitted.metrics["ranker_training"]["feature_gain_share"]
    assert share and set(share) <= set(fitted.ranker.feature_names)
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-3) and list(share.values()) == sorted(share.values())[::-1]
    gain = fitted.ranker.feature_importance()
    assert max(gain, key=gain.get) == next(iter(share))


def test_recommend_excludes_seen_and_explains(fitted):
    user = fitted.events["user_id"].value_counts().index[0]
    recs = fitted.recommend(user, k=5, explain=True)
    assert len(recs) == 5 and [r.rank for r in recs] == [1, 2, 3, 4, 5]
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    seen = set(fitted.events.loc[fitted.events["user_id"] == user, "item_id"])
    assert not seen & {r.item_id for r in recs}
    for r in recs:
        e = r.explanation
        assert e["item_id"] == r.item_id and e["sentence"]
        # contributions + bias reproduce the ranker score
        assert sum(e["all_contributions"].values()) + e["base_score"] == pytest.approx(r.score, abs=1e-4)
        cited = {f["name"] for f in e["features"]}
        assert cited <= set(fitted.ranker.feature_names)
    json.dumps([r.to_dict() for r in recs])  # JSON-able


def test_unknown_ids_are_clear_errors(fitted):
    with pytest.raises(UnknownIdError, match="unknown user 'nobody'") as err:
        fitted.recommend("nobody", 3)
    # the hint fits every interface that shows it (Python, CLI, HTTP): no Python call syntax
    assert "text query or a few chosen items" in str(err.value) and "=" not in str(err.value)
    with pytest.raises(UnknownIdError) as err:
        fitted.explain("nobody", fitted.item_ids[0])
    assert str(err.value) == "unknown user 'nobody': not in the training data"  # no serving hint for explain
    with pytest.raises(UnknownIdError, match="unknown item"):
        fitted.similar("no-such-item", 3)
    with pytest.raises(DataError):
        fitted.recommend(fitted.user_ids[0], 0)


def test_user_without_history_is_served_from_a_query(fitted):
    import copy

    import scipy.sparse as sp

    recs = fitted.recommend("brand-new-user", 4, query="red jacket")
    assert len(recs) == 4 and all(r.sources for r in recs)
    # a user listed in users.parquet without events has an untrained vector: a clear error, or the query path
    rec = copy.copy(fitted)
    ghost = fitted.user_ids[0]
    seen = fitted.seen.tolil()
    seen[fitted.user_pos[ghost], :] = 0
    rec._seen = sp.csr_matrix(seen)
    assert not rec.has_history(ghost) and rec.has_history(fitted.user_ids[1])
    assert not rec.has_history("brand-new-user") and fitted.has_history(ghost)
    with pytest.raises(DataError, match="has no events"):
        rec.recommend(ghost, 4)
    with pytest.raises(DataError, match="has no events"):
        rec.recommend_batch([fitted.user_ids[1], ghost], 4)
    assert [r.item_id for r in rec.recommend(ghost, 4, query="red jacket")] == [
        r.item_id for r in fitted.search(text="red jacket", k=4)]


def test_search_finds_items_by_their_own_title(fitted):
    hits = 0
    titles = fitted.items["title"].tolist()[:20]
    ids = fitted.items["item_id"].tolist()[:20]
    for t, i in zip(titles, ids):
        hits += i in [r.item_id for r in fitted.search(text=t, k=5)]
    assert hits >= 8  # chance is 20 * 5 / 200 = 0.5; even tiny random towers put an exact title near the top


def test_image_search_returns_the_item_itself(fitted, demo_dataset):
    row = fitted.items.dropna(subset=["image"]).iloc[3]
    res = fitted.search(image=str(demo_dataset.root / row["image"]), k=3)
    assert res[0].item_id == row["item_id"]


def test_bundle_roundtrip_same_recommendations(fitted, tiny_encoders, tmp_path):
    import platform

    import torch

    path = fitted.save(tmp_path / "bundle")
    versions = json.loads((path / "manifest.json").read_text())["versions"]
    assert versions["python"] == platform.python_version() and versions["torch"] == torch.__version__.split("+")[0]
    assert all(versions[p] for p in ("torch_geometric", "lightgbm", "numpy", "open_clip_torch"))
    again = Recommender.load(path, encoders=tiny_encoders)
    user = fitted.user_ids[5]
    a = [(r.item_id, round(r.score, 5)) for r in fitted.recommend(user, 8)]
    b = [(r.item_id, round(r.score, 5)) for r in again.recommend(user, 8)]
    assert a == b
    assert [r.item_id for r in fitted.similar(fitted.item_ids[0], 5)] == [r.item_id for r in again.similar(again.item_ids[0], 5)]
    assert fitted.explain(user, a[0][0]).to_dict()["sentence"] == again.explain(user, a[0][0]).to_dict()["sentence"]


def test_explain_says_where_an_item_stands_when_it_is_not_recommended(fitted):
    """explain() on any pair: a recommended item keeps the sentence its recommendation carries; an item from the
    user's history or outside the candidates is not called "recommended"."""
    user = fitted.events["user_id"].value_counts().index[0]
    c = fitted.config.ranking.num_candidates
    recs = fitted.recommend(user, c, explain=True)
    top = recs[3]
    assert fitted.explain(user, top.item_id).sentence == top.explanation["sentence"]
    u = fitted.user_pos[user]
    own = fitted.item_ids[fitted.seen[u].indices[0]]
    e = fitted.explain(user, own)
    assert e.sentence.startswith(f"*{e.item_title}* is already in your history, so it is not recommended again")
    listed = {r.item_id for r in recs} | {fitted.item_ids[j] for j in fitted.seen[u].indices}
    outside = next(i for i in fitted.item_ids if i not in listed)
    e = fitted.explain(user, outside)
    assert e.sentence.startswith(f"*{e.item_title}* is not among your top {c} candidates, so it is not recommended")
    assert "is recommended because" not in e.sentence and e.to_dict()["sentence"] == e.sentence
    assert e.features == fitted.explainer.explain(user, outside).features  # the evidence itself is unchanged


def test_bundle_damage_and_versions_are_detected(fitted, tmp_path):
    path = fitted.save(tmp_path / "b")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "fusion" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="incomplete"):
        Recommender.load(broken)
    old = tmp_path / "old"
    shutil.copytree(path, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 999
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 999"):
        Recommender.load(old)
    tampered = tmp_path / "tampered"
    shutil.copytree(path, tampered)
    with open(tampered / "ranker" / next(p.name for p in (tampered / "ranker").iterdir()), "ab") as fh:
        fh.write(b"x")
    with pytest.raises(BundleError, match="damaged"):
        Recommender.load(tampered)


def test_interrupted_save_keeps_previous_bundle(fitted, tmp_path, monkeypatch):
    import kgrec.bundle as bundle

    path = fitted.save(tmp_path / "b")
    before = json.loads((path / "manifest.json").read_text())["created"]
    real = bundle.write_bundle
    monkeypatch.setattr("kgrec.pipeline.write_bundle", lambda *a, **k: real(*a, **k, _fail_after_write=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fitted.save(path)
    assert json.loads((path / "manifest.json").read_text())["created"] == before
    assert Recommender.load(path) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.tmp")]


def test_similar_items_share_category_more_than_chance(fitted):
    cats = fitted.items.set_index("item_id")["category"]
    same, total = 0, 0
    for item in fitted.item_ids[:30]:
        for r in fitted.similar(item, 5):
            same += cats[r.item_id] == cats[item]
            total += 1
    share = np.mean(cats.value_counts(normalize=True) ** 2)  # chance of a random pair sharing a category
    assert same / total > 2 * share


def test_refit_ranker_changes_only_the_ranker_and_is_reproducible(fitted, demo_dataset):
    before_test = json.loads(json.dumps(fitted.metrics["test"]))
    before_ranker, before_model = fitted.ranker, fitted.model
    original = fitted.config.ranking.model_copy()
    small = fitted.refit_ranker(original.model_copy(update={"num_leaves": 2}), dataset=demo_dataset)
    trees = fitted.ranker.booster_.dump_model()["tree_info"]
    assert trees and max(t["num_leaves"] for t in trees) == 2  # the new setting was used
    assert fitted.ranker is not before_ranker and fitted.model is before_model  # the GNN is untouched
    assert small["test"]["gnn"] == before_test["gnn"]  # same split, same retrieval order
    assert small["ranker_training"]["train_groups"] == fitted.metrics["ranker_training"]["train_groups"] > 0
    assert fitted.metrics["test"] is small["test"] and fitted.config.ranking.num_leaves == 2
    # back to the fitted setting: the same ranker numbers as Recommender.fit produced (and the fixture restored)
    again = fitted.refit_ranker(original, dataset=demo_dataset)
    assert again["test"]["gnn+ranker"] == pytest.approx(before_test["gnn+ranker"], abs=1e-12)
    assert fitted.config.ranking == original
    assert fitted.recommend(fitted.user_ids[0], 3, explain=True)[0].explanation  # explainer rebuilt on the new ranker


@pytest.fixture(scope="module")
def split_catalog(demo_dataset, tmp_path_factory):
    """The demo dataset without 10% of its items (and their events), plus a delta dataset holding them."""
    from kgrec.data.schema import Dataset

    items, events = demo_dataset.items, demo_dataset.events
    held = set(items["item_id"].iloc[::10])
    base_dir = tmp_path_factory.mktemp("upd") / "base"
    base = Dataset.write(base_dir, {
        "items": items[~items["item_id"].isin(held)], "users": demo_dataset.users,
        "events": events[~events["item_id"].isin(held)], "triples": demo_dataset.triples,
        "links": demo_dataset.links[~demo_dataset.links["item_id"].isin(held)],
    }, images_from=demo_dataset.root)
    delta_events = events[events["item_id"].isin(held)]
    delta_items = items[items["item_id"].isin(held | set(delta_events["item_id"]))]
    delta = Dataset.write(base_dir.parent / "delta", {
        "items": delta_items, "users": demo_dataset.users[demo_dataset.users["user_id"].isin(delta_events["user_id"])],
        "events": delta_events, "links": demo_dataset.links[demo_dataset.links["item_id"].isin(held)],
    }, images_from=demo_dataset.root)
    return base, delta, sorted(held)


def test_incremental_update_makes_new_items_retrievable(split_catalog, tiny_encoders, tmp_path):
    base, delta, held = split_catalog
    cfg = Config.load(env={}, overrides={"fusion.epochs": 10, "fusion.dim": 32, "ranking.num_candidates": 50,
                                          "encoders.cache_dir": str(tmp_path / "cache")})
    rec = Recommender.fit(base, cfg, progress=False, encoders=tiny_encoders)
    n_items = len(rec.item_ids)
    assert not set(held) & set(rec.item_ids)
    report = rec.update(delta)
    assert report["new_items"] == len(held) and len(rec.item_ids) == n_items + len(held)
    assert rec.model.item_embeddings.shape[0] == len(rec.item_ids) == len(rec.embeddings.item_ids)
    assert 0 < report["drift"] <= 1 and isinstance(report["retrain_suggested"], bool)
    # retrievable at once through content: its own title finds it
    found = sum(h in [r.item_id for r in rec.search(text=rec.items.loc[h, "title"], k=5)] for h in held)
    assert found >= 5  # chance: 20 * 5 / 200 = 0.5 (tiny random towers)
    # and through KG neighbours: similar items of a new item share its category more often than chance
    cats = rec.items["category"]
    same = np.mean([cats[r.item_id] == cats[h] for h in held for r in rec.similar(h, 5)])
    assert same > 2 * np.mean(cats.value_counts(normalize=True) ** 2)
    # the graph knows the new items, and a user's list can contain them
    assert rec.store.counts()["Item"] == len(rec.item_ids)
    user = delta.events["user_id"].iloc[0]
    assert rec.recommend(user, 5)
    # updating twice adds nothing
    again = rec.update(delta)
    assert again["new_items"] == 0 and again["new_events"] == 0
    # the updated model saves and loads
    rec2 = Recommender.load(rec.save(tmp_path / "b"), encoders=tiny_encoders)
    assert rec2.item_ids == rec.item_ids


def test_gnn_training_graph_has_no_valid_or_test_purchases(demo_dataset):
    # ALSO_BOUGHT derived from every purchase would carry valid / test labels into the GNN's training graph
    from kg.embedded_store import EmbeddedStore
    from kgrec.pipeline import _index, event_split_codes, split_pairs, training_graph

    store = EmbeddedStore(also_bought_min_count=1)
    store.load(demo_dataset)
    hetero, ids = store.to_hetero_data()
    up, ip = _index(ids["user"]), _index(ids["item"])
    events = demo_dataset.events
    pairs = split_pairs(demo_dataset, events, up, ip, seed=0)
    codes = event_split_codes(events, pairs, up, ip)
    g = training_graph(hetero, ids, events, pairs, also_bought_min_count=1)

    def co_bought(ev):
        buys = ev[ev["type"] == "purchase"].drop_duplicates(["user_id", "item_id"])
        by_user = buys.groupby("user_id")["item_id"].apply(lambda s: sorted(ip[i] for i in s))
        return {(a, b) for items in by_user for k, a in enumerate(items) for b in items[k + 1:]}

    got = {tuple(e) for e in g["item", "also_bought", "item"].edge_index.t().tolist()}
    assert got == co_bought(events[codes == 0])
    assert co_bought(events) - got  # the full graph would have held pairs bought only in valid / test
    assert not ({tuple(e) for e in g["user", "purchased", "item"].edge_index.t().tolist()}
                & set(zip(pairs.loc[pairs["split"] > 0, "u"], pairs.loc[pairs["split"] > 0, "i"])))


def test_user_who_has_seen_every_item_gets_an_empty_list(fitted):
    import copy

    import scipy.sparse as sp

    rec = copy.copy(fitted)
    user = fitted.user_ids[0]
    u = fitted.user_pos[user]
    seen = fitted.seen.tolil()
    seen[u, :] = 1
    rec._seen = sp.csr_matrix(seen)
    assert rec.recommend(user, 5) == [] and rec.recommend(user, 5, explain=True) == []
    assert rec.recommend_batch([user, fitted.user_ids[1]], 5, explain=True)[0] == []
    assert fitted.ranker.contributions(np.zeros((0, len(fitted.ranker.feature_names)))).shape == (
        0, len(fitted.ranker.feature_names) + 1)


def test_update_with_new_items_without_image_or_brand(split_catalog, tiny_encoders, tmp_path):
    # a missing image / brand reads back from Parquet as NaN: new items must still be added (text only)
    from kgrec.data.schema import Dataset

    base, delta, held = split_catalog
    items = delta.items.reset_index()
    items["image"], items["brand"] = None, None
    bare = Dataset.write(tmp_path / "bare", {"items": items, "users": delta.users, "events": delta.events,
                                            "links": delta.links})
    cfg = Config.load(env={}, overrides={"fusion.epochs": 5, "fusion.dim": 32, "ranking.num_candidates": 50,
                                          "encoders.cache_dir": str(tmp_path / "cache")})
    rec = Recommender.fit(base, cfg, progress=False, encoders=tiny_encoders)
    report = rec.update(bare)
    assert report["new_items"] == len(held)
    new = [rec.item_pos[h] for h in held]
    vecs = rec.model.item_embeddings[new]
    assert np.isfinite(vecs).all() and (np.linalg.norm(vecs, axis=1) > 0).all()
    # no picture: all the weight on text, as in training (the zero image row took about half before)
    np.testing.assert_allclose(rec.model.modality_weights[new], np.tile([1.0, 0.0, 0.0], (len(new), 1)), atol=1e-6)


def test_fit_on_a_catalogue_smaller_than_k_with_few_candidates(tiny_encoders, tmp_path):
    # 15 items < k = 20 of the evaluation, 10 candidates < 20: ranks past the end are misses, not errors
    from kgrec.data.ingest import ingest
    from kgrec.data.synthetic import generate_catalog

    generate_catalog(tmp_path / "raw", n_items=15, n_users=40, seed=0, images=False)
    ingest(tmp_path / "raw", tmp_path / "ds")
    cfg = Config.load(env={}, overrides={"fusion.epochs": 3, "fusion.dim": 16, "ranking.num_candidates": 10,
                                          "encoders.cache_dir": str(tmp_path / "cache")})
    rec = Recommender.fit(tmp_path / "ds", cfg, progress=False, encoders=tiny_encoders)
    test = rec.metrics["test"]
    assert {"gnn", "gnn+ranker"} <= set(test)
    for row in test.values():
        assert row["recall@20"] >= row["recall@10"] and 0 < row["item_coverage@20"] <= 1.0
    # the ranker's lists hold 10 candidates: its top 20 are its top 10 (the -1 padding is not an item)
    ranked = test["gnn+ranker"]
    assert ranked["item_coverage@20"] == ranked["item_coverage@10"] and ranked["recall@20"] == ranked["recall@10"]


def test_a_ranker_of_other_features_serves_its_own_columns_and_unknown_ones_are_refused(fitted, tmp_path):
    """A saved ranker keeps the names it learned from (an older version's set, or ``ranking.exclude_features``):
    serving builds exactly those columns in that order; a name this version cannot build is refused at load."""
    import copy

    from ranking.features import FEATURE_NAMES, FeatureBuilder
    from ranking.ranker import Ranker

    names = ("item_popularity", "gnn_score", "kg_paths_total", "history_similarity")  # a subset, another order
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(400, len(names))), rng.integers(0, 2, 400)
    rec = copy.copy(fitted)
    rec.ranker = Ranker(fitted.config.ranking, names).fit(X, y, np.full(20, 20))  # drops the copy's serving caches
    assert rec.feature_builder.names == names
    loaded = Recommender.load(rec.save(tmp_path / "b"))
    assert loaded.ranker.feature_names == names and loaded.feature_builder.names == names
    user = loaded.user_ids[0]
    recs = loaded.recommend(user, k=5, explain=True)
    u = loaded.user_pos[user]
    items = np.array([loaded.item_pos[r.item_id] for r in recs])
    full = FeatureBuilder(loaded.context).build(np.array([u]), items.reshape(1, -1))  # every column
    expected = loaded.ranker.predict(np.stack([full.column(n) for n in names], axis=1))
    np.testing.assert_allclose([r.score for r in recs], expected, rtol=1e-6)
    assert {c["name"] for r in recs for c in r.explanation["features"]} <= set(names)

    bad = copy.copy(fitted)
    bad.ranker = Ranker(fitted.config.ranking, ("gnn_score", "a_feature_from_the_future")).fit(
        X[:, :2], y, np.full(20, 20))
    with pytest.raises(BundleError, match="was trained on features"):
        Recommender.load(bad.save(tmp_path / "c"))
    assert len(FEATURE_NAMES) > len(names)
    with pytest.raises(ValueError, match=r"takes \(n, \d+\) features"):
        fitted.ranker.predict(rng.normal(size=(3, len(fitted.ranker.feature_names) - 1)))


def test_exclude_and_extra_features_choose_a_new_rankers_columns(fitted, demo_dataset):
    from kgrec.config import ConfigError

    before = json.loads(json.dumps(fitted.metrics["test"]))
    original = fitted.config.ranking.model_copy()
    left_out, added = ["price", "price_ratio", "kg_paths_entity"], ["co_buyer_cosine", "days_user_to_item_activity"]
    fitted.refit_ranker(original.model_copy(update={"exclude_features": left_out, "extra_features": added}),
                        dataset=demo_dataset)
    try:
        names = fitted.ranker.feature_names
        assert not set(left_out) & set(names) and set(added) <= set(names)
        assert len(names) == len(original.feature_names) - 1 and names[-2:] == tuple(added)
        assert fitted.feature_builder.names == fitted.ranker.feature_names  # serving rebuilt for the new ranker
        assert fitted.recommend(fitted.user_ids[0], k=3, explain=True)[0].explanation
        # the serving context was rebuilt with the event times the new time column reads
        assert fitted.context.item_event_times is not None
        u = np.array([fitted.user_pos[fitted.user_ids[0]]])
        gap = fitted.feature_builder.build(u, np.arange(20).reshape(1, -1)).column("days_user_to_item_activity")
        assert np.isfinite(gap).sum() > 0
    finally:
        again = fitted.refit_ranker(original, dataset=demo_dataset)  # the fixture restored
    assert fitted.context.item_event_times is None  # default columns: no per-event time arrays
    assert again["test"]["gnn+ranker"] == pytest.approx(before["gnn+ranker"], abs=1e-12)
    with pytest.raises(ConfigError, match="unknown ranking features"):
        Config.load(env={}, overrides={"ranking.exclude_features": ["no_such_feature"]})
    with pytest.raises(ConfigError, match="opt-in features are"):
        Config.load(env={}, overrides={"ranking.extra_features": ["gnn_score"]})  # a default column, not opt-in
    with pytest.raises(ConfigError, match="every ranking feature is excluded"):
        Config.load(env={}, overrides={"ranking.exclude_features": list(original.feature_names)})
    only = Config.load(env={}, overrides={"ranking.exclude_features": list(original.feature_names),
                                          "ranking.extra_features": ["gnn_dot_z"]})  # judged together
    assert only.ranking.feature_names == ("gnn_dot_z",)


def test_saved_bundles_follow_the_umask_and_resave_cleanly(fitted, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = fitted.save(tmp_path / "b")
        (tmp_path / f".b.old-{os.getpid()}" / "junk").mkdir(parents=True)  # left by an interrupted swap
        path = fitted.save(tmp_path / "b")  # saved again over the first
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(path) == 0o755 and mode(path / "manifest.json") == 0o644
    assert mode(path / "ranker" / "model.txt") == 0o644 and mode(path / "ranker" / "feature_spec.json") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".b.old-{os.getpid()}", "b"]  # no other leftovers
    assert Recommender.load(path).item_ids == fitted.item_ids


def test_update_counts_the_new_events_wherever_they_are_in_the_delta(demo_dataset, tiny_encoders, tmp_path):
    import pandas as pd

    from kgrec.data.schema import Dataset

    cfg = Config.load(env={}, overrides={"fusion.epochs": 3, "fusion.dim": 16, "ranking.num_candidates": 50,
                                          "encoders.cache_dir": str(tmp_path / "cache")})
    rec = Recommender.fit(demo_dataset, cfg, progress=False, encoders=tiny_encoders)
    ev = demo_dataset.events
    old = ev.iloc[[0]]  # already known, listed first
    new = ev.iloc[[1]].assign(user_id="zed")  # a new user's event
    delta = Dataset.write(tmp_path / "delta", {
        "items": demo_dataset.items.reset_index()[lambda d: d["item_id"].isin(set(old["item_id"]) | set(new["item_id"]))],
        "users": pd.DataFrame({"user_id": [old["user_id"].iloc[0], "zed"]}),
        "events": pd.concat([old, new], ignore_index=True)})
    n_events = len(rec.events)
    report = rec.update(delta)
    assert (report["new_users"], report["new_events"], report["events_on_untrained_items_or_users"]) == (1, 1, 1)
    assert len(rec.events) == n_events + 1


def test_a_query_steers_a_known_users_list(fitted):
    user = fitted.events["user_id"].value_counts().index[0]
    plain = fitted.recommend(user, 10)
    steered = fitted.recommend(user, 10, query="red leather boots")
    match, _ = fitted._search_scores(text="red leather boots")
    mean_match = lambda recs: np.mean([match[fitted.item_pos[r.item_id]] for r in recs])  # noqa: E731
    assert [r.item_id for r in steered] != [r.item_id for r in plain]
    assert mean_match(steered) > mean_match(plain)
    assert all(set(r.sources) == {"ranker", "query"} for r in steered)
    assert [r.score for r in steered] == sorted((r.score for r in steered), reverse=True)
    # query_weight 0: the ranker's order over the same candidates
    import copy

    rec = copy.copy(fitted)
    rec.config = fitted.config.model_copy(deep=True)
    rec.config.ranking.query_weight = 0.0
    zero = rec.recommend(user, 10, query="red leather boots")
    ranker_only = [r.sources["ranker"] for r in zero]
    assert ranker_only == sorted(ranker_only, reverse=True)


def test_html_report_for_query_results_and_cold_users(fitted, tmp_path):
    from kgrec.commands.model import write_html

    cold = fitted.recommend("nobody", 3, query="red jacket")
    assert write_html(fitted, {"nobody": cold}, tmp_path / "cold.html") is None and not (tmp_path / "cold.html").exists()
    user = fitted.events["user_id"].value_counts().index[0]
    recs = fitted.recommend(user, 3, query="red jacket")
    path = write_html(fitted, {user: recs, "nobody": cold}, tmp_path / "r.html", query="red jacket")
    html = path.read_text(encoding="utf-8")
    assert all(r.item_id in html for r in recs) and "nobody" not in html
    # the bundle's ranker: its overall split-gain chart heads the page, its largest share first
    top = next(iter(fitted.metrics["ranker_training"]["feature_gain_share"]))
    assert "What the ranker rests on overall" in html and f">{top}<" in html


_FIT_CHECKSUM = """
import hashlib, sys
import numpy as np
from encoders.clip import ClipEncoder
from encoders.text import TextEncoder
from kgrec.config import Config
from kgrec.pipeline import Recommender
text = TextEncoder.from_config(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                               seed=0, max_length=32, batch_size=16, device="cpu")
clip = ClipEncoder("kgrec-tiny-test", device="cpu", batch_size=32, seed=0)
cfg = Config.load(env={}, overrides={"fusion.epochs": 8, "fusion.dim": 32, "encoders.cache_dir": sys.argv[2]})
rec = Recommender.fit(sys.argv[1], cfg, progress=False, encoders=(text, clip))
h = hashlib.sha256(np.ascontiguousarray(rec.model.user_embeddings).tobytes())
h.update(np.ascontiguousarray(rec.model.item_embeddings).tobytes())
print("CHECKSUM", h.hexdigest(), repr(rec.metrics["test"]["gnn+ranker"]["recall@20"]))
"""


def test_two_fits_in_separate_processes_are_bit_identical(tmp_path):
    # deterministic torch kernels while training (fusion.deterministic): on 2 threads the GNN's scatter-adds summed
    # in timing order, and fits in separate processes differed at ~1e-9 (3 of 3 runs measured), enough to flip the
    # ranker's early stopping (demo catalog: gnn+ranker Recall@20 0.1670 / 0.1780 from the same code)
    import os
    import subprocess
    import sys
    from pathlib import Path

    from kgrec.data.ingest import ingest
    from kgrec.data.synthetic import generate_catalog

    generate_catalog(tmp_path / "raw", n_items=300, n_users=120, seed=0, images=False, progress=False)
    ingest(tmp_path / "raw", tmp_path / "ds", progress=False)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONPATH=str(root))
    out = [subprocess.run([sys.executable, "-c", _FIT_CHECKSUM, str(tmp_path / "ds"), str(tmp_path / "cache")],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600) for _ in range(2)]
    lines = [next(x for x in o.stdout.splitlines() if x.startswith("CHECKSUM")) for o in out]
    assert lines[0] == lines[1]


def test_the_clip_checkpoint_travels_with_every_save(fitted, tmp_path, monkeypatch):
    """A bundle keeps its fit-clip checkpoint in encoders/clip; loading it (by a relative path) and saving again —
    in place (what `kgrec update B` does), elsewhere, from another working directory — must copy that checkpoint."""
    import copy

    ckpt = tmp_path / "fit-clip-out"
    ckpt.mkdir()
    (ckpt / "clip_config.json").write_text('{"model": "tiny"}')
    rec = copy.copy(fitted)
    rec.encoder_spec = dict(fitted.encoder_spec, clip_checkpoint_dir=str(ckpt))
    first = rec.save(tmp_path / "a")
    spec = lambda b: json.loads((b / "encoders" / "encoders.json").read_text())  # noqa: E731
    assert spec(first)["clip_checkpoint_dir"] == "encoders/clip"
    assert (first / "encoders" / "clip" / "clip_config.json").read_text() == '{"model": "tiny"}'
    monkeypatch.chdir(tmp_path)
    loaded = Recommender.load("a")  # a relative path: checkpoint names must resolve against the bundle, not the cwd
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for target in (first, tmp_path / "b"):  # in place over its own bundle (`kgrec update B`), then a new one
        out = loaded.save(target)
        assert spec(out)["clip_checkpoint_dir"] == "encoders/clip"
        assert (out / "encoders" / "clip" / "clip_config.json").read_text() == '{"model": "tiny"}'
    shutil.rmtree(tmp_path / "b")  # an export deleted later does not concern the model: it still reads from a
    assert (loaded.save(tmp_path / "c") / "encoders" / "clip" / "clip_config.json").is_file()
    gone = copy.copy(fitted)
    gone.encoder_spec = dict(fitted.encoder_spec, clip_checkpoint_dir=str(tmp_path / "deleted"))
    with pytest.raises(BundleError, match="CLIP checkpoint .* is gone"):
        gone.save(tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.neo4j
def test_a_neo4j_bundle_finds_its_server_without_neo4j_uri(fitted, tiny_encoders, neo4j_store, neo4j_server,
                                                             demo_dataset, tmp_path, monkeypatch):
    """A bundle whose graph lives in Neo4j records the server (graph.json: address, database, user; never the
    password); loading it with NEO4J_URI unset uses that server (the password still comes from NEO4J_PASSWORD)."""
    import copy

    neo4j_store.load(demo_dataset)
    rec = copy.copy(fitted)
    rec.store = neo4j_store
    monkeypatch.delenv("NEO4J_URI", raising=False)
    path = rec.save(tmp_path / "neo")
    graph = json.loads((path / "graph" / "graph.json").read_text())
    assert graph == {"backend": "neo4j", "uri": neo4j_server.uri, "database": "neo4j", "user": neo4j_server.user}
    assert neo4j_server.password not in "".join(p.read_text(errors="ignore") for p in path.rglob("*.json"))
    monkeypatch.setenv("NEO4J_PASSWORD", neo4j_server.password)
    again = Recommender.load(path, encoders=tiny_encoders)
    try:
        assert again.store.uri == neo4j_server.uri
        user = fitted.user_ids[5]
        assert [r.item_id for r in again.recommend(user, 5)] == [r.item_id for r in fitted.recommend(user, 5)]
    finally:
        again.store.close()


def test_cli_enrich_into_a_bundles_graph_keeps_the_bundle_loadable(fitted, tiny_encoders, demo_dataset, tmp_path):
    """`kgrec enrich DS --bundle B` writes into B's embedded graph through the bundle (new manifest): rewriting
    graph/ in place used to drop graph.json and break the manifest's hashes, so B no longer loaded."""
    from typer.testing import CliRunner

    from kgrec.cli import app

    path = fitted.save(tmp_path / "b")
    before = Recommender.load(path).store.counts()
    res = CliRunner().invoke(app, ["enrich", str(demo_dataset.root), "--bundle", str(path), "--no-encoders",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "saved with the enriched graph" in res.output
    again = Recommender.load(path, encoders=tiny_encoders)  # verifies every file against the new manifest
    after = again.store.counts()
    assert after["SIMILAR_TO"] > before.get("SIMILAR_TO", 0) and after["Item"] == before["Item"]
    user = fitted.user_ids[5]
    assert len(again.recommend(user, 5)) == 5
    res = CliRunner().invoke(app, ["enrich", str(demo_dataset.root), "--bundle", str(path), "--no-encoders",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0 and "'written': 0" in res.output  # idempotent: nothing new, bundle untouched
    assert Recommender.load(path).store.counts() == after


def test_update_that_cannot_encode_new_items_changes_nothing(fitted, demo_dataset, tmp_path):
    """A bundle trained with encoders built in code, loaded without them, cannot encode new items: update() says
    so before it writes anything to the graph."""
    from kgrec.data.schema import Dataset

    rec = Recommender.load(fitted.save(tmp_path / "b"))  # no encoders passed
    item = demo_dataset.items.iloc[[0]].assign(item_id="NEW-1")
    new = Dataset.write(tmp_path / "new", {"items": item, "events": demo_dataset.events.iloc[:0]},
                        images_from=demo_dataset.root)
    counts = rec.store.counts()
    with pytest.raises(BundleError, match="built in code"):
        rec.update(new)
    assert rec.store.counts() == counts and "NEW-1" not in rec.item_pos


def test_update_refuses_known_items_that_come_back_changed(fitted, demo_dataset, tmp_path):
    """A known item id with another brand / category / attributes would get a second MADE_BY / IN_CATEGORY next to
    the old one (MERGE keeps both): refused before anything is written; an unchanged copy is fine."""
    from kgrec.data.schema import Dataset

    rec = Recommender.load(fitted.save(tmp_path / "b"))
    items = demo_dataset.items.reset_index(drop=True)
    same = items.iloc[[0, 1]]
    other_brand = next(b for b in items["brand"].dropna().unique() if b != items["brand"].iloc[1])
    changed = same.assign(brand=[same["brand"].iloc[0], other_brand])
    empty = demo_dataset.events.iloc[:0]
    counts = rec.store.counts()
    bad = Dataset.write(tmp_path / "bad", {"items": changed, "events": empty}, images_from=demo_dataset.root)
    with pytest.raises(DataError, match=r"1 item\(s\) the model already knows come with a changed brand.*'"
                                        + items["item_id"].iloc[1] + "', brand: .* -> '" + other_brand
                                        + "'.*Nothing was changed"):
        rec.update(bad)
    assert rec.store.counts() == counts
    # a changed attribute value is refused too; a missing one is "not given"
    a0 = json.loads(same["attributes"].iloc[0])
    key = next(iter(a0))
    flipped = same.iloc[[0]].assign(attributes=json.dumps({key: "zz-other"}))
    with pytest.raises(DataError, match=f"attribute {key}: .* -> 'zz-other'"):
        rec.update(Dataset.write(tmp_path / "bad2", {"items": flipped, "events": empty}, images_from=demo_dataset.root))
    # re-listing with only id and title (the other columns null, as Dataset.write fills them), or a blank brand, a
    # category spelled with spaces around '>', an attribute subset: nothing changed, nothing refused
    partial = same[["item_id", "title"]]
    spaced = same.assign(brand=[None, ""], category=[c.replace(">", " > ") for c in same["category"]],
                         attributes=[json.dumps({key: a0[key]}), None])
    node = ("Item", str(items["item_id"].iloc[0]))
    before = dict(rec.store.graph.nodes[node])
    for name, frame in (("partial", partial), ("spaced", spaced)):
        ds = Dataset.write(tmp_path / name, {"items": frame, "events": empty}, images_from=demo_dataset.root)
        assert rec.update(ds)["new_items"] == 0, name
    assert rec.store.counts() == counts
    assert dict(rec.store.graph.nodes[node]) == before  # a known item's properties are not touched (no nulls)
    # attributes compare as JSON (key order does not matter); the unchanged copy is accepted
    reordered = same.assign(attributes=[json.dumps(dict(reversed(list(json.loads(a).items())))) if isinstance(a, str)
                                        else a for a in same["attributes"]])
    ok = Dataset.write(tmp_path / "ok", {"items": reordered, "events": empty}, images_from=demo_dataset.root)
    assert rec.update(ok)["new_items"] == 0 and rec.store.counts() == counts


def test_a_loaded_bundles_graph_is_written_only_by_save(fitted, tmp_path):
    """The embedded store of a loaded bundle is not bound to the bundle's graph/ directory: closing it after a
    change must not rewrite that directory in place (the manifest hashes it); saving leaves no binding to the
    bundle's temporary directory either."""
    path = fitted.save(tmp_path / "b")
    rec = Recommender.load(path)
    assert rec.store.path is None
    rec.store.write_enrichment([{"kind": "relation", "type": "SIMILAR_TO", "src": fitted.item_ids[0],
                                 "dst": fitted.item_ids[1], "confidence": 0.5, "evidence": {}}], {"run_id": "t"})
    rec.store.close()  # dirty, but unbound: writes nothing
    Recommender.load(path)  # still verifies
    rec.save(path)
    assert rec.store.path is None and Recommender.load(path).store.counts() == rec.store.counts()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_recommend_from_a_few_chosen_items(fitted):
    """A user without history picks items: the mean of their vectors scores every item, the picks left out."""
    cats = fitted.items.set_index("item_id")["category"]
    cat = cats.iloc[0]
    chosen = [i for i in fitted.item_ids if cats[i] == cat][:3]
    recs = fitted.recommend_from_items(chosen, k=10)
    assert len(recs) == 10 and not {r.item_id for r in recs} & set(chosen)
    assert [r.rank for r in recs] == list(range(1, 11))
    idx = [fitted.item_pos[i] for i in chosen]
    scores = fitted.model.item_embeddings @ fitted.model.item_embeddings[idx].mean(0)
    scores[idx] = -np.inf
    assert [r.item_id for r in recs] == [fitted.item_ids[j] for j in np.argsort(-scores, kind="stable")[:10]]
    same = np.mean([cats[r.item_id] == cat for r in recs])
    assert same > 2 * (cats == cat).mean()  # the picks' category comes back far more often than by chance
    kept = fitted.recommend_from_items(chosen, k=30, exclude_chosen=False)
    full = fitted.model.item_embeddings @ fitted.model.item_embeddings[idx].mean(0)
    assert [r.item_id for r in kept] == [fitted.item_ids[j] for j in np.argsort(-full, kind="stable")[:30]]
    with pytest.raises(UnknownIdError):
        fitted.recommend_from_items(["no-such-item"])
    with pytest.raises(DataError, match="at least one item"):
        fitted.recommend_from_items([])


def test_cli_recommend_from_chosen_items(fitted, tmp_path):
    from typer.testing import CliRunner

    from kgrec.cli import app

    path = fitted.save(tmp_path / "b")
    chosen = fitted.item_ids[:2]
    res = CliRunner().invoke(app, ["recommend", "--bundle", str(path), "--items", ",".join(chosen), "--k", "5",
                                   "--json"])
    assert res.exit_code == 0, res.output
    got = [r["item_id"] for r in json.loads(res.output)]
    assert got == [r.item_id for r in fitted.recommend_from_items(chosen, k=5)]
    res = CliRunner().invoke(app, ["recommend", "--bundle", str(path), "--items", chosen[0], "--explain"])
    assert res.exit_code == 2 and "without USER" in res.output
    res = CliRunner().invoke(app, ["recommend", "--bundle", str(path)])
    assert res.exit_code == 2 and "--query / --items" in res.output


def test_fold_holdout_takes_each_users_latest_or_a_random_share():
    import pandas as pd

    from kgrec.pipeline import fold_holdout, split_is_temporal, temporal_pair_split

    rng = np.random.default_rng(0)
    sizes = {0: 20, 1: 10, 2: 9, 3: 35}  # user 2: fewer than 1 / 0.1 pairs, keeps all
    pairs = pd.DataFrame({"u": np.repeat(list(sizes), list(sizes.values())),
                          "i": np.concatenate([rng.choice(500, n, replace=False) for n in sizes.values()]),
                          "ts": rng.integers(0, 10**6, sum(sizes.values()))})
    held = fold_holdout(pairs, "temporal", 0.1)
    assert pairs[held].groupby("u").size().to_dict() == {0: 2, 1: 1, 3: 3}
    for u, g in pairs.groupby("u"):
        h = held[g.index]
        if h.any():  # the latest of the user's pairs
            assert g["ts"][h].min() >= g["ts"][~h].max()
    rnd = fold_holdout(pairs, "random", 0.1, seed=1)
    assert pairs[rnd].groupby("u").size().to_dict() == {0: 2, 1: 1, 3: 3}
    assert (rnd == fold_holdout(pairs, "random", 0.1, seed=1)).all() and (rnd != held).any()
    with pytest.raises(ValueError, match="temporal or random"):
        fold_holdout(pairs, "by-day", 0.1)
    # the split fit makes itself is temporal; a random one is not
    pairs["split"] = temporal_pair_split(pairs)
    assert split_is_temporal(pairs)
    from fusion.splits import random_split

    pairs["split"] = random_split(pairs["u"].to_numpy(), seed=0)
    assert not split_is_temporal(pairs)


def test_the_ranker_can_learn_from_a_held_out_fold_of_train(fitted, demo_dataset):
    from kgrec.pipeline import event_split_codes, split_pairs

    original = fitted.config.ranking.model_copy()
    v_groups = fitted.metrics["ranker_training"]["train_groups"]
    try:
        out = fitted.refit_ranker(original.model_copy(update={"label_source": "fold"}), dataset=demo_dataset)
        rep = out["ranker_training"]
        fold = rep["fold"]
        assert fold["split"] == "temporal"  # the demo has no split of its own: fit's temporal one
        assert fold["held_pairs"] > 0 and fold["gnn_epochs"] == fitted.model.kept_epochs
        assert set(rep["train_groups_by_source"]) == {"fold"} and rep["train_groups"] > 10
        assert {"gnn", "gnn+ranker"} <= set(out["test"])
        both = fitted.refit_ranker(original.model_copy(update={"label_source": "valid+fold"}), dataset=demo_dataset)
        by = both["ranker_training"]["train_groups_by_source"]
        assert by["heldout"] == v_groups and by["fold"] == rep["train_groups"]
        # what the fold learns from: labels from train pairs held out, candidates and history from the rest only
        events = demo_dataset.events
        pairs = split_pairs(demo_dataset, events, fitted.user_pos, fitted.item_pos, seed=fitted.config.fusion.seed)
        codes = event_split_codes(events, pairs, fitted.user_pos, fitted.item_pos)
        (builder, users, cand, fold_events), _ = fitted._fold_inputs(events, codes, pairs)
        n_i = len(fitted.item_ids)
        train = set((pairs.loc[pairs["split"] == 0, "u"] * n_i + pairs.loc[pairs["split"] == 0, "i"]).tolist())
        key = (fold_events["user_id"].map(fitted.user_pos) * n_i + fold_events["item_id"].map(fitted.item_pos))
        held = set(key.tolist())
        assert held and held <= train
        hist = builder.ctx.history + builder.ctx.touched  # the fold model's feature history: the rest of train
        seen = set((np.repeat(np.arange(hist.shape[0]), np.diff(hist.indptr)) * n_i + hist.indices).tolist())
        assert not seen & held and seen <= train
        picked = set((np.repeat(users, cand.shape[1]) * n_i + cand.ravel())[cand.ravel() >= 0].tolist())
        assert picked & held and not picked & (train - held)  # candidates exclude the rest, may hold the fold
    finally:
        fitted.refit_ranker(original, dataset=demo_dataset)
    assert fitted.metrics["ranker_training"]["train_groups"] == v_groups


def test_a_dataset_without_valid_events_gets_a_ranker_from_a_train_fold(demo_dataset, tiny_encoders, tmp_path):
    import pandas as pd

    from kgrec.data.schema import Dataset

    ev = demo_dataset.events
    pairs = ev[["user_id", "item_id", "timestamp"]].groupby(["user_id", "item_id"], as_index=False).min()
    last = pairs.groupby("user_id")["timestamp"].rank(method="first", ascending=False) <= 1
    split = pd.DataFrame({"user_id": pairs["user_id"], "item_id": pairs["item_id"],
                          "split": np.where(last, "test", "train")})
    ds = Dataset.write(tmp_path / "ds", {"items": demo_dataset.items, "users": demo_dataset.users, "events": ev,
                                         "triples": demo_dataset.triples, "links": demo_dataset.links,
                                         "split": split}, images_from=demo_dataset.root)
    over = {"fusion.epochs": 8, "fusion.dim": 32, "ranking.num_candidates": 50,
            "encoders.cache_dir": str(tmp_path / "cache")}
    rec = Recommender.fit(ds, Config.load(env={}, overrides=over), progress=False, encoders=tiny_encoders)
    assert rec.ranker is None and "gnn+ranker" not in rec.metrics["test"]  # nothing to learn from by default
    over["ranking.label_source"] = "fold"
    rec = Recommender.fit(ds, Config.load(env={}, overrides=over), progress=False, encoders=tiny_encoders)
    rep = rec.metrics["ranker_training"]
    assert rec.ranker is not None and "gnn+ranker" in rec.metrics["test"]
    assert rep["fold"]["split"] == "random"  # no valid split to tell time order from
    assert rep["fold"]["gnn_epochs"] == 8 and rep["valid_groups"] > 0 and rep["train_groups"] > 0
