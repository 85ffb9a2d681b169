"""The enrichment batch job: infer missing attributes, find duplicates, derive SIMILAR_TO / COMPLEMENTS, and write
it all to a ``GraphStore`` with provenance (or, in a dry run, to a reviewable CSV + Parquet).

Idempotence: the records are a deterministic function of the dataset, the embeddings and the settings, and the
``run_id`` is a hash of exactly those, so a second run sends the same records with the same provenance and the
store (which MERGEs) changes nothing. Values that came from the source data are never overwritten: only items
that lack an attribute get one inferred, and the stores themselves refuse to replace a ``source="data"`` value.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kgrec.enrichment.attributes import (
    AttributeResult,
    InferenceSettings,
    ItemEvidence,
    attribute_tasks,
    infer_attribute,
)
from kgrec.enrichment.calibration import plot_reliability
from kgrec.enrichment.relations import (
    DuplicateSettings,
    complement_pairs,
    content_vectors,
    find_duplicates,
    similar_pairs,
)
from kgrec.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from encoders.items import ItemEmbeddings
    from kgrec.config import EnrichmentConfig
    from kgrec.data.schema import Dataset

logger = logging.getLogger(__name__)

RECORD_COLUMNS = ["kind", "type", "item_id", "name", "value", "src", "dst", "confidence", "evidence"]
JOB_ID = "kgrec.enrichment"
STACKER_ID = "pairwise-logreg-stack+isotonic"


@dataclass
class EnrichmentReport:
    """What a run inferred, measured and wrote.

    ``attributes``: per attribute the validation numbers on hidden known values (held-out accuracy per source and
    stacked, accuracy and coverage at the threshold, ECE), how many missing values were inferred and how many
    reached the threshold. ``records``: every record the run wrote (or would write), one row each
    (``RECORD_COLUMNS``; ``evidence`` is JSON text). ``written``: the store's counts (``None`` in a dry run).
    """

    run_id: str
    created: str
    threshold: float
    dry_run: bool
    provenance: dict[str, Any]
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: dict[str, Any] = field(default_factory=dict)
    similar: dict[str, Any] = field(default_factory=dict)
    complements: dict[str, Any] = field(default_factory=dict)
    records: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RECORD_COLUMNS))
    written: dict[str, int] | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        """Records per kind/type: ``attribute``, ``DUPLICATE_OF``, ``SIMILAR_TO``, ``COMPLEMENTS``."""
        if len(self.records) == 0:
            return {}
        key = np.where(self.records["kind"] == "attribute", "attribute", self.records["type"].fillna(""))
        return {str(k): int(v) for k, v in pd.Series(key).value_counts().sort_index().items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "created": self.created, "threshold": self.threshold, "dry_run": self.dry_run,
            "provenance": self.provenance, "counts": self.counts(), "attributes": self.attributes,
            "duplicates": self.duplicates, "similar": self.similar, "complements": self.complements,
            "written": self.written, "files": self.files, "seconds": round(self.seconds, 2),
        }

    def to_text(self) -> str:
        """A short human-readable summary (the CLI prints it)."""
        # a dry run writes nothing: its counts are what a real run would write
        written = "would write" if self.dry_run else "written"
        lines = [f"enrichment run {self.run_id} ({'dry run, nothing written' if self.dry_run else 'written'}), "
                 f"threshold {self.threshold:g}, {self.seconds:.1f} s"]
        lines.append(f"{'attribute':<12} {'known':>6} {'missing':>7} {'held-out acc':>12} {'acc@T':>6} "
                     f"{'cov@T':>6} {written:>{len(written)}}")
        for name, a in sorted(self.attributes.items()):
            if a.get("skipped"):
                lines.append(f"{name:<12} {a.get('n_labelled', 0):>6} {a.get('n_targets', 0):>7}  skipped: "
                             f"{a['skipped']}")
                continue
            acc_t = a.get("accuracy_at_threshold")
            lines.append(f"{name:<12} {a['n_labelled']:>6} {a['n_targets']:>7} {a['stacked_accuracy']:>12.3f} "
                         f"{(acc_t if acc_t is not None else float('nan')):>6.3f} "
                         f"{a['coverage_at_threshold']:>6.3f} {a['n_written']:>{len(written)}}")
        thresholds = ", ".join(f"{name.replace('_', ' ')} >= {float(t):.3f}"
                               for name, t in self.duplicates.get("thresholds", {}).items())
        lines.append(f"duplicates: {self.duplicates.get('n', 0)} pairs (of {self.duplicates.get('n_candidates', 0)} "
                     f"candidates; thresholds: {thresholds or 'none'})")
        lines.append(f"SIMILAR_TO: {self.similar.get('n', 0)}   COMPLEMENTS: {self.complements.get('n', 0)}")
        if self.written is not None:
            lines.append(f"store: {self.written}")
        for k, v in sorted(self.files.items()):
            lines.append(f"{k}: {v}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- inputs


def _strings(values: Any) -> np.ndarray:
    return np.array([v if isinstance(v, str) and v.strip() else None for v in values], dtype=object)


def listing_texts(items: pd.DataFrame) -> list[str]:
    """Title + description per item: what the listing says in words, never the structured attributes."""
    out = []
    for t, d in zip(items["title"], items["description"]):
        parts = [p.strip() for p in (t, d) if isinstance(p, str) and p.strip()]
        out.append(". ".join(p.rstrip(".") for p in parts))
    return out


def align_embeddings(item_ids: list[str], embeddings: ItemEmbeddings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text, image, has_image) in ``item_ids`` order; items the embeddings lack get zero rows."""
    index = embeddings.index()
    missing = [i for i in item_ids if i not in index]
    if len(missing) == len(item_ids) and item_ids:
        raise DataError(
            f"the item embeddings hold none of the dataset's {len(item_ids)} items (e.g. {item_ids[0]!r}); "
            "re-run `kgrec encode` on this dataset"
        )
    if missing:
        logger.warning("%d items have no embeddings (e.g. %s); they get content evidence from text literals and "
                       "the graph only", len(missing), missing[:3])
    rows = np.array([index.get(i, -1) for i in item_ids])
    ok = rows >= 0

    def take(arr: np.ndarray) -> np.ndarray:
        out = np.zeros((len(item_ids), arr.shape[1]), dtype=np.float32)
        out[ok] = arr[rows[ok]]
        return out

    has_image = np.zeros(len(item_ids), dtype=bool)
    has_image[ok] = embeddings.has_image[rows[ok]]
    return take(embeddings.text), take(embeddings.image), has_image


