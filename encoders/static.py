"""Static (Model2Vec-style) text encoder distilled from a BERT-family sentence encoder, for big catalogs.

Distillation runs every vocabulary token (or every token that occurs in a given corpus) through the transformer once,
as ``[CLS] token [SEP]``, and keeps the mean-pooled output as that token's row; rows are optionally reduced by PCA and
each token gets a SIF weight ``a / (a + p(token))`` (``p`` from the corpus' token frequencies when a corpus is given,
else a Zipf law over vocabulary rank, as Model2Vec does). A text is then the weighted mean of its tokens' rows,
L2-normalised: one sparse matrix product per chunk of texts instead of a transformer forward pass, thousands of
texts per second on one CPU core (Tulkens & van Dongen, "Model2Vec", 2024; Arora et al., "SIF", 2017).

Why not the ``model2vec`` package: version 0.10.0 pins ``transformers`` 5.3 / ``tokenizers`` 0.22 (this project uses
5.23 / 0.23), so it cannot share the venv; the method itself is a few lines.

Saved as a directory: ``static.json`` (base model, dims, weighting) + ``embeddings.safetensors`` (``embeddings``
(V, d) float32, ``weights`` (V,) float32) + the tokenizer files. No pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from encoders.base import l2_normalise, tokenizer_fingerprint
from kgrec.errors import EncoderError

logger = logging.getLogger(__name__)

STATIC_PREFIX = "static:"
FORMAT_VERSION = 1


class StaticTextEncoder:
    """Texts -> ``(n, dim)`` float32 L2-normalised vectors as weighted means of per-token rows.

    Args:
        tokenizer: a Hugging Face tokenizer (the base model's).
        embeddings: (vocab_size, dim) float32 token rows (zero rows for tokens left out of distillation).
        weights: (vocab_size,) float32 per-token weights (0 for special tokens and tokens left out).
        base: name of the model it was distilled from (for ``model_id``).
        max_length: tokens kept per text.
        chunk_size: texts tokenised and multiplied at once (bounds memory on million-item catalogs).
    """

    def __init__(self, tokenizer: Any, embeddings: np.ndarray, weights: np.ndarray, base: str = "",
                 max_length: int = 256, chunk_size: int = 20_000, info: dict[str, Any] | None = None):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if embeddings.ndim != 2 or weights.shape != (embeddings.shape[0],):
            raise EncoderError(f"static encoder: embeddings {embeddings.shape} and weights {weights.shape} do not match "
                               "(need (V, d) and (V,))")
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.weights = weights
        self.base = base
        self.max_length = int(max_length)
        self.chunk_size = int(chunk_size)
        self.info = dict(info or {})
        self._model_id: str | None = None

    # ---------------------------------------------------------------- Encoder protocol
    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def model_id(self) -> str:
        """``static:<base>:<sha256 of rows and weights>[:16]:tok<tokenizer sha256[:8]>:len<max_length>``."""
        if self._model_id is None:
            h = hashlib.sha256(self.embeddings.tobytes())
            h.update(self.weights.tobytes())
            self._model_id = (f"static:{self.base}:{h.hexdigest()[:16]}:tok{tokenizer_fingerprint(self.tokenizer)[:8]}"
                              f":len{self.max_length}")
        return self._model_id

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without special tokens, truncated to ``max_length``."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=self.max_length)
        return enc["input_ids"]

    def encode(self, inputs: Sequence[str]) -> np.ndarray:
        """Texts -> ``(n, dim)`` float32, L2-normalised; identical texts are encoded once (hash dedupe).

        A text with no weighted token (empty, or only tokens left out of distillation) gives a zero row.
        """
        import pandas as pd

        texts = [t if isinstance(t, str) else "" for t in inputs]
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        codes, uniques = pd.factorize(pd.Series(texts, dtype=object), sort=False)
        uniq = np.zeros((len(uniques), self.dim), dtype=np.float32)
        for s in range(0, len(uniques), self.chunk_size):
            ids = self.token_ids(uniques[s:s + self.chunk_size].tolist())
            lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            cols = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
            indptr = np.concatenate([[0], np.cumsum(lengths)])
            m = sp.csr_matrix((self.weights[cols], cols, indptr), shape=(len(ids), len(self.weights)))
            uniq[s:s + len(ids)] = m @ self.embeddings  # weighted sum; the L2 norm below makes it the weighted mean
        norms = np.linalg.norm(uniq, axis=1, keepdims=True)
        uniq = np.where(norms > 0, uniq / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
        out[:] = uniq[codes]
        return out

    def with_corpus_weights(self, corpus: Sequence[str], sif_coefficient: float | None = None) -> StaticTextEncoder:
        """The same token rows with SIF weights ``a / (a + p(token))`` from ``corpus``'s token frequencies (tokens
        that had weight 0, i.e. special or left out, stay 0)."""
        a = float(sif_coefficient if sif_coefficient is not None else self.info.get("sif_coefficient", 1e-3))
        weights = sif_weights(self.token_ids(corpus), len(self.weights), a)
        weights[self.weights == 0] = 0.0
        info = {**self.info, "weighting": "corpus", "sif_coefficient": a, "corpus_texts": len(corpus)}
        return StaticTextEncoder(self.tokenizer, self.embeddings, weights, self.base, self.max_length,
                                 self.chunk_size, info)

    # ---------------------------------------------------------------- distillation
    @classmethod
    def distill(
        cls,
        base: Any = "packaged:all-MiniLM-L6-v2",
        *,
        corpus: Sequence[str] | None = None,
        vocabulary: str = "all",
        pca_dims: int | None = 256,
        sif_coefficient: float = 1e-3,
        batch_size: int = 1024,
        max_length: int = 256,
        show_progress: bool = False,
    ) -> StaticTextEncoder:
        """Distil a static encoder from ``base`` (a :class:`~encoders.text.TextEncoder` or a name it accepts).

        Args:
            corpus: texts whose token frequencies give the SIF weights (and the token set with
                ``vocabulary="corpus"``); without it a Zipf law over vocabulary rank stands in.
            vocabulary: ``"all"`` (every non-special token) or ``"corpus"`` (only tokens occurring in ``corpus``).
            pca_dims: reduce rows to this many principal components (None or >= hidden size: keep all).
            sif_coefficient: ``a`` in ``a / (a + p)``; smaller down-weights frequent tokens more.
        """
        import torch

        from encoders.text import TextEncoder

        t0 = time.perf_counter()
        enc = base if isinstance(base, TextEncoder) else TextEncoder(str(base), device="cpu")
        tok = enc.tokenizer
        vocab_size = int(getattr(enc.model.config, "vocab_size", len(tok)))
        special = set(int(i) for i in tok.all_special_ids)
        counts = np.zeros(vocab_size, dtype=np.float64)
        if corpus is not None:
            ids = tok(list(corpus), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            flat = np.fromiter((t for x in ids for t in x), dtype=np.int64)
            counts = np.bincount(flat, minlength=vocab_size)[:vocab_size].astype(np.float64)
        if vocabulary == "corpus":
            if corpus is None:
                raise EncoderError('vocabulary="corpus" needs a corpus of texts')
            keep = np.flatnonzero(counts > 0)
        elif vocabulary == "all":
            keep = np.arange(vocab_size)
        else:
            raise EncoderError(f'vocabulary must be "all" or "corpus", not {vocabulary!r}')
        keep = np.array([t for t in keep if int(t) not in special], dtype=np.int64)
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        rows = np.zeros((len(keep), enc.dim), dtype=np.float32)
        batches = range(0, len(keep), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="distil", unit="batch")
        enc.model.eval()
        with torch.inference_mode():
            for s in batches:
                ids = torch.as_tensor(keep[s:s + batch_size]).unsqueeze(1)
                parts = [ids]
                if cls_id is not None:
                    parts.insert(0, torch.full_like(ids, cls_id))
                if sep_id is not None:
                    parts.append(torch.full_like(ids, sep_id))
                x = torch.cat(parts, dim=1)
                batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "token_type_ids": torch.zeros_like(x)}
                out = enc.model(**{k: v.to(enc.device) for k, v in batch.items()}).last_hidden_state
                rows[s:s + len(ids)] = out.mean(1).float().cpu().numpy()  # the base model's mean pooling
        if pca_dims is not None and pca_dims < rows.shape[1] and len(rows) > pca_dims:
            centred = rows - rows.mean(0, keepdims=True)
            _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
            rows = (centred @ vt[:pca_dims].T).astype(np.float32)
        if corpus is not None:
            p = counts / max(counts.sum(), 1.0)
        else:  # Zipf over vocabulary rank (ids of BERT WordPiece vocabularies roughly follow frequency)
            rank = np.arange(1, vocab_size + 1, dtype=np.float64)
            p = (1.0 / rank) / (1.0 / rank).sum()
        weights = np.zeros(vocab_size, dtype=np.float32)
        weights[keep] = (sif_coefficient / (sif_coefficient + p[keep])).astype(np.float32)
        embeddings = np.zeros((vocab_size, rows.shape[1]), dtype=np.float32)
        embeddings[keep] = rows
        info = {"tokens": int(len(keep)), "vocabulary": vocabulary, "pca_dims": pca_dims,
                "sif_coefficient": sif_coefficient, "weighting": "corpus" if corpus is not None else "zipf",
                "distill_seconds": round(time.perf_counter() - t0, 2)}
        logger.info("distilled a static encoder from %s: %d tokens, dim %d, %.1f s", enc.name, len(keep),
                    embeddings.shape[1], info["distill_seconds"])
        return cls(tok, embeddings, weights, base=enc.model_id, max_length=max_length, info=info)

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``static.json``, ``embeddings.safetensors`` and the tokenizer files; atomic directory swap."""
        from safetensors.numpy import save_file

        from kgrec.data.schema import atomic_directory

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            save_file({"embeddings": self.embeddings, "weights": self.weights}, str(tmp / "embeddings.safetensors"))
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            meta = {"format_version": FORMAT_VERSION, "kind": "static_text_encoder", "base": self.base,
                    "dim": self.dim, "vocab_size": int(len(self.weights)), "max_length": self.max_length,
                    "info": self.info}
            (tmp / "static.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> StaticTextEncoder:
        """Read a directory written by :meth:`save`."""
        from safetensors.numpy import load_file
        from transformers import AutoTokenizer

        directory = Path(directory)
        meta_path = directory / "static.json"
        if not meta_path.is_file() or not (directory / "embeddings.safetensors").is_file():
            raise EncoderError(f"{directory} is not a saved static text encoder (needs static.json and "
                               "embeddings.safetensors); write one with StaticTextEncoder.distill(...).save(DIR)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise EncoderError(f"{meta_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}; "
                               "distil it again")
        t = load_file(str(directory / "embeddings.safetensors"))
        tok = AutoTokenizer.from_pretrained(str(directory / "tokenizer"), local_files_only=True)
        return cls(tok, t["embeddings"], t["weights"], base=meta["base"], max_length=meta["max_length"],
                   info=meta.get("info"))


def sif_weights(token_ids: Sequence[Sequence[int]], vocab_size: int, a: float = 1e-3) -> np.ndarray:
    """(vocab_size,) float32 SIF weights ``a / (a + p(t))`` with ``p`` the token frequencies in ``token_ids``."""
    flat = np.fromiter((t for x in token_ids for t in x), dtype=np.int64)
    counts = np.bincount(flat, minlength=vocab_size)[:vocab_size].astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    return (a / (a + p)).astype(np.float32)


def static_encoder_from_name(name: str, *, corpus: Sequence[str] | None = None,
                             pca_dims: int | None = 256) -> StaticTextEncoder:
    """``static:<DIR>`` loads a saved static encoder; ``static:<base>`` distils one from ``<base>`` (a packaged
    name, a checkpoint directory or a hub name the text encoder accepts; about a minute on 2 CPU cores)."""
    rest = name[len(STATIC_PREFIX):] if name.startswith(STATIC_PREFIX) else name
    if (Path(rest) / "static.json").is_file():
        return StaticTextEncoder.load(rest)
    return StaticTextEncoder.distill(rest or "packaged:all-MiniLM-L6-v2", corpus=corpus, pca_dims=pca_dims)


def encoder_agreement(a: np.ndarray, b: np.ndarray, k: int = 10, pairs: int = 20_000, seed: int = 0) -> dict[str, float]:
    """How closely two encodings of the same texts agree: mean top-``k`` neighbour overlap (cosine, self excluded)
    and Spearman correlation of the cosines of ``pairs`` random text pairs. ``a``, ``b``: (n, d_a), (n, d_b)."""
    from scipy.stats import spearmanr

    a, b = l2_normalise(a), l2_normalise(b)
    n = len(a)
    k = min(k, n - 1)

    def knn(x: np.ndarray) -> np.ndarray:
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return np.argpartition(-s, k, axis=1)[:, :k]

    na, nb = knn(a), knn(b)
    overlap = float(np.mean([len(np.intersect1d(na[r], nb[r])) / k for r in range(n)]))
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    ok = i != j
    rho = spearmanr(np.einsum("nd,nd->n", a[i[ok]], a[j[ok]]), np.einsum("nd,nd->n", b[i[ok]], b[j[ok]])).statistic
    return {f"knn@{k}_overlap": round(overlap, 4), "pairwise_cosine_spearman": round(float(rho), 4)}
