"""Per-item modality fusion: attention over text, image and graph/ID embeddings whose weights can be read out.

Each available modality ``m`` of item ``i`` is projected to the model dimension (``h_m``, (n, dim)); an additive
attention (HAN's semantic attention: ``s_m = q . tanh(W h_m + b)``) scores it, a softmax over the modalities the item
actually has gives ``w_i`` (n, 3) in the fixed order ``MODALITIES``, and the fused vector is ``sum_m w_im h_m``.
Missing modalities (no image for this item, no text model, a cold item without a trained ID row) get weight 0.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

MODALITIES: tuple[str, str, str] = ("text", "image", "graph")


class ModalityFusion(nn.Module):
    """Attention fusion of text, image and graph/ID embeddings, one weight vector per item.

    Args:
        dim: output dimension (= graph/ID embedding dimension).
        text_dim: dimension of the text vectors, or 0 when there is no text modality.
        image_dim: dimension of the image vectors, or 0 when there is no image modality.
        attention_dim: hidden size of the attention scorer.
    """

    def __init__(self, dim: int, text_dim: int = 0, image_dim: int = 0, attention_dim: int = 32):
        super().__init__()
        self.dim = dim
        self.text_proj = nn.Linear(text_dim, dim, bias=False) if text_dim else None
        self.image_proj = nn.Linear(image_dim, dim, bias=False) if image_dim else None
        self.att = nn.Linear(dim, attention_dim)
        self.query = nn.Parameter(torch.zeros(attention_dim))
        for proj in (self.text_proj, self.image_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=0.1 / max(proj.in_features, 1) ** 0.5)
        nn.init.normal_(self.query, std=0.1)

    def forward(
        self,
        graph: Tensor | None,
        text: Tensor | None = None,
        image: Tensor | None = None,
        present: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Fuse modalities.

        Args:
            graph: (n, dim) graph/ID embeddings, or None (cold items: content only).
            text: (n, text_dim) text vectors or None.
            image: (n, image_dim) image vectors or None.
            present: (n, 3) bool, which modalities each item has (text, image, graph); default: every given one.

        Returns:
            fused (n, dim) and weights (n, 3) (rows sum to 1 over present modalities; 0 for absent ones).
        """
        ref = next(t for t in (graph, text, image) if t is not None)
        n, device = ref.shape[0], ref.device
        parts: list[Tensor] = []
        avail = torch.zeros(n, 3, dtype=torch.bool, device=device)
        zeros = torch.zeros(n, self.dim, device=device)
        for k, (x, proj) in enumerate(((text, self.text_proj), (image, self.image_proj), (graph, None))):
            if x is None or (proj is None and k < 2):
                parts.append(zeros)
                continue
            parts.append(proj(x) if proj is not None else x)
            avail[:, k] = True
        if present is not None:
            avail &= present.to(device)
        h = torch.stack(parts, dim=1)  # (n, 3, dim)
        if bool((avail.sum(1) <= 1).all()):
            # one modality (or none) per item: the softmax is exactly one-hot and passes no gradient to the scorer,
            # so skip scoring (text-only items: ~15% of a training step on ml-100k, measured)
            weights = avail.to(h.dtype)
            return (weights.unsqueeze(-1) * h).sum(1), weights
        scores = torch.tanh(self.att(h)) @ self.query  # (n, 3)
        scores = scores.masked_fill(~avail, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        weights = torch.nan_to_num(weights, nan=0.0)  # an item with no modality at all gets a zero vector
        return (weights.unsqueeze(-1) * h).sum(1), weights