def kg_neighbour_graph(item_ids: list[str], brand: np.ndarray, category: np.ndarray, events: pd.DataFrame,
                       also_bought_min_count: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The item-item structure the KG votes come from: group codes for items sharing a brand / leaf category
    (``MADE_BY`` / ``IN_CATEGORY`` in the graph) and the sparse ``ALSO_BOUGHT`` adjacency, built by the same rule
    as ``kg.loading.also_bought`` so the votes match the graph the stores hold."""
    import scipy.sparse as sp

    from kg.loading import also_bought

    groups: dict[str, np.ndarray] = {}
    for name, col in (("brand", brand), ("category", category)):
        codes = np.full(len(item_ids), -1, dtype=np.int64)
        known = np.array([v is not None for v in col])
        if known.any():
            _, inv = np.unique(col[known].astype(str), return_inverse=True)
            codes[known] = inv
        groups[name] = codes
    pos = {iid: i for i, iid in enumerate(item_ids)}
    rows = [(pos[r["src"]], pos[r["dst"]]) for r in also_bought(events, also_bought_min_count)
            if r["src"] in pos and r["dst"] in pos]
    n = len(item_ids)
    if rows:
        a = np.array(rows)
        adj = sp.coo_matrix((np.ones(2 * len(a)), (np.r_[a[:, 0], a[:, 1]], np.r_[a[:, 1], a[:, 0]])), shape=(n, n))
        adj = adj.tocsr()
        adj.data[:] = 1.0
    else:
        adj = sp.csr_matrix((n, n))
    return groups, {"also_bought": adj}


def classifier_features(features: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """(n, <= dims) standardised principal components of the content vectors (fitted on every item, labels unused).

    PCA through the (d, d) covariance and ``eigh``: O(n d^2), no randomised SVD (which is slow and
    thread-hungry on small matrices). ``seed`` fixes the sign convention only (components are unique up to sign).
    """
    present = np.any(features != 0, axis=1)
    if present.sum() < 3 or features.shape[1] == 0:
        return np.zeros((len(features), 0))
    x = features[present].astype(np.float64)
    mean = x.mean(axis=0)
    cov = (x - mean).T @ (x - mean) / max(1, len(x) - 1)
    eigval, eigvec = np.linalg.eigh(cov)
    k = int(min(dims, present.sum() - 1, features.shape[1]))
    order = np.argsort(-eigval)[:k]
    comps = eigvec[:, order]
    comps *= np.where(comps[np.abs(comps).argmax(axis=0), np.arange(k)] < 0, -1.0, 1.0)  # deterministic signs
    z = (features.astype(np.float64) - mean) @ comps
    z[~present] = 0.0
    std = z[present].std(axis=0)
    return z / np.where(std > 1e-12, std, 1.0)


def run_id_for(dataset_fingerprint: str, model_ids: dict[str, str], settings: dict[str, Any]) -> str:
    """Deterministic run id: the same data, models and settings give the same id (so re-runs are no-ops)."""
    h = hashlib.sha256(json.dumps({"data": dataset_fingerprint, "models": model_ids, "settings": settings},
                                  sort_keys=True, default=str).encode())
    return "enr-" + h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- the job


def enrich(
    dataset: Dataset,
    embeddings: ItemEmbeddings,
    store: Any | None,
    *,
    clip_encoder: Any | None = None,
    text_encoder: Any | None = None,
    threshold: float | None = None,
    dry_run: bool = True,
    out_dir: str | Path | None = None,
    config: EnrichmentConfig | None = None,
    also_bought_min_count: int = 2,
    progress: bool = False,
) -> EnrichmentReport:
    """Enrich the catalog of ``dataset`` and write the results to ``store`` (or, with ``dry_run``, to files).

    Args:
        dataset: the catalog (items, events).
        embeddings: ``encoders.items.encode_dataset`` output for this dataset (text, image, clip_text vectors).
        store: a ``GraphStore`` (``EmbeddedStore`` / ``Neo4jStore``); may be ``None`` in a dry run.
        clip_encoder: a ``ClipEncoder`` whose text tower embeds the zero-shot prompts (the one that made
            ``embeddings.image``); ``None`` leaves the zero-shot source out.
        text_encoder: the text encoder; when given, the classifier and kNN read vectors of the listing text
            *without* its structured attributes (so that items with a known value, whose encoded text names it, are
            not easier than the items that lack it). Without it they read ``embeddings.text``.
        threshold: calibrated confidence an inferred value needs to be written (default ``config.threshold``).
        dry_run: write nothing to the store; write ``enrichment.csv`` + ``enrichment.parquet`` to ``out_dir``.
        out_dir: where the reviewable records, ``reliability.png`` and ``report.json`` go (optional unless you want
            the files).
        config: ``EnrichmentConfig`` (defaults when ``None``).
        also_bought_min_count: co-purchases that make an ``ALSO_BOUGHT`` neighbour (``KGConfig``'s value).
        progress: show a tqdm bar over the attributes.

    Returns:
        An :class:`EnrichmentReport` (records included).
    """
    import time

    from tqdm.auto import tqdm

    from kgrec import __version__
    from kgrec.config import EnrichmentConfig

    t0 = time.perf_counter()
    config = config or EnrichmentConfig()
    threshold = config.threshold if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"enrichment threshold must be within [0, 1], got {threshold}")
    if not dry_run and store is None:
        raise DataError("enrich(dry_run=False) needs a graph store to write to; pass one or use dry_run=True")

    items = dataset.items
    item_ids = items["item_id"].astype(str).tolist()
    brand, category = _strings(items["brand"]), _strings(items["category"])
    price = pd.to_numeric(items["price"], errors="coerce").to_numpy(dtype=np.float64)
    texts = listing_texts(items)
    text, image, has_image = align_embeddings(item_ids, embeddings)

    model_ids = {k: str(v) for k, v in sorted(embeddings.model_ids.items())}
    content_text = text
    if text_encoder is not None:
        model_ids["classifier_text"] = str(text_encoder.model_id)
        content_text = np.asarray(text_encoder.encode(texts), dtype=np.float32)
    settings = InferenceSettings(
        folds=config.folds, seed=config.seed, knn_k=config.knn_k, classifier_dims=config.classifier_dims,
        classifier_c=config.classifier_c, kg_smoothing=config.kg_smoothing, prompt=config.prompt,
        min_labelled=config.min_labelled,
        exclude_sources=tuple(config.exclude_sources),
    )
    features = content_vectors(content_text, image if has_image.any() else None)
    prompt_encoder = None
    if clip_encoder is not None and has_image.any():
        made_by = embeddings.model_ids.get("clip")
        if made_by is not None and made_by != clip_encoder.model_id:
            logger.warning("the CLIP encoder given (%s) did not make the image embeddings (%s): no zero-shot source",
                           clip_encoder.model_id, made_by)
        else:
            model_ids["zero_shot"] = str(clip_encoder.model_id)
            prompt_encoder = clip_encoder.encode_texts
    groups, adjacency = kg_neighbour_graph(item_ids, brand, category, dataset.events, also_bought_min_count)
    evidence = ItemEvidence(item_ids, features, image if has_image.any() else None, has_image, texts, category,
                            brand, kg_groups=groups, kg_neighbours=adjacency, prompt_encoder=prompt_encoder)
    settings_dict = config.model_dump(mode="json") | {"threshold": threshold,
                                                      "also_bought_min_count": also_bought_min_count}
    run_id = run_id_for(dataset.fingerprint, model_ids, settings_dict)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    provenance = {
        "run_id": run_id, "created": created, "source": "enrichment", "job": f"{JOB_ID}/{__version__}",
        # a list of "role=model id" strings: Neo4j properties cannot hold maps
        "model_ids": [f"{k}={v}" for k, v in sorted((model_ids | {"stacker": STACKER_ID}).items())],
        "threshold": threshold,
        "data_fingerprint": dataset.fingerprint,
    }

    records: list[dict[str, Any]] = []
    attr_report: dict[str, dict[str, Any]] = {}
    results: dict[str, AttributeResult] = {}
    # Small dense problems: multi-threaded BLAS only spins on them (25x slower measured on a busy 2-core box).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        cls_x = classifier_features(features, settings.classifier_dims, settings.seed)
        tasks = attribute_tasks(items, dataset.item_attributes(), config.min_applicable_share)
        for task in tqdm(tasks, desc="attributes", unit="attr", disable=not progress):
            res = infer_attribute(task.name, task.known, task.targets, evidence, cls_x, settings, threshold)
            results[task.name] = res
            entry = dict(res.validation)
            if res.skipped:
                entry["skipped"] = res.skipped
                entry["n_written"] = 0
                attr_report[task.name] = entry
                logger.info("attribute %s skipped: %s", task.name, res.skipped)
                continue
            write = res.confidence >= threshold
            entry["n_inferred"] = int(len(res.targets))
            entry["n_written"] = int(write.sum())
            entry["n_below_threshold"] = int((~write).sum())
            attr_report[task.name] = entry
            for row in np.flatnonzero(write):
                records.append({
                    "kind": "attribute", "item_id": item_ids[res.targets[row]], "name": task.name,
                    "value": res.values[res.predicted[row]], "confidence": round(float(res.confidence[row]), 4),
                    "evidence": res.evidence(row),
                })

    dup_settings = DuplicateSettings(k=config.duplicate_k, min_cosine=config.duplicate_min_cosine,
                                     price_tolerance=config.duplicate_price_tolerance)
    source_attrs = [json.loads(a) if isinstance(a, str) and a.strip() else {} for a in items["attributes"]]
    dups = find_duplicates(item_ids, text, image if has_image.any() else None, brand, category, price, dup_settings,
                           attributes=source_attrs)
    evidence_cols = [c for c in dups.pairs.columns if c not in ("src", "dst", "confidence")]
    for r in dups.pairs.to_dict("records"):
        records.append({"kind": "relation", "type": "DUPLICATE_OF", "src": r["src"], "dst": r["dst"],
                        "confidence": float(r["confidence"]), "evidence": {c: _jsonable(r[c]) for c in evidence_cols}})

    dup_keys = {(r["src"], r["dst"]) for r in dups.pairs.to_dict("records")}
    sim = similar_pairs(item_ids, content_vectors(text, image if has_image.any() else None), config.similar_k,
                        config.similar_min_cosine, exclude=dup_keys)
    for r in sim.to_dict("records"):
        records.append({"kind": "relation", "type": "SIMILAR_TO", "src": r["src"], "dst": r["dst"],
                        "confidence": float(r["confidence"]), "evidence": {"content_cosine": float(r["confidence"]),
                                                                          "neighbour_rank": int(r["rank"])}})
    comp = complement_pairs(dataset.events, dict(zip(item_ids, category)), config.complement_min_users)
    for r in comp.to_dict("records"):
        records.append({"kind": "relation", "type": "COMPLEMENTS", "src": r["src"], "dst": r["dst"],
                        "confidence": float(r["confidence"]),
                        "evidence": {k: _jsonable(r[k]) for k in ("co_buyers", "buyers_src", "buyers_dst", "lift",
                                                                   "category_src", "category_dst")}})
    records.sort(key=_record_key)

    report = EnrichmentReport(
        run_id=run_id, created=created, threshold=threshold, dry_run=dry_run, provenance=provenance,
        attributes=attr_report,
        duplicates={"n": int(len(dups.pairs)), "n_candidates": dups.n_candidates, "thresholds": dups.thresholds},
        similar={"n": int(len(sim)), "k": config.similar_k, "min_cosine": config.similar_min_cosine},
        complements={"n": int(len(comp)), "min_users": config.complement_min_users},
        records=records_frame(records),
    )
    for name, r in results.items():
        if r.curve is not None:
            report.attributes[name]["reliability"] = r.curve.to_dict()
    if out_dir is not None:
        out = Path(out_dir)
        curves = {n: r.curve for n, r in results.items() if r.curve is not None}
        if curves:
            report.files["reliability_png"] = str(plot_reliability(curves, out / "reliability.png",
                                                                   threshold=threshold))
        if dry_run:
            report.files.update(write_review_files(report.records, out))
    if not dry_run:
        logger.info("writing %d enrichment records (run %s)", len(records), run_id)
        report.written = {str(k): int(v) for k, v in store.write_enrichment(records, provenance).items()}
    report.seconds = time.perf_counter() - t0
    if out_dir is not None:
        from kgrec.data.schema import atomic_write_json

        path = Path(out_dir) / "report.json"
        report.files["report_json"] = str(path)
        atomic_write_json(path, report.to_dict())
    return report


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else round(float(v), 4)
    return v


def _record_key(r: dict[str, Any]) -> tuple[str, ...]:
    if r["kind"] == "attribute":
        return ("0", r["item_id"], r["name"], "")
    return ("1", r["type"], r["src"], r["dst"])


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record (``RECORD_COLUMNS``), ``evidence`` as JSON text: the reviewable table."""
    rows = [{c: (json.dumps(r.get(c), sort_keys=True) if c == "evidence" else r.get(c)) for c in RECORD_COLUMNS}
            for r in records]
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def write_review_files(frame: pd.DataFrame, out_dir: str | Path) -> dict[str, str]:
    """``enrichment.csv`` and ``enrichment.parquet`` (same rows) in ``out_dir``, each written atomically."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from kgrec.data.schema import atomic_write_bytes

    out = Path(out_dir)
    csv_path, pq_path = out / "enrichment.csv", out / "enrichment.parquet"
    atomic_write_bytes(csv_path, frame.to_csv(index=False).encode("utf-8"))
    schema = pa.schema([(c, pa.float64() if c == "confidence" else pa.string()) for c in RECORD_COLUMNS])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), buf, compression="zstd")
    atomic_write_bytes(pq_path, buf.getvalue())
    logger.info("dry run: %d records for review in %s and %s", len(frame), csv_path, pq_path)
    return {"review_csv": str(csv_path), "review_parquet": str(pq_path)}


def read_review_file(path: str | Path) -> list[dict[str, Any]]:
    """Records back from a reviewed ``enrichment.parquet`` / ``.csv`` (e.g. to write an edited dry run with
    ``store.write_enrichment(records, provenance)``): empty fields dropped, ``evidence`` decoded from JSON."""
    path = Path(path)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str, keep_default_na=False)
    out = []
    for row in frame.to_dict("records"):
        rec: dict[str, Any] = {}
        for key, value in row.items():
            if value is None or (isinstance(value, float) and not np.isfinite(value)) or value == "":
                continue
            rec[key] = value
        rec["confidence"] = float(rec["confidence"])
        rec["evidence"] = json.loads(rec["evidence"]) if rec.get("evidence") else {}
        out.append(rec)
    return out
