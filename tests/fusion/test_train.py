from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from fusion.baselines import EASE, MatrixFactorization, Popularity, PyGLightGCN
from fusion.metrics import evaluate, to_csr
from fusion.train import TrainedModel, fit_embeddings, train_model
from kgrec.config import FusionConfig
from kgrec.errors import BundleError, DataError


def _pairs(t, code):
    m = t.split == code
    return t.users[m], t.items[m]


def _cfg(**kw) -> FusionConfig:
    base = dict(device="cpu", dim=16, num_layers=2, epochs=12, batch_size=1024, lr=0.02, patience=4, seed=7,
                loss="softmax", num_negatives=64, weight_decay=0.0)
    base.update(kw)
    return FusionConfig(**base)


def _hetero(t):
    """Items linked to one 'genre' category node each, as a KG would export them."""
    from torch_geometric.data import HeteroData

    g = HeteroData()
    g["item"].num_nodes = t.num_items
    g["category"].num_nodes = int(t.item_cluster.max()) + 1
    g["item", "in_category", "category"].edge_index = torch.as_tensor(
        np.stack([np.arange(t.num_items), t.item_cluster]), dtype=torch.long
    )
    return g


@pytest.fixture(scope="module")
def trained(taste) -> TrainedModel:
    tu, ti = _pairs(taste, 0)
    return train_model(taste.num_users, taste.num_items, tu, ti, graph=_hetero(taste), text=taste.text,
                       valid=_pairs(taste, 1), config=_cfg())


def _test_metrics(taste, score_fn):
    shape = (taste.num_users, taste.num_items)
    test = to_csr(*_pairs(taste, 2), shape)
    seen = to_csr(*_pairs(taste, 0), shape) + to_csr(*_pairs(taste, 1), shape)
    return evaluate(score_fn, test, seen, ks=(10,))


def test_training_beats_popularity(taste, trained) -> None:
    pop = Popularity().fit(to_csr(*_pairs(taste, 0), (taste.num_users, taste.num_items)))
    ours = _test_metrics(taste, trained.score_all)["ndcg@10"]
    base = _test_metrics(taste, pop.score)["ndcg@10"]
    assert ours > 1.5 * base, (ours, base)
    assert len(trained.history) >= 2 and trained.history[-1]["loss"] < trained.history[0]["loss"]


def test_modality_weights_are_per_item_distributions(trained) -> None:
    w = trained.modality_weights
    assert w.shape == (trained.num_items, 3)
    assert np.allclose(w.sum(1), 1.0, atol=1e-5)
    assert (w[:, 1] == 0).all()  # no image modality given
    assert set(trained.relation_weights) == {"interaction", "item__in_category__category"}


def test_save_load_same_scores(tmp_path, trained) -> None:
    trained.save(tmp_path / "m")
    again = TrainedModel.load(tmp_path / "m")
    users = np.arange(10)
    assert np.allclose(again.score_all(users).numpy(), trained.score_all(users).numpy(), atol=1e-6)
    assert np.array_equal(again.recommend(users, 5)[0], trained.recommend(users, 5)[0])
    assert np.allclose(again.item_vectors_from_content(trained_text := np.eye(16, dtype=np.float32)[:2]),
                       trained.item_vectors_from_content(trained_text), atol=1e-6)
    with pytest.raises(BundleError, match="config.json"):
        TrainedModel.load(tmp_path / "missing")


def test_recommend_excludes_training_items(taste, trained) -> None:
    idx, _ = trained.recommend(np.arange(taste.num_users), k=10)
    seen = trained.train_matrix.toarray()
    assert not seen[np.arange(taste.num_users)[:, None], idx].any()


