"""``fit_text``: domain fine-tuning of the BERT text encoder with in-batch negatives.

Pairs the catalog provides:

- ``title``: an item's title ↔ its description + attributes (:func:`item_facts`);
- ``query``: a search query typed before a purchase ↔ the purchased item's full text (:func:`~encoders.items.item_text`).

Items are split into train / held-out (seeded); every pair follows its item. The loss is the symmetric
multiple-negatives ranking loss (InfoNCE over the batch, fixed scale 20 as in sentence-transformers). Only the top
``train_layers`` transformer layers are trained (the rest is frozen: faster on CPU, less forgetting). Each epoch is
scored on held-out pairs — recall@10 and MRR of finding the right item among all held-out items — and training stops
when that stops improving. The untuned model is scored the same way first, so the gain is reported.

Output: a Hugging Face checkpoint directory (safetensors + tokenizer) that ``TextEncoder(model=DIR)`` loads, plus
``fit_text_config.json``, ``metrics.json`` and ``training_curve.png``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from encoders.base import FitResult
from encoders.items import item_text
from encoders.text import TextEncoder
from kgrec.data.schema import Dataset, atomic_directory, atomic_write_json
from kgrec.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class FitTextConfig:
    """Every default written down."""

    model: str = "packaged:all-MiniLM-L6-v2"
    max_length: int = 64
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-5
    weight_decay: float = 0.01
    scale: float = 20.0
    train_layers: int = 2  # top transformer layers trained; 0 = all
    holdout: float = 0.2
    patience: int = 1
    max_pairs_per_kind: int = 5000
    seed: int = 0
    device: str = "auto"


FitTextResult = FitResult  # the shared result record (encoders/base.py)


@dataclass(frozen=True)
class TextPair:
    anchor: str
    item_id: str
    kind: str  # "title" | "query"


def item_facts(row: dict[str, Any]) -> str:
    """The item text without its title: description + brand/category/attributes."""
    return item_text(dict(row, title=""))


def catalog_text_pairs(dataset: Dataset) -> tuple[list[TextPair], dict[str, dict[str, str]]]:
    """``(pairs, positives)``: ``positives[kind][item_id]`` is the text an anchor of that kind must find."""
    rows = {r["item_id"]: r for r in dataset.table("items").to_pylist()}
    pairs: list[TextPair] = []
    positives: dict[str, dict[str, str]] = {"title": {}, "query": {}}
    for item_id, row in rows.items():
        title, facts = (row.get("title") or "").strip(), item_facts(row)
        if title and facts:
            pairs.append(TextPair(title, item_id, "title"))
            positives["title"][item_id] = facts
    events = dataset.table("events")
    if events.num_rows and "query" in events.column_names:
        seen: set[tuple[str, str]] = set()
        for e in events.select(["item_id", "type", "query"]).to_pylist():
            q = (e.get("query") or "").strip()
            if q and e["type"] == "purchase" and e["item_id"] in rows and (q, e["item_id"]) not in seen:
                seen.add((q, e["item_id"]))
                pairs.append(TextPair(q, e["item_id"], "query"))
                positives["query"][e["item_id"]] = item_text(rows[e["item_id"]])
    if len(pairs) < 10:
        raise DataError(f"{dataset.root}: only {len(pairs)} text pairs (title ↔ description, query ↔ purchase); "
                        "fit-text needs at least 10")
    return pairs, positives


def retrieval_metrics(encoder: Any, pairs: list[TextPair], positives: dict[str, dict[str, str]],
                      k: int = 10) -> dict[str, dict[str, float]]:
    """Per kind: recall@k and MRR of each anchor's item among all candidate items of the pairs' kind.

    ``encoder`` is anything with ``encode(texts) -> (n, d)`` L2-normalised."""
    out: dict[str, dict[str, float]] = {}
    for kind in ("title", "query"):
        kp = [p for p in pairs if p.kind == kind]
        if not kp:
            continue
        cand_ids = sorted({p.item_id for p in kp})
        col = {c: i for i, c in enumerate(cand_ids)}
        cand = encoder.encode([positives[kind][c] for c in cand_ids])
        anchors = encoder.encode([p.anchor for p in kp])
        sims = anchors @ cand.T
        target = np.array([col[p.item_id] for p in kp])
        correct = sims[np.arange(len(kp)), target]
        ranks = 1 + (sims > correct[:, None]).sum(1)
        out[kind] = {"pairs": len(kp), "candidates": len(cand_ids), f"recall@{k}": float((ranks <= k).mean()),
                     "mrr": float((1.0 / ranks).mean())}
    return out


class _FrozenLowerLayers:
    """Runs the frozen bottom of a BERT once per distinct text and keeps its token states, so each training step
    and each evaluation only runs the trained top layers (the frozen part's output never changes)."""

    def __init__(self, enc: TextEncoder, n_frozen: int):
        self.enc = enc
        self.model = enc.model
        self.n_frozen = n_frozen
        self.states: dict[str, torch.Tensor] = {}

    def _mask4d(self, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)

    @torch.inference_mode()
    def precompute(self, texts: list[str], batch_size: int = 64) -> None:
        todo = sorted({t for t in texts if t not in self.states}, key=len)
        was = self.model.training
        self.model.eval()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            tok = self.enc.tokenize(chunk)
            tok = {k: v.to(self.enc.device) for k, v in tok.items()}
            h = self.model.embeddings(input_ids=tok["input_ids"], token_type_ids=tok.get("token_type_ids"))
            mask4 = self._mask4d(h, tok["attention_mask"])
            for layer in self.model.encoder.layer[: self.n_frozen]:
                h = layer(h, mask4)
                h = h[0] if isinstance(h, tuple) else h
            lengths = tok["attention_mask"].sum(1).tolist()
            for t, row, n in zip(chunk, h, lengths):
                self.states[t] = row[: int(n)].detach().float().cpu().clone()
        self.model.train(was)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """(b, dim) L2-normalised vectors; gradients flow into the top layers only."""
        rows = [self.states[t] for t in texts]
        width = max(len(r) for r in rows)
        h = torch.zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            h[i, : len(r)] = r
            mask[i, : len(r)] = 1
        h, mask = h.to(self.enc.device), mask.to(self.enc.device)
        mask4 = self._mask4d(h, mask)
        for layer in self.model.encoder.layer[self.n_frozen:]:
            h = layer(h, mask4)
            h = h[0] if isinstance(h, tuple) else h
        from encoders.text import mean_pool

        return F.normalize(mean_pool(h, mask).float(), dim=-1)

    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        self.precompute(list(texts))
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                out.append(self.forward(list(texts[start:start + batch_size])).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.enc.dim), dtype=np.float32)


