"""Tests for consilia.common.rundir.layout: the run directory's paths and typed readers."""

from __future__ import annotations

import numpy as np
import pytest
from fake_run import make_run_dir

from consilia.common.data.images import ImageData
from consilia.common.rundir.layout import GLOBAL_MODEL, RunDir


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    return RunDir(make_run_dir(tmp_path_factory.mktemp("run") / "run", num_sites=2))


def test_paths_follow_the_documented_layout(tmp_path):
    layout = RunDir(tmp_path)
    assert layout.config_path == tmp_path / "config.yaml"
    assert layout.site_path("site-01") == tmp_path / "sites" / "site-01.npz"
    assert layout.holdout_path("site-01") == tmp_path / "holdout" / "site-01.npz"
    assert layout.test_set_path == tmp_path / "test_set.npz"
    assert layout.rounds_jsonl_path == tmp_path / "metrics" / "rounds.jsonl"
    assert layout.prediction_path("federated") == tmp_path / "predictions" / "federated.npz"
    assert layout.model_path("local-site-00") == tmp_path / "models" / "local-site-00.safetensors"
    assert layout.centralized_model_path == tmp_path / "models" / "centralized.safetensors"


def test_readers_return_typed_content(run):
    assert run.read_task()["class_names"] == ["alpha", "beta", "gamma"]
    assert isinstance(run.read_config(), dict)
    sites = run.read_sites()
    assert list(sites) == ["site-00", "site-01"]
    train, val, names = sites["site-00"]
    assert train.labels.dtype == np.int64 and names == ["alpha", "beta", "gamma"]
    val_splits = run.read_site_validation()
    assert np.array_equal(val_splits["site-01"][1], sites["site-01"][1].labels)
    test = run.read_test_set()
    assert isinstance(test, ImageData) and test.labels.dtype == np.int64
    assert run.read_rounds()
    assert "federated" in run.read_predictions()


def test_models_include_the_global_model_first(run):
    models, run_config = run.load_models()
    assert next(iter(models)) == GLOBAL_MODEL
    assert run_config.task.class_names == ["alpha", "beta", "gamma"]


def test_test_set_round_trips(tmp_path):
    layout = RunDir(tmp_path)
    data = ImageData(np.zeros((3, 1, 4, 4), np.uint8), np.array([0, 1, 1]))
    layout.write_test_set(data, ["a", "b"])
    back = layout.read_test_set()
    assert np.array_equal(back.images, data.images) and np.array_equal(back.labels, data.labels)
    with np.load(layout.test_set_path) as z:
        assert z["class_names"].tolist() == ["a", "b"]


def test_missing_files_are_clear_errors(tmp_path):
    layout = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no site-XX.npz"):
        layout.read_sites()
    with pytest.raises(FileNotFoundError, match="test split"):
        layout.read_test_set()
    with pytest.raises(FileNotFoundError, match="global_model.safetensors"):
        layout.load_global_model()