def test_cold_start_items_from_content(taste) -> None:
    """Items never seen in training (not even in the model) are retrieved for users of their own cluster."""
    cold = np.arange(taste.num_items) >= taste.num_items - 20
    keep = ~cold[taste.items] & (taste.split == 0)
    tm = train_model(taste.num_users, taste.num_items - 20, taste.users[keep], taste.items[keep],
                     text=taste.text[~cold], config=_cfg(epochs=10, id_dropout=0.5))
    vecs = tm.item_vectors_from_content(text=taste.text[cold])
    assert vecs.shape == (20, 16)
    scores = tm.user_embeddings @ vecs.T  # (users, cold items)
    same = taste.user_cluster[:, None] == taste.item_cluster[cold][None, :]
    # each user scores cold items of their own cluster above the others, on average
    assert (scores * same).sum(1).mean() / same.sum(1).mean() > (scores * ~same).sum(1).mean() / (~same).sum(1).mean()
    hit = same[np.arange(taste.num_users), np.argmax(scores, axis=1)].mean()
    assert hit > 0.6, hit
    # a user with no history, described by a few items of cluster 0, prefers cluster-0 cold items
    u = tm.user_vector_from_items(np.flatnonzero(taste.item_cluster[: taste.num_items - 20] == 0)[:3])
    top = np.argsort(-(vecs @ u))[:3]
    assert (taste.item_cluster[cold][top] == 0).mean() >= 2 / 3
    with pytest.raises(DataError):
        tm.item_vectors_from_content(image=np.zeros((1, 4), dtype=np.float32))


def test_baselines_in_same_harness(taste) -> None:
    shape = (taste.num_users, taste.num_items)
    train = to_csr(*_pairs(taste, 0), shape)
    pop = _test_metrics(taste, Popularity().fit(train).score)["ndcg@10"]
    ease = _test_metrics(taste, EASE(50.0).fit(train).score)["ndcg@10"]
    assert ease > 1.5 * pop
    valid = to_csr(*_pairs(taste, 1), shape)
    tu, ti = _pairs(taste, 0)
    for module in (MatrixFactorization(*shape, dim=16), PyGLightGCN(*shape, tu, ti, dim=16)):
        hist = fit_embeddings(module, *shape, tu, ti, _cfg(epochs=8, loss="bpr", num_negatives=1), valid=valid)
        users, items, _, _ = module()
        got = _test_metrics(taste, lambda u: users[u] @ items.T)["ndcg@10"]
        assert got > pop, (type(module).__name__, got, pop)
        assert max(h.valid["ndcg@20"] for h in hist) > 0


