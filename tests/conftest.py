"""Shared fixtures. Data fixtures live in tests/fixtures_data.py, the real Neo4j server in tests/fixtures_neo4j.py."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures_data", "tests.fixtures_neo4j"]
