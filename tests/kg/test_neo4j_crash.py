"""Kill -9 the real Neo4j server in the middle of a load, restart it on the same data, load again: the graph must be
exactly the expected one (batches are idempotent MERGEs, so a re-run finishes what the crash interrupted)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from kg.export import hetero_equal
from kgrec.data.schema import Dataset
from tests.kg.conftest import embedded_copy_of


def _medium_dataset(root) -> Dataset:
    rng = np.random.default_rng(7)
    n_users, n_items, n_events = 800, 200, 6_000
    items = pd.DataFrame({
        "item_id": [f"I{i:04d}" for i in range(n_items)],
        "title": [f"item {i}" for i in range(n_items)],
        "brand": [f"B{i % 12}" for i in range(n_items)],
        "category": [f"C{i % 5}>S{i % 15}" for i in range(n_items)],
    })
    events = pd.DataFrame({
        "user_id": [f"U{u:05d}" for u in rng.integers(0, n_users, n_events)],
        "item_id": [f"I{i:04d}" for i in rng.zipf(1.3, n_events) % n_items],
        "type": rng.choice(["view", "click", "purchase"], n_events, p=[0.6, 0.2, 0.2]),
        "timestamp": pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 10**7, n_events), "s"),
    })
    users = pd.DataFrame({"user_id": sorted(events["user_id"].unique())})
    tables = {"items": pa.Table.from_pandas(items, preserve_index=False),
              "users": pa.Table.from_pandas(users, preserve_index=False),
              "events": pa.Table.from_pandas(events, preserve_index=False)}
    return Dataset.write(root, tables)


class _CrashingStore:
    """Builds a Neo4jStore whose ``kill_at``-th write transaction first SIGKILLs the real server, so the crash lands
    in the middle of the load at the same point on fast and slow machines."""

    @staticmethod
    def make(server, kill_at: int):
        from kg.neo4j_store import Neo4jStore

        class Store(Neo4jStore):
            writes = 0

            def _write(self, query, **params):
                Store.writes += 1
                if Store.writes == kill_at:
                    server.kill()
                return super()._write(query, **params)

        return Store(server.uri, server.user, server.password, batch_size=200, max_retry_time_s=1.0,
                     progress=False)


@pytest.mark.neo4j
def test_kill_during_load_then_reload_gives_exact_graph(neo4j_server, tmp_path):
    from kg.neo4j_store import Neo4jStore

    dataset = _medium_dataset(tmp_path / "ds")
    expected = embedded_copy_of(dataset)
    exp_counts = expected.counts()
    assert exp_counts["VIEWED"] > 2_000  # > 10 batches of 200

    store = _CrashingStore.make(neo4j_server, kill_at=12)  # 7 node batches, then the 5th VIEWED batch
    store.clear()
    with pytest.raises(Exception) as crashed:  # the driver gives up once the server is gone
        store.load(dataset)
    store.close()
    assert not neo4j_server.is_running()
    assert "ServiceUnavailable" in type(crashed.value).__name__ or "connect" in str(crashed.value).lower()

    neo4j_server.start()  # same home: crash recovery, same password
    with Neo4jStore(neo4j_server.uri, neo4j_server.user, neo4j_server.password, progress=False) as again:
        partial = again.counts()
        assert partial["User"] == exp_counts["User"]  # node batches before the crash are durable
        assert 0 < partial["VIEWED"] < exp_counts["VIEWED"] and partial["PURCHASED"] == 0
        again.load(dataset)
        assert again.counts() == exp_counts
        assert hetero_equal(again.to_hetero_data()[0], expected.to_hetero_data()[0])
        again.clear()
