"""Tests for ``fl-sim cv`` (consilia.simulations.crossval)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from consilia.common.config import ConfigError, DataConfig, load_experiment_config
from consilia.common.data.datasets import load_dataset
from consilia.simulations import run as run_module
from consilia.simulations.cli import main as fl_sim
from consilia.simulations.crossval import (
    format_summary,
    kfold_bundles,
    pool_splits,
    run_cross_validation,
)
from consilia.simulations.run import ExperimentResult


@pytest.fixture(scope="module")
def bundle():
    return load_dataset(DataConfig(dataset="synthetic", max_samples=90, image_size=8), seed=0)


def test_pool_keeps_every_split_and_caps_stratified(bundle):
    pool = pool_splits(bundle, None, 0)
    assert len(pool) == 90
    assert np.bincount(pool.labels).tolist() == [30, 30, 30]
    capped = pool_splits(bundle, 45, 0)
    assert len(capped) == 45 and np.bincount(capped.labels).tolist() == [15, 15, 15]


def test_folds_are_disjoint_cover_the_pool_and_are_stratified(bundle):
    pool = pool_splits(bundle, None, 0)
    folds = kfold_bundles(bundle, pool, 3, seed=0)
    assert len(folds) == 3
    tests = [f.test.images.reshape(len(f.test), -1) for f in folds]
    assert sum(len(t) for t in tests) == 90
    all_test = np.concatenate(tests)
    assert len(np.unique(all_test, axis=0)) == len(np.unique(pool.images.reshape(90, -1), axis=0))
    for fold in folds:
        assert len(fold.train) + len(fold.test) == 90 and fold.val is None
        assert np.bincount(fold.test.labels).tolist() == [10, 10, 10]
        train_rows = {r.tobytes() for r in fold.train.images.reshape(len(fold.train), -1)}
        assert not train_rows & {r.tobytes() for r in fold.test.images.reshape(30, -1)}
    again = kfold_bundles(bundle, pool, 3, seed=0)
    np.testing.assert_array_equal(again[1].test.labels, folds[1].test.labels)
    np.testing.assert_array_equal(again[1].test.images, folds[1].test.images)


def test_too_many_folds_or_too_few_are_clear_errors(bundle):
    pool = pool_splits(bundle, 6, 0)  # 2 images per class
    with pytest.raises(ConfigError, match="fewer than 3 images"):
        kfold_bundles(bundle, pool, 3, seed=0)
    with pytest.raises(ConfigError, match=">= 2"):
        kfold_bundles(bundle, pool, 1, seed=0)


def test_each_fold_is_one_run_on_its_own_bundle_and_the_summary_is_mean_std(tmp_path,
                                                                              monkeypatch):
    seen = []

    def fake(cfg, out_dir, verbose=False, argv=None, bundle=None):
        seen.append((Path(out_dir).name, bundle))
        fold = len(seen) - 1
        final = {"federated": {"auc": 0.8 + 0.1 * fold, "accuracy": 0.5, "balanced_accuracy": 0.5},
                 "local_only": {"mean": {"auc": 0.6, "accuracy": 0.4}}}
        return ExperimentResult(Path(out_dir), final, {})

    monkeypatch.setattr(run_module, "run_experiment", fake)
    cfg = load_experiment_config(None, ["data.dataset=synthetic", "data.max_samples=60",
                                        "data.image_size=8"])
    result = run_cross_validation(cfg, 2, tmp_path)
    assert [name for name, _ in seen] == ["fold-00", "fold-01"]
    assert all(len(b.test) == 30 and len(b.train) == 30 for _, b in seen)
    fed = result.summary.set_index("model").loc["federated"]
    assert fed["auc_mean"] == pytest.approx(0.85)
    assert fed["auc_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert fed["folds"] == 2
    assert set(result.summary["model"]) == {"federated", "local-only (mean)"}
    assert len(pd.read_csv(tmp_path / "cv_folds.csv")) == 4
    saved = json.loads((tmp_path / "cv_summary.json").read_text())
    assert saved["models"]["federated"]["auc_mean"] == pytest.approx(0.85)
    assert saved["models"]["local-only (mean)"]["balanced_accuracy_mean"] is None
    assert "0.8500 ± 0.0707" in format_summary(result.summary)


@pytest.mark.slow
def test_cv_end_to_end_with_real_federated_runs(tmp_path):
    out = tmp_path / "cv"
    code = fl_sim(["cv", "--folds", "2", "--dataset", "synthetic", "--sites", "2",
                   "--rounds", "1", "--no-baselines", "--set", "model.kwargs.width=4",
                   "--set", "data.max_samples=120", "--set", "data.image_size=16",
                   "--set", "partition.scheme=iid", "--out", str(out)])
    assert code == 0
    folds = pd.read_csv(out / "cv_folds.csv")
    assert folds["fold"].tolist() == [0, 1] and (folds["n_test"] == 60).all()
    tests = []
    for fold in (0, 1):
        final = json.loads((out / f"fold-{fold:02d}" / "final_metrics.json").read_text())
        assert folds.loc[fold, "auc"] == pytest.approx(final["federated"]["auc"])
        with np.load(out / f"fold-{fold:02d}" / "test_set.npz") as z:
            tests.append(z["images"].reshape(60, -1))
    assert not {r.tobytes() for r in tests[0]} & {r.tobytes() for r in tests[1]}
    summary = pd.read_csv(out / "cv_summary.csv").set_index("model")
    assert summary.at["federated", "auc_mean"] == pytest.approx(folds["auc"].mean())
