"""Dask jobs on a real ``LocalCluster`` (2 worker processes, 1 thread each) give the single-process results.

Tolerances: event validation and feature matrices are exactly equal; text vectors within atol 1e-5 (different
batch padding per partition); the Dask-trained LambdaRank ranker within 0.05 test NDCG@20 of the local ranker
(LightGBM's data-parallel histograms are not bit-identical to one machine's) and both well above retrieval order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("distributed")

from kgrec.distributed.dask_jobs import (  # noqa: E402
    TextEncoderSpec,
    build_features_dask,
    dask_client,
    encode_items_dask,
    encode_texts_dask,
    partition_bounds,
    train_ranker_dask,
    validate_events_dask,
)

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def client():
    with dask_client(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB") as c:
        assert len(c.scheduler_info()["workers"]) == 2
        yield c


def test_partition_bounds_cover_range_exactly() -> None:
    for n, k in [(0, 3), (1, 4), (10, 3), (1001, 7)]:
        b = partition_bounds(n, k)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(x[1] == y[0] for x, y in zip(b, b[1:]))
        sizes = [s - a for a, s in b]
        assert max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------------------------------------ validation
@pytest.fixture(scope="module")
def noisy_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kgrec.data.synthetic import generate_catalog

    out = tmp_path_factory.mktemp("noisy_raw")
    generate_catalog(out, n_items=150, n_users=60, seed=4, images=False, noise=0.05)
    return out


def _sorted_rows(t: pa.Table) -> list[tuple]:
    cols = t.column_names
    return sorted(tuple(str(r[c]) for c in cols) for r in t.to_pylist())


def test_event_validation_per_partition_equals_single_process(client, noisy_raw: Path) -> None:
    from kgrec.config import DataConfig
    from kgrec.data.readers import read_source
    from kgrec.data.validation import validate_source

    raw = read_source(noisy_raw, "auto")
    whole = validate_source(raw, DataConfig())
    ev = whole.results["events"]
    assert ev.quarantined > 10  # the planted errors are there to be found
    items = whole.results["items"].table.column("item_id").combine_chunks()
    users = whole.results["users"].table.column("user_id").combine_chunks() if "users" in raw.tables else None
    raw_events = raw.tables["events"].table
    # duplicate a block of rows into another partition: the global merge must catch cross-partition duplicates
    dup = raw_events.slice(5, 20)
    raw_plus = pa.concat_tables([raw_events, dup])
    single = validate_source_events(raw_plus, items, users)
    out = validate_events_dask(client, raw_plus, items, users, n_partitions=5)
    assert out.partitions == 5
    assert out.read == raw_plus.num_rows == single.read
    assert out.read == out.kept + out.quarantine.num_rows
    assert out.merged == single.merged >= 20
    assert out.reasons() == single.reasons
    assert out.table.num_rows == single.table.num_rows
    assert _sorted_rows(out.table) == _sorted_rows(single.table)
    q = sorted(zip(out.quarantine.column("line").to_pylist(), out.quarantine.column("reason").to_pylist()))
    q1 = sorted(zip(single.quarantine.column("line").to_pylist(), single.quarantine.column("reason").to_pylist()))
    assert q == q1  # same rows, same reasons, same line numbers


def validate_source_events(table: pa.Table, items: pa.Array, users: pa.Array | None):
    from kgrec.config import DataConfig
    from kgrec.data.readers import RawTable
    from kgrec.data.validation import validate_events

    return validate_events(RawTable("events", table), DataConfig(), items, users)


def test_event_validation_from_parquet_row_groups(client, tmp_path: Path, noisy_raw: Path) -> None:
    from kgrec.data.readers import FILE_COL, LINE_COL, read_source

    raw = read_source(noisy_raw, "auto")
    t = raw.tables["events"].table.drop_columns([FILE_COL, LINE_COL])
    path = tmp_path / "events.parquet"
    pq.write_table(t, path, row_group_size=300)
    assert pq.ParquetFile(path).metadata.num_row_groups >= 3
    items = pa.array(sorted(set(t.column("item_id").to_pylist()) - {None}), pa.string())
    out = validate_events_dask(client, path, items, None)
    from kgrec.data.readers import read_parquet

    single = validate_source_events(read_parquet(path).table, items, None)
    assert out.partitions == pq.ParquetFile(path).metadata.num_row_groups
    assert out.reasons() == single.reasons
    assert _sorted_rows(out.table) == _sorted_rows(single.table)
    assert sorted(out.quarantine.column("line").to_pylist()) == sorted(single.quarantine.column("line").to_pylist())


def test_parquet_row_groups_quarantine_invalid_utf8_like_the_reader(client, tmp_path: Path, noisy_raw: Path) -> None:
    """Rows whose bytes are not UTF-8 are quarantined by the workers exactly as ``read_parquet`` rejects them."""
    from kgrec.config import DataConfig
    from kgrec.data.readers import FILE_COL, LINE_COL, read_parquet, read_source
    from kgrec.data.validation import validate_events

    raw = read_source(noisy_raw, "auto")
    t = raw.tables["events"].table.drop_columns([FILE_COL, LINE_COL])
    users = [None if u is None else u.encode() for u in t.column("user_id").to_pylist()]
    bad_rows = [3, 301, 302, len(users) - 1]
    for i in bad_rows:
        users[i] = b"U\xff\xfe" + (users[i] or b"")
    t = t.set_column(t.column_names.index("user_id"), "user_id", pa.array(users, pa.binary()))
    path = tmp_path / "events_bytes.parquet"
    pq.write_table(t, path, row_group_size=300)
    items = pa.array(sorted(set(t.column("item_id").to_pylist()) - {None}), pa.string())
    out = validate_events_dask(client, path, items, None)
    single = validate_events(read_parquet(path), DataConfig(), items, None)
    assert out.reasons() == single.reasons
    assert out.reasons().get("invalid_utf8", 0) == len(bad_rows)
    assert _sorted_rows(out.table) == _sorted_rows(single.table)
    assert sorted(out.quarantine.column("line").to_pylist()) == sorted(single.quarantine.column("line").to_pylist())
    assert {i + 1 for i in bad_rows} <= set(out.quarantine.column("line").to_pylist())


# ------------------------------------------------------------------------------------------------ encoding
def test_text_encoding_one_model_per_worker_matches_local(client, tmp_path: Path) -> None:
    from encoders.items import item_text
    from encoders.text import TextEncoder
    from kgrec.data.synthetic import generate_catalog

    spec = TextEncoderSpec(bert_config=TINY_BERT, seed=3, batch_size=16, device="cpu")
    local = TextEncoder.from_config(TINY_BERT, seed=3, batch_size=64, device="cpu")
    texts = [f"item {i} {'red ' * (i % 7)}running shoes with a {'long ' * (i % 13)}description" for i in range(300)]
    texts[17] = ""
    vec, model_id = encode_texts_dask(client, texts, spec, partition_size=64)
    ref = local.encode(texts)
    assert model_id == local.model_id
    assert vec.shape == ref.shape == (300, 32) and vec.dtype == np.float32
    np.testing.assert_allclose(vec, ref, atol=1e-5)
    # two plugins on two workers: each worker built its own model once
    model_ids = client.run(lambda dask_worker: id(dask_worker.plugins["kgrec-text-encoder"].encoder))
    assert len(set(model_ids)) == 2

    raw = tmp_path / "raw"
    generate_catalog(raw, n_items=120, n_users=20, seed=1, images=False, fmt="parquet")
    items = pq.read_table(raw / "items.parquet")
    pq.write_table(items, tmp_path / "items.parquet", row_group_size=25)
    ids, item_vec, _ = encode_items_dask(client, tmp_path / "items.parquet", spec)
    assert ids == items.column("item_id").to_pylist()
    np.testing.assert_allclose(item_vec, local.encode([item_text(r) for r in items.to_pylist()]), atol=1e-5)
    # the same spec again: the models already on the workers are reused, not reloaded
    assert client.run(lambda dask_worker: id(dask_worker.plugins["kgrec-text-encoder"].encoder)) == model_ids


# ------------------------------------------------------------------------------------------------ ranking
@pytest.fixture(scope="module")
def ranking_setup():
    from ranking.features import FeatureBuilder
    from ranking.ranker import build_training_set, top_candidates
    from tests.ranking.world import context_from_world, make_world

    world = make_world(n_users=240, n_items=200, seed=5, test_events=8)
    ctx = context_from_world(world)
    cand, _ = top_candidates(ctx.user_vectors, ctx.item_vectors, 40, exclude=ctx.interactions["purchase"])
    builder = FeatureBuilder(ctx)
    return world, ctx, cand, builder, build_training_set


def test_feature_matrices_identical_to_single_process(client, ranking_setup) -> None:
    world, ctx, cand, builder, _ = ranking_setup
    users = np.arange(ctx.num_users)
    ref = builder.build(users, cand)
    out = build_features_dask(client, ctx, users, cand, users_per_partition=37)
    assert out.X.shape == ref.X.shape == (ctx.num_users * 40, len(ref.names))
    np.testing.assert_array_equal(np.isnan(out.X), np.isnan(ref.X))
    np.testing.assert_array_equal(np.nan_to_num(out.X), np.nan_to_num(ref.X))
    # with one query vector for all users, and reusing the registered plugin
    q = ctx.item_text[3]
    ref_q = builder.build(users[:50], cand[:50], q)
    out_q = build_features_dask(client, ctx, users[:50], cand[:50], query_vectors=q, users_per_partition=20,
                                register=False)
    np.testing.assert_array_equal(np.nan_to_num(out_q.X), np.nan_to_num(ref_q.X))
    assert np.isfinite(out_q.column("query_similarity")).all()
    # a ranker's own columns (opt-in ones included), by name and in its order
    from ranking.features import FeatureBuilder

    names = ("co_buyer_cosine", "gnn_score", "item_events_near_user_time", "kg_paths_total")
    out_n = build_features_dask(client, ctx, users[:50], cand[:50], users_per_partition=20, names=names)
    ref_n = FeatureBuilder(ctx, names).build(users[:50], cand[:50])
    assert out_n.names == names
    np.testing.assert_array_equal(np.nan_to_num(out_n.X), np.nan_to_num(ref_n.X))
    with pytest.raises(ValueError, match="register=True"):  # the registered plugin builds those 4, not the default
        build_features_dask(client, ctx, users[:50], cand[:50], register=False)


def test_a_context_with_a_retrieval_scorer_is_built_on_workers_and_scored_here(client, ranking_setup) -> None:
    """A Recommender's context scores gnn_score with its model (a bound method holding locks: not picklable):
    the workers build the other columns and the scorer fills gnn_score here, identical to the one-process build."""
    import copy
    import threading

    from ranking.features import FeatureBuilder

    world, ctx, cand, _, _ = ranking_setup
    lock = threading.Lock()  # what makes a Recommender's bound method unpicklable

    def scorer(u: np.ndarray, c: np.ndarray) -> np.ndarray:
        with lock:
            return np.einsum("nd,ncd->nc", ctx.user_vectors[u], ctx.item_vectors[c]) + 0.5 * c

    scored = copy.copy(ctx)
    scored.retrieval_scorer = scorer
    users = np.arange(60)
    ref = FeatureBuilder(scored).build(users, cand[:60])
    out = build_features_dask(client, scored, users, cand[:60], users_per_partition=25)
    np.testing.assert_array_equal(np.nan_to_num(out.X), np.nan_to_num(ref.X))
    np.testing.assert_allclose(out.column("gnn_score"), ref.column("gnn_score"))
    assert not np.allclose(out.column("gnn_score"), FeatureBuilder(ctx).build(users, cand[:60]).column("gnn_score"))


def test_dask_lgbm_ranker_close_to_local_ranker(client, ranking_setup) -> None:
    from kgrec.config import RankingConfig
    from ranking.ranker import Ranker, ndcg_at_k

    world, ctx, cand, builder, build_training_set = ranking_setup
    users = np.arange(ctx.num_users)
    tr, te = users[:170], users[170:]
    train = build_training_set(builder, tr, cand[tr], world.test_events)
    test = build_training_set(builder, te, cand[te], world.test_events)
    cfg = RankingConfig(n_estimators=60, learning_rate=0.08, num_leaves=15, seed=7, n_jobs=1, min_child_samples=10)
    local = Ranker(cfg).fit(train.X, train.y, train.group)
    dist = train_ranker_dask(client, train.X, train.y, train.group, config=cfg)
    nd_local = ndcg_at_k(local.predict(test.X), test.y, test.group)
    nd_dask = ndcg_at_k(dist.predict(test.X), test.y, test.group)
    shuffled = Ranker(cfg).fit(train.X, np.random.default_rng(0).permutation(train.y), train.group)
    nd_control = ndcg_at_k(shuffled.predict(test.X), test.y, test.group)
    assert dist.metrics_["chunks"] == 2
    assert abs(nd_dask - nd_local) < 0.05, (nd_dask, nd_local)
    assert nd_dask > nd_control + 0.02, (nd_dask, nd_control)  # it learned from the labels
    assert dist.booster_.num_trees() == 60
