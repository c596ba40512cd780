"""Tests for consilia.common.evaluation.clinical (bootstrap CIs, operating points, calibration, ...)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from consilia.common.evaluation.clinical import (
    METRIC_NAMES,
    bootstrap_ci,
    bootstrap_indices,
    cross_site_matrix,
    expected_calibration_error,
    generalisation_gap,
    macro_auc,
    metrics_with_ci,
    plot_heatmap,
    plot_reliability,
    point_metrics,
    predict_proba,
    reliability_curve,
    sensitivity_at_specificity,
    site_spread,
    subgroup_metrics,
    to_matrix,
)
from consilia.common.evaluation.metrics import compute_metrics


def _binary_scores(rng: np.random.Generator, n_per_class: int, d: float):
    """Negatives ~ N(0, 1), positives ~ N(d, 1): the true AUC is Phi(d / sqrt(2))."""
    neg = rng.normal(0.0, 1.0, n_per_class)
    pos = rng.normal(d, 1.0, n_per_class)
    y = np.r_[np.zeros(n_per_class, int), np.ones(n_per_class, int)]
    score = 1.0 / (1.0 + np.exp(-np.r_[neg, pos]))  # monotone: same AUC as the raw scores
    return y, np.stack([1 - score, score], axis=1)


# -- point metrics agree with consilia.common.evaluation.metrics (the run's final_metrics.json) ---------


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


# -- bootstrap --------------------------------------------------------------------------------


def test_stratified_indices_keep_class_counts(rng):
    y = np.r_[np.zeros(7, int), np.ones(3, int)]
    idx = bootstrap_indices(y, n_boot=50, seed=1, stratified=True)
    assert idx.shape == (50, 10)
    assert np.all((y[idx] == 1).sum(axis=1) == 3)
    plain = bootstrap_indices(y, n_boot=50, seed=1, stratified=False)
    assert len(set((y[plain] == 1).sum(axis=1))) > 1


def test_bootstrap_ci_matches_vectorised_metrics_with_ci(rng):
    """The generic path (sklearn per resample) and the fast path give the same interval."""
    y, p = _binary_scores(rng, 80, 1.0)
    generic = bootstrap_ci(y, p, lambda a, b: roc_auc_score(a, b[:, 1]), n_boot=150, seed=3)
    fast = metrics_with_ci(y, p, ["neg", "pos"], n_boot=150, seed=3)["auc"]
    assert generic.value == pytest.approx(fast["value"])
    assert generic.low == pytest.approx(fast["ci_low"])
    assert generic.high == pytest.approx(fast["ci_high"])
    assert generic.low < generic.value < generic.high


def test_bootstrap_ci_skips_undefined_resamples():
    y = np.r_[np.zeros(18, int), np.ones(2, int)]
    s = np.linspace(0, 1, 20)
    value, low, high = bootstrap_ci(y, s, roc_auc_score, n_boot=200, seed=0, stratified=False)
    assert value == pytest.approx(1.0)
    assert 0.0 <= low <= high <= 1.0


def test_bootstrap_ci_covers_true_auc():
    """95% percentile intervals cover the true AUC Phi(d/sqrt 2) in >= 85% of repetitions."""
    d = 1.0
    true_auc = norm.cdf(d / math.sqrt(2))  # 0.760
    rng = np.random.default_rng(0)
    reps, covered, widths = 100, 0, []  # expected coverage ~0.93 (sd 0.026 over 100 reps)
    for rep in range(reps):
        y, p = _binary_scores(rng, 60, d)
        ci = metrics_with_ci(y, p, n_boot=300, seed=rep)["auc"]
        covered += ci["ci_low"] <= true_auc <= ci["ci_high"]
        widths.append(ci["ci_high"] - ci["ci_low"])
    assert covered / reps >= 0.85
    assert 0.05 < np.mean(widths) < 0.35  # a real interval, neither degenerate nor vacuous


def test_metrics_with_ci_multiclass_shape_and_order(rng):
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet(np.ones(3), 200)
    p[np.arange(200), y] += 1.0
    p /= p.sum(axis=1, keepdims=True)
    result = metrics_with_ci(y, p, ["a", "b", "c"], n_boot=100, seed=0)
    assert set(result) == set(METRIC_NAMES)
    for name, r in result.items():
        assert r["ci_low"] <= r["value"] <= r["ci_high"], name
        assert 0.0 <= r["ci_low"] and r["ci_high"] <= 1.0
    with pytest.raises(ValueError, match="2 class names but y_prob has 3 columns"):
        metrics_with_ci(y, p, ["a", "b"], n_boot=10)


# -- operating points -------------------------------------------------------------------------


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


# -- calibration ------------------------------------------------------------------------------


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
    y, p = _binary_scores(rng, 200, 1.5)
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


# -- inference and cross-site -----------------------------------------------------------------


class _Fixed(torch.nn.Module):
    """Predicts class 1 iff the mean intensity is above a threshold."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([self.threshold - m, m - self.threshold], dim=1) * 50 + self.dummy


