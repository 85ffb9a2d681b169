"""A relation-aware LightGCN over user-item interactions and knowledge-graph relations, with fused item inputs.

Graph: one global node space (users, items, then every other HeteroData node type: brand, category, attribute,
entity... ordered by hop distance from the users and items, see below). Each relation ``r`` (the training
interactions, and every KG edge type, made undirected) has an adjacency ``A_r = D^-1/2 E_r D^-1/2`` (``D``: degrees
over all relations, so a node's neighbours share one budget) and a learned gate ``a_r = 2 * sigmoid(theta_r)``
(interactions fixed at 1). One layer is ``h^{l+1} = sum_r a_r A_r h^l``, computed as one SpMM with a CSR matrix whose
values are ``a_r * norm`` (``GatedSymmetricSpMM``). Final vectors are the mean over layers 0..L (LightGCN, He et al.
2020). Item inputs at layer 0 come from ``ModalityFusion`` over text, image and the item's ID embedding.

Only user and item rows of the final vectors are used, so layer ``l`` of ``L`` only needs the rows of nodes within
``L - l`` hops of a user or item, and layer 0 only the nodes within ``L`` hops. KG nodes are numbered by hop
distance, so each of these row sets is a prefix and each layer is one SpMM over a block ``A[:rows, :cols]`` of the
CSR (``PropagationBlock``; on ml-100k + KG, 2 layers: 261k + 164k of 2 x 353k edges). ``propagate`` runs the whole
stack as one autograd function: the gradient uses the stored transposed blocks (``A`` is symmetric, so
``A[:rows, :cols]^T = A[:cols, :rows]``), and the relation-gate gradient is summed over KG edges only (the
interaction gate is fixed). Vectors and gradients equal the full propagation's (tested).

On measurement (ml-100k, 1 CPU thread, 2 layers) we do not go through PyG's ``LGConv``: its gather/scatter message
passing took ~1.1 s per forward+backward, its ``adj_t`` SpMM path ~0.1 s because autograd transposes the CSR matrix
on every backward; a plain gated SpMM per layer ~0.015 s. Restricting the rows (and the rest of the step's
changes) took a whole training step from 56 to 22 ms at the same model (``benchmarks/results/ml100k_epoch_ablation.json``).
PyG's own ``LightGCN`` is the baseline.
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
UNREACHED = np.iinfo(np.int64).max  # hop distance of nodes no user or item reaches


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what we want here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


def _crow(rows: Tensor, num_rows: int) -> Tensor:
    counts = torch.bincount(rows, minlength=num_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _spmm(a: Tensor, x: Tensor) -> Tensor:
    """``a @ x`` (sparse CSR times dense) into a fresh, unfilled output: ``a @ x`` zero-fills a result and copies it
    into another (two extra passes over a (rows, dim) array per call on CPU, ~2/3 of the call for 37k x 64)."""
    out = x.new_empty(a.shape[0], x.shape[1])
    return torch.addmm(out, a, x, beta=0.0, out=out)


@dataclass
class PropagationBlock:
    """One layer's part of the adjacency: ``A[:rows, :cols]`` in CSR, its transpose, and its gated (KG) edges.

    ``crow`` (rows + 1,), ``col``, ``norm``, ``rel`` (nnz,): the block in CSR order; ``t_*``: ``A[:cols, :rows]``
    (the transpose, by symmetry) in CSR order; ``kg_*``: the block's edges whose relation has a learned gate
    (``rel > 0``), the pattern of the gate gradient.
    """

    rows: int
    cols: int
    crow: Tensor
    col: Tensor
    norm: Tensor
    rel: Tensor
    t_crow: Tensor
    t_col: Tensor
    t_norm: Tensor
    t_rel: Tensor
    kg_crow: Tensor
    kg_col: Tensor
    kg_norm: Tensor
    kg_rel: Tensor

    def adjacency(self, gates: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Gated ``A[:rows, :cols]`` and ``A[:cols, :rows]`` as CSR tensors of ``dtype``."""
        # index_select: ~6x faster than gates[rel] for a 1-d gather on CPU (measured, 261k edges)
        a = _csr(self.crow, self.col, self.norm.to(dtype) * gates.index_select(0, self.rel), (self.rows, self.cols))
        a_t = _csr(self.t_crow, self.t_col, self.t_norm.to(dtype) * gates.index_select(0, self.t_rel),
                   (self.cols, self.rows))
        return a, a_t

    def gate_grad(self, grad: Tensor, x: Tensor, num_rel: int) -> Tensor:
        """d/dgates[r] = sum over the block's edges e of relation r of ``norm_e * grad[row_e] . x[col_e]``: ``grad @
        x^T`` sampled at the KG edges (per-edge dot products without a gather), summed per relation."""
        out = torch.zeros(num_rel, dtype=grad.dtype, device=grad.device)
        if self.kg_col.numel() == 0:
            return out
        pattern = _csr(self.kg_crow, self.kg_col, torch.ones_like(self.kg_norm, dtype=grad.dtype), (self.rows, self.cols))
        per_edge = self.kg_norm.to(grad.dtype) * torch.sparse.sampled_addmm(pattern, grad, x.T, beta=0.0).values()
        return out.index_add_(0, self.kg_rel, per_edge)


