"""Operating points: the sensitivity reached at a required specificity (binary tasks)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

__all__ = ["sensitivity_at_specificity"]


def sensitivity_at_specificity(
    y_true: Any, y_score: Any, specificity: float = 0.90
) -> tuple[float, float]:
    """Highest sensitivity whose specificity is at least ``specificity`` (binary tasks).

    Parameters
    ----------
    y_true : array-like of {0, 1}, shape (N,)
        1 = positive (diseased).
    y_score : array-like, shape (N,) or (N, 2)
        Score of the positive class (for ``(N, 2)`` probabilities, column 1 is used).
    specificity : float
        Required specificity, e.g. 0.90 or 0.95.

    Returns
    -------
    tuple of float
        ``(sensitivity, threshold)``: call a case positive when ``score >= threshold``.
        The threshold is ``inf`` when only "all negative" reaches the specificity.

    """
    if not 0 < specificity <= 1:
        raise ValueError(f"specificity must be in (0, 1], got {specificity}")
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim == 2:
        if s.shape[1] != 2:
            raise ValueError(
                f"sensitivity_at_specificity is for binary tasks; y_score has {s.shape[1]} "
                "columns (pass one class's scores for a one-vs-rest operating point)"
            )
        s = s[:, 1]
    if set(np.unique(y)) - {0, 1}:
        raise ValueError("y_true must hold 0 (negative) and 1 (positive) labels")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    ok = fpr <= (1.0 - specificity) + 1e-12
    best = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return float(tpr[best]), float(thresholds[best])
