from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fusion.metrics import evaluate, rank_metrics, scores_from_matrix, to_csr


def test_rank_metrics_hand_computed() -> None:
    # ranking a b c d, held-out {b, d, x}: hits at ranks 2 and 4, |P| = 3
    hits = np.array([[0, 1, 0, 1]])
    m = rank_metrics(hits, np.array([3]), ks=(4, 1))
    assert m["recall@4"][0] == pytest.approx(2 / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # truncated at min(|P|, k) = 3
    assert m["ndcg@4"][0] == pytest.approx(dcg / idcg)
    assert m["hit@4"][0] == 1.0 and m["mrr@4"][0] == pytest.approx(0.5)
    assert m["precision@4"][0] == pytest.approx(0.5)
    assert m["recall@1"][0] == 0.0 and m["mrr@1"][0] == 0.0 and m["ndcg@1"][0] == 0.0


def test_recall_denominator_is_full_heldout_size() -> None:
    # 30 held-out items, all 20 slots hit: RecBole's recall@20 is 20/30, ndcg@20 is 1
    m = rank_metrics(np.ones((1, 20)), np.array([30]), ks=(20,))
    assert m["recall@20"][0] == pytest.approx(20 / 30)
    assert m["ndcg@20"][0] == pytest.approx(1.0)


def test_evaluate_masks_excluded_items_and_averages_users() -> None:
    # 3 users, 5 items; scores prefer item 0 > 1 > 2 > 3 > 4 for everyone
    scores = np.tile(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), (3, 1))
    heldout = to_csr(np.array([0, 1]), np.array([1, 4]), (3, 5))  # user 2 has nothing held out: not averaged
    exclude = to_csr(np.array([0]), np.array([0]), (3, 5))  # user 0 already has item 0
    r = evaluate(scores_from_matrix(scores), heldout, exclude, ks=(1, 2))
    # user 0: item 0 masked, item 1 is rank 1 -> hit; user 1: item 4 is rank 5 -> miss
    assert r["num_users"] == 2
    assert r["recall@1"] == pytest.approx(0.5)
    assert r["mrr@2"] == pytest.approx(0.5)
    # without the mask user 0's item 1 is at rank 2
    r2 = evaluate(scores_from_matrix(scores), heldout, None, ks=(1, 2))
    assert r2["recall@1"] == 0.0 and r2["mrr@2"] == pytest.approx(0.25)
    # coverage: top-1 lists hold item 1 (user 0) and item 0 (user 1) -> 2 of 5 items
    assert r["item_coverage@1"] == pytest.approx(2 / 5)


def test_evaluate_batches_give_same_result() -> None:
    rng = np.random.default_rng(0)
    scores = torch.as_tensor(rng.normal(size=(50, 30)))
    held = sp.csr_matrix((rng.random((50, 30)) < 0.1).astype(np.float32))
    ex = sp.csr_matrix((rng.random((50, 30)) < 0.2).astype(np.float32))
    a = evaluate(scores_from_matrix(scores), held, ex, batch_size=7)
    b = evaluate(scores_from_matrix(scores), held, ex, batch_size=1000)
    assert a == pytest.approx(b)


def test_k_larger_than_the_catalogue_counts_missing_ranks_as_misses() -> None:
    # 5 items, k = 20: @20 equals @5 for recall / ndcg / hit / mrr; precision keeps its / k
    scores = np.tile(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), (2, 1))
    heldout = to_csr(np.array([0, 1, 1]), np.array([1, 3, 4]), (2, 5))
    r = evaluate(scores_from_matrix(scores), heldout, None, ks=(5, 20))
    for m in ("recall", "ndcg", "hit", "mrr"):
        assert r[f"{m}@20"] == pytest.approx(r[f"{m}@5"])
    assert r["recall@20"] == 1.0 and r["precision@20"] == pytest.approx((1 + 2) / 20 / 2)
    assert r["item_coverage@20"] == 1.0