def _score(m: dict[str, dict[str, float]]) -> float:
    return float(np.mean([v["mrr"] for v in m.values()])) if m else 0.0


def fit_text(dataset: Dataset, out_dir: str | Path, config: FitTextConfig | None = None,
             encoder: TextEncoder | None = None) -> FitTextResult:
    """Fine-tune the text encoder on ``dataset``'s pairs and write a checkpoint directory to ``out_dir``.

    ``encoder`` overrides ``config.model`` (e.g. a tiny model from :meth:`TextEncoder.from_config` in tests).
    """
    cfg = config or FitTextConfig()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    enc = encoder or TextEncoder(cfg.model, max_length=cfg.max_length, batch_size=64, device=cfg.device)
    enc.max_length = cfg.max_length
    pairs, positives = catalog_text_pairs(dataset)
    rng = np.random.default_rng(cfg.seed)
    item_ids = sorted({p.item_id for p in pairs})
    held_items = set(rng.permutation(item_ids)[: max(1, int(round(len(item_ids) * cfg.holdout)))].tolist())
    train, held = [], []
    for p in pairs:
        (held if p.item_id in held_items else train).append(p)
    for kind in ("title", "query"):  # bound the epoch cost on big catalogs
        kp = [p for p in train if p.kind == kind]
        if len(kp) > cfg.max_pairs_per_kind:
            drop = set(rng.choice(len(kp), len(kp) - cfg.max_pairs_per_kind, replace=False).tolist())
            keep_ids = {id(p) for i, p in enumerate(kp) if i not in drop}
            train = [p for p in train if p.kind != kind or id(p) in keep_ids]
    logger.info("fit-text: %d train pairs, %d held-out pairs", len(train), len(held))

    model = enc.model
    layers = list(model.encoder.layer) if hasattr(model, "encoder") else []
    n_train = len(layers) if cfg.train_layers <= 0 else min(cfg.train_layers, len(layers))
    t_cache = time.perf_counter()
    if 0 < n_train < len(layers):
        frozen = _FrozenLowerLayers(enc, len(layers) - n_train)
        frozen.precompute([p.anchor for p in pairs] + [positives[p.kind][p.item_id] for p in pairs])
        embed_train: Any = frozen.forward
        scorer: Any = frozen
    else:
        frozen = None
        embed_train = lambda texts: enc.forward_batch(enc.tokenize(texts))  # noqa: E731
        scorer = enc
    logger.info("fit-text: frozen-layer states for %d texts in %.1f s", len(frozen.states) if frozen else 0,
                time.perf_counter() - t_cache)
    before = retrieval_metrics(scorer, held, positives)
    trainable_prefixes = tuple(f"encoder.layer.{i}." for i in range(len(layers) - n_train, len(layers)))
    trainable = {n: p for n, p in model.named_parameters() if not trainable_prefixes or n.startswith(trainable_prefixes)}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    optim = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def positive_text(p: TextPair) -> str:
        return positives[p.kind][p.item_id]

    curve: list[dict[str, float]] = []
    best_score, best_state, bad = _score(before), None, 0
    best_metrics = before
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(train))
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            batch = [train[i] for i in order[start:start + cfg.batch_size]]
            # in-batch negatives must not contain the positive item twice
            seen: set[tuple[str, str]] = set()
            batch = [p for p in batch if not ((p.kind, p.item_id) in seen or seen.add((p.kind, p.item_id)))]
            if len(batch) < 2:
                continue
            a = embed_train([p.anchor for p in batch])
            b = embed_train([positive_text(p) for p in batch])
            logits = cfg.scale * a @ b.T
            target = torch.arange(len(batch), device=logits.device)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
        model.eval()
        metrics = retrieval_metrics(scorer, held, positives)
        score = _score(metrics)
        curve.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                      "held_out_mrr": score})
        logger.info("fit-text epoch %d: loss %.4f held-out MRR %.4f", epoch + 1, curve[-1]["train_loss"], score)
        if score > best_score + 1e-4:
            best_score, bad, best_metrics = score, 0, metrics
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
        else:
            bad += 1
            if bad > cfg.patience:
                break
    with torch.no_grad():
        if best_state is not None:
            for n, p in trainable.items():
                p.copy_(best_state[n])
        else:  # no epoch beat the untuned model: keep it unchanged
            logger.warning("fit-text: no epoch improved held-out MRR over the untuned model; weights unchanged")
    for p in model.parameters():
        p.requires_grad_(False)
    enc.invalidate_id()
    seconds = time.perf_counter() - t0
    metrics = {"before": before, "after": best_metrics, "train_pairs": len(train), "held_out_pairs": len(held),
               "epochs_run": len(curve), "improved": best_state is not None, "train_layers": n_train,
               "seconds": seconds, "train_seconds": time.perf_counter() - t_train, "device": str(enc.device)}
    _write(Path(out_dir), cfg, enc, metrics, curve)
    logger.info("fit-text done in %.1f s: %s", seconds, json.dumps(summary_table(metrics)))
    return FitTextResult(Path(out_dir), metrics, curve, seconds)


def summary_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind, after in metrics["after"].items():
        before = metrics["before"][kind]
        rows.append({"pairs": kind, "n": after["pairs"], "candidates": after["candidates"],
                     "recall@10_before": round(before["recall@10"], 3), "recall@10_after": round(after["recall@10"], 3),
                     "mrr_before": round(before["mrr"], 3), "mrr_after": round(after["mrr"], 3)})
    return rows


def _write(out_dir: Path, cfg: FitTextConfig, enc: TextEncoder, metrics: dict[str, Any],
           curve: list[dict[str, float]]) -> None:
    from encoders.fit_clip import plot_curve

    with atomic_directory(out_dir) as tmp:
        enc.model.save_pretrained(tmp, safe_serialization=True)
        enc.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "fit_text_config.json", {"base_model": enc.name, "fit": asdict(cfg)})
        atomic_write_json(tmp / "metrics.json", {"metrics": metrics, "curve": curve})
        if curve:
            plot_curve([{"epoch": c["epoch"], "train_loss": c["train_loss"], "val_loss": 1 - c["held_out_mrr"]}
                        for c in curve], tmp / "training_curve.png", title="fit-text (held-out: 1 - MRR)")
