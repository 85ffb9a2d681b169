"""``fit_clip``: align a CLIP's image and text towers on the catalog's own image–text pairs.

Loss: symmetric InfoNCE with a learnable temperature (``logit_scale``), as in CLIP. Two modes:

- ``heads`` (default for ``kgrec-effnetlite0-minilm``): the pretrained trunks stay frozen, so their outputs are
  computed once — EfficientNet features (or the activations before the last ``top_blocks`` blocks, which are then
  trained too) and mean-pooled MiniLM features — and only the projection heads (+ top blocks) and the temperature
  are trained. Minutes on 2 CPU cores for the demo catalog.
- ``full``: every parameter is trained on image batches (any open_clip model, e.g. a user's pretrained CLIP on a GPU,
  or the tiny test config).

Items are split into train / held-out by a seeded permutation. Held-out evaluation (:func:`evaluate_clip`):
zero-shot prediction of each attribute (colour, category, ...) from the image alone against prompts
``"<name>: <value>"``, with chance for comparison, and text→image precision@10 per attribute value.
Output directory: ``clip_config.json``, ``clip_weights.safetensors`` (only the trained tensors), ``metrics.json``,
``training_curve.png``; load it with ``ClipEncoder(checkpoint=DIR)``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from encoders.base import FitResult
from encoders.clip import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, ClipEncoder
from encoders.images import load_image
from encoders.items import item_text
from kgrec.data.schema import Dataset, atomic_directory, atomic_write_json
from kgrec.errors import DataError, EncoderError

logger = logging.getLogger(__name__)


@dataclass
class FitClipConfig:
    """Every default written down. ``image_size`` 128 keeps CPU cost low (demo images are 64 px)."""

    model: str = "kgrec-effnetlite0-minilm"
    pretrained: str | None = None
    mode: str = "auto"  # auto | heads | full ("auto": heads when the towers allow it)
    top_blocks: int = 0  # heads mode: also train the last N EfficientNet blocks (+ conv_head)
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    holdout: float = 0.2
    patience: int = 8
    image_size: int = 128
    seed: int = 0
    device: str = "auto"
    eval_attributes: tuple[str, ...] = ("colour", "category", "material", "pattern")


FitClipResult = FitResult  # the shared result record (encoders/base.py)


# ---------------------------------------------------------------- data
def catalog_pairs(dataset: Dataset) -> list[dict[str, Any]]:
    """Items with a decodable image: ``item_id``, ``text``, ``image`` (RGB PIL), ``attrs`` (incl. ``category``)."""
    pairs = []
    for row in dataset.table("items").to_pylist():
        path = dataset.image_path(row.get("image"))
        if path is None:
            continue
        loaded = load_image(path)
        if not loaded.ok:
            continue
        attrs = json.loads(row["attributes"]) if row.get("attributes") else {}
        if row.get("category"):
            attrs["category"] = row["category"]
        pairs.append({"item_id": row["item_id"], "text": item_text(row), "image": loaded.image, "attrs": attrs})
    if len(pairs) < 10:
        raise DataError(f"{dataset.root}: only {len(pairs)} items have a usable image; fit-clip needs at least 10")
    return pairs


def split_pairs(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = max(1, int(round(n * holdout)))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


# ---------------------------------------------------------------- towers split into frozen / trainable parts
def _heads_mode_supported(model: torch.nn.Module) -> bool:
    visual, text = getattr(model, "visual", None), getattr(model, "text", None)
    return (
        visual is not None and hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks")
        and hasattr(visual.trunk, "conv_head") and text is not None and hasattr(text, "transformer")
    )


class _VisionSuffix(torch.nn.Module):
    """The trainable end of an EfficientNet tower: last ``top_blocks`` blocks, conv_head, bn2, pool, head."""

    def __init__(self, visual: torch.nn.Module, top_blocks: int):
        super().__init__()
        trunk = visual.trunk
        self.top_blocks = top_blocks
        self.blocks = torch.nn.Sequential(*list(trunk.blocks)[len(trunk.blocks) - top_blocks:]) if top_blocks else None
        self.conv_head, self.bn2, self.pool = trunk.conv_head, trunk.bn2, trunk.global_pool
        self.head = visual.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.top_blocks:
            x = self.pool(self.bn2(self.conv_head(self.blocks(x))))
        return self.head(x)


@torch.inference_mode()
def _frozen_vision_features(visual: torch.nn.Module, pixels: torch.Tensor, top_blocks: int, batch: int = 64) -> torch.Tensor:
    from tqdm.auto import tqdm

    trunk = visual.trunk
    outs = []
    for start in tqdm(range(0, len(pixels), batch), desc="fit-clip: frozen image features", unit="batch", leave=False):
        x = pixels[start:start + batch]
        x = trunk.bn1(trunk.conv_stem(x))
        n_keep = len(trunk.blocks) - top_blocks
        for blk in list(trunk.blocks)[:n_keep]:
            x = blk(x)
        if not top_blocks:
            x = trunk.global_pool(trunk.bn2(trunk.conv_head(x)))
        outs.append(x.float().cpu())
    return torch.cat(outs)


@torch.inference_mode()
def _frozen_text_features(text_tower: torch.nn.Module, tokens: torch.Tensor, batch: int = 128) -> torch.Tensor:
    pad = text_tower.config.pad_token_id
    outs = []
    for start in range(0, len(tokens), batch):
        x = tokens[start:start + batch]
        mask = (x != pad).long()
        out = text_tower.transformer(input_ids=x, attention_mask=mask)
        outs.append(text_tower.pooler(out, mask).float().cpu())
    return torch.cat(outs)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, text) rows; inputs L2-normalised (b, d)."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ---------------------------------------------------------------- evaluation
def evaluate_clip(
    image_emb: np.ndarray,
    attrs: list[dict[str, str]],
    encode_texts: Any,
    attributes: tuple[str, ...],
    k: int = 10,
) -> dict[str, Any]:
    """Zero-shot attribute accuracy (vs chance = majority share) and text→image precision@k per attribute.

    ``image_emb`` (n, d) L2-normalised held-out image vectors; ``attrs[i]`` the attributes of item ``i``.
    """
    out: dict[str, Any] = {}
    for name in attributes:
        labelled = [i for i, a in enumerate(attrs) if a.get(name)]
        values = sorted({attrs[i][name] for i in labelled})
        if len(values) < 2:
            continue
        prompts = encode_texts([f"{name}: {v}" for v in values])
        truth = np.array([values.index(attrs[i][name]) for i in labelled])
        pred = (image_emb[labelled] @ prompts.T).argmax(1)
        counts = np.bincount(truth, minlength=len(values))
        sims = prompts @ image_emb.T  # (values, n)
        precisions = []
        for v_idx, v in enumerate(values):
            top = np.argsort(-sims[v_idx])[:k]
            precisions.append(float(np.mean([attrs[i].get(name) == v for i in top])))
        out[name] = {
            "classes": len(values),
            "n": len(labelled),
            "zero_shot_accuracy": float((pred == truth).mean()),
            "chance_uniform": 1.0 / len(values),
            "chance_majority": float(counts.max() / counts.sum()),
            f"precision@{k}": float(np.mean(precisions)),
            f"precision@{k}_random": float(np.mean([c / len(image_emb) for c in counts])),
        }
    return out


# ---------------------------------------------------------------- training
def fit_clip(dataset: Dataset, out_dir: str | Path, config: FitClipConfig | None = None) -> FitClipResult:
    """Align the CLIP towers on ``dataset``'s image–text pairs and write a checkpoint to ``out_dir``."""
    cfg = config or FitClipConfig()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    encoder = ClipEncoder(cfg.model, cfg.pretrained, device=cfg.device, seed=cfg.seed, image_size=cfg.image_size)
    model, device = encoder.model, encoder.device
    mode = cfg.mode
    if mode == "auto":
        mode = "heads" if _heads_mode_supported(model) else "full"
    if mode == "heads" and not _heads_mode_supported(model):
        raise EncoderError(f"fit-clip mode 'heads' needs an EfficientNet timm vision tower and a HF text tower; "
                           f"{cfg.model} has neither: use mode 'full'")

    pairs = catalog_pairs(dataset)
    train_idx, hold_idx = split_pairs(len(pairs), cfg.holdout, cfg.seed)
    logger.info("fit-clip: %d pairs (%d train, %d held out), mode=%s", len(pairs), len(train_idx), len(hold_idx), mode)
    from tqdm.auto import tqdm

    pixels = torch.stack([encoder.preprocess(p["image"])
                          for p in tqdm(pairs, desc="fit-clip: preparing images", unit="img", leave=False)])
    tokens = encoder.tokenizer([p["text"] for p in pairs])
    attrs = [p["attrs"] for p in pairs]

    timings: dict[str, float] = {"build": time.perf_counter() - t0}

    def held_out_metrics() -> dict[str, Any]:
        model.eval()
        if mode == "heads":  # the frozen part's outputs are already computed: only the suffix runs
            with torch.inference_mode():
                img = F.normalize(vision(visual_in[hold_idx].to(device)), dim=-1).float().cpu().numpy()
        else:
            img = encoder.encode_images([pairs[i]["image"] for i in hold_idx])
        return evaluate_clip(img, [attrs[i] for i in hold_idx], encoder.encode_texts, cfg.eval_attributes)

    if mode == "heads":
        t = time.perf_counter()
        visual_in = _frozen_vision_features(model.visual, pixels.to(device), cfg.top_blocks)
        text_in = _frozen_text_features(model.text, tokens.to(device))
        timings["frozen_features"] = time.perf_counter() - t
        vision = _VisionSuffix(model.visual, cfg.top_blocks)
        text_head = model.text.proj
        trainable = {n: p for n, p in model.named_parameters() if _in_heads(n, cfg.top_blocks, model)}
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)

        def batch_loss(idx: np.ndarray) -> torch.Tensor:
            img = F.normalize(vision(visual_in[idx].to(device)), dim=-1)
            txt = F.normalize(text_head(text_in[idx].to(device)), dim=-1)
            return clip_loss(img, txt, model.logit_scale)

        def set_train(flag: bool) -> None:
            vision.train(flag)
            text_head.train(flag)
            for m in vision.modules():  # small batches: keep BatchNorm statistics from ImageNet
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
    else:
        trainable = dict(model.named_parameters())
        for p in trainable.values():
            p.requires_grad_(True)

        def batch_loss(idx: np.ndarray) -> torch.Tensor:
            img = model.encode_image(pixels[idx].to(device), normalize=True)
            txt = model.encode_text(tokens[idx].to(device), normalize=True)
            return clip_loss(img, txt, model.logit_scale)

        def set_train(flag: bool) -> None:
            model.train(flag)

    before = held_out_metrics()
    t_train = time.perf_counter()
    params = [p for p in trainable.values() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    curve: list[dict[str, float]] = []
    best_val, best_state, bad_epochs, best_epoch = math.inf, None, 0, 0
    bar = tqdm(range(cfg.epochs), desc="fit-clip", unit="epoch")
    for epoch in bar:
        set_train(True)
        perm = train_idx[rng.permutation(len(train_idx))]
        losses = []
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            if len(idx) < 2:
                continue
            loss = batch_loss(idx)
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
        set_train(False)
        with torch.no_grad():
            val = float(np.mean([float(batch_loss(hold_idx[s:s + cfg.batch_size]))
                                 for s in range(0, len(hold_idx), cfg.batch_size) if len(hold_idx[s:s + cfg.batch_size]) > 1]
                                or [float("nan")]))
        curve.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                      "val_loss": val, "temperature": float(1 / model.logit_scale.detach().exp())})
        logger.debug("fit-clip epoch %d: train %.4f val %.4f", epoch + 1, curve[-1]["train_loss"], val)
        if val < best_val - 1e-4:
            best_val, bad_epochs, best_epoch = val, 0, epoch + 1
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
        else:
            bad_epochs += 1
        bar.set_postfix(train=f"{curve[-1]['train_loss']:.4f}", val=f"{val:.4f}", best=f"{best_val:.4f}", refresh=False)
        if bad_epochs >= cfg.patience:
            break
    bar.close()
    if best_state is not None:
        logger.info("fit-clip trained %d epochs; best held-out loss %.4f at epoch %d, kept", len(curve), best_val,
                    best_epoch)
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
    for p in model.parameters():
        p.requires_grad_(False)
    encoder.invalidate_id()
    timings["train"] = time.perf_counter() - t_train
    after = held_out_metrics()
    seconds = time.perf_counter() - t0
    metrics = {"before": before, "after": after, "pairs": len(pairs), "train": int(len(train_idx)),
               "held_out": int(len(hold_idx)), "mode": mode, "top_blocks": cfg.top_blocks if mode == "heads" else None,
               "epochs_run": len(curve), "best_val_loss": best_val, "seconds": seconds, "device": str(device),
               "timings": timings}
    _write_checkpoint(Path(out_dir), cfg, model, list(trainable), metrics, curve)
    logger.info("fit-clip done in %.1f s: %s", seconds, json.dumps(summary_table(metrics)))
    return FitClipResult(Path(out_dir), metrics, curve, seconds)


