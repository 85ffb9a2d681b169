"""The LightGBM LambdaRank re-ranker (the project's ``Ranker`` protocol) and its training-set helper.

Saved as two files in a directory (the bundle's ``ranker/``):

* ``model.txt`` - LightGBM's own text model format (``Booster.save_model``), readable by any LightGBM;
* ``feature_spec.json`` - feature names and descriptions in column order, the label grades, per-feature medians
  of the training data (used to neutralise a feature), training metrics, and the LightGBM version.

Both are written atomically; nothing is pickled.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kgrec.config import RankingConfig
from kgrec.data.schema import atomic_write_bytes, atomic_write_json
from kgrec.errors import BundleError, ModelNotTrainedError
from ranking.features import FEATURE_DESCRIPTIONS, FeatureBuilder, FeatureMatrix

logger = logging.getLogger(__name__)

# Graded relevance of a held-out (user, item) pair: the strongest event wins. "rating" counts as a strong positive
# (explicit feedback, e.g. MovieLens), between cart and purchase in intent. The grade indexes ``label_gain``.
LABEL_GRADES: dict[str, int] = {"none": 0, "view": 1, "click": 2, "cart": 3, "rating": 3, "purchase": 4}
# Gain of each grade in NDCG: written down in ``RankingConfig.label_gain`` (default 0, 1, 2, 4, 8 for grades 0..4).
DEFAULT_LABEL_GAIN: tuple[float, ...] = tuple(RankingConfig().label_gain)
SPEC_VERSION = 1
_SMALL_BATCH = 5_000  # rows below which prediction runs on one thread
MODEL_FILE = "model.txt"
SPEC_FILE = "feature_spec.json"


class Ranker:
    """LightGBM ``LGBMRanker(objective="lambdarank")`` with graded labels and early stopping on NDCG@20.

    sklearn-shaped: ``fit(X, y, group, eval_X=, eval_y=, eval_group=)``, ``predict(X)``, ``contributions(X)``,
    ``save(dir)``, ``Ranker.load(dir)``. Scores are LightGBM raw scores (higher = better, comparable within a
    group only).
    """

    def __init__(self, config: RankingConfig | None = None, feature_names: tuple[str, ...] | list[str] | None = None):
        self.config = config or RankingConfig()
        self.feature_names: tuple[str, ...] = tuple(feature_names or FeatureBuilder.names)
        self.booster_: Any = None
        self.best_iteration_: int | None = None
        self.medians_: np.ndarray | None = None
        self.metrics_: dict[str, Any] = {}
        self.eval_curve_: list[float] | None = None  # eval-set NDCG@20 after each iteration (fit with an eval set)

    @property
    def label_gain(self) -> list[float]:
        gain = list(self.config.label_gain)
        if len(gain) <= max(LABEL_GRADES.values()):
            raise ValueError(f"label_gain needs {max(LABEL_GRADES.values()) + 1} entries (grades 0..4), got {gain}")
        return gain

    # ------------------------------------------------------------------ fit / predict
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        group: np.ndarray,
        *,
        eval_X: np.ndarray | None = None,
        eval_y: np.ndarray | None = None,
        eval_group: np.ndarray | None = None,
    ) -> Ranker:
        """Train on (n, F) features, (n,) integer grades 0..4 and group sizes summing to n (one group per user
        or query, rows contiguous). With an eval set, stops early when its NDCG@20 has not improved for
        ``config.early_stopping_rounds`` rounds and keeps the best iteration."""
        import lightgbm as lgb

        X = self._features(X)
        y = np.asarray(y, dtype=np.int32)
        group = np.asarray(group, dtype=np.int64)
        if group.sum() != len(X):
            raise ValueError(f"group sizes sum to {group.sum()} but X has {len(X)} rows")
        cfg = self.config
        model = lgb.LGBMRanker(**self.lgbm_params(), n_jobs=cfg.n_jobs)
        fit_kwargs: dict[str, Any] = {"group": group, "feature_name": list(self.feature_names)}
        callbacks = []
        if eval_X is not None:
            if eval_y is None or eval_group is None:
                raise ValueError("eval_X needs eval_y and eval_group")
            fit_kwargs.update(
                eval_X=np.asarray(eval_X, dtype=np.float32),
                eval_y=np.asarray(eval_y, dtype=np.int32),
                eval_group=[np.asarray(eval_group, dtype=np.int64)],
                eval_at=[20],
                eval_metric="ndcg",
            )
            callbacks.append(lgb.early_stopping(cfg.early_stopping_rounds, first_metric_only=True, verbose=False))
        model.fit(X, y, callbacks=callbacks, **fit_kwargs)
        self.booster_ = model.booster_
        self.best_iteration_ = int(model.best_iteration_) if model.best_iteration_ else self.booster_.current_iteration()
        self.medians_ = _column_medians(X)
        self.metrics_ = {"best_iteration": self.best_iteration_, "train_rows": int(len(X)), "train_groups": int(len(group))}
        if eval_X is not None and model.best_score_:
            self.metrics_["valid_ndcg@20"] = float(model.best_score_["valid_0"]["ndcg@20"])
        self.eval_curve_ = ([float(v) for v in model.evals_result_["valid_0"]["ndcg@20"]]
                            if eval_X is not None and model.evals_result_ else None)
        logger.debug("ranker trained: %s", self.metrics_)  # fit_ranker logs the fuller report at INFO
        return self

    def _check(self) -> None:
        if self.booster_ is None:
            raise ModelNotTrainedError("the ranker is not trained: call Ranker.fit(...) or Ranker.load(dir) first")

    def lgbm_params(self) -> dict[str, Any]:
        """LightGBM LambdaRank parameters from the config (shared by the local and the Dask ranker)."""
        cfg = self.config
        return dict(
            objective="lambdarank",
            n_estimators=cfg.n_estimators,
            learning_rate=cfg.learning_rate,
            num_leaves=cfg.num_leaves,
            min_child_samples=cfg.min_child_samples,
            subsample=cfg.subsample,
            subsample_freq=1 if cfg.subsample < 1.0 else 0,
            colsample_bytree=cfg.colsample_bytree,
            label_gain=self.label_gain,
            lambdarank_truncation_level=cfg.lambdarank_truncation_level,
            random_state=cfg.seed,
            deterministic=True,
            force_row_wise=True,
            verbose=-1,
        )

    def predict(self, X: np.ndarray | FeatureMatrix, num_threads: int | None = None) -> np.ndarray:
        """(n,) float64 raw ranking scores for (n, F) features (an array, or a :class:`FeatureMatrix` whose column
        names are checked against the ranker's). ``num_threads`` overrides the thread count (default:
        1 below a few thousand rows, else ``config.n_jobs``); the scores do not depend on it. A service running one
        process per core passes 1."""
        self._check()
        X = self._features(X)
        threads = self._threads(len(X)) if num_threads is None else max(1, int(num_threads))
        return self.booster_.predict(X, num_iteration=self.best_iteration_, num_threads=threads)

    def _features(self, X: np.ndarray | FeatureMatrix) -> np.ndarray:
        if isinstance(X, FeatureMatrix):  # named columns: they must be the ranker's own, in its order
            if tuple(X.names) != self.feature_names:
                raise ValueError(f"the ranker takes features {list(self.feature_names)}, in that order; got "
                                 f"{list(X.names)} (build them with FeatureBuilder(context, ranker.feature_names))")
            X = X.X
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise ValueError(f"the ranker takes (n, {len(self.feature_names)}) features {list(self.feature_names)}; "
                             f"got shape {X.shape}")
        return X

    def _threads(self, n_rows: int) -> int:
        # One request's few hundred rows: thread start-up and contention cost more than the trees (per-user latency).
        return 1 if n_rows < _SMALL_BATCH else max(1, self.config.n_jobs)

    def contributions(self, X: np.ndarray | FeatureMatrix) -> np.ndarray:
        """(n, F + 1) float64 SHAP contributions (TreeSHAP, ``pred_contrib=True``): one column per feature plus
        the bias last; each row sums to ``predict(X)``."""
        self._check()
        X = self._features(X)
        if len(X) == 0:  # LightGBM divides by the row count
            return np.zeros((0, len(self.feature_names) + 1), dtype=np.float64)
        return self.booster_.predict(
            X, num_iteration=self.best_iteration_, pred_contrib=True, num_threads=self._threads(len(X))
        )

    def feature_importance(self) -> dict[str, float]:
        """Total gain per feature name."""
        self._check()
        gains = self.booster_.feature_importance(importance_type="gain", iteration=self.best_iteration_)
        return dict(zip(self.feature_names, (float(g) for g in gains)))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``model.txt`` (LightGBM text format) and ``feature_spec.json`` into ``directory``."""
        self._check()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        text = self.booster_.model_to_string(num_iteration=self.best_iteration_)
        atomic_write_bytes(d / MODEL_FILE, text.encode("utf-8"))
        atomic_write_json(d / SPEC_FILE, self.spec())
        return d

    def spec(self) -> dict[str, Any]:
        import lightgbm as lgb

        return {
            "spec_version": SPEC_VERSION,
            "lightgbm_version": lgb.__version__,
            "objective": "lambdarank",
            "features": [
                {"name": n, "description": FEATURE_DESCRIPTIONS.get(n, ""), "median": None if not np.isfinite(m) else float(m)}
                for n, m in zip(self.feature_names, self.medians_ if self.medians_ is not None else [0.0] * len(self.feature_names))
            ],
            "label_grades": LABEL_GRADES,
            "label_gain": self.label_gain,
            "best_iteration": self.best_iteration_,
            "metrics": self.metrics_,
            "config": self.config.model_dump(mode="json"),
        }

    @classmethod
    def load(cls, directory: str | Path) -> Ranker:
        """Read a directory written by :meth:`save`."""
        import lightgbm as lgb

        d = Path(directory)
        model_path, spec_path = d / MODEL_FILE, d / SPEC_FILE
        if not model_path.is_file() or not spec_path.is_file():
            raise BundleError(f"{d} is not a saved ranker: expected {MODEL_FILE} and {SPEC_FILE}; retrain with `kgrec train`")
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BundleError(f"{spec_path} is not valid JSON ({exc}); the bundle is damaged, retrain it") from exc
        if spec.get("spec_version") != SPEC_VERSION:
            raise BundleError(f"{spec_path}: feature spec version {spec.get('spec_version')} is not supported (expected {SPEC_VERSION})")
        cfg = RankingConfig.model_validate(spec.get("config", {}))
        names = [f["name"] for f in spec["features"]]
        ranker = cls(cfg, names)
        try:
            ranker.booster_ = lgb.Booster(model_file=str(model_path))
        except lgb.basic.LightGBMError as exc:
            raise BundleError(f"{model_path} is not a readable LightGBM model ({exc}); retrain with `kgrec train`") from exc
        if ranker.booster_.feature_name() != names:
            raise BundleError(f"{model_path}: model features {ranker.booster_.feature_name()} differ from {spec_path}")
        ranker.best_iteration_ = spec.get("best_iteration") or ranker.booster_.current_iteration()
        ranker.medians_ = np.array(
            [np.nan if f.get("median") is None else f["median"] for f in spec["features"]], dtype=np.float64
        )
        ranker.metrics_ = spec.get("metrics", {})
        return ranker


