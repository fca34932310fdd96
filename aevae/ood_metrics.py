"""Detection metrics of an out-of-distribution score: AUROC, AUPR, FPR at 95% TPR, with bootstrap intervals.

The out-of-distribution images are the positive class and a higher score means "more out of distribution".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("auroc", "aupr", "fpr95")
TPR_LEVEL = 0.95


def _labelled(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([in_scores, out_scores]).astype(np.float64)
    return np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], scores


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of an OOD image > score of an in-distribution image), ties counted half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_labelled(in_scores, out_scores)))


def aupr(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the precision-recall curve with OOD as positive (sklearn's average precision)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_labelled(in_scores, out_scores)))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr_level: float = TPR_LEVEL) -> float:
    """Share of in-distribution images flagged at the highest threshold that flags tpr_level of the OOD images."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(*_labelled(in_scores, out_scores), drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, tpr_level, side="left")])


METRIC_FUNCTIONS = {"auroc": auroc, "aupr": aupr, "fpr95": fpr_at_tpr}


@dataclass
class Estimate:
    """A metric's value on all images and its percentile bootstrap interval."""

    value: float
    low: float
    high: float


def detection_metrics(
    in_scores: np.ndarray, out_scores: np.ndarray, bootstrap: int = 200, confidence: float = 0.95, seed: int = 0
) -> dict[str, Estimate]:
    """Every metric with a percentile bootstrap interval: in- and out-images resampled separately, seeded."""
    in_scores, out_scores = np.asarray(in_scores), np.asarray(out_scores)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in METRICS}
    for _ in range(bootstrap):
        resampled_in = in_scores[rng.integers(0, len(in_scores), len(in_scores))]
        resampled_out = out_scores[rng.integers(0, len(out_scores), len(out_scores))]
        for name in METRICS:
            draws[name].append(METRIC_FUNCTIONS[name](resampled_in, resampled_out))
    tail = 100 * (1 - confidence) / 2
    estimates = {}
    for name in METRICS:
        value = METRIC_FUNCTIONS[name](in_scores, out_scores)
        low, high = np.percentile(draws[name], [tail, 100 - tail]) if bootstrap else (value, value)
        estimates[name] = Estimate(value, float(low), float(high))
    return estimates
