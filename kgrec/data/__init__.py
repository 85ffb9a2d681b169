"""The data layer: records, the on-disk Dataset, readers, validation and the synthetic demo catalog.

This is the lowest stage: ``kg/``, ``encoders/``, ``fusion/`` and ``ranking/`` may import ``kgrec.data``; nothing
in ``kgrec.data`` imports a stage.
"""
from __future__ import annotations

from kgrec.data.schema import (
    EVENT_TYPES,
    Dataset,
    Event,
    Item,
    ItemLink,
    Triple,
    User,
)

__all__ = ["EVENT_TYPES", "Dataset", "Event", "Item", "ItemLink", "Triple", "User"]
