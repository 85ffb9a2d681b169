"""Validation of enrichment write-back records, shared by both stores.

Records (from the enrichment stage)::

    {"kind": "attribute", "item_id": "I1", "name": "colour", "value": "red", "confidence": 0.9}
    {"kind": "relation", "type": "SIMILAR_TO", "src": "I1", "dst": "I2", "confidence": 0.8, "evidence": {...}}

Provenance: ``{"run_id": str, "model_ids": [str, ...], "created": ISO-8601 str (now when absent)}``. Written
relationships carry ``source="enrichment"``, ``confidence``, ``run_id``, ``model_ids``, ``created`` (relations also
``evidence`` as JSON text). Values from the data (``source="data"``) are never replaced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from kg.loading import ENRICHMENT_SOURCE, attribute_value_id, evidence_json
from kgrec.errors import GraphStoreError

ENRICHMENT_RELS = ("SIMILAR_TO", "COMPLEMENTS", "DUPLICATE_OF")


@dataclass
class EnrichmentPlan:
    attributes: list[dict[str, Any]] = field(default_factory=list)  # item_id, name, value, av_id, props
    relations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # rel -> src, dst, props
    invalid: int = 0  # records dropped before touching the store (duplicates, self-relations)

    @property
    def total(self) -> int:
        return len(self.attributes) + sum(len(v) for v in self.relations.values()) + self.invalid


def plan_enrichment(records: Iterable[dict[str, Any]], provenance: dict[str, Any]) -> EnrichmentPlan:
    """Check records and provenance, drop duplicates (first wins) and build the properties to write."""
    run_id = provenance.get("run_id")
    if not run_id or not isinstance(run_id, str):
        raise GraphStoreError("enrichment provenance needs a non-empty string 'run_id'")
    raw_ids = provenance.get("model_ids", [])
    model_ids = [raw_ids] if isinstance(raw_ids, str) else [str(m) for m in raw_ids]  # "clip" is one id
    created = str(provenance.get("created") or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    base = {"source": ENRICHMENT_SOURCE, "run_id": run_id, "model_ids": model_ids, "created": created}
    plan = EnrichmentPlan()
    seen: set[tuple[str, ...]] = set()
    for n, rec in enumerate(records):
        kind = rec.get("kind")
        try:
            confidence = float(rec.get("confidence", 1.0))
        except (TypeError, ValueError) as exc:
            raise GraphStoreError(f"enrichment record {n}: confidence {rec.get('confidence')!r} is not a number") from exc
        if not -1e-6 <= confidence <= 1.0 + 1e-6:  # NaN fails too (it would become a NaN edge_weight)
            raise GraphStoreError(f"enrichment record {n}: confidence {confidence!r} is not in [0, 1]")
        confidence = min(max(confidence, 0.0), 1.0)  # float rounding of a cosine
        if kind == "attribute":
            try:
                item_id, name, value = str(rec["item_id"]), str(rec["name"]), str(rec["value"])
            except KeyError as exc:
                raise GraphStoreError(f"enrichment record {n}: attribute records need item_id, name, value") from exc
            key = ("attribute", item_id, name, value)
            if key in seen:
                plan.invalid += 1
                continue
            seen.add(key)
            plan.attributes.append({
                "item_id": item_id, "name": name, "value": value, "av_id": attribute_value_id(name, value),
                "props": {**base, "confidence": confidence},
            })
        elif kind == "relation":
            rel = rec.get("type")
            if rel not in ENRICHMENT_RELS:
                raise GraphStoreError(
                    f"enrichment record {n}: relation type {rel!r} is not one of {list(ENRICHMENT_RELS)}"
                )
            try:
                src, dst = str(rec["src"]), str(rec["dst"])
            except KeyError as exc:
                raise GraphStoreError(f"enrichment record {n}: relation records need src and dst") from exc
            key = ("relation", rel, src, dst)
            if key in seen or src == dst:
                plan.invalid += 1
                continue
            seen.add(key)
            props = {**base, "confidence": confidence}
            ev = evidence_json(rec.get("evidence"))
            if ev is not None:
                props["evidence"] = ev
            plan.relations.setdefault(rel, []).append({"src": src, "dst": dst, "props": props})
        else:
            raise GraphStoreError(f"enrichment record {n}: kind {kind!r} is not 'attribute' or 'relation'")
    return plan
