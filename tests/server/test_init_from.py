"""``--init-from FILE``: a run that starts from saved weights, and the files it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from inprocess_testkit import run_inprocess_experiment

from consilia.common.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    TaskSpec,
    load_experiment_config,
)
from consilia.common.model_files import load_model_file, save_model_file
from consilia.common.rundir.layout import RunDir
from consilia.common.serde import model_from_run_config
from consilia.server.app import load_initial_model
from consilia.server.control.cli import main as fl_server_main
from consilia.server.control.run_launcher import load_run_config
from consilia.simulations.cli import main as fl_sim_main

SYNTHETIC = TaskSpec(class_names=[f"pattern-{k}" for k in range(3)], in_channels=1,
                     image_size=16)
SIM_ARGS = ["--set", "data.dataset=synthetic", "--set", "data.max_samples=300",
            "--set", "data.image_size=16", "--set", "partition.scheme=iid",
            "--sites", "2", "--model", "cnn", "--set", "model.kwargs={width: 4}",
            "--rounds", "1", "--no-baselines"]
DEPLOY_RUN = Path(__file__).resolve().parents[2] / "deploy" / "run.example.yaml"


def _experiment(*overrides: str):
    return load_experiment_config(None, [
        "data.dataset=synthetic", "data.max_samples=300", "data.image_size=16",
        "partition.num_sites=2", "partition.scheme=iid", "model.name=cnn",
        "model.kwargs={width: 4}", "strategy.name=fedavg", "train.batch_size=16",
        "train.lr=0.05", "baselines.centralized=false", "baselines.local_only=false",
        *overrides,
    ])


def _model_file(path: Path, model: ModelConfig, task: TaskSpec) -> Path:
    run = RunConfig(model=model, task=task)
    return save_model_file(path, model_from_run_config(run), run, server_round=3)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_run_initialised_from_another_runs_final_model_starts_at_its_accuracy(
    tmp_path: Path,
) -> None:
    first, _, first_rounds = run_inprocess_experiment(_experiment("strategy.rounds=4"),
                                                      tmp_path / "first")
    trained = first.final["federated"]["accuracy"]
    chance = first_rounds[0]["server_eval"]["accuracy"]  # the freshly seeded model
    assert trained > chance + 0.25, (chance, trained)  # the first run really learnt

    source = RunDir(first.run_dir).global_model_path
    second, _, rounds = run_inprocess_experiment(
        _experiment("strategy.rounds=1", f"init_from={json.dumps(str(source))}"),
        tmp_path / "second")
    # round 0 scores the loaded model on the same test split: the first run's final accuracy
    assert rounds[0]["round"] == 0
    assert rounds[0]["server_eval"]["accuracy"] == pytest.approx(trained)
    assert rounds[0]["server_eval"]["loss"] == pytest.approx(
        first_rounds[-1]["server_eval"]["loss"])  # the very same weights, not a lucky guess
    layout = RunDir(second.run_dir)
    assert json.loads(layout.environment_path.read_text())["init_from"] == str(source)
    assert yaml.safe_load(layout.config_path.read_text())["init_from"] == str(source)
    assert yaml.safe_load(RunDir(first.run_dir).config_path.read_text())["init_from"] is None


def test_fl_sim_refuses_a_checkpoint_of_another_model(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    other = _model_file(tmp_path / "other.safetensors",
                        ModelConfig(name="cnn", kwargs={"width": 4}),
                        SYNTHETIC.model_copy(update={"image_size": 32}))
    rc = fl_sim_main(["run", *SIM_ARGS, "--out", str(tmp_path / "run"),
                      "--init-from", str(other)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"fl-sim: --init-from {other} holds a cnn {{'width': 4}} for 3 "
                           "classes at 32 px"), line
    assert "this run builds cnn {'width': 4} for 3 classes at 16 px" in line
    assert line.endswith("choose a matching checkpoint")
    assert not RunDir(tmp_path / "run").rounds_jsonl_path.exists()  # refused before training


def test_fl_sim_refuses_a_pickle_and_a_missing_file(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    pickle = tmp_path / "weights.pt"
    run = RunConfig(model=ModelConfig(name="cnn", kwargs={"width": 4}), task=SYNTHETIC)
    torch.save(model_from_run_config(run).state_dict(), pickle)
    rc = fl_sim_main(["run", *SIM_ARGS, "--out", str(tmp_path / "a"), "--init-from",
                      str(pickle)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"fl-sim: --init-from: {pickle} is a pickle-based .pt file"), line

    missing = tmp_path / "nowhere.safetensors"
    rc = fl_sim_main(["run", *SIM_ARGS, "--out", str(tmp_path / "b"), "--init-from",
                      str(missing)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"fl-sim: --init-from {missing}: file not found"), line


def test_fl_server_run_checks_the_checkpoint_before_submitting(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployed = load_run_config(DEPLOY_RUN)
    assert deployed.init_from is None and deployed.task is not None
    wrong = _model_file(tmp_path / "wrong.safetensors", ModelConfig(name="cnn"), SYNTHETIC)
    rc = fl_server_main(["--state-dir", str(tmp_path / "state"), "run", str(DEPLOY_RUN),
                         "--out", str(tmp_path / "run"), "--init-from", str(wrong)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"fl-server: error: --init-from {wrong} holds a cnn for 3 classes"
                           " at 16 px"), line
    assert f"this run builds {deployed.model.name}" in line
    assert not (tmp_path / "run").exists()  # nothing was written or submitted

    # a relative path is resolved on this (the coordinator) machine
    matching = _model_file(tmp_path / "match.safetensors", deployed.model, deployed.task)
    monkeypatch.chdir(tmp_path)
    run = load_run_config(DEPLOY_RUN, init_from=Path("match.safetensors"))
    assert run.init_from == matching.resolve()
    loaded = load_initial_model(run)
    assert loaded is not None
    assert all(torch.equal(loaded.state_dict()[k], v)
               for k, v in load_model_file(matching)[0].state_dict().items())


def test_init_from_in_the_run_config_file_is_checked_too(tmp_path: Path) -> None:
    wrong = _model_file(tmp_path / "wrong.safetensors", ModelConfig(name="cnn"), SYNTHETIC)
    with pytest.raises(ConfigError, match=r"init_from .*wrong\.safetensors holds a cnn"):
        load_run_config(DEPLOY_RUN, [f"init_from={json.dumps(str(wrong))}"])


def test_no_init_from_keeps_the_seeded_model() -> None:
    assert load_initial_model(RunConfig(task=SYNTHETIC)) is None
    assert RunConfig().init_from is None
