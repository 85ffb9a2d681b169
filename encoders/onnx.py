"""Query encoders in ONNX Runtime: the same forward as the torch encoders, cheaper per call on CPU.

A search request encodes a few short texts; on one CPU thread PyTorch's eager overhead per operator is a large part
of that (all-MiniLM-L6-v2, 16 queries of ~6 tokens: ~33 ms in torch, ~22 ms in ONNX Runtime). These wrappers export
the encoder's own forward (BERT + masked mean pooling + L2 normalisation; CLIP's text tower + projection) with
``torch.onnx.export`` into memory, run it in an ``onnxruntime.InferenceSession``, and check at construction that the
vectors equal the torch encoder's on probe texts (max abs difference <= ``tolerance``; measured ~2e-7). Anything that
fails — onnxruntime missing, an export error, a disagreement — raises :class:`~kgrec.errors.EncoderError`;
:func:`onnx_query_encoders` turns that into a logged fallback to torch. Nothing is written to disk.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Sequence

import numpy as np
import torch

from kgrec.errors import EncoderError

logger = logging.getLogger(__name__)

PROBE_TEXTS = ("red cotton shirt", "a", "blue denim jacket for men with two pockets and a zip",
               "Lederhose größe 52 — braun", "")


def _session(model: bytes, threads: int) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EncoderError("ONNX query encoding needs onnxruntime: pip install onnxruntime") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str],
            dynamic: dict[str, dict[int, str]], outputs: list[str] | None = None) -> bytes:
    """ONNX bytes of ``module`` traced on ``args`` (TorchScript exporter, opset 17, dynamic batch/length axes)."""
    import warnings

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buf, input_names=names, output_names=outputs or ["vectors"],
                              dynamic_axes=dynamic, opset_version=17, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean "use torch"
        raise EncoderError(f"could not export the query encoder to ONNX: {type(exc).__name__}: {exc}") from exc
    return buf.getvalue()


def _feed(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """ONNX Runtime inputs of a padded text batch (``TextEncoder.padded_batches``)."""
    return {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}


class _BertQueryModule(torch.nn.Module):
    """``TextEncoder.forward_batch`` as a module of (input_ids, attention_mask) -> (b, dim) unit vectors."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from encoders.text import mean_pool

        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids))
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


