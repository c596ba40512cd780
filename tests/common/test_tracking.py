"""Tests for consilia.common.tracking and its hook in the run recorder."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fake_run import synthetic_images, tiny_run_config

from consilia.common import tracking
from consilia.common.tracking import (
    TensorBoardTracker,
    TrackingUnavailableError,
    create_tracker,
    open_tracker,
    scalars,
)

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(
    not HAS_TENSORBOARD,
    reason="optional extra 'tensorboard' not installed (pip install tensorboard)",
)


def _read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_keeps_finite_numbers_only():
    flat = {"round": 3, "elapsed_s": 1.5, "server_eval.auc": 0.9, "sites.a.epsilon": None,
            "x.nan": float("nan"), "flag": True, "name": "a", "train.num-examples": 10}
    assert scalars(flat) == {"elapsed_s": 1.5, "server_eval.auc": 0.9, "train.num-examples": 10.0}


def test_none_gives_no_tracker_and_unknown_kind_raises(tmp_path):
    assert create_tracker("none", tmp_path) is None
    assert open_tracker("none", tmp_path) is None
    with pytest.raises(ValueError, match="allowed: none, tensorboard, mlflow"):
        create_tracker("wandb", tmp_path)


def test_missing_package_raises_in_create_and_only_warns_in_open(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TrackingUnavailableError, match="pip install mlflow"):
        create_tracker("mlflow", tmp_path)
    with caplog.at_level(logging.WARNING, logger="consilia"):
        assert open_tracker("tensorboard", tmp_path) is None
    assert "pip install tensorboard" in caplog.text


class _FakeMlflow(types.ModuleType):
    """Records the calls MLflowTracker makes."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.calls: list[tuple] = []

    def set_tracking_uri(self, uri):
        self.calls.append(("uri", uri))

    def start_run(self, run_name=None):
        self.calls.append(("start", run_name))
        return object()

    def log_params(self, params):
        self.calls.append(("params", params))

    def set_tag(self, key, value):
        self.calls.append(("tag", key))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", metrics, step))

    def end_run(self):
        self.calls.append(("end",))


def test_mlflow_tracker_logs_params_metrics_per_round_and_ends(tmp_path, monkeypatch):
    fake = _FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = open_tracker("mlflow", tmp_path, "my-run", {"train.lr": 0.001, "model.name": "cnn"})
    tracker.log_round(2, {"round": 2, "server_eval.auc": 0.8, "sites.site-00.epsilon": None})
    tracker.close()
    assert fake.calls[0] == ("uri", (tmp_path / "mlruns").resolve().as_uri())
    assert ("start", "my-run") in fake.calls
    assert ("params", {"train.lr": "0.001", "model.name": "cnn"}) in fake.calls
    assert ("metrics", {"server_eval.auc": 0.8}, 2) in fake.calls
    assert fake.calls[-1] == ("end",)


def test_a_failing_tracker_is_switched_off_with_one_warning(tmp_path, monkeypatch, caplog):
    class Broken:
        closed = 0

        def log_round(self, server_round, values):
            raise OSError("disk full")

        def close(self):
            Broken.closed += 1

    monkeypatch.setattr(tracking, "create_tracker", lambda *a, **k: Broken())
    tracker = open_tracker("tensorboard", tmp_path)
    with caplog.at_level(logging.WARNING, logger="consilia"):
        tracker.log_round(1, {"a": 1.0})
        tracker.log_round(2, {"a": 1.0})
    assert caplog.text.count("disk full") == 1
    assert Broken.closed == 1


@needs_tensorboard
def test_tensorboard_tracker_writes_scalars_by_round(tmp_path):
    tracker = TensorBoardTracker(tmp_path, {"train.lr": 0.01})
    tracker.log_round(0, {"round": 0, "server_eval.auc": 0.5})
    tracker.log_round(1, {"round": 1, "server_eval.auc": 0.75, "sites.site-00.train-loss": 0.4})
    tracker.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    values = _read_scalars(tmp_path / "tensorboard")
    assert values["server_eval/auc"] == [(0, 0.5), (1, 0.75)]
    assert values["sites/site-00/train-loss"] == [(1, pytest.approx(0.4))]


@needs_tensorboard
def test_run_recorder_logs_each_evaluated_round_to_tensorboard(tmp_path):
    from flwr.app import ArrayRecord

    from consilia.common.data.images import ImageData
    from consilia.common.serde import model_from_run_config
    from consilia.server.recorder import RunRecorder

    run = tiny_run_config(["a", "b", "c"]).model_copy(update={"tracking": "tensorboard"})
    images, labels = synthetic_images(24, 3, np.random.default_rng(0))
    recorder = RunRecorder(tmp_path, run, ImageData(images, labels))
    arrays = ArrayRecord(model_from_run_config(run).state_dict())
    recorder.on_global_evaluation(0, arrays)
    recorder.close_round(0)
    recorder.on_site_evaluation(1, [], None)
    recorder.on_global_evaluation(1, arrays)
    recorder.close_round(1)
    recorder.finish(arrays)
    values = _read_scalars(tmp_path / "tensorboard")
    recorded = [r["server_eval"]["auc"] for r in recorder.rounds]
    assert [step for step, _ in values["server_eval/auc"]] == [0, 1]
    assert [v for _, v in values["server_eval/auc"]] == pytest.approx(recorded, abs=1e-6)
