"""Confidence calibration for inferred values: isotonic regression, reliability curves, ECE and the PNG plot.

A raw score (the stacker's top-class probability) is mapped to the probability that the value is right, learned on
items whose value is known but was hidden from the models (out-of-fold). ``cross_fitted_calibration`` also gives
honest calibrated confidences for those same items (each fold calibrated by a model fitted on the other folds):
those are what the reliability plot and the reported accuracy/coverage are computed from.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class IsotonicCalibrator:
    """Monotone map raw score -> P(correct), stored as breakpoints (JSON-friendly, no pickle).

    ``x`` and ``y`` are the isotonic fit's thresholds; scores between breakpoints are interpolated linearly and
    scores outside are clipped to the ends. ``fallback`` (the base rate) is used when there was nothing to fit on.
    """

    x: np.ndarray
    y: np.ndarray
    fallback: float = 0.5

    @classmethod
    def fit(cls, scores: np.ndarray, correct: np.ndarray) -> IsotonicCalibrator:
        """Fit on ``scores`` (m,) in [0, 1] and ``correct`` (m,) bool."""
        from sklearn.isotonic import IsotonicRegression

        scores = np.asarray(scores, dtype=np.float64)
        correct = np.asarray(correct, dtype=np.float64)
        if len(scores) == 0:
            return cls(np.zeros(0), np.zeros(0), 0.5)
        base = float(correct.mean())
        if len(np.unique(scores)) < 2 or len(np.unique(correct)) < 2:
            return cls(np.zeros(0), np.zeros(0), base)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
        iso.fit(scores, correct)
        return cls(np.asarray(iso.X_thresholds_, dtype=np.float64), np.asarray(iso.y_thresholds_, dtype=np.float64),
                   base)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (m,) float64 in [0, 1]."""
        scores = np.asarray(scores, dtype=np.float64)
        if len(self.x) == 0:
            return np.full(scores.shape, self.fallback)
        return np.interp(scores, self.x, self.y)

    def to_dict(self) -> dict[str, list[float] | float]:
        return {"x": self.x.tolist(), "y": self.y.tolist(), "fallback": self.fallback}


def cross_fitted_calibration(
    scores: np.ndarray, correct: np.ndarray, folds: np.ndarray
) -> tuple[np.ndarray, IsotonicCalibrator]:
    """Calibrate out-of-fold scores honestly.

    Args:
        scores: (m,) raw top-value scores of items with a known (hidden) value.
        correct: (m,) bool, the top value equals the known one.
        folds: (m,) int fold of each item.

    Returns:
        ``(calibrated, final)``: (m,) confidences, each from a calibrator fitted on the other folds, and the
        calibrator fitted on everything (the one applied to items whose value is missing).
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    calibrated = np.zeros(len(scores))
    for f in np.unique(folds):
        test = folds == f
        calibrated[test] = IsotonicCalibrator.fit(scores[~test], correct[~test]).predict(scores[test])
    return calibrated, IsotonicCalibrator.fit(scores, correct)


@dataclass
class ReliabilityCurve:
    """Binned confidence vs accuracy: ``bin_confidence``/``bin_accuracy``/``bin_count`` per non-empty bin."""

    bin_confidence: np.ndarray
    bin_accuracy: np.ndarray
    bin_count: np.ndarray
    ece: float  # expected calibration error: count-weighted mean |accuracy - confidence|

    def to_dict(self) -> dict[str, object]:
        return {
            "bin_confidence": [round(float(v), 4) for v in self.bin_confidence],
            "bin_accuracy": [round(float(v), 4) for v in self.bin_accuracy],
            "bin_count": [int(v) for v in self.bin_count],
            "ece": round(self.ece, 4),
        }


def reliability_curve(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> ReliabilityCurve:
    """Equal-width bins over [0, 1]; ECE over the non-empty bins."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return ReliabilityCurve(np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64), 0.0)
    idx = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    keep = count > 0
    bc, ba, n = conf_sum[keep] / count[keep], acc_sum[keep] / count[keep], count[keep]
    ece = float(np.sum(n * np.abs(ba - bc)) / n.sum())
    return ReliabilityCurve(bc, ba, n, ece)


def plot_reliability(curves: dict[str, ReliabilityCurve], path: str | Path, *, threshold: float | None = None,
                     title: str = "Attribute inference: reliability (held-out known values)",
                     min_bin_count: int = 5) -> Path:
    """Write a reliability diagram PNG (one line per attribute, point area ~ bin count) atomically. Bins with fewer
    than ``min_bin_count`` items are not drawn (their accuracy is noise); the ECE in the legend counts them."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kgrec.data.schema import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=110)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    for name, c in sorted(curves.items()):
        keep = c.bin_count >= min_bin_count
        if not keep.any():
            continue
        sizes = 10 + 140 * c.bin_count[keep] / max(1, c.bin_count.max())
        line, = ax.plot(c.bin_confidence[keep], c.bin_accuracy[keep], lw=1.2, label=f"{name} (ECE {c.ece:.3f})")
        ax.scatter(c.bin_confidence[keep], c.bin_accuracy[keep], s=sizes, alpha=0.5, color=line.get_color())
    if threshold is not None:
        ax.axvline(threshold, c="red", lw=1, ls=":", label=f"write threshold {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("calibrated confidence")
    ax.set_ylabel("observed accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    logger.info("wrote reliability plot to %s", path)
    return path