class _ClipTextModule(torch.nn.Module):
    """``open_clip`` ``encode_text(tokens, normalize=True)`` as a module."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


class OnnxTextQueryEncoder:
    """:class:`~encoders.text.TextEncoder` ``encode`` for queries, run by ONNX Runtime on CPU.

    Same tokenisation (truncation to the encoder's ``max_length``, texts sorted by length, padded per batch) and the
    same output: (n, dim) float32 L2-normalised rows, equal to the torch encoder's to ``max_abs_diff``.
    """

    def __init__(self, encoder: Any, threads: int = 1, tolerance: float = 1e-5) -> None:
        self.encoder = encoder
        self.dim = int(encoder.dim)
        was_training = encoder.model.training
        encoder.model.eval()
        try:
            ids = encoder._pad([[101, 2000, 2001, 102], [101, 2003, 102]])
            model = _export(_BertQueryModule(encoder.model), (ids["input_ids"], ids["attention_mask"]),
                            ["input_ids", "attention_mask"],
                            {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                             "vectors": {0: "batch"}})
        finally:
            encoder.model.train(was_training)
        self.session = _session(model, threads)
        self.max_abs_diff = _check(self.encode(list(PROBE_TEXTS)), encoder.encode(list(PROBE_TEXTS)), tolerance, "text")

    def encode(self, inputs: Sequence[str]) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" for t in inputs]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for rows, _, batch in self.encoder.padded_batches(texts):
            out[rows] = self.session.run(None, _feed(batch))[0]
        return out


class OnnxClipQueryEncoder:
    """CLIP text tower for queries (:func:`kgrec.pipeline.encode_clip_queries` semantics: tokens cut after the
    last non-pad column) run by ONNX Runtime; open_clip Hugging Face text towers only."""

    def __init__(self, clip_encoder: Any, threads: int = 1, tolerance: float = 1e-5) -> None:
        from kgrec.pipeline import encode_clip_queries

        self.clip = clip_encoder
        model, tokenizer = clip_encoder.model, clip_encoder.tokenizer
        self.pad = getattr(getattr(getattr(model, "text", None), "config", None), "pad_token_id", None)
        if self.pad is None or type(model.text).__name__ != "HFTextEncoder":
            raise EncoderError("ONNX CLIP query encoding supports open_clip Hugging Face text towers only")
        was_training = model.training
        model.eval()
        try:
            tokens = tokenizer(["warm up the text tower", "a"])[:, :8]
            onnx_model = _export(_ClipTextModule(model), (tokens,), ["tokens"],
                                 {"tokens": {0: "batch", 1: "tokens"}, "vectors": {0: "batch"}})
        finally:
            model.train(was_training)
        self.session = _session(onnx_model, threads)
        self.max_abs_diff = _check(self.encode(list(PROBE_TEXTS)), encode_clip_queries(clip_encoder, list(PROBE_TEXTS)),
                                   tolerance, "CLIP text")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" for t in texts]
        if not texts:
            return np.zeros((0, int(self.clip.dim)), dtype=np.float32)
        tokens = self.clip.tokenizer(texts)
        width = int((tokens != self.pad).any(dim=0).nonzero().max()) + 1
        return self.session.run(None, {"tokens": tokens[:, :width].numpy()})[0].astype(np.float32, copy=False)


class _SharedModule(torch.nn.Module):
    """One BERT forward, two outputs: the text encoder's vector and the CLIP text tower's (mean pool, projection)."""

    def __init__(self, model: torch.nn.Module, proj: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.proj = model, proj

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from encoders.text import mean_pool

        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids))
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        norm = torch.nn.functional.normalize
        return norm(pooled.float(), dim=-1), norm(self.proj(pooled).float(), dim=-1)


def shares_text_tower(text_encoder: Any, clip_encoder: Any) -> bool:
    """True when the CLIP text tower is the text encoder's transformer with a mean pooler and a projection: same
    weights (every tensor equal), same vocabulary and pad id. The default CLIP (EfficientNet-Lite0 + the packaged
    MiniLM, not fine-tuned) is such a model: one forward then gives both query vectors."""
    model = getattr(clip_encoder, "model", None)
    tower = getattr(model, "text", None)
    if (tower is None or type(tower).__name__ != "HFTextEncoder" or type(getattr(tower, "pooler", None)).__name__
            != "MeanPooler" or not isinstance(getattr(tower, "proj", None), torch.nn.Linear)
            or not hasattr(text_encoder, "_pad")):
        return False
    mine, theirs = text_encoder.model.state_dict(), tower.transformer.state_dict()
    if any(k not in mine or mine[k].shape != v.shape or not torch.equal(mine[k].cpu(), v.cpu())
           for k, v in theirs.items()):
        return False
    clip_tok = getattr(clip_encoder.tokenizer, "tokenizer", None)
    return (clip_tok is not None and clip_tok.get_vocab() == text_encoder.tokenizer.get_vocab()
            and tower.config.pad_token_id == (text_encoder.tokenizer.pad_token_id or 0))


class OnnxSharedQueryEncoder:
    """Text and CLIP query vectors from one ONNX Runtime forward of the shared transformer (see
    :func:`shares_text_tower`); ``views()`` gives the two encoders the recommender uses.

    A text the text encoder may have truncated (``max_length`` tokens or more) gets its CLIP vector from
    ``clip_fallback`` instead: the CLIP tokenizer keeps up to its own context length. The last results are kept so
    that asking for the text and then the CLIP vectors of the same texts runs one forward.
    """

    def __init__(self, text_encoder: Any, clip_encoder: Any, clip_fallback: Any, threads: int = 1,
                 tolerance: float = 1e-5) -> None:
        from kgrec.pipeline import encode_clip_queries

        if not shares_text_tower(text_encoder, clip_encoder):
            raise EncoderError("the CLIP text tower is not the text encoder's transformer: nothing to share")
        self.encoder, self.clip_fallback = text_encoder, clip_fallback
        self.dims = (int(text_encoder.dim), int(clip_encoder.dim))
        self.context = int(clip_encoder.tokenizer.context_length) if hasattr(clip_encoder.tokenizer,
                                                                             "context_length") else 0
        was_training = clip_encoder.model.training
        clip_encoder.model.eval()
        try:
            ids = text_encoder._pad([[101, 2000, 2001, 102], [101, 2003, 102]])
            model = _export(_SharedModule(text_encoder.model, clip_encoder.model.text.proj),
                            (ids["input_ids"], ids["attention_mask"]), ["input_ids", "attention_mask"],
                            {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                             "vectors": {0: "batch"}, "clip_vectors": {0: "batch"}}, outputs=["vectors", "clip_vectors"])
        finally:
            clip_encoder.model.train(was_training)
        self.session = _session(model, threads)
        self._last: tuple[tuple[str, ...], np.ndarray, np.ndarray] | None = None
        probe = list(PROBE_TEXTS)
        text_vecs, clip_vecs = self.encode(probe)
        self.max_abs_diff = max(_check(text_vecs, text_encoder.encode(probe), tolerance, "shared text"),
                                _check(clip_vecs, encode_clip_queries(clip_encoder, probe), tolerance, "shared CLIP"))

    def encode(self, inputs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(text vectors (n, d_text), CLIP text vectors (n, d_clip)), float32, L2-normalised."""
        texts = tuple(t if isinstance(t, str) else "" for t in inputs)
        last = self._last
        if last is not None and last[0] == texts:
            return last[1], last[2]
        limit = min(self.encoder.max_length, self.context or self.encoder.max_length)
        text_out = np.zeros((len(texts), self.dims[0]), dtype=np.float32)
        clip_out = np.zeros((len(texts), self.dims[1]), dtype=np.float32)
        long: list[int] = []
        for rows, ids, batch in self.encoder.padded_batches(texts):
            text_out[rows], clip_out[rows] = self.session.run(None, _feed(batch))
            long += [int(r) for r, x in zip(rows, ids) if len(x) >= limit]
        if long:  # maybe truncated by the text encoder: the CLIP tower sees its own (longer) context
            clip_out[long] = self.clip_fallback([texts[i] for i in long])
        self._last = (texts, text_out, clip_out)
        return text_out, clip_out

    def views(self) -> dict[str, Any]:
        return {"text": _SharedView(self, 0), "clip": _SharedView(self, 1)}


class _SharedView:
    def __init__(self, shared: OnnxSharedQueryEncoder, which: int) -> None:
        self.shared, self.which, self.max_abs_diff = shared, which, shared.max_abs_diff

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.shared.encode(texts)[self.which]


def _check(got: np.ndarray, want: np.ndarray, tolerance: float, what: str) -> float:
    diff = float(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max())
    if not np.isfinite(diff) or diff > tolerance:
        raise EncoderError(f"ONNX {what} query encoder disagrees with torch (max abs diff {diff:.2e} > {tolerance})")
    return diff


def onnx_query_encoders(text_encoder: Any, clip_encoder: Any, threads: int = 1) -> dict[str, Any]:
    """``{"text": ..., "clip": ...}`` ONNX Runtime query encoders for the encoders that can have one.

    When the CLIP text tower is the text encoder's transformer (:func:`shares_text_tower`), both come from one
    :class:`OnnxSharedQueryEncoder` (one forward per query instead of two). An encoder that cannot be exported,
    has no ONNX equivalent, runs on a GPU, or disagrees with torch is left out (logged): the caller keeps torch
    for it.
    """
    out: dict[str, Any] = {}
    for kind, enc, cls in (("text", text_encoder, OnnxTextQueryEncoder), ("clip", clip_encoder, OnnxClipQueryEncoder)):
        if enc is None or getattr(getattr(enc, "device", None), "type", "cpu") != "cpu":
            continue
        if kind == "text" and not hasattr(enc, "_pad"):  # e.g. the static encoder: nothing to speed up
            continue
        try:
            out[kind] = cls(enc, threads=threads)
            logger.info("ONNX Runtime %s query encoder ready (max abs diff vs torch %.1e)", kind, out[kind].max_abs_diff)
        except EncoderError as exc:
            logger.warning("%s queries stay on torch: %s", kind, exc)
    if "text" in out and clip_encoder is not None and shares_text_tower(text_encoder, clip_encoder):
        from kgrec.pipeline import encode_clip_queries

        fallback = out["clip"].encode if "clip" in out else (lambda texts: encode_clip_queries(clip_encoder, texts))
        try:
            shared = OnnxSharedQueryEncoder(text_encoder, clip_encoder, fallback, threads=threads)
            out.update(shared.views())
            logger.info("text and CLIP queries share one forward (max abs diff vs torch %.1e)", shared.max_abs_diff)
        except EncoderError as exc:
            logger.warning("text and CLIP queries stay apart: %s", exc)
    return out
