"""A relation-aware LightGCN over user-item interactions and knowledge-graph relations, with fused item inputs.

Graph: one global node space (users, items, then every other HeteroData node type: brand, category, attribute,
entity...). Each relation ``r`` (the training interactions, and every KG edge type, made undirected) has an adjacency
``A_r = D^-1/2 E_r D^-1/2`` (``D``: degrees over all relations, so a node's neighbours share one budget) and a learned
gate ``a_r = 2 * sigmoid(theta_r)``
(interactions fixed at 1). One layer is ``h^{l+1} = sum_r a_r A_r h^l``, computed as one SpMM with a CSR matrix whose
values are ``a_r * norm`` (``GatedSymmetricSpMM``). We do not go through PyG's ``LGConv`` here, on measurement
(ml-100k, 1 CPU thread, 2 layers): its gather/scatter message passing took ~1.1 s per forward+backward, its
``adj_t`` SpMM path ~0.1 s because autograd transposes the CSR matrix on every backward; ``SymmetricSpMM`` below
reuses ``A`` (symmetric, so ``A^T = A``) for the gradient: ~0.015 s. PyG's own ``LightGCN`` is the baseline. Final vectors are the mean over
layers 0..L (LightGCN, He et al. 2020). Item inputs at layer 0 come from ``ModalityFusion`` over text, image and the
item's ID embedding.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from kgrec.errors import DataError
from fusion.fusion import ModalityFusion

logger = logging.getLogger(__name__)

INTERACTION = "interaction"


@dataclass
class RelationalGraph:
    """Undirected multi-relational graph in a global node space (users first, then items, then KG nodes).

    ``edge_index`` (2, E) int64 holds both directions of every edge; ``edge_rel`` (E,) the relation id (0 =
    training interactions); ``norm`` (E,) float32 the symmetric normalisation over all relations.
    """

    num_users: int
    num_items: int
    num_nodes: int
    node_offsets: dict[str, int]
    relations: list[str]
    edge_index: Tensor
    edge_rel: Tensor
    norm: Tensor
    node_types: list[str] = field(default_factory=list)

    crow: Tensor | None = None
    # the transpose of the user+item rows of A (A[:, :n_targets] in CSR order over all nodes): col -> row order
    t_crow: Tensor | None = None
    t_col: Tensor | None = None
    t_perm: Tensor | None = None

    @property
    def num_targets(self) -> int:
        """Users + items: the rows whose final vectors are used."""
        return self.num_users + self.num_items

    def to(self, device: torch.device | str) -> RelationalGraph:
        self.edge_index = self.edge_index.to(device)
        self.edge_rel = self.edge_rel.to(device)
        self.norm = self.norm.to(device)
        for name in ("crow", "t_crow", "t_col", "t_perm"):
            v = getattr(self, name)
            setattr(self, name, None if v is None else v.to(device))
        return self

    def build_adjacency(self) -> RelationalGraph:
        """Sort the edges by (row, col) into CSR order once: ``crow`` (num_nodes + 1,), and keep ``row``, ``col``,
        ``norm``, ``rel`` in that order (the gated adjacency is rebuilt from them on every forward)."""
        order = torch.argsort(self.edge_index[0] * self.num_nodes + self.edge_index[1])
        self.edge_index, self.edge_rel, self.norm = self.edge_index[:, order], self.edge_rel[order], self.norm[order]
        counts = torch.bincount(self.edge_index[0], minlength=self.num_nodes)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        # The last layer only needs the user and item rows (a prefix of the CSR); its backward needs the transpose
        # of that row block, stored here as a CSR over all nodes with a permutation into the prefix's values.
        nnz_t = int(self.crow[self.num_targets])
        rows, cols = self.edge_index[0, :nnz_t], self.edge_index[1, :nnz_t]
        self.t_perm = torch.argsort(cols * self.num_targets + rows)
        self.t_col = rows[self.t_perm]
        t_counts = torch.bincount(cols, minlength=self.num_nodes)
        self.t_crow = torch.cat([t_counts.new_zeros(1), t_counts.cumsum(0)])
        return self


def _sym_norm(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> np.ndarray:
    deg = np.bincount(src, minlength=num_nodes) + np.bincount(dst, minlength=num_nodes)
    deg = deg.astype(np.float64)
    return (1.0 / np.sqrt(deg[src] * deg[dst])).astype(np.float32)


def build_relational_graph(
    num_users: int,
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    graph: object | None = None,
    *,
    use_kg: bool = True,
) -> RelationalGraph:
    """Assemble the propagation graph from training interactions and the KG edges of a ``HeteroData``.

    User-item edge types in ``graph`` are ignored on purpose: interactions come only from ``train_users`` /
    ``train_items`` so valid/test events exported into the graph can never leak into training.

    Args:
        num_users, num_items: sizes of the user and item index spaces.
        train_users, train_items: (n,) int index arrays of training interactions.
        graph: a ``torch_geometric.data.HeteroData`` with node types ``item`` (``num_items`` nodes, same order) and
            any KG node types, or None.
        use_kg: False drops every KG relation (the no-KG ablation).
    """
    tu = np.asarray(train_users, dtype=np.int64)
    ti = np.asarray(train_items, dtype=np.int64)
    if len(tu) != len(ti):
        raise DataError(f"train_users ({len(tu)}) and train_items ({len(ti)}) differ in length")
    if len(tu) and (tu.max() >= num_users or ti.max() >= num_items or tu.min() < 0 or ti.min() < 0):
        raise DataError("training interaction indices are out of range of num_users/num_items")
    pairs = np.unique(tu * num_items + ti)
    tu, ti = pairs // num_items, pairs % num_items
    offsets = {"user": 0, "item": num_users}
    node_types = ["user", "item"]
    num_nodes = num_users + num_items
    srcs, dsts, rels = [tu], [ti + num_users], [np.zeros(len(tu), dtype=np.int64)]
    relations = [INTERACTION]
    if graph is not None and use_kg:
        if "item" in graph.node_types and graph["item"].num_nodes not in (None, num_items):
            raise DataError(
                f"the graph has {graph['item'].num_nodes} item nodes but the model has {num_items} items; "
                "export the graph and the interactions from the same dataset"
            )
        for nt in graph.node_types:
            if nt in offsets:
                continue
            offsets[nt] = num_nodes
            node_types.append(nt)
            num_nodes += int(graph[nt].num_nodes or 0)
        for et in graph.edge_types:
            s, r, d = et
            if "user" in (s, d):
                continue
            ei = graph[et].edge_index.cpu().numpy().astype(np.int64)
            if ei.size == 0:
                continue
            srcs.append(ei[0] + offsets[s])
            dsts.append(ei[1] + offsets[d])
            rels.append(np.full(ei.shape[1], len(relations), dtype=np.int64))
            relations.append(f"{s}__{r}__{d}")
    src = np.concatenate(srcs)
    dst = np.concatenate(dsts)
    rel = np.concatenate(rels)
    # One symmetric normalisation over the union of relations (degrees count every edge of a node): per-relation
    # normalisation let an item's single LINKED_TO edge (weight 1) drown its ~50 interaction edges (weight ~0.02);
    # on ml-100k that cost valid NDCG@20 0.2014 vs 0.2512 without the KG (measured).
    norm = _sym_norm(src, dst, num_nodes)
    edge_index = np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])])
    logger.info("relational graph: %d nodes, %d undirected edges, %d relations", num_nodes, len(src), len(relations))
    return RelationalGraph(
        num_users=num_users,
        num_items=num_items,
        num_nodes=num_nodes,
        node_offsets=offsets,
        relations=relations,
        edge_index=torch.as_tensor(edge_index),
        edge_rel=torch.as_tensor(np.concatenate([rel, rel])),
        norm=torch.as_tensor(np.concatenate([norm, norm])),
        node_types=node_types,
    ).build_adjacency()


def _gate_grad(adj: Tensor, col: Tensor, norm: Tensor, rel: Tensor, grad: Tensor, x: Tensor, num_rel: int) -> Tensor:
    """d/dgates[r] = sum over edges e of relation r of ``norm_e * grad[row_e] . x[col_e]``: ``grad @ x^T`` sampled at
    ``adj``'s nonzeros in CSR order (the per-edge dot products without a gather), summed per relation."""
    pattern = torch.sparse_csr_tensor(adj.crow_indices(), col, torch.ones_like(norm), adj.shape)
    per_edge = norm * torch.sparse.sampled_addmm(pattern, grad, x.T, beta=0.0).values()
    return torch.zeros(num_rel, dtype=grad.dtype, device=grad.device).index_add_(0, rel, per_edge)


