"""Training the re-ranker from retrieval candidates + held-out events, and measuring what it adds over retrieval.

Typical use by the app (``Recommender.fit`` / ``kgrec train``)::

    builder = FeatureBuilder(context)                      # context built from the TRAIN interactions only
    cands = retrieval_candidates_for(users)                # (n, C) dense item indices, best first
    ranker, report = fit_ranker(builder, users, cands, valid_events, config=cfg.ranking)
    table = evaluate_reranking(ranker, builder, test_users, test_cands, test_events)

``valid_events`` are events after the training cut (the dataset's ``split == "valid"`` rows): their graded
labels (``LABEL_GRADES``) teach the ranker which candidates the user went on to buy / cart / click / view.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kgrec.config import RankingConfig
from kgrec.errors import DataError
from ranking.features import FeatureBuilder
from ranking.ranker import Ranker, TrainingSet, build_training_set, grade_matrix, ndcg_at_k

logger = logging.getLogger(__name__)


def fit_ranker(
    builder: FeatureBuilder,
    user_index: np.ndarray,
    candidates: np.ndarray,
    heldout_events: pd.DataFrame,
    *,
    config: RankingConfig | None = None,
    valid_fraction: float = 0.2,
    seed: int | None = None,
    extra_train: Sequence[tuple[str, TrainingSet]] = (),
    learn_from_heldout: bool = True,
) -> tuple[Ranker, dict[str, Any]]:
    """Train a :class:`Ranker` on users' candidates labelled by their held-out events.

    Users are split (seeded) into a training part and a validation part (``valid_fraction``) used for early
    stopping on NDCG@20. Users whose candidates contain none of their held-out items are dropped (they carry no
    ranking signal). Returns the ranker and a report (rows, groups, NDCG@20 on the validation users for the
    ranker and for the retrieval order).

    ``extra_train``: more labelled groups to learn from, as ``(name, TrainingSet)`` built with the same feature
    columns (``Recommender.fit``'s held-out fold of train: another retrieval model's candidates, features from
    another history); groups of the validation users are left out of them, so early stopping and the report stay on
    users the ranker has not learnt from. ``learn_from_heldout=False`` learns from ``extra_train`` only (the
    held-out events then serve early stopping and the report alone).

    With ``config.cv_folds >= 2`` the users are cut into that many folds instead: each fold's ranker learns from the
    others and stops early on it, the tree count is the best iteration of the fold-mean NDCG@20 curve, and the ranker
    returned learns from every user with that many trees; the report's NDCG@20 is out-of-fold over all users
    (``valid_fraction`` is not used).
    """
    config = config or RankingConfig()
    rng = np.random.default_rng(config.seed if seed is None else seed)
    user_index = np.asarray(user_index, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    order = rng.permutation(len(user_index))
    for name, ts in extra_train:
        if tuple(ts.names) != tuple(builder.names):
            raise ValueError(f"training set {name!r} has other feature columns than the builder")
    held: TrainingSet | None = None
    if config.cv_folds >= 2:
        held = build_training_set(builder, user_index, candidates, heldout_events)
        if len(held.group) >= config.cv_folds:
            ranker, report = _fit_cv(held, builder, user_index, config, order, extra_train, learn_from_heldout)
            return ranker, _finish_report(ranker, report)
        logger.info("%d users with a held-out event among their candidates, fewer than ranking.cv_folds (%d): "
                    "early stopping on a share of them instead", len(held.group), config.cv_folds)
    n_valid = max(1, int(round(len(order) * valid_fraction)))
    va, tr = order[:n_valid], order[n_valid:]

    def part(pos: np.ndarray) -> TrainingSet:  # the groups of these users, built once
        if held is None:
            return build_training_set(builder, user_index[pos], candidates[pos], heldout_events)
        return _pick(held, user_index[pos])

    valid = part(va)
    parts: list[tuple[str, TrainingSet]] = []
    if learn_from_heldout:
        parts.append(("heldout", part(tr)))
    for name, ts in extra_train:
        parts.append((name, _without_users(ts, user_index[va])))
    train = _concat(parts, builder.names)
    if len(train.group) == 0:
        raise DataError(
            "no training user has a held-out event among their retrieval candidates: the ranker cannot learn; "
            "check the split (valid events after the train cut) or raise ranking.num_candidates"
        )
    ranker = Ranker(config, builder.names)
    if len(valid.group):
        ranker.fit(train.X, train.y, train.group, eval_X=valid.X, eval_y=valid.y, eval_group=valid.group)
    else:
        logger.warning("no validation user has a held-out event among their candidates: training without early stopping")
        ranker.fit(train.X, train.y, train.group)
    report: dict[str, Any] = {
        "train_rows": int(len(train.X)),
        "train_groups": int(len(train.group)),
        "valid_groups": int(len(valid.group)),
        "best_iteration": ranker.best_iteration_,
    }
    if extra_train or not learn_from_heldout:
        report["train_groups_by_source"] = {name: int(len(ts.group)) for name, ts in parts}
    if len(valid.group):
        report.update(_against_retrieval(ndcg_at_k(ranker.predict(valid.X), valid.y, valid.group, 20, ranker.label_gain),
                                         valid, ranker.label_gain))
    return ranker, _finish_report(ranker, report)


def _against_retrieval(ranker_ndcg: float, ts: TrainingSet, gain: list[float]) -> dict[str, Any]:
    """The ranker's NDCG@20 next to the retrieval order's on the groups of ``ts``."""
    position = np.concatenate([np.arange(g) for g in ts.group]).astype(float)  # retrieval order
    out = {"valid_ndcg@20_ranker": float(ranker_ndcg),
           "valid_ndcg@20_retrieval": ndcg_at_k(-position, ts.y, ts.group, 20, gain)}
    out["beats_retrieval"] = bool(out["valid_ndcg@20_ranker"] > out["valid_ndcg@20_retrieval"])
    return out


def gain_shares(ranker: Ranker) -> dict[str, float]:
    """What the ranker's trees rest on overall: each column's share of the total split gain, largest first, rounded
    to 4 digits (columns no split uses are left out; empty for a ranker without a gainful split)."""
    gain = ranker.feature_importance()
    total = sum(gain.values())
    if total <= 0:
        return {}
    return {n: round(g / total, 4) for n, g in sorted(gain.items(), key=lambda kv: -kv[1]) if g > 0}


def _finish_report(ranker: Ranker, report: dict[str, Any]) -> dict[str, Any]:
    """Log the training report (and warn when the ranker does not beat the retrieval order); keep it on the ranker."""
    report["feature_gain_share"] = gain_shares(ranker)
    ranker.metrics_.update(report)
    logger.info("re-ranker: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()
                                  if k != "feature_gain_share"})
    top = list(report["feature_gain_share"].items())[:5]
    if top:
        logger.info("re-ranker's split gain, largest shares: %s", ", ".join(f"{n} {v:.0%}" for n, v in top))
    if not report.get("beats_retrieval", True):
        logger.warning(
            "the re-ranker does not beat the retrieval order on its %d validation users (NDCG@20 %.4f vs %.4f, "
            "best iteration %d): the re-ranker is still used, but compare the gnn and gnn+ranker rows of the metrics (the "
            "retrieval figure is optimistic when the retrieval model stopped early on these same events, as fit's GNN "
            "does); more held-out events (users with valid events) or a smaller ranking.num_leaves usually help",
            report["valid_groups"], report["valid_ndcg@20_ranker"], report["valid_ndcg@20_retrieval"],
            report["best_iteration"] or 0)
    return report


def _fit_cv(held: TrainingSet, builder: FeatureBuilder, user_index: np.ndarray, config: RankingConfig,
            order: np.ndarray, extra_train: Sequence[tuple[str, TrainingSet]],
            learn_from_heldout: bool) -> tuple[Ranker, dict[str, Any]]:
    """``config.cv_folds``-fold cross-validation over the users chooses the number of trees (the best iteration of
    the fold-mean NDCG@20 curve); then one ranker learns from every user with that many trees. ``held``: the
    held-out groups of ``user_index``. The report's ranker NDCG@20 is the folds' own evaluation at the chosen count,
    pooled over their users (each user scored by the fold model that did not learn from them)."""
    k = config.cv_folds
    fold_at = np.empty(len(user_index), dtype=np.int64)
    fold_at[order] = np.arange(len(order)) % k
    fold_of = dict(zip(user_index[::-1].tolist(), fold_at[::-1].tolist()))  # a repeated user: its first fold
    group_fold = np.array([fold_of[u] for u in held.user_index.tolist()], dtype=np.int64)
    curves, sizes, used = [], [], []
    for f in range(k):
        parts = [("heldout", _groups(held, group_fold != f))] if learn_from_heldout else []
        fold_users = np.array([u for u, g in fold_of.items() if g == f], dtype=np.int64)
        parts += [(name, _without_users(ts, fold_users)) for name, ts in extra_train]
        train, valid = _concat(parts, builder.names), _groups(held, group_fold == f)
        if len(train.group) == 0 or len(valid.group) == 0:
            continue
        model = Ranker(config, builder.names).fit(train.X, train.y, train.group, eval_X=valid.X, eval_y=valid.y,
                                                  eval_group=valid.group)
        if model.eval_curve_:
            curves.append(model.eval_curve_)
            sizes.append(len(valid.group))
            used.append(f)
    everything = _concat(([("heldout", held)] if learn_from_heldout else []) + list(extra_train), builder.names)
    if not curves or len(everything.group) == 0:
        raise DataError(
            "no cross-validation fold has users with a held-out event among their retrieval candidates on both sides: "
            "the ranker cannot learn; check the split (valid events after the train cut), raise "
            "ranking.num_candidates or set ranking.cv_folds: 0"
        )
    # every fold ran at least early_stopping_rounds past its own best: the common length covers the choice
    length = min(len(c) for c in curves)
    per_fold = np.array([c[:length] for c in curves])
    best = int(np.argmax(per_fold.mean(axis=0))) + 1
    ranker = Ranker(config.model_copy(update={"n_estimators": best}), builder.names)
    ranker.fit(everything.X, everything.y, everything.group)
    ranker.config = config  # the configured settings travel with the bundle; the tree count is best_iteration
    scored = _groups(held, np.isin(group_fold, used))
    report: dict[str, Any] = {
        "train_rows": int(len(everything.X)),
        "train_groups": int(len(everything.group)),
        "valid_groups": int(len(scored.group)),
        "best_iteration": int(ranker.best_iteration_ or best),
        "cv_folds": k,
        "cv_best_iterations": [int(np.argmax(c)) + 1 for c in curves],
    }
    if extra_train or not learn_from_heldout:
        report["train_groups_by_source"] = {name: int(len(ts.group)) for name, ts in
                                            ([("heldout", held)] if learn_from_heldout else []) + list(extra_train)}
    # LightGBM's NDCG@20 of each fold at the chosen count, weighted by the fold's users: the pooled mean
    report.update(_against_retrieval(float(np.average(per_fold[:, best - 1], weights=sizes)), scored,
                                     ranker.label_gain))
    return ranker, report


def _groups(ts: TrainingSet, keep: np.ndarray) -> TrainingSet:
    """The groups of ``ts`` where ``keep`` (one bool per group), with their rows."""
    rows = np.repeat(keep, ts.group)
    return TrainingSet(X=ts.X[rows], y=ts.y[rows], group=ts.group[keep], user_index=ts.user_index[keep],
                       candidates=ts.candidates[keep], names=ts.names)


def _pick(ts: TrainingSet, users: np.ndarray) -> TrainingSet:
    """The groups of ``users`` in that order (a user's first group; users without one skipped), with their rows:
    what ``build_training_set`` gives for those users when ``ts`` was built over a list that holds them."""
    first: dict[int, int] = {}
    for g, u in enumerate(ts.user_index.tolist()):
        first.setdefault(u, g)
    take = np.array([first[u] for u in np.asarray(users).tolist() if u in first], dtype=np.int64)
    starts = np.r_[0, np.cumsum(ts.group)[:-1]]
    rows = np.concatenate([np.arange(starts[g], starts[g] + ts.group[g]) for g in take]) if len(take) else \
        np.zeros(0, dtype=np.int64)
    return TrainingSet(X=ts.X[rows], y=ts.y[rows], group=ts.group[take], user_index=ts.user_index[take],
                       candidates=ts.candidates[take], names=ts.names)


def _without_users(ts: TrainingSet, users: np.ndarray) -> TrainingSet:
    """``ts`` without the groups of ``users`` (and their rows)."""
    keep = ~np.isin(ts.user_index, users)
    return ts if keep.all() else _groups(ts, keep)


def _concat(parts: list[tuple[str, TrainingSet]], names: tuple[str, ...]) -> TrainingSet:
    """One training set from several (groups in order; candidate lists padded with -1 to the longest)."""
    if len(parts) == 1:
        return parts[0][1]
    sets = [ts for _, ts in parts]
    width = max([ts.candidates.shape[1] for ts in sets] + [0])
    cands = [np.pad(ts.candidates, ((0, 0), (0, width - ts.candidates.shape[1])), constant_values=-1) for ts in sets]
    return TrainingSet(
        X=np.concatenate([ts.X for ts in sets]) if sets else np.zeros((0, len(names)), dtype=np.float32),
        y=np.concatenate([ts.y for ts in sets]) if sets else np.zeros(0, dtype=np.int32),
        group=np.concatenate([ts.group for ts in sets]) if sets else np.zeros(0, dtype=np.int64),
        user_index=np.concatenate([ts.user_index for ts in sets]) if sets else np.zeros(0, dtype=np.int64),
        candidates=np.concatenate(cands) if sets else np.zeros((0, 0), dtype=np.int64),
        names=tuple(names),
    )


def evaluate_reranking(
    ranker: Ranker,
    builder: FeatureBuilder,
    user_index: np.ndarray,
    candidates: np.ndarray,
    heldout_events: pd.DataFrame,
    *,
    ks: tuple[int, ...] = (10, 20),
) -> dict[str, Any]:
    """Retrieval order vs re-ranked order on the same users and candidates (all users, none dropped).

    Returns ``{"users": n, "users_with_hit": m, "retrieval": {"ndcg@10": ..., "recall@10": ...}, "reranked": {...}}``
    where recall@k = held-out positives (grade >= 1) in the top k / all the user's held-out items, and users without
    any held-out event count as 0 for both orders.
    """
    ctx = builder.ctx
    user_index = np.asarray(user_index, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    n, C = candidates.shape
    grades = grade_matrix(heldout_events, ctx.user_ids, ctx.item_ids)[user_index].tocsr()
    from ranking.features import _pair_values

    rep = np.repeat(np.arange(n), C)
    y = _pair_values(grades, rep, candidates.ravel()).astype(np.int64)
    relevant = np.diff(grades.indptr)  # held-out items per user (inside or outside the candidates)
    fm = builder.build(user_index, np.maximum(candidates, 0))
    scores = ranker.predict(fm)  # checks the builder makes the ranker's columns
    scores[candidates.ravel() < 0] = -np.inf  # -1 padding (fewer unseen items than C): never ranked, never a hit
    group = np.full(n, C)
    out: dict[str, Any] = {"users": int(n), "users_with_hit": int((y.reshape(n, C).max(axis=1) > 0).sum())}
    for name, s in (("retrieval", -np.tile(np.arange(C), n).astype(float)), ("reranked", scores)):
        res = {}
        for k in ks:
            res[f"ndcg@{k}"] = ndcg_at_k(s, y, group, k, ranker.label_gain)
            top = np.argsort(-s.reshape(n, C), axis=1, kind="stable")[:, :k]
            hits = (np.take_along_axis(y.reshape(n, C), top, axis=1) > 0).sum(axis=1)
            res[f"recall@{k}"] = float(np.mean(np.where(relevant > 0, hits / np.maximum(relevant, 1), 0.0)))
        out[name] = res
    return out
