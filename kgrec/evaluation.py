"""The evaluation harness: one dataset, one split, baselines and our model's ablations in the same full-ranking
protocol, written as a table (Markdown + JSON) and a bar chart (PNG).

Protocol (RecBole's, ``fusion.metrics``): every item is ranked for every test user; the user's train and valid items
are masked at test (train items at valid); Recall@K, NDCG@K, Hit@K, MRR@K, Precision@K per user, averaged over
users with held-out items, and item coverage@K. Every model is fitted on train only; its settings (EASE's lambda,
early stopping of the embedding models) are chosen on valid NDCG@20; test is evaluated once.

Splits (``SPLITS``): ``given`` (the dataset's split.parquet), ``temporal`` (per user, oldest 80 % train, newest 10 %
valid / 10 % test: what ``kgrec train`` uses without a split), ``random`` (8:1:1 per user, seeded),
``leave-one-out`` (per user the last interaction is test, the one before valid).
Baselines (``BASELINES``): popularity, item-KNN (cosine, shrink 50, k 100), EASE (lambda from
``fusion.ease_lambdas`` on valid), BPR-MF and PyG's LightGCN (2 layers), both trained with our loop (``fusion.train
.fit_embeddings``: the configured loss, negatives, early stopping on valid NDCG@20).
Ablations (``ABLATIONS``) of our GNN: ``fused`` (text + image + KG + ID, the configured model), ``no-kg``,
``graph-only`` (KG + ID, no text or image), ``text-only`` and ``image-only`` (content vectors only: no ID, no KG).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kgrec.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("given", "temporal", "random", "leave-one-out")
BASELINES: tuple[str, ...] = ("popularity", "itemknn", "ease", "bpr-mf", "lightgcn")
ABLATIONS: dict[str, dict[str, Any]] = {
    "fused": {},
    "no-kg": {"use_kg": False},
    "graph-only": {"use_text": False, "use_image": False},
    "text-only": {"use_kg": False, "use_image": False, "id_dropout": 1.0},
    "image-only": {"use_kg": False, "use_text": False, "id_dropout": 1.0},
}
METRIC_COLUMNS: tuple[str, ...] = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "hit@20", "mrr@20", "precision@20",
                                   "item_coverage@20")


@dataclass
class EvaluationResult:
    """Rows (one per model: name, kind, valid NDCG@20, test metrics, fit seconds, note) and the files written."""

    dataset: str
    split: str
    counts: dict[str, int]
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    encode_seconds: float = 0.0  # encoding the items + building the graph, shared by the ablations (not in fit s)

    def row(self, model: str) -> dict[str, Any]:
        for r in self.rows:
            if r["model"] == model:
                return r
        raise KeyError(model)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "counts": self.counts, "rows": self.rows,
                "encode_seconds": self.encode_seconds,
                "protocol": "full ranking over all items; train (+ valid at test) masked; RecBole metric definitions"}

    def to_markdown(self) -> str:
        head = f"Split `{self.split}`: " + ", ".join(f"{k} {v:,}" for k, v in self.counts.items()) + "\n\n"
        cols = ["valid ndcg@20", *METRIC_COLUMNS, "fit s"]
        lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        skipped = []
        for r in self.rows:
            if "skipped" in r:
                skipped.append(f"- {r['model']}: skipped, {r['skipped']}")
                continue
            vals = [f"{r['valid_ndcg@20']:.4f}", *(f"{r[c]:.4f}" for c in METRIC_COLUMNS), f"{r['fit_seconds']:.1f}"]
            lines.append(f"| {r['model']} | " + " | ".join(vals) + " |")
        tail = (f"\nfit s: each model's own training; the ablations share {self.encode_seconds:.1f} s of item encoding "
                "and graph building before them\n" if self.encode_seconds else "")
        return (head + "\n".join(lines) + "\n" + "".join(f"\n{s}" for s in skipped) + ("\n" if skipped else "")
                + tail)


def _split_codes(split: str, ds: Any, events: Any, user_pos: dict[str, int], item_pos: dict[str, int],
                 seed: int) -> Any:
    """(u, i, ts, split) pairs under the named split."""
    from fusion.splits import leave_one_out, random_split
    from kgrec.pipeline import _event_pairs, split_pairs, temporal_pair_split

    if split == "given":
        if not ds.has_split:
            raise DataError(f"{ds.root} has no split.parquet: choose --split temporal, random or leave-one-out")
        return split_pairs(ds, events, user_pos, item_pos, seed=seed)
    pairs = _event_pairs(events, user_pos, item_pos)
    u, ts = pairs["u"].to_numpy(), pairs["ts"].to_numpy()
    if split == "temporal":  # the split kgrec train makes
        pairs["split"] = temporal_pair_split(pairs)
    elif split == "random":
        pairs["split"] = random_split(u, seed=seed)
    else:
        pairs["split"] = leave_one_out(u, ts, seed=seed)
    return pairs


def run_evaluation(
    dataset: Any,
    config: Any = None,
    *,
    split: str = "temporal",
    baselines: Sequence[str] = BASELINES,
    ablations: Sequence[str] = tuple(ABLATIONS),
    out_dir: str | Path | None = None,
    encoders: tuple[Any, Any] | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Fit the named baselines and ablations on ``dataset`` under ``split`` and evaluate them side by side.

    Args:
        dataset: a dataset directory (``kgrec ingest``) or ``Dataset``.
        config: a ``Config`` (its ``fusion`` section is the fused model; ``encoders`` names the encoders).
        encoders: (text, CLIP) encoders to use instead of the configured ones (tests use tiny ones).
        out_dir: where ``results.md``, ``results.json`` and ``results.png`` go (nothing written when None).
    """
    import scipy.sparse as sp
    import torch
    from tqdm.auto import tqdm

    from fusion.baselines import EASE, ItemKNN, MatrixFactorization, Popularity, PyGLightGCN
    from fusion.metrics import evaluate
    from fusion.train import fit_embeddings, seed_everything, train_model
    from kg.embedded_store import EmbeddedStore
    from kgrec.config import Config
    from kgrec.data.schema import Dataset
    from kgrec.pipeline import _index, aligned_content, build_encoders, encode_items, training_graph

    cfg = config or Config()
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    bad = [b for b in baselines if b not in BASELINES] + [a for a in ablations if a not in ABLATIONS]
    if bad:
        raise ConfigError(f"unknown baselines / ablations {bad}: baselines are {', '.join(BASELINES)}; ablations "
                          f"are {', '.join(ABLATIONS)}")
    ds = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
    events = ds.events
    store = EmbeddedStore(also_bought_min_count=cfg.kg.also_bought_min_count)
    store.load(ds)
    hetero, id_maps = store.to_hetero_data()
    user_ids, item_ids = list(id_maps["user"]), list(id_maps["item"])
    user_pos, item_pos = _index(user_ids), _index(item_ids)
    n_u, n_i = len(user_ids), len(item_ids)
    pairs = _split_codes(split, ds, events, user_pos, item_pos, cfg.fusion.seed)
    part = {c: pairs[pairs["split"] == k] for k, c in enumerate(("train", "valid", "test"))}
    counts = {f"{k} pairs": len(v) for k, v in part.items()}
    if not len(part["train"]) or not len(part["test"]):
        raise DataError(f"split {split!r} of {ds.root} leaves no train or no test interactions ({counts})")

    def csr(*frames: Any) -> sp.csr_matrix:
        u = np.concatenate([f["u"].to_numpy() for f in frames])
        i = np.concatenate([f["i"].to_numpy() for f in frames])
        return sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(n_u, n_i))

    train, valid, test = csr(part["train"]), csr(part["valid"]), csr(part["test"])
    seen = csr(part["train"], part["valid"])
    tu, ti = part["train"]["u"].to_numpy(), part["train"]["i"].to_numpy()
    vu, vi = part["valid"]["u"].to_numpy(), part["valid"]["i"].to_numpy()
    has_valid = valid.nnz > 0
    result = EvaluationResult(str(ds.root), split, counts)

    def add(name: str, kind: str, score_fn: Any, fit_s: float, note: str = "") -> None:
        v = evaluate(score_fn, valid, train, ks=(20,)) if has_valid else {"ndcg@20": float("nan")}
        t = evaluate(score_fn, test, seen, ks=(10, 20))
        result.rows.append({"model": name, "kind": kind, "valid_ndcg@20": float(v["ndcg@20"]),
                            **{c: float(t[c]) for c in METRIC_COLUMNS}, "fit_seconds": fit_s, "note": note})
        logger.info("%-24s valid ndcg@20 %.4f | test recall@20 %.4f ndcg@20 %.4f", name, v["ndcg@20"],
                    t["recall@20"], t["ndcg@20"])

    steps = list(baselines) + list(ablations)
    bar = tqdm(total=len(steps), desc="evaluate", unit="model", disable=not progress)
    fc = cfg.fusion
    for name in baselines:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        if name == "popularity":
            m = Popularity().fit(train)
            add(name, "baseline", m.score, time.perf_counter() - t0)
        elif name == "itemknn":
            m = ItemKNN(100, 50).fit(train)
            add(name, "baseline", m.score, time.perf_counter() - t0, "cosine, shrink 50, k 100")
        elif name == "ease":
            fits = [(EASE(lam).fit(train), lam) for lam in fc.ease_lambdas]
            scored = [(evaluate(m.score, valid, train, ks=(20,))["ndcg@20"] if has_valid else 0.0, -lam, m, lam)
                      for m, lam in fits]
            _, _, m, lam = max(scored, key=lambda r: (r[0], r[1]))
            add(name, "baseline", m.score, time.perf_counter() - t0, f"lambda {lam:g} chosen on valid")
        else:
            seed_everything(fc.seed)  # module init draws from the global RNG
            module = (MatrixFactorization(n_u, n_i, fc.dim) if name == "bpr-mf"
                      else PyGLightGCN(n_u, n_i, tu, ti, dim=fc.dim, num_layers=2))
            hist = fit_embeddings(module, n_u, n_i, tu, ti, fc, valid=valid if has_valid else None)
            with torch.no_grad():
                users, items, _, _ = module()
            add(name, "baseline", lambda u, U=users, I=items: U[torch.as_tensor(u)] @ I.T, time.perf_counter() - t0,
                f"{len(hist)} epochs, {fc.loss} loss")
        bar.update()

    if ablations:
        t0 = time.perf_counter()
        text_enc, clip_enc = encoders if encoders is not None else build_encoders(cfg, ds)
        text, image, present = aligned_content(encode_items(ds, text_enc, clip_enc, cfg), item_ids)
        if present is not None and not present.any():  # an image tower but no item has a picture: no image input
            image = present = None
        graph = training_graph(hetero, id_maps, events, pairs, cfg.kg.also_bought_min_count)
        result.encode_seconds = time.perf_counter() - t0
    for name in ablations:
        bar.set_postfix_str(name)
        over = ABLATIONS[name]
        c = fc.model_copy(update=over)
        t_in = text if c.use_text else None
        i_in = image if c.use_image else None
        if over.get("id_dropout") == 1.0 and t_in is None and i_in is None:
            missing = "text" if name == "text-only" else "image"
            result.rows.append({"model": name, "kind": "ablation", "skipped": f"the dataset has no {missing} vectors"})
            bar.update()
            continue
        t0 = time.perf_counter()
        tm = train_model(n_u, n_i, tu, ti, graph=graph, text=t_in, image=i_in,
                         image_present=present if i_in is not None else None,
                         valid=(vu, vi) if has_valid else None, config=c)
        w = np.round(tm.modality_weights.mean(0), 3).tolist() if tm.modality_weights is not None else None
        add(name, "ablation", tm.score_all, time.perf_counter() - t0,
            f"{len(tm.history)} epochs; mean modality weights text/image/graph {w}")
        bar.update()
    bar.close()
    result.rows = [r for r in result.rows if "skipped" not in r] + [r for r in result.rows if "skipped" in r]
    if out_dir is not None:
        write_results(result, Path(out_dir))
    return result


def write_results(result: EvaluationResult, out_dir: Path) -> dict[str, str]:
    """``results.json``, ``results.md`` and ``results.png`` (Recall@20 and NDCG@20 per model) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kgrec.data.schema import atomic_write_bytes, atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result.rows if "skipped" not in r]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    for k, (metric, colour) in enumerate((("recall@20", "#4c72b0"), ("ndcg@20", "#dd8452"))):
        ax.bar(x + (k - 0.5) * 0.38, [r[metric] for r in rows], 0.38, label=metric, color=colour)
    ax.set_xticks(x, [r["model"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test")
    ax.set_title(f"{Path(result.dataset).name}: split {result.split} (full ranking, train + valid masked)")
    ax.legend()
    fig.tight_layout()
    png = out_dir / "results.png"
    tmp = out_dir / ".results.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(png)
    atomic_write_bytes(out_dir / "results.md", result.to_markdown().encode())
    atomic_write_json(out_dir / "results.json", result.to_dict())
    result.files = {"markdown": str(out_dir / "results.md"), "json": str(out_dir / "results.json"), "png": str(png)}
    return result.files