def test_same_seed_same_model(taste) -> None:
    # bit for bit on 2 threads: deterministic kernels (multi-threaded scatter-adds summed in timing order before,
    # ~1e-9 apart between runs); the global torch setting is restored afterwards
    tu, ti = _pairs(taste, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [train_model(taste.num_users, taste.num_items, tu, ti, graph=_hetero(taste), text=taste.text,
                            valid=_pairs(taste, 1), config=_cfg(epochs=3)) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        assert np.array_equal(r.item_embeddings, runs[0].item_embeddings)
        assert np.array_equal(r.user_embeddings, runs[0].user_embeddings)
    assert not torch.are_deterministic_algorithms_enabled()


def test_rejects_mismatched_inputs(taste) -> None:
    tu, ti = _pairs(taste, 0)
    with pytest.raises(DataError, match="text vectors have"):
        train_model(taste.num_users, taste.num_items, tu, ti, text=taste.text[:5], config=_cfg(epochs=1))
    with pytest.raises(DataError, match="out of range"):
        train_model(taste.num_users, 3, tu, ti, config=_cfg(epochs=1))


def test_gated_propagation_matches_dense_gradients() -> None:
    """The one-SpMM relation-gated layer equals sum_r gate_r A_r x, gradients included (gates and x)."""
    from fusion.gnn import GatedSymmetricSpMM, build_relational_graph

    rng = np.random.default_rng(0)
    from torch_geometric.data import HeteroData

    g = HeteroData()
    g["item"].num_nodes = 6
    g["category"].num_nodes = 2
    g["item", "in_category", "category"].edge_index = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 1]])
    rg = build_relational_graph(4, 6, rng.integers(0, 4, 15), rng.integers(0, 6, 15), g)
    x = torch.randn(rg.num_nodes, 3, dtype=torch.float64, requires_grad=True)
    gates = torch.tensor([1.0, 0.7], dtype=torch.float64, requires_grad=True)
    y = GatedSymmetricSpMM.apply(rg.crow, rg.edge_index[1], rg.edge_index[0], rg.norm.double(), rg.edge_rel, gates, x)
    (y * torch.arange(y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
    gx, gg = x.grad.clone(), gates.grad.clone()
    x.grad, gates.grad = None, None
    dense = torch.zeros(rg.num_nodes, rg.num_nodes, dtype=torch.float64)
    vals = rg.norm.double() * gates[rg.edge_rel]
    dense = dense.index_put((rg.edge_index[0], rg.edge_index[1]), vals, accumulate=True)
    y2 = dense @ x
    (y2 * torch.arange(y2.numel(), dtype=torch.float64).view_as(y2)).sum().backward()
    assert torch.allclose(y, y2) and torch.allclose(gx, x.grad) and torch.allclose(gg, gates.grad)


@pytest.mark.parametrize("num_layers", [0, 1, 2, 3])
def test_hop_restricted_layers_match_full_propagation(num_layers: int) -> None:
    """Computing layer l only on the nodes within L - l hops of a user or item (``propagate``) gives the same vectors
    and gradients (embeddings, fused item inputs, relation gates) as propagating every node through every layer:
    entities 1, 2 and 3 hops out and an unreachable one included, some items with and some without their ID."""
    from torch_geometric.data import HeteroData

    from fusion.gnn import GatedSymmetricSpMM, KGFusionGNN, build_relational_graph

    rng = np.random.default_rng(1)
    g = HeteroData()
    g["item"].num_nodes = 7
    g["entity"].num_nodes = 7
    g["item", "linked_to", "entity"].edge_index = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2]])
    # entity 3: 2 hops, 4: 2 hops, 5: 3 hops (via 4), 6: unreachable
    g["entity", "rel_a", "entity"].edge_index = torch.tensor([[0, 1, 2, 4], [3, 4, 4, 5]])
    rg = build_relational_graph(5, 7, rng.integers(0, 5, 20), rng.integers(0, 7, 20), g, prune_leaves=False)
    hops = rg.hops.tolist()
    assert hops[:12] == [0] * 12 and hops == sorted(hops)  # users and items first, KG nodes by distance
    assert [rg.within(k) for k in range(4)] == [12, 15, 17, 18] and rg.num_nodes == 19
    # renumbering keeps each node's type and index within its type
    assert sorted(rg.node_local[rg.node_type == 2].tolist()) == list(range(7))
    torch.manual_seed(0)
    model = KGFusionGNN(rg, dim=4, num_layers=num_layers, text_dim=3).double()
    text = torch.randn(7, 3, dtype=torch.float64)
    present = torch.ones(7, 3, dtype=torch.bool)
    present[::2, 2] = False  # items 0, 2, 4, 6 without their ID embedding
    with torch.no_grad():
        model.relation_logit.copy_(torch.tensor([0.0, 0.3, -0.4]))

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        items0, _ = model.item_inputs(text, None, present)
        w = model.node_emb.weight
        x = torch.cat([w[: rg.num_users], items0, w[rg.num_users + rg.num_items :]])
        gates, out = model.relation_weights(), x
        for _ in range(model.num_layers):
            x = GatedSymmetricSpMM.apply(rg.crow, rg.edge_index[1], rg.edge_index[0], rg.norm.double(), rg.edge_rel,
                                         gates, x)
            out = out + x
        out = out / (model.num_layers + 1)
        return out[: rg.num_users], out[rg.num_users : rg.num_targets]

    weights = torch.arange(rg.num_targets * 4, dtype=torch.float64).view(rg.num_targets, 4).sin()
    runs = []
    for fn in (lambda: model(text, None, present)[:2], reference):
        model.zero_grad()
        u, i = fn()
        (torch.cat([u, i]) * weights).sum().backward()
        runs.append([torch.cat([u, i]).detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                     for p in model.parameters()])
    assert len(runs[0]) == 1 + len(list(model.parameters()))
    for a, b in zip(*runs):
        assert torch.allclose(a, b, atol=1e-12)
    grad_emb, grad_gates = model.node_emb.weight.grad, model.relation_logit.grad
    beyond = rg.hops > num_layers
    assert beyond.any() and (grad_emb[beyond] == 0).all()  # nodes beyond L hops cannot reach a user or item
    if num_layers >= 1:
        uses_row = ~beyond
        uses_row[rg.num_users : rg.num_targets] = present[:, 2]  # an item's ID row only matters where it is used
        assert (grad_emb[uses_row].abs().sum(1) > 0).all() and (grad_emb[~uses_row] == 0).all()
        assert grad_gates[1].abs() > 0
    if num_layers >= 2:  # entity-entity edges reach an item's vector from the second layer on
        assert grad_gates[1:].abs().min() > 0


