"""Data fixtures (owned by the data layer): small generated catalogs, built once per test session.

* ``demo_raw_dir``: raw synthetic catalog (``kgrec.data.synthetic.generate_catalog``): 200 items, 80 users,
  images, seed 0 -> items.jsonl, users.csv, events.csv, triples.csv, links.csv, images/, truth/.
* ``demo_dataset``: that catalog ingested (``kgrec.data.ingest.ingest``) into a ``Dataset`` (truth/ copied in).

Treat both as read-only; copy them (``shutil.copytree``) before modifying.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kgrec.data.schema import Dataset

DEMO_ITEMS = 200
DEMO_USERS = 80
DEMO_SEED = 0


@pytest.fixture(scope="session")
def demo_raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kgrec.data.synthetic import generate_catalog

    out = tmp_path_factory.mktemp("demo_raw")
    generate_catalog(out, n_items=DEMO_ITEMS, n_users=DEMO_USERS, seed=DEMO_SEED, images=True)
    return out


@pytest.fixture(scope="session")
def demo_dataset(demo_raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from kgrec.data.ingest import ingest

    out = tmp_path_factory.mktemp("demo_dataset") / "dataset"
    report = ingest(demo_raw_dir, out)
    assert report.quarantined == 0, report.to_text()
    return Dataset.open(out)