def _column_medians(X: np.ndarray) -> np.ndarray:
    """(F,) median of each column over its finite values; NaN for an all-missing column (stays "missing")."""
    out = np.full(X.shape[1], np.nan)
    for j in range(X.shape[1]):
        col = X[:, j]
        col = col[np.isfinite(col)]
        if len(col):
            out[j] = float(np.median(col))
    return out


# ---------------------------------------------------------------------- training data
@dataclass
class TrainingSet:
    """Rows for ``Ranker.fit``: features, grades and group sizes, plus the pairs they describe."""

    X: np.ndarray  # (n, F) float32
    y: np.ndarray  # (n,) int32 grades 0..4
    group: np.ndarray  # (n_groups,) rows per group (the group's candidates that are not padding)
    user_index: np.ndarray  # (n_groups,) dense user index per group
    candidates: np.ndarray  # (n_groups, C) dense item indices, -1 padding at the end of short lists
    names: tuple[str, ...]


def grade_matrix(
    events: pd.DataFrame, user_ids: list[str], item_ids: list[str]
) -> Any:
    """(U, I) CSR of graded labels from events (``user_id``, ``item_id``, ``type``): max grade per pair."""
    import scipy.sparse as sp

    upos = pd.Series(np.arange(len(user_ids)), index=pd.Index(user_ids)).reindex(events["user_id"].astype(str)).to_numpy()
    ipos = pd.Series(np.arange(len(item_ids)), index=pd.Index(item_ids)).reindex(events["item_id"].astype(str)).to_numpy()
    grade = events["type"].map(LABEL_GRADES).fillna(0).to_numpy()
    ok = ~np.isnan(upos) & ~np.isnan(ipos) & (grade > 0)
    df = pd.DataFrame({"u": upos[ok].astype(np.int64), "i": ipos[ok].astype(np.int64), "g": grade[ok]})
    best = df.groupby(["u", "i"])["g"].max()
    if len(best) == 0:
        return sp.csr_matrix((len(user_ids), len(item_ids)), dtype=np.float32)
    ui = np.array(best.index.tolist(), dtype=np.int64).reshape(-1, 2)
    return sp.csr_matrix((best.to_numpy(dtype=np.float32), (ui[:, 0], ui[:, 1])), shape=(len(user_ids), len(item_ids)))


