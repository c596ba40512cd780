"""Bootstrap confidence intervals: stratified case resampling and percentile intervals.

Bootstrap CIs are percentile intervals from resampling cases with replacement, by default
*within each class* (stratified), so every resample contains every class and AUC is always
defined. ``scipy.stats.bootstrap`` does not fit: it cannot stratify and fails on resamples
where AUC is undefined. :func:`metrics_with_ci` evaluates all resamples at once (confusion
matrices by ``bincount``, AUC as the Mann-Whitney rank statistic, identical to
``roc_auc_score`` including ties) — about 100x faster than calling sklearn per resample,
and it uses the same resamples as :func:`bootstrap_ci` for a given seed. Point values come
from :func:`consilia.common.evaluation.metrics.point_metrics` (the conventions of
:mod:`consilia.common.evaluation.metrics`), so they equal the run's ``final_metrics.json``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import rankdata

from consilia.common.evaluation.metrics import METRIC_NAMES, check_labels_probs, point_metrics

__all__ = ["ConfidenceInterval", "bootstrap_ci", "bootstrap_indices", "metrics_with_ci"]

#: Resamples evaluated per vectorised block (bounds memory: block x N integers).
_BLOCK = 256


class ConfidenceInterval(NamedTuple):
    """A point estimate with its percentile bootstrap interval (unpacks as a 3-tuple)."""

    value: float
    low: float
    high: float



# ---------------------------------------------------------------------------------------
# The metrics of METRIC_NAMES, vectorised over rows of resamples
# ---------------------------------------------------------------------------------------


def _batched_confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrices for rows of resamples: ``(B, N)`` -> ``(B, C, C)`` (rows = true)."""
    b = y.shape[0]
    codes = y * num_classes + pred + (np.arange(b)[:, None] * num_classes * num_classes)
    counts = np.bincount(codes.ravel(), minlength=b * num_classes * num_classes)
    return counts.reshape(b, num_classes, num_classes)


