"""Classification metrics (scikit-learn) that never crash on missing classes.

Conventions
-----------
* Predictions are ``argmax`` of the probabilities.
* Per-class values that are undefined are NaN: recall and AUC of a class absent from
  ``y_true``; specificity and AUC of a class when every sample belongs to it; precision
  and F1 of a class that is neither present nor predicted. A class that is present but
  never predicted has precision 0 (the model missed it), as in scikit-learn.
* Macro averages run over the classes present in ``y_true`` (skipping NaN), so a site
  whose validation split lacks a class is not penalised for it; macro recall then equals
  the balanced accuracy. Multi-class AUC is the macro one-vs-rest AUC over the classes
  where it is defined (equal to ``roc_auc_score(multi_class="ovr")`` when all are
  present); binary AUC uses the class-1 probability.
* ``sensitivity`` / ``specificity``: binary tasks use the clinical convention with
  class 1 (``class_names[1]``) as the positive class; multi-class tasks use the macro
  recall and macro specificity.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = [
    "METRIC_NAMES",
    "ClassMetrics",
    "ClassificationMetrics",
    "check_labels_probs",
    "compute_metrics",
    "macro_auc",
    "point_metrics",
    "softmax_probs",
]

HEADLINE_KEYS = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity")


@dataclass(frozen=True)
class ClassMetrics:
    """One class, one-vs-rest (NaN where undefined).

    Attributes
    ----------
    name : str
        Class name.
    precision, recall, specificity, f1, auc : float
        One-vs-rest scores; recall is the sensitivity.
    support : int
        Number of samples of this class in ``y_true``.

    """

    name: str
    precision: float
    recall: float
    specificity: float
    f1: float
    auc: float
    support: int


@dataclass(frozen=True)
class ClassificationMetrics:
    """Overall and per-class scores of one evaluation (see the module docstring).

    Attributes
    ----------
    class_names : list of str
        Class order of the confusion matrix and ``per_class``.
    num_samples : int
        Number of evaluated samples.
    accuracy, balanced_accuracy : float
        Overall accuracy and mean recall over the classes present.
    macro_precision, macro_recall, macro_specificity, macro_f1 : float
        Means over the classes present in ``y_true``.
    auc : float
        Binary: class-1 ROC AUC; multi-class: macro one-vs-rest AUC (NaN if undefined).
    sensitivity, specificity : float
        Binary: of the positive class (index 1); multi-class: macro recall / specificity.
    confusion_matrix : list of list of int
        Rows = true class, columns = predicted class.
    per_class : list of ClassMetrics
        One entry per class, in ``class_names`` order.

    """

    class_names: list[str]
    num_samples: int
    accuracy: float
    balanced_accuracy: float
    macro_precision: float
    macro_recall: float
    macro_specificity: float
    macro_f1: float
    auc: float
    sensitivity: float
    specificity: float
    confusion_matrix: list[list[int]]
    per_class: list[ClassMetrics]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (NaN becomes ``None``)."""
        return _json_safe(asdict(self))

    def headline(self) -> dict[str, float]:
        """Return the summary scores (floats, NaN where undefined).

        Keys: ``accuracy``, ``balanced_accuracy``, ``auc``, ``f1`` (macro), ``sensitivity``,
        ``specificity``.
        """
        return {
            "accuracy": float(self.accuracy),
            "balanced_accuracy": float(self.balanced_accuracy),
            "auc": float(self.auc),
            "f1": float(self.macro_f1),
            "sensitivity": float(self.sensitivity),
            "specificity": float(self.specificity),
        }


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _validate(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(f"compute_metrics: need at least 2 class names, got {class_names!r}")
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim != 1:
        raise ValueError(f"compute_metrics: y_true must be 1-D (N,), got shape {y_true.shape}")
    if y_true.size == 0:
        raise ValueError(
            "compute_metrics: empty input (0 samples); evaluate on a non-empty split "
            "or skip the metrics for it"
        )
    if y_prob.shape != (y_true.size, num_classes):
        raise ValueError(
            f"compute_metrics: y_prob must be (N, C) = ({y_true.size}, {num_classes}) "
            f"probabilities, got shape {y_prob.shape}"
        )
    if not np.issubdtype(y_true.dtype, np.integer):
        as_int = y_true.astype(np.int64) if np.issubdtype(y_true.dtype, np.number) else None
        if as_int is None or not np.array_equal(as_int, y_true):
            raise ValueError(
                f"compute_metrics: y_true must hold integer class indices, got {y_true.dtype}"
            )
        y_true = as_int
    y_true = y_true.astype(np.int64, copy=False)
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise ValueError(
            f"compute_metrics: labels must be in [0, {num_classes - 1}] "
            f"(classes {class_names}), got range [{y_true.min()}, {y_true.max()}]"
        )
    if not np.all(np.isfinite(y_prob)):
        raise ValueError("compute_metrics: y_prob contains NaN or infinite values")
    return y_true, y_prob


def _one_vs_rest_auc(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    aucs = np.full(y_prob.shape[1], np.nan)
    for k in range(y_prob.shape[1]):
        positives = y_true == k
        if 0 < positives.sum() < positives.size:
            aucs[k] = roc_auc_score(positives, y_prob[:, k])
    return aucs


def compute_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: list[str]
) -> ClassificationMetrics:
    """Compute overall and per-class classification metrics.

    Parameters
    ----------
    y_true : np.ndarray
        True class indices ``(N,)``.
    y_prob : np.ndarray
        Predicted class probabilities ``(N, C)`` (e.g. :func:`softmax_probs`).
    class_names : list of str
        The ``C`` class names, in index order.

    Returns
    -------
    ClassificationMetrics

    Raises
    ------
    ValueError
        On empty input, mismatched shapes, labels outside ``[0, C)`` or non-finite
        probabilities.

    """
    y_true, y_prob = _validate(y_true, y_prob, class_names)
    num_classes = len(class_names)
    labels = list(range(num_classes))
    y_pred = y_prob.argmax(axis=1)

    cm = confusion_matrix(y_true, y_pred, labels=labels)
    support = cm.sum(axis=1)
    present = support > 0
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=np.nan
    )
    # Present but never predicted: the model missed the class -> precision 0, not undefined.
    precision = np.where(np.isnan(precision) & present, 0.0, precision)
    true_pos = np.diag(cm)
    false_pos = cm.sum(axis=0) - true_pos
    negatives = y_true.size - support
    true_neg = negatives - false_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        specificity = np.where(negatives > 0, true_neg / np.maximum(negatives, 1), np.nan)
    aucs = _one_vs_rest_auc(y_true, y_prob)

    if num_classes == 2:
        auc = float(roc_auc_score(y_true, y_prob[:, 1])) if present.all() else math.nan
    else:
        auc = _nanmean(aucs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        balanced = float(balanced_accuracy_score(y_true, y_pred))

    macro_recall = _nanmean(recall[present])
    macro_specificity = _nanmean(specificity[present])
    if num_classes == 2:
        sensitivity, spec = float(recall[1]), float(specificity[1])
    else:
        sensitivity, spec = macro_recall, macro_specificity
    per_class = [
        ClassMetrics(
            name=name,
            precision=float(precision[k]),
            recall=float(recall[k]),
            specificity=float(specificity[k]),
            f1=float(f1[k]),
            auc=float(aucs[k]),
            support=int(support[k]),
        )
        for k, name in enumerate(class_names)
    ]
    return ClassificationMetrics(
        class_names=list(class_names),
        num_samples=int(y_true.size),
        accuracy=float(accuracy_score(y_true, y_pred)),
        balanced_accuracy=balanced,
        macro_precision=_nanmean(precision[present]),
        macro_recall=macro_recall,
        macro_specificity=macro_specificity,
        macro_f1=_nanmean(f1[present]),
        auc=auc,
        sensitivity=sensitivity,
        specificity=spec,
        confusion_matrix=cm.astype(int).tolist(),
        per_class=per_class,
    )


def softmax_probs(logits: torch.Tensor) -> np.ndarray:
    """Convert logits ``(N, C)`` to float64 class probabilities (rows sum to 1).

    Raises
    ------
    ValueError
        If ``logits`` is not 2-D.

    """
    if logits.ndim != 2:
        raise ValueError(f"softmax_probs: logits must be (N, C), got {tuple(logits.shape)}")
    return torch.softmax(logits.detach().to("cpu", torch.float64), dim=1).numpy()


# ---------------------------------------------------------------------------------------
# Point metrics on plain arrays (the clinical evaluation's entry points)
# ---------------------------------------------------------------------------------------

#: Metrics reported by the clinical evaluation (same names as ``ClassificationMetrics.headline``).
METRIC_NAMES = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")


def check_labels_probs(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(y_true int64 (N,), y_prob float64 (N, C))``.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        Class indices (integral floats and booleans are accepted).
    y_prob : array-like, shape (N, C) or (N,)
        Class probabilities, or scores of the positive class (then ``C = 2``).

    Raises
    ------
    ValueError
        On an empty set, mismatched lengths, fewer than two columns or labels outside
        ``0..C-1``.

    """
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim == 1:  # binary scores for the positive class
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"y_prob must be (N, C) class probabilities with C >= 2, got {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} labels but y_prob has {len(p)} rows")
    if len(y) == 0:
        raise ValueError("cannot evaluate an empty set (no labels)")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise ValueError(
            f"y_true holds class index {bad} outside 0..{p.shape[1] - 1} "
            f"(y_prob has {p.shape[1]} columns)"
        )
    return y.astype(np.int64), p


def macro_auc(y_true: Any, y_prob: Any) -> float:
    """AUC of class 1 (binary) or macro one-vs-rest AUC over classes present in ``y_true``.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        Class labels.
    y_prob : array-like, shape (N, C) or (N,)
        Class probabilities, or scores of the positive class.

    Returns
    -------
    float
        NaN when fewer than two classes are present.

    """
    y, p = check_labels_probs(y_true, y_prob)
    return point_metrics(y, p)["auc"]


def point_metrics(y_true: Any, y_prob: Any) -> dict[str, float]:
    """Return every metric of :data:`METRIC_NAMES` on the full set (no resampling).

    The values are :meth:`ClassificationMetrics.headline` of :func:`compute_metrics`, so they
    equal the run's ``final_metrics.json``; ``y_prob`` may also be positive-class scores.
    """
    y, p = check_labels_probs(y_true, y_prob)
    headline = compute_metrics(y, p, [str(k) for k in range(p.shape[1])]).headline()
    return {name: headline[name] for name in METRIC_NAMES}
