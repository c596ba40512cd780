"""Tests for consilia.common.evaluation.operating_points."""

from __future__ import annotations

import numpy as np
import pytest

from consilia.common.evaluation.operating_points import sensitivity_at_specificity


def test_sensitivity_at_specificity_hand_case():
    # 10 negatives, 5 positives. At spec >= 0.9 at most 1 false positive is allowed.
    neg = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.6, 0.9]
    pos = [0.5, 0.7, 0.8, 0.95, 0.99]
    y = np.r_[np.zeros(10, int), np.ones(5, int)]
    s = np.r_[neg, pos]
    sens, thr = sensitivity_at_specificity(y, s, 0.90)
    assert sens == pytest.approx(0.8) and thr == pytest.approx(0.7)  # 0.7, 0.8, 0.95, 0.99
    sens95, thr95 = sensitivity_at_specificity(y, s, 0.95)  # no false positive allowed
    assert sens95 == pytest.approx(0.4) and thr95 == pytest.approx(0.95)
    pred = s >= thr
    assert ((pred == 0) & (y == 0)).sum() / 10 >= 0.9
    # (N, 2) probabilities use column 1
    sens2, _ = sensitivity_at_specificity(y, np.stack([1 - s, s], axis=1), 0.90)
    assert sens2 == sens
    with pytest.raises(ValueError, match="binary"):
        sensitivity_at_specificity(y, np.full((15, 3), 1 / 3), 0.9)
