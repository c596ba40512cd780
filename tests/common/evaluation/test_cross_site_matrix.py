"""Tests for consilia.common.evaluation.cross_site (matrix, gaps, heatmap)."""

from __future__ import annotations

import pandas as pd
import pytest
from evaluation_testkit import FixedThresholdModel, intensity_site

from consilia.common.evaluation.cross_site import (
    cross_site_matrix,
    generalisation_gap,
    plot_heatmap,
    to_matrix,
)


def test_cross_site_matrix_on_tiny_federation(rng):
    # Site A: classes separated at intensity 0.3 (~77/255), site B at 0.7 (~179/255).
    site_data = {
        "site-00": intensity_site(rng, 40, 20, 120),
        "site-01": intensity_site(rng, 40, 140, 240),
    }
    models = {
        # threshold 127: right on A? no, 120 < 127 -> wrong on A's 1s
        "global": FixedThresholdModel(0.5),
        "local-site-00": FixedThresholdModel(0.3),  # perfect on A, calls everything on B positive
        "local-site-01": FixedThresholdModel(0.7),  # perfect on B, calls everything on A negative
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