@dataclass
class RelationalGraph:
    """Undirected multi-relational graph in a global node space: users ``[0, U)``, items ``[U, U + I)``, then KG nodes
    in order of hop distance from the users and items (``hops``), unreached ones last.

    ``edge_index`` (2, E) int64 holds both directions of every edge, sorted by (row, col) (CSR order, ``crow``);
    ``edge_rel`` (E,) the relation id (0 = training interactions); ``norm`` (E,) float32 the symmetric
    normalisation over all relations. ``node_type`` (N,) indexes ``node_types``; ``node_local`` (N,) is the node's
    index within its type (as in the exported ``HeteroData``).
    """

    num_users: int
    num_items: int
    num_nodes: int
    relations: list[str]
    edge_index: Tensor
    edge_rel: Tensor
    norm: Tensor
    node_types: list[str] = field(default_factory=list)
    node_type: Tensor | None = None
    node_local: Tensor | None = None
    hops: Tensor | None = None
    crow: Tensor | None = None
    _blocks: dict[int, list[PropagationBlock]] = field(default_factory=dict, repr=False)

    @property
    def num_targets(self) -> int:
        """Users + items: the rows whose final vectors are used."""
        return self.num_users + self.num_items

    def to(self, device: torch.device | str) -> RelationalGraph:
        for name in ("edge_index", "edge_rel", "norm", "crow"):
            v = getattr(self, name)
            setattr(self, name, None if v is None else v.to(device))
        self._blocks = {}
        return self

    def within(self, hops: int) -> int:
        """Number of nodes within ``hops`` hops of a user or item (a prefix of the node space)."""
        if self.hops is None:
            return self.num_nodes
        return int(torch.searchsorted(self.hops, torch.tensor(hops, dtype=self.hops.dtype), right=True))

    def blocks(self, num_layers: int) -> list[PropagationBlock]:
        """The adjacency blocks of layers 1..``num_layers``: layer ``l`` maps the nodes within ``L - l + 1`` hops to
        those within ``L - l`` hops. Built once per depth."""
        if num_layers not in self._blocks:
            row, col = self.edge_index
            # int32 CSR indices: with int64 ones every CPU SpMM converted (copied) them first (measured)
            idx = torch.int32 if row.numel() < 2**31 else torch.int64
            out = []
            for layer in range(1, num_layers + 1):
                rows, cols = self.within(num_layers - layer), self.within(num_layers - layer + 1)
                nnz = int(self.crow[rows])
                # every neighbour of a node within k hops is within k + 1 hops: the row prefix is the whole block
                b_col, b_norm, b_rel = col[:nnz], self.norm[:nnz], self.edge_rel[:nnz]
                t = (row < cols) & (col < rows)
                kg = b_rel > 0
                out.append(PropagationBlock(
                    rows, cols, self.crow[: rows + 1].to(idx), b_col.to(idx), b_norm, b_rel,
                    _crow(row[t], cols).to(idx), col[t].to(idx), self.norm[t], self.edge_rel[t],
                    _crow(row[:nnz][kg], rows).to(idx), b_col[kg].to(idx), b_norm[kg], b_rel[kg],
                ))
            self._blocks[num_layers] = out
        return self._blocks[num_layers]

    def build_adjacency(self) -> RelationalGraph:
        """Sort the edges by (row, col) into CSR order once: ``crow`` (num_nodes + 1,), and keep ``edge_index``,
        ``norm``, ``edge_rel`` in that order (the gated adjacency is rebuilt from them on every forward)."""
        order = torch.argsort(self.edge_index[0] * self.num_nodes + self.edge_index[1])
        self.edge_index, self.edge_rel, self.norm = self.edge_index[:, order], self.edge_rel[order], self.norm[order]
        self.crow = _crow(self.edge_index[0], self.num_nodes)
        self._blocks = {}
        return self


