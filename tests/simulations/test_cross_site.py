"""Tests for consilia.simulations.cross_site on a tiny fake run directory (no Flower)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_run import make_run_dir

from consilia.common.evaluation.metrics import point_metrics
from consilia.common.model_files import load_model_file
from consilia.common.rundir.layout import RunDir
from consilia.common.training.inference import predict_proba
from consilia.simulations.cross_site import cross_site_validation


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("xsite") / "run", num_sites=3, dp=False)


@pytest.fixture(scope="module")
def result(run_dir) -> dict:
    return cross_site_validation(run_dir)


def test_table_has_every_model_on_every_site(run_dir, result):
    frame = pd.read_csv(run_dir / "cross_site.csv")
    models = ["global", "centralized", "local-site-00", "local-site-01", "local-site-02"]
    assert list(frame.columns) == ["model", "site", "n", "auc", "accuracy"]
    assert len(frame) == len(models) * 3
    assert set(frame["model"]) == set(models)
    assert set(frame["site"]) == {"site-00", "site-01", "site-02"}
    assert (frame["n"] == 30).all()
    assert (run_dir / "plots" / "cross_site_heatmap.png").stat().st_size > 1000
    assert set(result["cross_site"]["auc"]) == set(models)


def test_values_equal_a_direct_evaluation_on_the_site_val_split(run_dir, result):
    model, _, _ = load_model_file(run_dir / "models" / "local-site-01.safetensors")
    with np.load(run_dir / "sites" / "site-02.npz") as z:
        expected = point_metrics(z["val_labels"], predict_proba(model, z["val_images"]))
    assert result["cross_site"]["auc"]["local-site-01"]["site-02"] == pytest.approx(
        expected["auc"])
    assert result["cross_site"]["accuracy"]["local-site-01"]["site-02"] == pytest.approx(
        expected["accuracy"])


def test_generalisation_gap_is_consistent_with_the_matrix(result):
    auc = result["cross_site"]["auc"]
    gap = result["cross_site"]["generalisation_gap"]["site-00"]
    own = auc["local-site-00"]["site-00"]
    others = np.mean([auc["local-site-00"]["site-01"], auc["local-site-00"]["site-02"]])
    assert gap["local_own"] == pytest.approx(own)
    assert gap["local_gap"] == pytest.approx(own - others)
    assert gap["global_minus_local"] == pytest.approx(auc["global"]["site-00"] - own)


def test_fairness_names_worst_and_best_site_of_the_global_model(result):
    spread = result["fairness"]["global"]["auc"]
    per_site = result["cross_site"]["auc"]["global"]
    assert spread["worst_site"] == min(per_site, key=per_site.get)
    assert spread["best_site"] == max(per_site, key=per_site.get)
    assert spread["gap"] == pytest.approx(max(per_site.values()) - min(per_site.values()))
    assert result["fairness"]["local_own"]["auc"]["n_sites"] == 3


def test_result_is_strict_json(result):
    text = json.dumps(result, allow_nan=False)  # raises on NaN/inf
    assert json.loads(text) == result


def test_runs_without_baselines_and_skips_sites_without_val(tmp_path, run_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "models")
    with np.load(copy / "sites" / "site-01.npz") as z:
        data = dict(z)
    data["val_images"], data["val_labels"] = data["val_images"][:0], data["val_labels"][:0]
    np.savez(copy / "sites" / "site-01.npz", **data)
    assert list(RunDir(copy).read_site_validation()) == ["site-00", "site-02"]
    models, _ = RunDir(copy).load_models()
    assert list(models) == ["global"]
    result = cross_site_validation(copy)
    assert list(result["cross_site"]["auc"]) == ["global"]
    assert result["cross_site"]["generalisation_gap"]["site-00"]["local_own"] is None
    assert "local_own" not in result["fairness"]


def test_missing_global_model_is_a_clear_error(tmp_path, run_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "sites", copy / "sites")
    with pytest.raises(FileNotFoundError, match="global_model.safetensors"):
        cross_site_validation(copy)
    with pytest.raises(FileNotFoundError, match="no site-XX.npz"):
        RunDir(tmp_path).read_site_validation()
