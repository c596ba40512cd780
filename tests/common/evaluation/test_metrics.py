"""Tests for consilia.common.evaluation.metrics against hand-computed toy cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from consilia.common.evaluation.metrics import (
    METRIC_NAMES,
    ClassificationMetrics,
    compute_metrics,
    macro_auc,
    point_metrics,
    softmax_probs,
)


def _binary_case() -> tuple[np.ndarray, np.ndarray]:
    # y_true = [0, 0, 0, 1, 1]; p(class 1) = [0.1, 0.4, 0.6, 0.35, 0.8]
    # y_pred = [0, 0, 1, 0, 1]  -> confusion matrix [[2, 1], [1, 1]]
    y_true = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.6, 0.35, 0.8])
    return y_true, np.stack([1 - p1, p1], axis=1)


def test_binary_hand_computed() -> None:
    y_true, y_prob = _binary_case()
    m = compute_metrics(y_true, y_prob, ["normal", "disease"])
    assert m.confusion_matrix == [[2, 1], [1, 1]]
    # accuracy = (2 + 1) / 5
    assert m.accuracy == pytest.approx(0.6)
    # positive class 1: TP=1 FN=1 -> sensitivity 1/2; TN=2 FP=1 -> specificity 2/3
    assert m.sensitivity == pytest.approx(0.5)
    assert m.specificity == pytest.approx(2 / 3)
    # class 0: precision 2/3 (predicted 0 at idx 0,1,3; 2 right), recall 2/3, F1 2/3
    # class 1: precision 1/2, recall 1/2, F1 1/2  -> macro F1 = (2/3 + 1/2) / 2 = 7/12
    assert m.per_class[0].precision == pytest.approx(2 / 3)
    assert m.per_class[0].f1 == pytest.approx(2 / 3)
    assert m.per_class[1].f1 == pytest.approx(0.5)
    assert m.macro_f1 == pytest.approx(7 / 12)
    # balanced accuracy = macro recall = (2/3 + 1/2) / 2
    assert m.balanced_accuracy == pytest.approx(7 / 12)
    assert m.macro_recall == pytest.approx(7 / 12)
    # macro specificity = (spec0 = recall1 = 1/2, spec1 = 2/3) / 2 = 7/12
    assert m.macro_specificity == pytest.approx(7 / 12)
    # AUC: positives {0.35, 0.8} vs negatives {0.1, 0.4, 0.6}:
    # 0.35 beats 1 of 3, 0.8 beats 3 of 3 -> 4/6
    assert m.auc == pytest.approx(2 / 3)
    assert m.per_class[1].auc == pytest.approx(2 / 3)
    assert [c.support for c in m.per_class] == [3, 2]


def _three_class_case() -> tuple[np.ndarray, np.ndarray]:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_prob = np.array(
        [
            [0.7, 0.2, 0.1],  # pred 0 (right)
            [0.3, 0.4, 0.3],  # pred 1 (true 0)
            [0.2, 0.6, 0.2],  # pred 1 (right)
            [0.1, 0.3, 0.6],  # pred 2 (true 1)
            [0.1, 0.1, 0.8],  # pred 2 (right)
            [0.2, 0.2, 0.6],  # pred 2 (right)
        ]
    )
    return y_true, y_prob


def test_three_class_hand_computed() -> None:
    y_true, y_prob = _three_class_case()
    m = compute_metrics(y_true, y_prob, ["a", "b", "c"])
    assert m.confusion_matrix == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m.accuracy == pytest.approx(4 / 6)
    # class a: TP1 FP0 FN1 TN4 -> P 1, R 1/2, F1 2/3, spec 4/4
    # class b: TP1 FP1 FN1 TN3 -> P 1/2, R 1/2, F1 1/2, spec 3/4
    # class c: TP2 FP1 FN0 TN3 -> P 2/3, R 1, F1 4/5, spec 3/4
    a, b, c = m.per_class
    assert (a.precision, a.recall, a.f1, a.specificity) == pytest.approx((1, 0.5, 2 / 3, 1))
    assert (b.precision, b.recall, b.f1, b.specificity) == pytest.approx((0.5, 0.5, 0.5, 0.75))
    assert (c.precision, c.recall, c.f1, c.specificity) == pytest.approx((2 / 3, 1, 0.8, 0.75))
    assert m.macro_precision == pytest.approx(13 / 18)
    assert m.macro_recall == pytest.approx(2 / 3)
    assert m.balanced_accuracy == pytest.approx(2 / 3)
    assert m.macro_f1 == pytest.approx(59 / 90)
    assert m.macro_specificity == pytest.approx(5 / 6)
    # multi-class: sensitivity/specificity are the macro values
    assert m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(5 / 6)
    # one-vs-rest AUC: a: both positives (0.7, 0.3) beat all 4 negatives -> 1
    # b: 0.6 beats 4, 0.3 beats 3 of {0.2, 0.4, 0.1, 0.2} -> 7/8
    # c: 0.8 beats 4, 0.6 beats 3 and ties 0.6 (counts 1/2) -> 7.5/8
    assert [a.auc, b.auc, c.auc] == pytest.approx([1.0, 7 / 8, 15 / 16])
    assert m.auc == pytest.approx((1 + 7 / 8 + 15 / 16) / 3)
    # agrees with scikit-learn's own macro averages when every class is present
    assert m.auc == pytest.approx(roc_auc_score(y_true, y_prob, multi_class="ovr"))
    assert m.macro_f1 == pytest.approx(f1_score(y_true, y_prob.argmax(1), average="macro"))


def test_missing_class_does_not_crash_and_is_skipped_in_macro() -> None:
    # class 2 never occurs in y_true but is predicted once (idx 3)
    y_true = np.array([0, 0, 1, 1])
    y_prob = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    m = compute_metrics(y_true, y_prob, ["a", "b", "c"])
    c = m.per_class[2]
    assert c.support == 0
    assert math.isnan(c.recall) and math.isnan(c.auc)
    assert c.precision == 0.0  # predicted once, wrongly
    assert c.specificity == pytest.approx(3 / 4)
    # macro recall over present classes a (1) and b (1/2) = 3/4 = balanced accuracy
    assert m.macro_recall == pytest.approx(0.75)
    assert m.balanced_accuracy == pytest.approx(0.75)
    # macro AUC over the defined classes only: a: 1.0, b: positives (0.7, 0.2) vs (0.1, 0.3)
    # -> 0.7 beats 2, 0.2 beats 1 -> 3/4
    assert m.auc == pytest.approx((1.0 + 0.75) / 2)
    d = m.to_dict()
    assert d["per_class"][2]["recall"] is None
    json.dumps(d, allow_nan=False)  # JSON-safe


def test_present_but_never_predicted_class_has_zero_precision() -> None:
    y_true = np.array([0, 1, 1])
    y_prob = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])  # always predicts 0
    m = compute_metrics(y_true, y_prob, ["a", "b"])
    assert m.per_class[1].precision == 0.0
    assert m.per_class[1].recall == 0.0
    assert m.macro_precision == pytest.approx((1 / 3 + 0) / 2)
    assert m.sensitivity == 0.0 and m.specificity == 1.0


def test_single_class_y_true_gives_nan_auc() -> None:
    y_true = np.array([1, 1, 1])
    y_prob = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    m = compute_metrics(y_true, y_prob, ["a", "b"])
    assert m.accuracy == pytest.approx(2 / 3)
    assert math.isnan(m.auc)
    assert math.isnan(m.specificity)  # no negatives
    assert m.sensitivity == pytest.approx(2 / 3)
    headline = m.headline()
    assert set(headline) == {
        "accuracy",
        "balanced_accuracy",
        "auc",
        "f1",
        "sensitivity",
        "specificity",
    }
    assert all(isinstance(v, float) for v in headline.values())
    assert m.to_dict()["auc"] is None


def test_single_class_multiclass() -> None:
    y_true = np.array([2, 2])
    y_prob = np.array([[0.1, 0.1, 0.8], [0.5, 0.2, 0.3]])
    m = compute_metrics(y_true, y_prob, ["a", "b", "c"])
    assert m.accuracy == pytest.approx(0.5)
    assert math.isnan(m.auc)
    assert m.macro_recall == pytest.approx(0.5)


def test_empty_input_raises_clear_error() -> None:
    with pytest.raises(ValueError, match="empty input"):
        compute_metrics(np.array([], dtype=np.int64), np.zeros((0, 2)), ["a", "b"])


@pytest.mark.parametrize(
    ("y_true", "y_prob", "names", "match"),
    [
        (np.array([0, 1]), np.zeros((2, 3)), ["a", "b"], "y_prob must be"),
        (np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"], "labels must be in"),
        (np.array([0.5, 1.0]), np.full((2, 2), 0.5), ["a", "b"], "integer class"),
        (np.array([0, 1]), np.array([[np.nan, 1], [0, 1]]), ["a", "b"], "NaN"),
        (np.array([0, 1]), np.full((2, 1), 1.0), ["a"], "at least 2"),
    ],
)
def test_bad_input_raises(y_true, y_prob, names, match) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(y_true, y_prob, names)


def test_integral_float_labels_are_accepted() -> None:
    y_true, y_prob = _binary_case()
    m = compute_metrics(y_true.astype(np.float32), y_prob, ["a", "b"])
    assert m.accuracy == pytest.approx(0.6)


def test_to_dict_round_trips_and_headline_values() -> None:
    y_true, y_prob = _three_class_case()
    m = compute_metrics(y_true, y_prob, ["a", "b", "c"])
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["confusion_matrix"] == m.confusion_matrix
    assert d["per_class"][2]["name"] == "c"
    rebuilt = ClassificationMetrics(**{**d, "per_class": m.per_class})
    assert rebuilt.accuracy == m.accuracy
    h = m.headline()
    assert h["f1"] == pytest.approx(59 / 90)
    assert h["auc"] == pytest.approx(15 / 16)


def test_softmax_probs() -> None:
    logits = torch.tensor([[0.0, 0.0], [1000.0, 0.0]], requires_grad=True)
    probs = softmax_probs(logits)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, [[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        softmax_probs(torch.zeros(3))


# -- point metrics on plain arrays equal compute_metrics (the run's final_metrics.json) --------


@pytest.mark.parametrize("num_classes", [2, 4])
def test_point_metrics_equal_compute_metrics_headline(rng, num_classes):
    y = rng.integers(0, num_classes, 300)
    p = rng.dirichlet(np.ones(num_classes), 300)
    p[np.arange(300), y] += 0.3 * rng.random(300)  # some signal
    p /= p.sum(axis=1, keepdims=True)
    p[:20] = np.round(p[:20], 1)  # ties
    p /= p.sum(axis=1, keepdims=True)
    ours = point_metrics(y, p)
    reference = compute_metrics(y, p, [f"c{k}" for k in range(num_classes)]).headline()
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(reference[name], abs=1e-12), name


def test_macro_auc_handles_missing_class_and_binary_scores():
    y = np.array([0, 0, 1, 1])
    assert macro_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    y3 = np.array([0, 0, 1, 1])  # class 2 absent: macro over the classes present
    p3 = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    assert macro_auc(y3, p3) == pytest.approx(1.0)
    assert math.isnan(macro_auc(np.zeros(3, int), np.full((3, 2), 0.5)))


def test_bad_input_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="3 labels but y_prob has 2 rows"):
        point_metrics([0, 1, 1], np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="class index 5"):
        point_metrics([0, 5], np.full((2, 2), 0.5))
