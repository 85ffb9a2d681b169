"""Baselines in the same harness: popularity, item-KNN, RP3beta, EASE (closed forms), and BPR-MF / LightGCN (PyG).

The closed-form models share a two-method shape: ``fit(train)`` with a (num_users, num_items) CSR of training
positives, then ``score(users)`` -> (b, num_items) float32 tensor. BPR-MF and PyG's ``LightGCN`` are trained by
``fusion.train.fit_embeddings`` (same sampler, loss and early stopping as our model) via ``train_bpr_mf`` /
``train_lightgcn``.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from kgrec.errors import ModelNotTrainedError

logger = logging.getLogger(__name__)


class _ClosedForm:
    name = "closed-form"

    def __init__(self) -> None:
        self._train: sp.csr_matrix | None = None

    def _check(self) -> sp.csr_matrix:
        if self._train is None:
            raise ModelNotTrainedError(f"{type(self).__name__}.score called before fit(train)")
        return self._train

    def _rows(self, users: Tensor | np.ndarray) -> Tensor:
        x = self._check()[np.asarray(torch.as_tensor(users).cpu())]
        return torch.as_tensor(x.toarray(), dtype=torch.float32)


class Popularity(_ClosedForm):
    """True training popularity (positives only); ties go to the lower item index (RecBole's PopExact)."""

    name = "popularity"

    def fit(self, train: sp.csr_matrix) -> Popularity:
        self._train = sp.csr_matrix(train)
        counts = np.asarray((self._train > 0).sum(axis=0)).ravel().astype(np.float64)
        n = len(counts)
        # integer counts + a tie-break in [0, 0.5) that prefers lower indices
        self.item_scores = torch.as_tensor(counts + 0.5 * (1.0 - np.arange(n) / n), dtype=torch.float64)
        return self

    def score(self, users: Tensor | np.ndarray) -> Tensor:
        self._check()
        return self.item_scores.expand(len(users), -1)


class EASE(_ClosedForm):
    """Embarrassingly Shallow Autoencoder (Steck 2019): ``B = I - P diagMat(1/diag(P))``, ``P = (X'X + lam I)^-1``.

    ``side`` optionally adds side information as extra pseudo-users (collective EASE): the Gram matrix becomes
    ``X'X + side_weight * F F'`` with ``F`` (num_items, num_features).
    """

    name = "ease"

    def __init__(self, lam: float = 300.0, side: sp.csr_matrix | None = None, side_weight: float = 0.0, device: str = "cpu"):
        super().__init__()
        self.lam, self.side, self.side_weight, self.device = lam, side, side_weight, torch.device(device)

    def fit(self, train: sp.csr_matrix) -> EASE:
        self._train = sp.csr_matrix(train)
        gram = torch.as_tensor((self._train.T @ self._train).toarray(), dtype=torch.float64, device=self.device)
        if self.side is not None and self.side_weight > 0:
            f = sp.csr_matrix(self.side)
            gram += self.side_weight * torch.as_tensor((f @ f.T).toarray(), dtype=torch.float64, device=self.device)
        gram.diagonal().add_(self.lam)
        p = torch.linalg.inv(gram)
        b = -p / torch.diagonal(p)
        b.fill_diagonal_(0.0)
        self.B = b.float()
        return self

    def score(self, users: Tensor | np.ndarray) -> Tensor:
        return self._rows(users).to(self.device) @ self.B


class ItemKNN(_ClosedForm):
    """Item-based KNN: cosine similarity with shrinkage, top-``k`` neighbours per item."""

    name = "itemknn"

    def __init__(self, k: int = 100, shrink: float = 50.0):
        super().__init__()
        self.k, self.shrink = k, shrink

    def fit(self, train: sp.csr_matrix) -> ItemKNN:
        self._train = sp.csr_matrix(train)
        x = self._train
        co = (x.T @ x).toarray().astype(np.float64)
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-12)
        np.fill_diagonal(sim, 0.0)
        if self.k < sim.shape[0]:
            kth = np.argpartition(-sim, self.k, axis=0)[self.k :]
            np.put_along_axis(sim, kth, 0.0, axis=0)
        self.W = torch.as_tensor(sim, dtype=torch.float32)
        return self

    def score(self, users: Tensor | np.ndarray) -> Tensor:
        return self._rows(users) @ self.W


class RP3beta(_ClosedForm):
    """RP3beta (Paudel et al. 2017): 3-step random walk item->user->item, popularity-penalised by ``deg^beta``."""

    name = "rp3beta"

    def __init__(self, alpha: float = 0.8, beta: float = 0.6):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def fit(self, train: sp.csr_matrix) -> RP3beta:
        self._train = sp.csr_matrix(train)
        x = self._train.toarray().astype(np.float64)
        pui = x / np.maximum(x.sum(1, keepdims=True), 1)
        piu = (x / np.maximum(x.sum(0, keepdims=True), 1)).T
        w = (piu ** self.alpha) @ (pui ** self.alpha)
        w /= np.maximum(x.sum(0), 1)[None, :] ** self.beta
        np.fill_diagonal(w, 0.0)
        self.W = torch.as_tensor(w, dtype=torch.float32)
        return self

    def score(self, users: Tensor | np.ndarray) -> Tensor:
        return self._rows(users) @ self.W


class MatrixFactorization(nn.Module):
    """BPR-MF: a user and an item embedding table; ``forward`` returns them (the shape ``fit_embeddings`` uses)."""

    def __init__(self, num_users: int, num_items: int, dim: int = 64):
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.xavier_normal_(self.user.weight)
        nn.init.xavier_normal_(self.item.weight)

    def forward(self) -> tuple[Tensor, Tensor, Tensor, None]:
        ego = torch.cat([self.user.weight, self.item.weight])
        return self.user.weight, self.item.weight, ego, None


class PyGLightGCN(nn.Module):
    """PyG's ``torch_geometric.nn.models.LightGCN`` on the user-item bipartite graph (users first, then items)."""

    def __init__(self, num_users: int, num_items: int, train_users: np.ndarray, train_items: np.ndarray, dim: int = 64, num_layers: int = 2):
        super().__init__()
        from torch_geometric.nn.models import LightGCN

        self.num_users, self.num_items = num_users, num_items
        u = torch.tensor(np.asarray(train_users, dtype=np.int64))  # a copy: the inputs may be read-only views
        i = torch.tensor(np.asarray(train_items, dtype=np.int64)) + num_users
        n = num_users + num_items
        edge_index = torch.stack([torch.cat([u, i]), torch.cat([i, u])])
        # a torch sparse CSR adjacency takes PyG's SpMM path: same result as the edge_index, ~8x faster (measured)
        self.adj_t = torch.sparse_coo_tensor(edge_index, torch.ones(edge_index.shape[1]), (n, n)).coalesce().to_sparse_csr()
        self.model = LightGCN(n, dim, num_layers)

    def forward(self) -> tuple[Tensor, Tensor, Tensor, None]:
        self.adj_t = self.adj_t.to(self.model.embedding.weight.device)
        out = self.model.get_embedding(self.adj_t)
        return out[: self.num_users], out[self.num_users :], self.model.embedding.weight, None