def _in_heads(name: str, top_blocks: int, model: torch.nn.Module) -> bool:
    if name in ("logit_scale", "logit_bias") or name.startswith("visual.head.") or name.startswith("text.proj."):
        return True
    if top_blocks:
        n_blocks = len(model.visual.trunk.blocks)
        if name.startswith(("visual.trunk.conv_head.", "visual.trunk.bn2.")):
            return True
        for b in range(n_blocks - top_blocks, n_blocks):
            if name.startswith(f"visual.trunk.blocks.{b}."):
                return True
    return False


def summary_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``attribute, chance, zero-shot before/after, P@10 random/before/after`` for printing."""
    rows = []
    for name, after in metrics["after"].items():
        before = metrics["before"].get(name, {})
        rows.append({
            "attribute": name, "classes": after["classes"], "chance": round(after["chance_majority"], 3),
            "zero_shot_before": round(before.get("zero_shot_accuracy", float("nan")), 3),
            "zero_shot_after": round(after["zero_shot_accuracy"], 3),
            "p@10_random": round(after["precision@10_random"], 3),
            "p@10_before": round(before.get("precision@10", float("nan")), 3),
            "p@10_after": round(after["precision@10"], 3),
        })
    return rows


def _write_checkpoint(out_dir: Path, cfg: FitClipConfig, model: torch.nn.Module, names: list[str],
                      metrics: dict[str, Any], curve: list[dict[str, float]]) -> None:
    from safetensors.torch import save_file

    with atomic_directory(out_dir) as tmp:
        state = model.state_dict()
        save_file({n: state[n].detach().cpu().contiguous() for n in names}, str(tmp / CHECKPOINT_WEIGHTS))
        spec = {"model": cfg.model, "pretrained": cfg.pretrained, "seed": cfg.seed, "image_size": cfg.image_size,
                "trained_tensors": len(names), "fit": asdict(cfg)}
        atomic_write_json(tmp / CHECKPOINT_CONFIG, spec)
        atomic_write_json(tmp / "metrics.json", {"metrics": metrics, "curve": curve})
        plot_curve(curve, tmp / "training_curve.png", title=f"fit-clip {cfg.model} ({metrics['mode']})")


def plot_curve(curve: list[dict[str, float]], path: Path, title: str) -> None:
    """Train/held-out loss per epoch as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    epochs = [c["epoch"] for c in curve]
    ax.plot(epochs, [c["train_loss"] for c in curve], label="train")
    ax.plot(epochs, [c["val_loss"] for c in curve], label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