def _metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics from ``(B, C, C)`` confusion matrices (see module conventions)."""
    cm = cm.astype(np.float64)
    total = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, tp / support, np.nan)
        negatives = total[:, None] - support
        true_neg = negatives - (predicted - tp)
        spec = np.where(present & (negatives > 0), true_neg / negatives, np.nan)
        f1 = np.where(present, 2 * tp / (support + predicted), np.nan)
        accuracy = tp.sum(axis=1) / total
    balanced = np.nanmean(recall, axis=1)
    f1_score = np.nanmean(f1, axis=1)
    if cm.shape[1] == 2:
        sens, specificity = recall[:, 1], recall[:, 0]
    else:
        sens = balanced
        specificity = np.nanmean(spec, axis=1)
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "sensitivity": sens,
        "specificity": specificity,
        "f1": f1_score,
    }


def _batched_binary_auc(y_pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC per row (Mann-Whitney U / (n_pos n_neg), mid-ranks for ties); NaN if one class."""
    ranks = rankdata(scores, axis=1)  # average ranks: ties count one half, as in sklearn
    n_pos = y_pos.sum(axis=1).astype(np.float64)
    n_neg = y_pos.shape[1] - n_pos
    rank_sum = np.where(y_pos, ranks, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _batched_auc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Binary AUC of class 1, or macro one-vs-rest AUC, per row of ``(B, N)`` resamples."""
    num_classes = p.shape[-1]
    if num_classes == 2:
        return _batched_binary_auc(y == 1, p[..., 1])
    per_class = np.stack(
        [_batched_binary_auc(y == c, p[..., c]) for c in range(num_classes)], axis=1
    )
    with _quiet_nan():
        return np.nanmean(per_class, axis=1)


@contextmanager
def _quiet_nan() -> Iterator[None]:
    """Silence numpy's 'Mean of empty slice' warnings (all-NaN rows give NaN, as intended)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _metrics_for_rows(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """All :data:`METRIC_NAMES` for ``(B, N)`` labels and ``(B, N, C)`` probabilities."""
    num_classes = p.shape[-1]
    with _quiet_nan():
        out = _metrics_from_confusion(_batched_confusion(y, p.argmax(axis=-1), num_classes))
    out["auc"] = _batched_auc(y, p)
    return out



# ---------------------------------------------------------------------------------------
# Resampling and intervals
# ---------------------------------------------------------------------------------------


def bootstrap_indices(
    y_true: Any, n_boot: int, seed: int = 0, stratified: bool = True
) -> np.ndarray:
    """Resample case indices with replacement.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        Class labels (used for stratification).
    n_boot : int
        Number of resamples.
    seed : int
        Seed of the NumPy generator.
    stratified : bool
        Resample within each class, keeping the class counts fixed.

    Returns
    -------
    np.ndarray
        ``(n_boot, N)`` integer indices into the original arrays.

    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    y = np.asarray(y_true).reshape(-1)
    n = len(y)
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.integers(0, n, size=(n_boot, n))
    out = np.empty((n_boot, n), dtype=np.int64)
    start = 0
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        k = len(members)
        out[:, start:start + k] = members[rng.integers(0, k, size=(n_boot, k))]
        start += k
    return out


def _percentile_interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    valid = samples[np.isfinite(samples)]
    if valid.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(
    y_true: Any,
    y_prob: Any,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> ConfidenceInterval:
    """Percentile bootstrap confidence interval of any metric.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        Class labels.
    y_prob : array-like, shape (N, ...)
        Scores or probabilities; resampled together with ``y_true`` (paired).
    metric_fn : callable
        ``metric_fn(y_true, y_prob) -> float``. Resamples on which it raises ``ValueError``
        or returns NaN (e.g. AUC on a single-class resample) are left out.
    n_boot : int
        Number of resamples.
    alpha : float
        ``1 - confidence level`` (0.05 gives a 95 % interval).
    seed : int
        Seed of the resampling (same seed, same resamples as :func:`metrics_with_ci`).
    stratified : bool
        Resample within each class (keeps class proportions; recommended for AUC).

    Returns
    -------
    ConfidenceInterval
        ``(value, low, high)``; the point value is ``metric_fn`` on the full data. The bounds
        are NaN when no resample gave a finite value.

    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_prob)
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} labels but y_prob has {len(p)} rows")
    point = float(metric_fn(y, p))
    samples = np.full(n_boot, np.nan)
    with warnings.catch_warnings():  # e.g. sklearn's "only one class present" on a resample
        warnings.simplefilter("ignore")
        for i, idx in enumerate(bootstrap_indices(y, n_boot, seed, stratified)):
            try:
                samples[i] = float(metric_fn(y[idx], p[idx]))
            except ValueError:
                continue
    return ConfidenceInterval(point, *_percentile_interval(samples, alpha))


def metrics_with_ci(
    y_true: Any,
    y_prob: Any,
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
) -> dict[str, dict[str, float]]:
    """AUC, accuracy, balanced accuracy, sensitivity, specificity and F1 with bootstrap CIs.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        Class labels.
    y_prob : array-like, shape (N, C)
        Class probabilities (rows need not sum exactly to 1).
    class_names : sequence of str, optional
        Only checked against the number of columns of ``y_prob``.
    n_boot, seed, alpha, stratified
        As in :func:`bootstrap_ci`; all metrics share the same resamples.

    Returns
    -------
    dict
        ``{metric: {"value": v, "ci_low": lo, "ci_high": hi}}`` for :data:`METRIC_NAMES`
        (binary: class 1 is positive; see the module conventions).

    """
    y, p = check_labels_probs(y_true, y_prob)
    if class_names is not None and len(class_names) != p.shape[1]:
        raise ValueError(
            f"{len(class_names)} class names but y_prob has {p.shape[1]} columns"
        )
    point = point_metrics(y, p)
    indices = bootstrap_indices(y, n_boot, seed, stratified)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for start in range(0, n_boot, _BLOCK):
        idx = indices[start:start + _BLOCK]
        values = _metrics_for_rows(y[idx], p[idx])
        for name in METRIC_NAMES:
            collected[name].append(values[name])
    result: dict[str, dict[str, float]] = {}
    for name in METRIC_NAMES:
        low, high = _percentile_interval(np.concatenate(collected[name]), alpha)
        result[name] = {"value": point[name], "ci_low": low, "ci_high": high}
    return result