def _site(rng, n, low, high):
    labels = rng.integers(0, 2, n)
    level = np.where(labels == 1, high, low)
    images = np.broadcast_to(level[:, None, None, None], (n, 1, 4, 4)).astype(np.uint8)
    return images.copy(), labels


def test_predict_proba_uint8_and_restores_mode(rng):
    model = _Fixed(0.5).train()
    images = np.array([np.full((1, 4, 4), 10), np.full((1, 4, 4), 250)], np.uint8)
    prob = predict_proba(model, images, batch_size=1)
    assert prob.shape == (2, 2) and np.allclose(prob.sum(axis=1), 1)
    assert prob[0, 0] > 0.99 and prob[1, 1] > 0.99
    assert model.training  # restored
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        predict_proba(model, np.zeros((4, 4), np.uint8))


def test_cross_site_matrix_on_tiny_federation(rng):
    # Site A: classes separated at intensity 0.3 (~77/255), site B at 0.7 (~179/255).
    site_data = {"site-00": _site(rng, 40, 20, 120), "site-01": _site(rng, 40, 140, 240)}
    models = {
        "global": _Fixed(0.5),  # threshold 127: right on A? no, 120 < 127 -> wrong on A's 1s
        "local-site-00": _Fixed(0.3),  # perfect on A, calls everything on B positive
        "local-site-01": _Fixed(0.7),  # perfect on B, calls everything on A negative
    }
    frame = cross_site_matrix(models, site_data, batch_size=16)
    assert list(frame.columns) == ["model", "site", "n", "auc", "accuracy"]
    assert len(frame) == 6 and set(frame["n"]) == {40}
    acc = to_matrix(frame, "accuracy")
    assert list(acc.index) == list(models) and list(acc.columns) == list(site_data)
    frac_a = (site_data["site-00"][1] == 0).mean()
    frac_b = (site_data["site-01"][1] == 1).mean()
    assert acc.at["local-site-00", "site-00"] == pytest.approx(1.0)
    assert acc.at["local-site-00", "site-01"] == pytest.approx(frac_b)
    assert acc.at["local-site-01", "site-01"] == pytest.approx(1.0)
    assert acc.at["local-site-01", "site-00"] == pytest.approx(frac_a)
    assert acc.at["global", "site-00"] == pytest.approx(frac_a)
    gap = generalisation_gap(acc)
    assert gap.at["site-00", "local_own"] == pytest.approx(1.0)
    assert gap.at["site-00", "local_gap"] == pytest.approx(1.0 - frac_b)
    assert gap.at["site-00", "others_on_site"] == pytest.approx(frac_a)
    assert gap.at["site-00", "global_minus_local"] == pytest.approx(frac_a - 1.0)
    tidy_gap = generalisation_gap(frame, metric="accuracy")
    pd.testing.assert_frame_equal(gap, tidy_gap)
    fig = plot_heatmap(acc, title="accuracy")
    assert fig.axes[0].get_title() == "accuracy"
    assert len(fig.axes[0].texts) == 6


# -- fairness ---------------------------------------------------------------------------------


def test_site_spread_worst_best_gap_std():
    spread = site_spread({
        "a": {"auc": 0.9, "eval-loss": 0.3, "epsilon": None},
        "b": {"auc": 0.7, "eval-loss": 0.6},
        "c": {"auc": 0.8, "eval-loss": float("nan")},
    })
    assert spread["auc"]["worst_site"] == "b" and spread["auc"]["best_site"] == "a"
    assert spread["auc"]["gap"] == pytest.approx(0.2)
    assert spread["auc"]["std"] == pytest.approx(np.std([0.9, 0.7, 0.8]))
    assert spread["eval-loss"]["worst_site"] == "b"  # lower loss is better
    assert spread["eval-loss"]["n_sites"] == 2
    assert "epsilon" not in spread


def test_subgroup_metrics_bins_ages_and_notes_missing_tags(rng):
    y = np.array([0, 1, 0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6], [0.1, 0.9]])
    meta = [
        {"PatientSex": "F", "PatientAge": "045Y"},
        {"PatientSex": "M", "PatientAge": "049Y"},
        {"PatientSex": "f", "PatientAge": "006M"},
        {"PatientSex": "M", "PatientAge": 71},
        {"PatientSex": "", "PatientAge": None},
        {"PatientSex": "F", "PatientAge": "072Y"},
    ]
    report = subgroup_metrics(y, p, meta)
    table = report.table.set_index(["key", "group"])
    assert table.loc[("PatientSex", "F"), "n"] == 3
    assert table.loc[("PatientSex", "unknown"), "n"] == 1
    assert table.loc[("PatientAge", "40-49"), "n"] == 2
    assert table.loc[("PatientAge", "0-9"), "n"] == 1
    assert table.loc[("PatientAge", "70-79"), "n"] == 2
    assert table.loc[("PatientAge", "40-49"), "accuracy"] == pytest.approx(1.0)
    assert report.notes == []
    missing = subgroup_metrics(y, p, [{} for _ in y])
    assert missing.table.empty
    assert len(missing.notes) == 2 and "PatientAge" in missing.notes[1]
    with pytest.raises(ValueError, match="meta has 2 records"):
        subgroup_metrics(y, p, meta[:2])
