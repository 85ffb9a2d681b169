"""Ranking fixtures: a generated shop with planted preferences, its context, and a small trained ranker."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from kgrec.config import RankingConfig
from ranking.context import RankingContext
from ranking.features import FeatureBuilder
from ranking.ranker import Ranker, TrainingSet, build_training_set, top_candidates
from tests.ranking.world import World, context_from_world, make_world

NUM_CANDIDATES = 50


@dataclass
class Trained:
    world: World
    ctx: RankingContext
    builder: FeatureBuilder
    ranker: Ranker
    candidates: np.ndarray  # (U, C) retrieval candidates per user
    train: TrainingSet
    valid: TrainingSet
    test: TrainingSet
    config: RankingConfig


def small_config(**kw) -> RankingConfig:
    base = dict(n_estimators=120, learning_rate=0.08, num_leaves=15, early_stopping_rounds=20, seed=7, n_jobs=1)
    base.update(kw)
    return RankingConfig(**base)


def train_on(world: World, ctx: RankingContext, config: RankingConfig) -> Trained:
    builder = FeatureBuilder(ctx)
    cand, _ = top_candidates(ctx.user_vectors, ctx.item_vectors, NUM_CANDIDATES, exclude=ctx.interactions["purchase"])
    users = np.arange(ctx.num_users)
    n = len(users)
    tr, va, te = users[: n * 6 // 10], users[n * 6 // 10 : n * 8 // 10], users[n * 8 // 10 :]
    train = build_training_set(builder, tr, cand[tr], world.test_events)
    valid = build_training_set(builder, va, cand[va], world.test_events)
    test = build_training_set(builder, te, cand[te], world.test_events)
    ranker = Ranker(config).fit(
        train.X, train.y, train.group, eval_X=valid.X, eval_y=valid.y, eval_group=valid.group
    )
    return Trained(world, ctx, builder, ranker, cand, train, valid, test, config)


@pytest.fixture(scope="session")
def ranking_world() -> World:
    return make_world(n_users=400, n_items=300, seed=3, test_events=8)


@pytest.fixture(scope="session")
def trained(ranking_world: World) -> Trained:
    ctx = context_from_world(ranking_world)
    return train_on(ranking_world, ctx, small_config())
