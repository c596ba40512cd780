"""Tests for consilia.common.evaluation.reliability (ECE, reliability diagrams)."""

from __future__ import annotations

import numpy as np
import pytest
from evaluation_testkit import binary_scores

from consilia.common.evaluation.reliability import (
    expected_calibration_error,
    plot_reliability,
    reliability_curve,
)


def test_ece_zero_when_perfectly_calibrated_and_positive_when_overconfident(rng):
    # Confidence 0.8 and exactly 80% correct: perfectly calibrated.
    y = np.r_[np.zeros(80, int), np.ones(20, int)]
    p = np.tile([0.8, 0.2], (100, 1))
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-6)
    # Confidence 0.99 but 60% correct: overconfident by 0.39.
    y2 = np.r_[np.zeros(60, int), np.ones(40, int)]
    p2 = np.tile([0.99, 0.01], (100, 1))
    assert expected_calibration_error(y2, p2) == pytest.approx(0.39, abs=1e-5)


def test_reliability_curve_and_plot(rng):
    y, p = binary_scores(rng, 200, 1.5)
    curve = reliability_curve(y, p, n_bins=10)
    assert curve.kind == "positive-class"
    assert len(curve.prob_pred) == len(curve.prob_true) == len(curve.counts)
    assert curve.counts.sum() == 400
    assert np.all((curve.prob_true >= 0) & (curve.prob_true <= 1))
    multi = reliability_curve(rng.integers(0, 3, 50), rng.dirichlet(np.ones(3), 50))
    assert multi.kind == "top-label"
    fig = plot_reliability(y, p, label="model")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("ECE" in t for t in labels)
