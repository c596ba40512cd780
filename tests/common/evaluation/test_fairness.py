"""Tests for consilia.common.evaluation.fairness (site spread, subgroups)."""

from __future__ import annotations

import numpy as np
import pytest

from consilia.common.evaluation.fairness import site_spread, subgroup_metrics


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