class GatedSymmetricSpMM(torch.autograd.Function):
    """``A(gates) @ x`` with ``A = sum_r gates[r] * A_r`` stored as one CSR whose values are ``norm_e * gates[rel_e]``.

    ``A`` is symmetric, so ``d/dx = A @ grad`` (no transpose); ``d/dgates[r] = sum_{e in r} norm_e * grad[row_e] .
    x[col_e]``. One SpMM per layer whatever the number of relations (summing one dense (num_nodes, dim) product
    per relation cost ~30x more on ml-100k's 28 relations, measured).
    """

    @staticmethod
    def forward(ctx, crow: Tensor, col: Tensor, row: Tensor, norm: Tensor, rel: Tensor, gates: Tensor, x: Tensor) -> Tensor:  # noqa: ANN001
        values = norm * gates[rel]
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what we want here
            warnings.simplefilter("ignore", UserWarning)
            adj = torch.sparse_csr_tensor(crow, col, values, (x.shape[0], x.shape[0]))
        ctx.save_for_backward(row, col, norm, rel, x)
        ctx.adj = adj
        ctx.num_rel = gates.shape[0]
        return adj @ x

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        row, col, norm, rel, x = ctx.saved_tensors
        grad_x = ctx.adj @ grad
        grad_gates = _gate_grad(ctx.adj, col, norm, rel, grad, x, ctx.num_rel) if ctx.needs_input_grad[5] else None
        return None, None, None, None, None, grad_gates, grad_x