def test_save_load_keeps_non_contiguous_arrays(tmp_path, trained) -> None:
    """safetensors writes raw buffers: a transposed (Fortran-ordered) matrix must still load equal."""
    import dataclasses

    m = dataclasses.replace(trained, item_item=np.asfortranarray(np.arange(trained.num_items**2, dtype=np.float32)
                                                                 .reshape(trained.num_items, -1)), hybrid_weight=0.5)
    again = TrainedModel.load(m.save(tmp_path / "m"))
    assert np.array_equal(again.item_item, m.item_item)


def test_prune_leaves_drops_single_edge_kg_nodes_only() -> None:
    """KG nodes with one edge go (with the edge); items, users and KG nodes with more edges stay, with their type and
    within-type index; degrees (and so the normalisation) are those of the pruned graph."""
    from torch_geometric.data import HeteroData

    from fusion.gnn import build_relational_graph

    g = HeteroData()
    g["item"].num_nodes = 4
    g["entity"].num_nodes = 4
    g["category"].num_nodes = 1
    # entity 0: items 0, 1 (kept); entity 1: item 2 only (leaf); entity 2: entity 0 only (leaf); entity 3: none
    g["item", "linked_to", "entity"].edge_index = torch.tensor([[0, 1, 2], [0, 0, 1]])
    g["entity", "rel_a", "entity"].edge_index = torch.tensor([[0], [2]])
    g["item", "in_category", "category"].edge_index = torch.tensor([[0, 3], [0, 0]])
    users, items = np.array([0, 0, 1, 2]), np.array([0, 1, 2, 3])
    full = build_relational_graph(3, 4, users, items, g, prune_leaves=False)
    pruned = build_relational_graph(3, 4, users, items, g)
    assert (full.num_nodes, pruned.num_nodes) == (12, 10)
    kept = {(pruned.node_types[t], int(i)) for t, i in zip(pruned.node_type[7:], pruned.node_local[7:])}
    assert kept == {("entity", 0), ("entity", 3), ("category", 0)}
    assert full.edge_index.shape[1] - pruned.edge_index.shape[1] == 4  # two undirected leaf edges
    deg = torch.bincount(pruned.edge_index[0], minlength=pruned.num_nodes).double()
    row, col = pruned.edge_index
    assert torch.allclose(pruned.norm.double(), 1 / (deg[row] * deg[col]).sqrt())


