"""Data fixtures (owned by the data layer): small generated catalogs."""
from __future__ import annotations
