"""Offline catalog enrichment: infer missing attribute values (calibrated), find near-duplicate listings, derive
``SIMILAR_TO`` / ``COMPLEMENTS`` relations, and write them to a ``GraphStore`` with provenance.

    from kgrec.enrichment import enrich
    report = enrich(dataset, embeddings, store, clip_encoder=clip, dry_run=True, out_dir="enrichment-review")
    print(report.to_text())
"""
from __future__ import annotations

from kgrec.enrichment.job import RECORD_COLUMNS, EnrichmentReport, enrich, read_review_file

__all__ = ["RECORD_COLUMNS", "EnrichmentReport", "enrich", "read_review_file"]
