"""End-to-end fl-sim runs on Flower's simulation engine (Ray), real MedNIST and synthetic data."""

import json

import numpy as np
import pytest

from consilia.common.config import load_experiment_config
from consilia.common.model_files import load_model_file
from consilia.common.rundir.round_records import read_round_records
from consilia.simulations.cli import main as fl_sim
from consilia.simulations.run import run_experiment


def _rounds(run_dir):
    return read_round_records(run_dir)


@pytest.mark.slow
def test_mednist_federation_beats_chance_and_writes_the_run_directory(tmp_path, shared_data_dir):
    cfg = load_experiment_config(None, [
        f"data.root={shared_data_dir}", "data.max_samples=1800", "partition.num_sites=3",
        "partition.scheme=iid", "strategy.rounds=2", "strategy.min_train_sites=3",
        "strategy.min_evaluate_sites=3", "strategy.min_available_sites=3",
        "model.kwargs={width: 8}", "train.batch_size=32",
    ])
    result = run_experiment(cfg, tmp_path / "run")
    run_dir = result.run_dir

    fed = result.final["federated"]
    assert fed["accuracy"] > 0.5, fed  # chance is 1/6
    assert fed["auc"] > 0.85, fed
    assert {"centralized", "local_only"} <= result.final.keys()
    assert set(result.final["local_only"]) == {"site-00", "site-01", "site-02", "mean"}

    records = _rounds(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    last = records[-1]
    assert set(last["sites"]) == {"site-00", "site-01", "site-02"}
    # sites report samples, not batches: the per-site counts add up to the training pool
    sizes = []
    for i in range(3):
        with np.load(run_dir / "sites" / f"site-0{i}.npz") as z:
            sizes.append(len(z["train_labels"]))
            assert last["sites"][f"site-0{i}"]["num-examples"] in (len(z["train_labels"]),
                                                                   len(z["val_labels"]))
    assert sum(sizes) > 1000
    for name in ("config.yaml", "environment.json", "task.json", "partition.csv",
                 "metrics/rounds.csv", "final_metrics.json", "checkpoints/round-001.safetensors",
                 "checkpoints/round-002.safetensors", "global_model.safetensors",
                 "plots/learning_curves.png",
                 "plots/confusion_matrix.png", "predictions/federated.npz", "cross_site.csv"):
        assert (run_dir / name).is_file(), name
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["versions"]["flwr"].startswith("1.42")
    model, run, meta = load_model_file(run_dir / "global_model.safetensors")
    assert run.task.class_names == ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
    assert meta["round"] == 2


@pytest.mark.slow
def test_same_seed_gives_same_partition_and_metrics(tmp_path):
    overrides = ["data.dataset=synthetic", "data.max_samples=400", "partition.num_sites=2",
                 "strategy.rounds=1", "strategy.min_train_sites=2",
                 "strategy.min_evaluate_sites=2", "strategy.min_available_sites=2",
                 "model.kwargs={width: 8}", "baselines.centralized=false",
                 "baselines.local_only=false"]
    runs = [run_experiment(load_experiment_config(None, overrides), tmp_path / f"r{i}")
            for i in range(2)]
    parts = [(r.run_dir / "partition.csv").read_text() for r in runs]
    assert parts[0] == parts[1]
    evals = [_rounds(r.run_dir)[-1]["server_eval"] for r in runs]
    assert evals[0] == pytest.approx(evals[1], abs=1e-9)


def test_cli_reports_a_bad_config_value_and_exits_2(tmp_path, capsys):
    code = fl_sim(["run", "--set", "strategy.name=fedsgd", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert "strategy.name" in err and "fedavg" in err
    assert not (tmp_path / "x").exists()


def test_cli_list_shows_models_and_datasets(capsys):
    assert fl_sim(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("cnn", "resnet18", "densenet121", "vit", "mednist", "pneumoniamnist"):
        assert name in out
