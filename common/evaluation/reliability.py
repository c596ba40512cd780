"""Reliability of predicted probabilities: expected calibration error and reliability diagrams.

Whether a model's probabilities can be read as frequencies: the top-label expected
calibration error (ECE, via ``torchmetrics``) and the points and figure of a reliability
diagram (``sklearn.calibration.calibration_curve``, uniform bins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from torchmetrics.functional.classification import multiclass_calibration_error

from consilia.common.evaluation.metrics import check_labels_probs

__all__ = ["ReliabilityCurve", "expected_calibration_error", "plot_reliability",
           "reliability_curve"]


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error (L1), via ``torchmetrics``.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        Class labels.
    y_prob : array-like, shape (N, C) or (N,)
        Class probabilities, or positive-class probabilities.
    n_bins : int
        Equal-width confidence bins.

    Returns
    -------
    float
        ``sum_b |acc_b - conf_b| * n_b / N``; 0 for a perfectly calibrated model.

    """
    y, p = check_labels_probs(y_true, y_prob)
    value = multiclass_calibration_error(
        torch.from_numpy(p), torch.from_numpy(y), num_classes=p.shape[1], n_bins=n_bins, norm="l1"
    )
    return float(value)


@dataclass
class ReliabilityCurve:
    """Points of a reliability diagram.

    Attributes
    ----------
    prob_pred : np.ndarray
        Mean predicted probability (confidence) in each non-empty bin.
    prob_true : np.ndarray
        Observed frequency (positive rate or accuracy) in each non-empty bin.
    counts : np.ndarray
        Cases per non-empty bin.
    kind : str
        ``"positive-class"`` (binary) or ``"top-label"`` (multi-class).

    """

    prob_pred: np.ndarray
    prob_true: np.ndarray
    counts: np.ndarray
    kind: str


def reliability_curve(
    y_true: Any, y_prob: Any, n_bins: int = 10, kind: str = "auto"
) -> ReliabilityCurve:
    """Reliability diagram points (``sklearn.calibration.calibration_curve``, uniform bins).

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        Class labels.
    y_prob : array-like, shape (N, C)
        Class probabilities.
    n_bins : int
        Equal-width bins on [0, 1].
    kind : {"auto", "positive-class", "top-label"}
        ``positive-class``: P(class 1) vs observed positive rate (binary only).
        ``top-label``: confidence (max probability) vs accuracy. ``auto`` picks the first for
        binary tasks and the second otherwise.

    """
    y, p = check_labels_probs(y_true, y_prob)
    if kind == "auto":
        kind = "positive-class" if p.shape[1] == 2 else "top-label"
    if kind == "positive-class":
        if p.shape[1] != 2:
            raise ValueError("kind='positive-class' needs a binary task (2 columns)")
        target, score = (y == 1).astype(int), p[:, 1]
    elif kind == "top-label":
        target, score = (p.argmax(axis=1) == y).astype(int), p.max(axis=1)
    else:
        raise ValueError(f"kind must be auto, positive-class or top-label, got {kind!r}")
    score = np.clip(score, 0.0, 1.0)
    prob_true, prob_pred = calibration_curve(target, score, n_bins=n_bins, strategy="uniform")
    counts, _ = np.histogram(score, bins=np.linspace(0.0, 1.0, n_bins + 1))
    return ReliabilityCurve(prob_pred, prob_true, counts[counts > 0], kind)


def plot_reliability(
    y_true: Any,
    y_prob: Any,
    n_bins: int = 10,
    label: str | None = None,
    ax: Any = None,
) -> Figure:
    """Reliability diagram with the ECE in the legend and a confidence histogram.

    Parameters
    ----------
    y_true, y_prob, n_bins
        As in :func:`reliability_curve`.
    label : str, optional
        Curve label (e.g. the model name).
    ax : matplotlib Axes, optional
        Draw into this axes (to overlay models); a new figure otherwise.

    Returns
    -------
    matplotlib.figure.Figure

    """
    curve = reliability_curve(y_true, y_prob, n_bins=n_bins)
    ece = expected_calibration_error(y_true, y_prob, n_bins=max(n_bins, 15))
    if ax is None:
        fig = Figure(figsize=(4.8, 4.2))
        ax = fig.subplots()
    else:
        fig = ax.figure
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    name = f"{label}: " if label else ""
    ax.plot(curve.prob_pred, curve.prob_true, "o-", label=f"{name}ECE = {ece:.3f}")
    weights = curve.counts / curve.counts.sum()
    ax.bar(curve.prob_pred, weights * 0.25, width=0.8 / n_bins, alpha=0.25, color="C0",
           label="share of cases (x0.25)")
    if curve.kind == "positive-class":
        ax.set_xlabel("predicted probability of the positive class")
        ax.set_ylabel("observed positive rate")
    else:
        ax.set_xlabel("confidence (max class probability)")
        ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