def test_batch_loss_equals_per_positive_softmax() -> None:
    """The per-user logsumexp form of the sampled softmax equals cross-entropy over (positive, shared negatives)
    per positive, value and gradients, whether users outnumber the batch or not."""
    from fusion.train import _loss, batch_loss

    cfg = FusionConfig(loss="softmax", temperature=0.2)
    gen = torch.Generator().manual_seed(0)
    users = torch.randn(50, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    items = torch.randn(30, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    bj = torch.randint(0, 30, (16,), generator=gen)
    for b in (100, 20):  # 100 positives > 50 users: all users scored; 20 < 50: only the batch's users
        bu, bi = torch.randint(0, 50, (b,), generator=gen), torch.randint(0, 30, (b,), generator=gen)
        grads = []
        for fn in (lambda: batch_loss(users, items, bu, bi, bj, cfg), lambda: _loss(users[bu], items[bi], items[bj], cfg)):
            users.grad = items.grad = None
            loss = fn()
            loss.backward()
            grads.append((loss.detach(), users.grad.clone(), items.grad.clone()))
        for a, c in zip(*grads):
            assert torch.allclose(a, c, atol=1e-12)


def test_single_modality_fusion_skips_scoring_with_same_result() -> None:
    """With at most one modality per item the attention weights are one-hot: the fast path returns the same fused
    vectors and weights as scoring (which passes no gradient to the scorer)."""
    from fusion.fusion import ModalityFusion

    torch.manual_seed(0)
    fusion = ModalityFusion(4, text_dim=3, image_dim=2).double()
    text, image = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    present = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    fused, weights = fusion(None, text, image, present)
    assert torch.equal(weights, present.double())
    expected = torch.stack([fusion.text_proj(text), fusion.image_proj(image)], 1)[:, :2] * present[:, :2, None]
    assert torch.allclose(fused, expected.sum(1))
    both = present.clone()
    both[0, 1] = True  # one item with two modalities: scored by attention, weights strictly between 0 and 1
    _, w = fusion(None, text, image, both)
    assert 0 < w[0, 0] < 1 and torch.allclose(w[0, :2].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_epoch_numbers_go_into_the_progress_bar_and_one_summary_line_is_logged(taste, caplog, capsys) -> None:
    shape = (taste.num_users, taste.num_items)
    tu, ti = _pairs(taste, 0)
    ro_u, ro_i = tu.copy(), ti.copy()
    ro_u.flags.writeable = ro_i.flags.writeable = False  # read-only inputs (pyarrow / pandas views) are copied
    valid = to_csr(*_pairs(taste, 1), shape)
    with caplog.at_level(logging.INFO, logger="fusion.train"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hist = fit_embeddings(MatrixFactorization(*shape, dim=8), *shape, ro_u, ro_i,
                                  _cfg(epochs=3, patience=10), valid=valid, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "fusion.train"]
    assert not any(m.startswith("epoch ") for m in lines)  # no per-epoch INFO line under a bar
    kept = hist[0]
    for h in hist:
        kept = h if h.valid["ndcg@20"] >= kept.valid["ndcg@20"] else kept
    assert lines == [f"trained 3 epochs ({sum(h.train_seconds for h in hist):.1f}s); best valid ndcg@20 "
                     f"{kept.valid['ndcg@20']:.4f} at epoch {kept.epoch + 1}, kept"]
    err = capsys.readouterr().err
    assert f"ndcg20={hist[-1].valid['ndcg@20']:.4f}" in err and "3/3" in err  # the bar carries the numbers
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fusion.train"):
        fit_embeddings(MatrixFactorization(*shape, dim=8), *shape, tu, ti, _cfg(epochs=2, patience=10), valid=valid)
    epochs = [r for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 2 and {r.levelno for r in epochs} == {logging.DEBUG}  # per epoch: --verbose only


def test_the_ease_term_choice_is_one_info_line(taste, trained, caplog) -> None:
    import copy

    from fusion.train import add_ease_term

    tm = copy.deepcopy(trained)
    tm.item_item, tm.hybrid_weight, tm.ease_lambda = None, 0.0, None
    valid = to_csr(*_pairs(taste, 1), (taste.num_users, taste.num_items))
    with caplog.at_level(logging.INFO, logger="fusion.train"):
        add_ease_term(tm, valid, _cfg(ease_lambdas=[20.0, 50.0], hybrid_weights=[0.0, 1.0, 2.0]))
    lines = [r.getMessage() for r in caplog.records if r.name == "fusion.train" and r.levelno == logging.INFO]
    assert len(lines) == 1 and lines[0].startswith("EASE term: ") and "(6 settings tried)" in lines[0]
    if tm.hybrid_weight:
        assert f"lambda {tm.ease_lambda:.0f}, weight " in lines[0]
    else:
        assert lines[0].startswith("EASE term: not used")


def test_an_ease_search_with_nothing_to_try_leaves_the_term_off(taste, trained, caplog) -> None:
    import copy

    from fusion.train import add_ease_term

    tm = copy.deepcopy(trained)
    tm.item_item, tm.hybrid_weight, tm.ease_lambda = None, 0.0, None
    valid = to_csr(*_pairs(taste, 1), (taste.num_users, taste.num_items))
    with caplog.at_level(logging.INFO, logger="fusion.train"):
        add_ease_term(tm, valid, _cfg(ease_lambdas=[], hybrid_weights=[0.0, 1.0]))
    assert tm.item_item is None and tm.hybrid_weight == 0 and tm.ease_lambda is None
    assert "EASE term: not used, no setting scored on valid (0 settings tried)" in caplog.text


def test_an_ease_setting_carries_to_another_model_and_through_save(taste, trained, tmp_path) -> None:
    # the ranker's train fold refits the GNN and reuses the fitted model's EASE choice (lambda, relative weight)
    import copy

    from fusion.train import add_ease_term

    valid = to_csr(*_pairs(taste, 1), (taste.num_users, taste.num_items))
    tm = copy.deepcopy(trained)
    tm.item_item, tm.hybrid_weight, tm.ease_lambda, tm.hybrid_relative_weight = None, 0.0, None, None
    add_ease_term(tm, valid, _cfg(ease_lambdas=[20.0], hybrid_weights=[2.0]))  # one setting, chosen
    assert (tm.ease_lambda, tm.hybrid_relative_weight) == (20.0, 2.0) and tm.hybrid_weight > 0
    other = copy.deepcopy(trained)
    other.item_item, other.hybrid_weight, other.ease_lambda = None, 0.0, None
    add_ease_term(other, valid, _cfg(), setting=(20.0, 2.0))  # no search: the config's grid is not used
    assert (other.ease_lambda, other.hybrid_relative_weight) == (20.0, 2.0)
    assert other.hybrid_weight == pytest.approx(tm.hybrid_weight) and np.allclose(other.item_item, tm.item_item)
    # a model saved before the relative weight was kept passes its absolute weight, which is used as given
    old = copy.deepcopy(trained)
    old.item_item, old.hybrid_weight, old.ease_lambda = None, 0.0, None
    add_ease_term(old, valid, _cfg(), setting=(20.0, 1.0), absolute_weight=0.37)
    assert (old.ease_lambda, old.hybrid_weight) == (20.0, 0.37) and np.allclose(old.item_item, tm.item_item)
    tm.save(tmp_path / "m")
    assert TrainedModel.load(tmp_path / "m").hybrid_relative_weight == 2.0


def test_kept_epochs_is_the_best_validation_epoch(trained) -> None:
    scored = [h for h in trained.history if h.get("valid")]
    best = max(h["valid"]["ndcg@20"] for h in scored)
    last_best = max(h["epoch"] for h in scored if h["valid"]["ndcg@20"] == best)
    assert trained.kept_epochs == last_best + 1 <= len(trained.history)
    import copy

    plain = copy.copy(trained)
    plain.history = [{"epoch": e, "loss": 1.0, "train_seconds": 0.1, "valid": {}} for e in range(5)]
    assert plain.kept_epochs == 5  # trained without validation: every epoch
