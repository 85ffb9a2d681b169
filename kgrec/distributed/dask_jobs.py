"""Stages on a Dask cluster (``dask.distributed``): the same functions as the single-machine path, per partition.

Each job takes a ``distributed.Client`` (a ``LocalCluster`` or a real scheduler, see :func:`dask_client`) and
returns exactly what the single-process code returns:

* :func:`validate_events_dask` - event validation per partition (row groups of a Parquet file, or slices of an
  Arrow table) with :func:`kgrec.data.validation.validate_events`, then one global exact-duplicate merge: the kept
  rows, quarantine reasons and merged count equal ``validate_events`` on the whole table.
* :func:`encode_texts_dask` / :func:`encode_items_dask` - the text encoder is built **once per worker** by a
  worker plugin (:class:`TextEncoderPlugin`) and partitions of item texts are encoded where they land; with a GPU
  per worker the plugin puts the model on it (``device="auto"``).
* :func:`build_features_dask` - the :class:`~ranking.context.RankingContext` travels once to every worker (the
  :class:`FeatureBuilderPlugin` builds a ``FeatureBuilder`` there); partitions of users are featurised in parallel.
  Features are row-wise per user, so the result is identical to ``FeatureBuilder.build`` on all users.
* :func:`train_ranker_dask` - LightGBM's own distributed ranker (``lightgbm.DaskLGBMRanker``, data-parallel
  histograms across workers) on partitions that never split a query group; returns our :class:`~ranking.ranker.
  Ranker` (same save format, same ``predict``).

Nothing here pickles user-facing files: results come back as arrays/tables and are saved by the usual writers.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
from distributed.diagnostics.plugin import WorkerPlugin

from kgrec.config import DataConfig, RankingConfig
from kgrec.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ENGINES = ("local", "dask")
TEXT_PLUGIN = "kgrec-text-encoder"
FEATURE_PLUGIN = "kgrec-feature-builder"


# ---------------------------------------------------------------------------------------------------- clusters
@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    *,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    processes: bool = True,
    memory_limit: str | int = "auto",
) -> Iterator[Any]:
    """A ``distributed.Client``: connected to ``scheduler`` (``tcp://host:8786``) or to a new ``LocalCluster``.

    A cluster started here is closed on exit; a remote scheduler is only disconnected from. Workers of a local
    cluster are separate processes (``processes=True``) so each holds its own model and its own GIL.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        _probe(scheduler)
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {scheduler}: {exc}. Start one with `dask scheduler` and "
                "workers with `dask worker ADDRESS`, or run with --engine local"
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=processes,
        memory_limit=memory_limit,
        dashboard_address=None,
        host="127.0.0.1",
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _probe(scheduler: str, timeout_s: float = 5.0) -> None:
    """Fail fast (instead of the client's 30 s of retries) when nothing listens at a ``tcp://host:port`` address."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(scheduler if "://" in scheduler else f"tcp://{scheduler}")
    if parts.scheme != "tcp" or not parts.hostname:
        return  # tls://, ucx://, inproc://: leave it to the client
    try:
        socket.create_connection((parts.hostname, parts.port or 8786), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {scheduler}: {exc}. Start one with `dask scheduler` and "
            "workers with `dask worker ADDRESS`, or run with --engine local"
        ) from exc


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    return engine


def partition_bounds(n: int, n_partitions: int) -> list[tuple[int, int]]:
    """``n_partitions`` contiguous ``[start, stop)`` ranges covering ``range(n)``, sizes differing by at most 1."""
    n_partitions = max(1, min(int(n_partitions), max(n, 1)))
    edges = np.linspace(0, n, n_partitions + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _workers(client: Any) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


# ---------------------------------------------------------------------------------------------------- validation
@dataclass
class EventValidation:
    """Outcome of :func:`validate_events_dask`.

    Attributes:
        table: kept events in the dataset schema (partition order, first occurrence of exact duplicates kept).
        quarantine: quarantined rows (``kgrec.data.validation.QUARANTINE_SCHEMA``: file, line, reason, message...).
        read: rows read; merged: exact duplicates merged away (``read == kept + quarantined`` and
        ``len(table) == kept - merged``).
    """

    table: pa.Table
    quarantine: pa.Table
    read: int
    merged: int
    partitions: int

    @property
    def kept(self) -> int:
        return self.table.num_rows + self.merged

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.quarantine.column("reason").to_pylist():
            out[r] = out.get(r, 0) + 1
        return out


def _read_event_row_group(path: str, group: int, first_line: int) -> tuple[pa.Table, list[dict[str, Any]]]:
    """One Parquet row group as a raw event table with ``__file``/``__line`` (1-based row number in the file), read
    exactly as ``read_parquet`` reads the whole file, and its rows with invalid UTF-8 as quarantine records."""
    import pyarrow.parquet as pq

    from kgrec.data.readers import _decode_columns, _with_origin, normalise_parquet_columns

    table = normalise_parquet_columns(pq.ParquetFile(path).read_row_group(group))
    lines = np.arange(first_line, first_line + table.num_rows, dtype=np.int64)
    table, lines, rejected = _decode_columns(table, Path(path).name, lines)
    return _with_origin(table, Path(path).name, lines), rejected


def _validate_event_partition(
    part: pa.Table | tuple[str, int, int], config: DataConfig, known_items: pa.Array, known_users: pa.Array | None
) -> tuple[pa.Table, pa.Table, int]:
    """(kept, quarantine, merged within the partition) for one partition; runs on a worker."""
    from kgrec.data.readers import RawTable
    from kgrec.data.validation import validate_events

    table, rejected = _read_event_row_group(*part) if isinstance(part, tuple) else (part, [])
    res = validate_events(RawTable("events", table, rejected), config, known_items, known_users)
    return res.table, res.quarantine, res.merged


def validate_events_dask(
    client: Any,
    events: pa.Table | str | Path,
    known_items: Sequence[str] | pa.Array,
    known_users: Sequence[str] | pa.Array | None = None,
    *,
    config: DataConfig | None = None,
    n_partitions: int | None = None,
) -> EventValidation:
    """Validate raw events on the cluster, one task per partition, with the single-machine rules.

    Args:
        client: a ``distributed.Client``.
        events: a raw events Parquet file (one task per row group, read on the worker: nothing passes through the
            client) or an Arrow table as a reader returns it (with ``__file``/``__line``; sliced into
            ``n_partitions`` and scattered).
        known_items / known_users: ids of the kept catalog items / users file (``None`` = implicit users).
        config: validation limits.
        n_partitions: partitions of an in-memory table (default: 2 per worker).
    """
    from kgrec.data.validation import QUARANTINE_SCHEMA, merge_exact_duplicates

    config = config or DataConfig()
    items = known_items if isinstance(known_items, pa.Array) else pa.array(list(known_items), pa.string())
    users = None
    if known_users is not None:
        users = known_users if isinstance(known_users, pa.Array) else pa.array(list(known_users), pa.string())
    # The id sets go to every worker once, not once per task.
    items_f, users_f = client.scatter([items, users], broadcast=True)
    if isinstance(events, (str, Path)):
        import pyarrow.parquet as pq

        path = str(Path(events).resolve())  # workers resolve relative paths in their own working directory
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read {path} as Parquet: {exc}") from exc
        parts: list[Any] = []
        line = 1
        for g in range(meta.num_row_groups):
            parts.append((path, g, line))
            line += meta.row_group(g).num_rows
        read = line - 1
    else:
        read = events.num_rows
        bounds = partition_bounds(read, n_partitions or 2 * _workers(client))
        parts = client.scatter([events.slice(a, b - a) for a, b in bounds], hash=False)  # slices share buffers: no content keys
    futures = [client.submit(_validate_event_partition, p, config, items_f, users_f, pure=False) for p in parts]
    results = client.gather(futures)
    kept = pa.concat_tables([r[0] for r in results]) if results else pa.table({})
    quarantine = pa.concat_tables([r[1] for r in results]) if results else QUARANTINE_SCHEMA.empty_table()
    merged = sum(r[2] for r in results)
    # Exact duplicates can sit in different partitions: one global pass over the (already clean) kept rows.
    kept, more = merge_exact_duplicates(kept)
    logger.info("validated %d events in %d partitions: %d kept, %d quarantined, %d merged",
                read, len(parts), kept.num_rows, quarantine.num_rows, merged + more)
    return EventValidation(kept, quarantine, read, merged + more, len(parts))


# ---------------------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class TextEncoderSpec:
    """How a worker builds its :class:`~encoders.text.TextEncoder` (the model itself never travels).

    ``model`` is ``packaged:all-MiniLM-L6-v2``, a checkpoint directory every worker can read, or a hub name; with
    ``bert_config`` set, a seeded random BERT of that shape is built instead (tests, experiments).
    """

    model: str = "packaged:all-MiniLM-L6-v2"
    max_length: int = 128
    batch_size: int = 64
    device: str = "auto"
    bert_config: dict[str, Any] | None = None
    seed: int = 0
    torch_threads: int | None = 1  # per worker; None leaves torch's default

    def build(self) -> Any:
        from encoders.static import STATIC_PREFIX, static_encoder_from_name
        from encoders.text import TextEncoder

        kw = dict(max_length=self.max_length, batch_size=self.batch_size, device=self.device)
        if self.bert_config is not None:
            return TextEncoder.from_config(dict(self.bert_config), seed=self.seed, **kw)
        if self.model.startswith(STATIC_PREFIX):  # encoders.text_model: static:<DIR or base>
            return static_encoder_from_name(self.model)
        return TextEncoder(self.model, **kw)


class TextEncoderPlugin(WorkerPlugin):
    """Worker plugin: builds the text encoder once when a worker joins (or when registered) and keeps it."""

    name = TEXT_PLUGIN

    def __init__(self, spec: TextEncoderSpec):
        self.spec = spec
        self.encoder: Any = None

    def setup(self, worker: Any) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.spec.torch_threads:
            import torch

            torch.set_num_threads(self.spec.torch_threads)
        self.encoder = self.spec.build()
        logger.info("worker %s: text encoder %s on %s", getattr(worker, "address", "?"), self.encoder.model_id,
                    self.encoder.device)

    def teardown(self, worker: Any) -> None:
        self.encoder = None


def _worker_plugin(name: str) -> Any:
    from distributed import get_worker

    plugin = get_worker().plugins.get(name)
    if plugin is None:
        raise RuntimeError(f"worker plugin {name!r} is not registered on this worker")
    return plugin


def _encode_partition(texts: list[str]) -> np.ndarray:
    return _worker_plugin(TEXT_PLUGIN).encoder.encode(texts)


def _worker_model_ids(dask_worker: Any) -> str:
    return dask_worker.plugins[TEXT_PLUGIN].encoder.model_id


def _worker_text_spec(dask_worker: Any) -> TextEncoderSpec | None:
    plugin = dask_worker.plugins.get(TEXT_PLUGIN)
    return None if plugin is None or plugin.encoder is None else plugin.spec


def ensure_text_encoders(client: Any, spec: TextEncoderSpec) -> str:
    """Load the encoder described by ``spec`` on every worker unless it is already there; returns its model id.

    Workers that join later get it too (a registered worker plugin runs on every new worker).
    """
    specs = client.run(_worker_text_spec)
    if not specs or any(s != spec for s in specs.values()):
        client.register_plugin(TextEncoderPlugin(spec), name=TEXT_PLUGIN)
    ids = set(client.run(_worker_model_ids).values())
    if len(ids) != 1:
        raise ConfigError(f"workers built different text encoders {sorted(ids)}; give every worker the same model")
    return ids.pop()


def encode_texts_dask(
    client: Any, texts: Sequence[str], spec: TextEncoderSpec, *, partition_size: int = 2048
) -> tuple[np.ndarray, str]:
    """Encode ``texts`` with one encoder per worker; returns ``((n, dim) float32 L2-normalised, model_id)``.

    Rows come back in input order. Every worker must build the same weights (checked through the model ids); the
    model is loaded once per worker and reused by later calls with the same spec.
    """
    model_id = ensure_text_encoders(client, spec)
    texts = list(texts)
    bounds = partition_bounds(len(texts), -(-len(texts) // partition_size)) if texts else []
    futures = [client.submit(_encode_partition, texts[a:b], pure=False) for a, b in bounds]
    parts = client.gather(futures)
    if not parts:
        return np.zeros((0, spec.build().dim if spec.bert_config else 384), dtype=np.float32), model_id
    return np.concatenate(parts).astype(np.float32, copy=False), model_id


def _item_text_partition(path: str, group: int) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    from encoders.items import item_text

    rows = pq.ParquetFile(path).read_row_group(group).to_pylist()
    return [r["item_id"] for r in rows], [item_text(r) for r in rows]


def _encode_item_partition(path: str, group: int) -> tuple[list[str], np.ndarray]:
    ids, texts = _item_text_partition(path, group)
    vecs = _encode_partition(texts)
    empty = np.array([not t.strip() for t in texts], dtype=bool)
    vecs[empty] = 0.0  # as encode_dataset: items without text get a zero row
    return ids, vecs


def encode_items_dask(client: Any, items_parquet: str | Path, spec: TextEncoderSpec) -> tuple[list[str], np.ndarray, str]:
    """Text vectors of a catalog's ``items.parquet``: each worker reads its row groups, builds
    :func:`~encoders.items.item_text` and encodes. Returns ``(item_ids, (n, dim) float32, model_id)`` in file
    order, the same rows ``encode_dataset(...).text`` holds."""
    import pyarrow.parquet as pq

    model_id = ensure_text_encoders(client, spec)
    path = str(Path(items_parquet).resolve())  # workers resolve relative paths in their own working directory
    groups = pq.ParquetFile(path).metadata.num_row_groups
    parts = client.gather([client.submit(_encode_item_partition, path, g, pure=False) for g in range(groups)])
    ids = [i for p in parts for i in p[0]]
    return ids, np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False), model_id


# ---------------------------------------------------------------------------------------------------- features
class FeatureBuilderPlugin(WorkerPlugin):
    """Worker plugin holding a ``FeatureBuilder`` over a ranking context shipped once to each worker."""

    name = FEATURE_PLUGIN

    def __init__(self, context: Any, names: tuple[str, ...] | None = None):
        self.context = context
        self.names = names
        self.builder: Any = None

    def setup(self, worker: Any) -> None:
        from ranking.features import FeatureBuilder

        self.builder = FeatureBuilder(self.context, self.names)

    def teardown(self, worker: Any) -> None:
        self.builder = None


def _feature_partition(user_index: np.ndarray, candidates: np.ndarray, query: np.ndarray | None
                       ) -> tuple[tuple[str, ...], np.ndarray]:
    fm = _worker_plugin(FEATURE_PLUGIN).builder.build(user_index, candidates, query)
    return fm.names, fm.X


def build_features_dask(
    client: Any,
    context: Any,
    user_index: np.ndarray,
    candidates: np.ndarray,
    *,
    query_vectors: np.ndarray | None = None,
    users_per_partition: int = 2000,
    register: bool = True,
    names: tuple[str, ...] | None = None,
) -> Any:
    """``FeatureBuilder(context, names).build(user_index, candidates, query_vectors)`` computed per user partition.

    Args:
        context: the :class:`~ranking.context.RankingContext` (sent to each worker once, with the plugin).
        user_index: (n,) dense user indices; candidates: (n, C) item indices.
        users_per_partition: users per task (bounds each task's dense buffers).
        register: False reuses the plugin registered by an earlier call with the same context and names.
        names: the columns (a ranker's ``feature_names``; default the default columns, ``FEATURE_NAMES``).

    Returns:
        a :class:`~ranking.features.FeatureMatrix` with ``X`` (n * C, F) float32, user-major, identical to the
        single-process build.
    """
    from ranking.features import FeatureBuilder, FeatureMatrix, check_feature_names

    names = FeatureBuilder.names if names is None else check_feature_names(names)
    user_index = np.asarray(user_index, dtype=np.int64).ravel()
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or candidates.shape[0] != len(user_index):
        raise ValueError(f"candidates must be (n_users, C) for {len(user_index)} users, got {candidates.shape}")
    # A retrieval scorer (a Recommender's context has one: its GNN + EASE scores) lives with the model on this
    # machine and cannot be shipped: the workers build every other column, its gnn_score column is scored here.
    scorer = getattr(context, "retrieval_scorer", None)
    if scorer is not None:
        import copy

        context = copy.copy(context)  # not dataclasses.replace: that would re-run __post_init__ (renormalising)
        context.retrieval_scorer = None
    if register:
        client.register_plugin(FeatureBuilderPlugin(context, names), name=FEATURE_PLUGIN)
    q = None if query_vectors is None else np.asarray(query_vectors, dtype=np.float32)
    per_user_q = q is not None and q.ndim == 2
    bounds = partition_bounds(len(user_index), -(-len(user_index) // users_per_partition))
    futures = [
        client.submit(_feature_partition, user_index[a:b], candidates[a:b], q[a:b] if per_user_q else q, pure=False)
        for a, b in bounds
    ]
    parts = client.gather(futures)
    built = {p[0] for p in parts}
    if built - {names}:  # a plugin registered earlier (register=False) builds other columns
        raise ValueError(f"the workers' feature builder makes {list(next(iter(built - {names})))}, not the "
                         f"{list(names)} asked for: call with register=True to ship a builder for these columns")
    X = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, len(names)), np.float32)
    if scorer is not None and len(X) and "gnn_score" in names:
        X[:, names.index("gnn_score")] = np.asarray(scorer(user_index, candidates), dtype=np.float32).ravel()
    return FeatureMatrix(X=X, names=names, user_index=user_index, candidates=candidates)


# ---------------------------------------------------------------------------------------------------- ranker
def _group_aligned_chunks(group: np.ndarray, n_chunks: int) -> list[tuple[int, int, int, int]]:
    """Split groups into ``n_chunks`` runs: ``(group_start, group_stop, row_start, row_stop)`` per chunk."""
    offsets = np.concatenate([[0], np.cumsum(group)])
    out = []
    for ga, gb in partition_bounds(len(group), n_chunks):
        out.append((ga, gb, int(offsets[ga]), int(offsets[gb])))
    return out


def train_ranker_dask(
    client: Any,
    X: np.ndarray,
    y: np.ndarray,
    group: np.ndarray,
    *,
    config: RankingConfig | None = None,
    feature_names: Sequence[str] | None = None,
    n_chunks: int | None = None,
) -> Any:
    """Train LambdaRank with ``lightgbm.DaskLGBMRanker`` (LightGBM's own data-parallel training across workers).

    Rows are cut into ``n_chunks`` (default: one per worker) at group boundaries, so no query is split between
    workers. The same hyper-parameters as :class:`~ranking.ranker.Ranker` are used; there is no early stopping
    (LightGBM's Dask interface does not support it with a validation set in 4.x for rankers reliably), so
    ``n_estimators`` trees are grown. Returns a :class:`~ranking.ranker.Ranker` holding the booster.
    """
    import dask.array as da
    import lightgbm as lgb

    from ranking.ranker import Ranker, _column_medians

    cfg = config or RankingConfig()
    ranker = Ranker(cfg, feature_names)
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int32)
    group = np.asarray(group, dtype=np.int64)
    if group.sum() != len(X):
        raise ValueError(f"group sizes sum to {group.sum()} but X has {len(X)} rows")
    chunks = _group_aligned_chunks(group, n_chunks or _workers(client))
    row_chunks = tuple(r1 - r0 for _, _, r0, r1 in chunks)
    group_chunks = tuple(g1 - g0 for g0, g1, _, _ in chunks)
    dX = da.from_array(X, chunks=(row_chunks, X.shape[1]))
    dy = da.from_array(y, chunks=(row_chunks,))
    dg = da.from_array(group, chunks=(group_chunks,))
    model = lgb.DaskLGBMRanker(client=client, **ranker.lgbm_params())
    model.fit(dX, dy, group=dg, feature_name=list(ranker.feature_names))
    ranker.booster_ = model.booster_
    ranker.best_iteration_ = ranker.booster_.current_iteration()
    ranker.medians_ = _column_medians(X)
    ranker.metrics_ = {"best_iteration": ranker.best_iteration_, "train_rows": int(len(X)),
                       "train_groups": int(len(group)), "engine": "dask", "chunks": len(chunks)}
    logger.info("dask ranker trained: %s", ranker.metrics_)
    return ranker