def _sym_norm(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> np.ndarray:
    deg = np.bincount(src, minlength=num_nodes) + np.bincount(dst, minlength=num_nodes)
    deg = deg.astype(np.float64)
    return (1.0 / np.sqrt(deg[src] * deg[dst])).astype(np.float32)


def _hops_from(num_targets: int, src: np.ndarray, dst: np.ndarray, num_nodes: int) -> np.ndarray:
    """(num_nodes,) hop distance of every node from the first ``num_targets`` nodes (``UNREACHED`` if none)."""
    import scipy.sparse as sp

    adj = sp.csr_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(num_nodes, num_nodes))
    adj = (adj + adj.T).tocsr()
    hops = np.full(num_nodes, UNREACHED, dtype=np.int64)
    hops[:num_targets] = 0
    frontier, k = np.arange(num_targets), 0
    while len(frontier):
        k += 1
        nb = np.unique(adj[frontier].indices)
        frontier = nb[hops[nb] == UNREACHED]
        hops[frontier] = k
    return hops


def build_relational_graph(
    num_users: int,
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    graph: object | None = None,
    *,
    use_kg: bool = True,
    prune_leaves: bool = True,
) -> RelationalGraph:
    """Assemble the propagation graph from training interactions and the KG edges of a ``HeteroData``.

    User-item edge types in ``graph`` are ignored on purpose: interactions come only from ``train_users`` /
    ``train_items`` so valid/test events exported into the graph can never leak into training. Item-item edges
    derived from interactions (ALSO_BOUGHT) are kept: the caller passes a graph built from training events
    (``kgrec.pipeline.training_graph``).

    Args:
        num_users, num_items: sizes of the user and item index spaces.
        train_users, train_items: (n,) int index arrays of training interactions.
        graph: a ``torch_geometric.data.HeteroData`` with node types ``item`` (``num_items`` nodes, same order) and
            any KG node types, or None.
        use_kg: False drops every KG relation (the no-KG ablation).
        prune_leaves: drop KG nodes with exactly one edge (and that edge). A leaf links to one node only, so it
            carries no signal between items; on ml-100k + Freebase 21k of 35k KG nodes are leaves, and dropping
            them cut the epoch by ~20% at the same valid NDCG@20 (measured, ``benchmarks/bench_ml100k.py``).
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
    type_starts = np.asarray(list(offsets.values()))
    node_type = np.repeat(np.arange(len(node_types)), np.diff([*type_starts, num_nodes]))
    node_local = np.arange(num_nodes) - type_starts[node_type]
    if prune_leaves and num_nodes > num_users + num_items:
        deg = np.bincount(src, minlength=num_nodes) + np.bincount(dst, minlength=num_nodes)
        keep = np.ones(num_nodes, dtype=bool)
        keep[num_users + num_items :] = deg[num_users + num_items :] != 1
        e = keep[src] & keep[dst]
        new_id = np.cumsum(keep) - 1
        src, dst, rel = new_id[src[e]], new_id[dst[e]], rel[e]
        node_type, node_local = node_type[keep], node_local[keep]
        logger.info("pruned %d leaf KG nodes of %d", num_nodes - int(keep.sum()), num_nodes - num_users - num_items)
        num_nodes = int(keep.sum())
    # One symmetric normalisation over the union of relations (degrees count every edge of a node): per-relation
    # normalisation let an item's single LINKED_TO edge (weight 1) drown its ~50 interaction edges (weight ~0.02);
    # on ml-100k that cost valid NDCG@20 0.2014 vs 0.2512 without the KG (measured).
    norm = _sym_norm(src, dst, num_nodes)
    # Renumber the KG nodes by hop distance from the users and items (stable within a distance), so that the nodes
    # each layer needs are a prefix of the node space.
    hops = _hops_from(num_users + num_items, src, dst, num_nodes)
    order = np.argsort(hops, kind="stable")  # new id -> old id (users and items keep theirs: hop 0, first)
    new_id = np.empty_like(order)
    new_id[order] = np.arange(num_nodes)
    src, dst = new_id[src], new_id[dst]
    edge_index = np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])])
    logger.info("relational graph: %d nodes, %d undirected edges, %d relations", num_nodes, len(src), len(relations))
    return RelationalGraph(
        num_users=num_users,
        num_items=num_items,
        num_nodes=num_nodes,
        relations=relations,
        edge_index=torch.as_tensor(edge_index),
        edge_rel=torch.as_tensor(np.concatenate([rel, rel])),
        norm=torch.as_tensor(np.concatenate([norm, norm])),
        node_types=node_types,
        node_type=torch.as_tensor(node_type[order]),
        node_local=torch.as_tensor(node_local[order]),
        hops=torch.as_tensor(hops[order]),
    ).build_adjacency()


class GatedSymmetricSpMM(torch.autograd.Function):
    """``A(gates) @ x`` over all nodes, ``A = sum_r gates[r] * A_r`` stored as one CSR whose values are
    ``norm_e * gates[rel_e]`` (the plain layer; ``propagate`` computes the same stack on fewer rows).

    ``A`` is symmetric, so ``d/dx = A @ grad`` (no transpose); ``d/dgates[r] = sum_{e in r} norm_e * grad[row_e] .
    x[col_e]``. One SpMM per layer whatever the number of relations (summing one dense (num_nodes, dim) product
    per relation cost ~30x more on ml-100k's 28 relations, measured).
    """

    @staticmethod
    def forward(ctx, crow: Tensor, col: Tensor, row: Tensor, norm: Tensor, rel: Tensor, gates: Tensor, x: Tensor) -> Tensor:  # noqa: ANN001
        adj = _csr(crow, col, norm * gates[rel], (x.shape[0], x.shape[0]))
        ctx.save_for_backward(col, norm, rel, x)
        ctx.adj = adj
        ctx.num_rel = gates.shape[0]
        return adj @ x

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        col, norm, rel, x = ctx.saved_tensors
        grad_x = ctx.adj @ grad
        grad_gates = None
        if ctx.needs_input_grad[5]:
            pattern = _csr(ctx.adj.crow_indices(), col, torch.ones_like(norm), ctx.adj.shape)
            per_edge = norm * torch.sparse.sampled_addmm(pattern, grad, x.T, beta=0.0).values()
            grad_gates = torch.zeros(ctx.num_rel, dtype=grad.dtype, device=grad.device).index_add_(0, rel, per_edge)
        return None, None, None, None, None, grad_gates, grad_x


class _Propagate(torch.autograd.Function):
    """The layer-mean of an L-layer gated propagation, on user+item rows: see ``propagate``."""

    @staticmethod
    def forward(ctx, blocks: list[PropagationBlock], num_users: int, num_targets: int,  # noqa: ANN001
                gates: Tensor, weight: Tensor, items0: Tensor) -> Tensor:
        reach = blocks[0].cols if blocks else num_targets
        x = weight[:reach].clone()  # layer 0: node embeddings with the fused item inputs in the item rows
        x[num_users:num_targets] = items0
        xs, adj_t = [x], []
        out = x[:num_targets].clone()
        for block in blocks:
            a, a_t = block.adjacency(gates, x.dtype)
            x = _spmm(a, x)
            out += x[:num_targets]
            xs.append(x)
            adj_t.append(a_t)
        out /= len(blocks) + 1
        ctx.save_for_backward(*xs[:-1])
        ctx.blocks, ctx.adj_t = blocks, adj_t
        ctx.num_users, ctx.num_targets, ctx.num_nodes = num_users, num_targets, weight.shape[0]
        ctx.num_rel = gates.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        xs = ctx.saved_tensors
        n, u = ctx.num_targets, ctx.num_users
        g = grad / (len(ctx.blocks) + 1)
        grad_gates = torch.zeros(ctx.num_rel, dtype=g.dtype, device=g.device) if ctx.needs_input_grad[3] else None
        gx = g.clone() if not ctx.blocks else g
        for layer in range(len(ctx.blocks) - 1, -1, -1):
            if grad_gates is not None:
                grad_gates += ctx.blocks[layer].gate_grad(gx, xs[layer], ctx.num_rel)
            gx = _spmm(ctx.adj_t[layer], gx)
            gx[:n] += g
        grad_items0 = gx[u:n].clone() if ctx.needs_input_grad[5] else None
        grad_weight = None
        if ctx.needs_input_grad[4]:
            gx[u:n] = 0  # item rows of layer 0 are the fused inputs, not the embedding table
            if gx.shape[0] < ctx.num_nodes:  # nodes beyond L hops never reach a user or item: zero gradient
                gx = torch.cat([gx, gx.new_zeros(ctx.num_nodes - gx.shape[0], gx.shape[1])])
            grad_weight = gx
        return None, None, None, grad_gates, grad_weight, grad_items0


def propagate(graph: RelationalGraph, num_layers: int, gates: Tensor, weight: Tensor, items0: Tensor) -> Tensor:
    """User and item rows (num_users + num_items, dim) of ``mean_{l=0..L} A(gates)^l x0``.

    ``x0`` is ``weight`` (num_nodes, dim) with item rows replaced by ``items0`` (num_items, dim). Layer ``l``
    computes only the rows within ``L - l`` hops of a user or item (``RelationalGraph.blocks``); same vectors and
    gradients (``weight``, ``items0``, ``gates``) as propagating every node.
    """
    return _Propagate.apply(graph.blocks(num_layers), graph.num_users, graph.num_targets, gates, weight, items0)


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
        if present is not None and (text is not None or image is not None) and not bool(present[:, 2].any()):
            ids = None  # no item uses its ID embedding: leave it out of the graph (no gradient to compute)
        return self.fusion(ids, text, image, present)

    def forward(
        self, text: Tensor | None = None, image: Tensor | None = None, present: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Propagate the full graph.

        Returns:
            users (num_users, dim), items (num_items, dim) final vectors, layer-0 vectors of users and items
            (num_users + num_items, dim), and modality weights (num_items, 3).
        """
        g = self.graph
        items0, weights = self.item_inputs(text, image, present)
        w = self.node_emb.weight
        out = propagate(g, self.num_layers, self.relation_weights(), w, items0)
        ego = torch.cat([w[: g.num_users], items0])
        return out[: g.num_users], out[g.num_users :], ego, weights