def build_training_set(
    builder: FeatureBuilder,
    user_index: np.ndarray,
    candidates: np.ndarray,
    heldout_events: pd.DataFrame,
    *,
    query_vectors: np.ndarray | None = None,
    drop_groups_without_positives: bool = True,
) -> TrainingSet:
    """Features of each user's retrieval candidates, labelled by the user's held-out events.

    Args:
        builder: the feature builder (its context holds only the training interactions).
        user_index: (n,) dense user indices; candidates: (n, C) dense item indices from retrieval (-1 pads a user
            with fewer than C unseen items; pads get no row).
        heldout_events: events after the training cut (``user_id``, ``item_id``, ``type``).
        drop_groups_without_positives: groups whose candidates hold no held-out item teach LambdaRank nothing.
    """
    ctx = builder.ctx
    grades = grade_matrix(heldout_events, ctx.user_ids, ctx.item_ids)
    user_index = np.asarray(user_index, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    from ranking.features import _pair_values

    C = candidates.shape[1]
    rep = np.repeat(np.arange(len(user_index)), C)
    y = _pair_values(grades[user_index], rep, candidates.ravel()).astype(np.int32)
    keep = np.ones(len(user_index), dtype=bool)
    if drop_groups_without_positives:
        keep = y.reshape(len(user_index), C).max(axis=1) > 0
    user_index, candidates = user_index[keep], candidates[keep]
    y = y.reshape(-1, C)[keep].ravel()
    q = None if query_vectors is None or np.ndim(query_vectors) == 1 else np.asarray(query_vectors)[keep]
    real = candidates >= 0
    fm: FeatureMatrix = builder.build(user_index, np.where(real, candidates, 0), q if q is not None else query_vectors)
    rows = real.ravel()
    return TrainingSet(
        X=fm.X[rows], y=y[rows], group=real.sum(axis=1).astype(fm.group.dtype), user_index=user_index,
        candidates=candidates, names=fm.names
    )


def top_candidates(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    *,
    exclude: Any = None,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k items by dot product for each user vector: ((n, k) indices, (n, k) scores), best first.

    ``exclude``: optional (n, I) sparse matrix; its non-zeros get score -inf and come last (returned only when a
    row has fewer than k other items). A stand-in for the fusion stage's retrieval when only arrays are at hand (tests, benchmarks).
    """
    user_vectors = np.atleast_2d(np.asarray(user_vectors, dtype=np.float32))
    n, I = len(user_vectors), len(item_vectors)
    k = min(k, I)
    idx_out = np.empty((n, k), dtype=np.int64)
    score_out = np.empty((n, k), dtype=np.float32)
    item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    for s in range(0, n, batch_size):
        # (I, d) @ (d, b) keeps the big matrix C-contiguous for BLAS: ~40x faster than u @ items.T for one user.
        scores = np.ascontiguousarray((item_vectors @ user_vectors[s : s + batch_size].T).T)
        if exclude is not None:
            ex = exclude[s : s + batch_size].tocoo()
            scores[ex.row, ex.col] = -np.inf
        part = np.argpartition(scores, I - k, axis=1)[:, I - k :]
        ps = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx_out[s : s + batch_size] = np.take_along_axis(part, order, axis=1)
        score_out[s : s + batch_size] = np.take_along_axis(ps, order, axis=1)
    return idx_out, score_out


def ndcg_at_k(scores: np.ndarray, labels: np.ndarray, group: np.ndarray, k: int = 20, label_gain: list[float] | None = None) -> float:
    """Mean NDCG@k over groups (groups without a positive label count as 0), gains from ``label_gain``."""
    gain = np.asarray(label_gain or DEFAULT_LABEL_GAIN, dtype=np.float64)
    out, start = [], 0
    for g in np.asarray(group, dtype=np.int64):
        s, y = scores[start : start + g], labels[start : start + g].astype(np.int64)
        start += g
        if y.max(initial=0) == 0:
            out.append(0.0)
            continue
        disc = 1.0 / np.log2(np.arange(2, min(k, g) + 2))
        top = np.argsort(-s, kind="stable")[:k]
        dcg = (gain[y[top]] * disc[: len(top)]).sum()
        ideal = np.sort(gain[y])[::-1][:k]
        out.append(dcg / (ideal * disc[: len(ideal)]).sum())
    return float(np.mean(out)) if out else 0.0