class GatedRowBlockSpMM(torch.autograd.Function):
    """``A(gates)[:n] @ x``: the first ``n`` rows (users and items) of the gated adjacency, for the last layer.

    The rows are a prefix of the CSR (``crow[: n + 1]``), so the forward costs only their edges; the backward uses
    the stored transpose of that block (``t_crow``, ``t_col``, values permuted by ``t_perm``): ``d/dx = A[:n]^T @ grad``.
    On ml-100k + KG the user/item rows hold about half of the edges, so the last layer costs about half (measured).
    """

    @staticmethod
    def forward(ctx, crow: Tensor, col: Tensor, norm: Tensor, rel: Tensor, t_crow: Tensor, t_col: Tensor,  # noqa: ANN001
                t_perm: Tensor, gates: Tensor, x: Tensor) -> Tensor:
        n = crow.shape[0] - 1
        nnz = int(crow[-1])
        col, norm, rel = col[:nnz], norm[:nnz], rel[:nnz]
        values = norm * gates[rel]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            adj = torch.sparse_csr_tensor(crow, col, values, (n, x.shape[0]))
            adj_t = torch.sparse_csr_tensor(t_crow, t_col, values[t_perm], (x.shape[0], n))
        ctx.save_for_backward(col, norm, rel, x)
        ctx.adj, ctx.adj_t, ctx.num_rel = adj, adj_t, gates.shape[0]
        return adj @ x

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        col, norm, rel, x = ctx.saved_tensors
        grad_x = ctx.adj_t @ grad
        grad_gates = _gate_grad(ctx.adj, col, norm, rel, grad, x, ctx.num_rel) if ctx.needs_input_grad[7] else None
        return None, None, None, None, None, None, None, grad_gates, grad_x


class KGFusionGNN(nn.Module):
    """Relation-aware LightGCN with attention-fused multimodal item inputs.

    Args:
        graph: the ``RelationalGraph`` to propagate over.
        dim: embedding dimension.
        num_layers: propagation layers (0 = matrix factorisation with fused item inputs).
        text_dim, image_dim: content vector dimensions (0 = modality absent).
    """

    def __init__(self, graph: RelationalGraph, dim: int = 64, num_layers: int = 2, text_dim: int = 0, image_dim: int = 0):
        super().__init__()
        self.graph = graph
        self.dim = dim
        self.num_layers = num_layers
        self.node_emb = nn.Embedding(graph.num_nodes, dim)
        nn.init.normal_(self.node_emb.weight, std=0.1)
        self.fusion = ModalityFusion(dim, text_dim, image_dim)
        self.relation_logit = nn.Parameter(torch.zeros(len(graph.relations)))

    def relation_weights(self) -> Tensor:
        """(num_relations,) gates; the interaction relation is fixed at 1."""
        w = 2.0 * torch.sigmoid(self.relation_logit)
        return torch.cat([w.new_ones(1), w[1:]])

    def item_inputs(self, text: Tensor | None, image: Tensor | None, present: Tensor | None) -> tuple[Tensor, Tensor]:
        """Layer-0 item vectors (num_items, dim) and modality weights (num_items, 3)."""
        g = self.graph
        ids = self.node_emb.weight[g.num_users : g.num_users + g.num_items]
        return self.fusion(ids, text, image, present)

    def forward(
        self, text: Tensor | None = None, image: Tensor | None = None, present: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Propagate the full graph.

        Returns:
            users (num_users, dim), items (num_items, dim) final vectors, layer-0 vectors of all nodes
            (num_nodes, dim), and modality weights (num_items, 3).
        """
        g = self.graph
        items0, weights = self.item_inputs(text, image, present)
        x0 = torch.cat([self.node_emb.weight[: g.num_users], items0, self.node_emb.weight[g.num_users + g.num_items :]])
        gates = self.relation_weights()
        n = g.num_targets
        # Only user and item rows are returned: accumulate the layer mean on them, and compute the last layer on
        # them alone (every other node's last-layer vector would be thrown away). Same numbers as propagating all.
        out = x0[:n]
        x = x0
        for layer in range(self.num_layers):
            if layer < self.num_layers - 1 or g.t_crow is None:
                x = GatedSymmetricSpMM.apply(g.crow, g.edge_index[1], g.edge_index[0], g.norm, g.edge_rel, gates, x)
                out = out + x[:n]
            else:
                x = GatedRowBlockSpMM.apply(g.crow[: n + 1], g.edge_index[1], g.norm, g.edge_rel, g.t_crow, g.t_col,
                                            g.t_perm, gates, x)
                out = out + x
        out = out / (self.num_layers + 1)
        return out[: g.num_users], out[g.num_users : n], x0, weights
