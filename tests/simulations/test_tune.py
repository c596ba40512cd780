"""Tests for ``fl-sim tune`` (consilia.simulations.tune)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
from fake_run import make_run_dir

from consilia.common.config import ConfigError, load_experiment_config
from consilia.simulations import run as run_module
from consilia.simulations.cli import build_parser
from consilia.simulations.cli import main as fl_sim
from consilia.simulations.tune import (
    federated_objective,
    format_results,
    grid_values,
    make_sampler,
    parse_space,
    run_tuning,
)

SPACE = ["lr=1e-4:1e-2:log", "local_epochs=1,2", "proximal_mu=0,0.01,0.1", "batch_size=16,32,64"]


def test_parse_space_reads_ranges_and_choices():
    lr, epochs, mu, batch = parse_space(SPACE)
    assert (lr.path, lr.kind, lr.low, lr.high, lr.log) == ("train.lr", "float", 1e-4, 1e-2, True)
    assert (epochs.path, epochs.choices) == ("train.local_epochs", (1, 2))
    assert (mu.path, mu.choices) == ("strategy.proximal_mu", (0, 0.01, 0.1))
    assert batch.choices == (16, 32, 64)
    (rounds,) = parse_space(["strategy.rounds=1:4"])
    assert (rounds.kind, rounds.low, rounds.high, rounds.log) == ("int", 1, 4, False)
    (opt,) = parse_space(["optimizer=adam,sgd"])
    assert opt.choices == ("adam", "sgd")


@pytest.mark.parametrize("item, message", [
    ("lr", "expected NAME"), ("lr=1e-2:1e-4", "LO must be below HI"),
    ("lr=0:1:log", "LO > 0"), ("lr=1:2:3", "LO:HI or LO:HI:log"), ("lr=a:b", "numbers"),
    ("nonsense=1,2", "unknown name"),
])
def test_parse_space_errors_name_the_item(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_space([item])


def test_parse_space_rejects_duplicates_and_empty():
    with pytest.raises(ConfigError, match="twice"):
        parse_space(["lr=1,2", "lr=3,4"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_space([])


def test_grid_values_discretise_ranges():
    lr, epochs, *_ = parse_space(SPACE)
    assert grid_values(lr, 3) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert grid_values(epochs) == [1, 2]
    (rounds,) = parse_space(["rounds=1:3"])
    assert grid_values(rounds, 5) == [1, 2, 3]


def test_make_sampler_picks_the_seeded_optuna_sampler():
    specs = parse_space(SPACE)
    assert isinstance(make_sampler("grid", specs, 0, 5), optuna.samplers.GridSampler)
    assert isinstance(make_sampler("random", specs, 0, 5), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("tpe", specs, 0, 5), optuna.samplers.TPESampler)
    with pytest.raises(ConfigError, match="grid, random or tpe"):
        make_sampler("cmaes", specs, 0, 5)


def test_objective_is_the_last_rounds_federated_validation_auc(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", num_sites=2, dp=False)
    assert federated_objective(run_dir) == pytest.approx(0.9)  # round 3: 0.6 + 0.1 * 3
    (run_dir / "metrics" / "rounds.jsonl").write_text(json.dumps({"round": 1, "train": {}}))
    assert math.isnan(federated_objective(run_dir))


def _fake_runs(monkeypatch) -> list:
    """Replace run_experiment by a writer of rounds.jsonl whose AUC peaks at lr=1e-3, 2 epochs."""
    calls = []

    def fake(cfg, out_dir, verbose=False, argv=None, bundle=None):
        calls.append(cfg)
        auc = 0.9 - 0.1 * abs(math.log10(cfg.train.lr) + 3) - 0.05 * abs(cfg.train.local_epochs - 2)
        (Path(out_dir) / "metrics").mkdir(parents=True)
        (Path(out_dir) / "metrics" / "rounds.jsonl").write_text(
            json.dumps({"round": 1, "federated_eval": {"auc": auc}, "server_eval": {"auc": 0.1}})
        )

    monkeypatch.setattr(run_module, "run_experiment", fake)
    return calls


def test_grid_search_tries_every_point_and_writes_a_valid_best_config(tmp_path, monkeypatch):
    calls = _fake_runs(monkeypatch)
    cfg = load_experiment_config(None, ["data.dataset=synthetic", "strategy.rounds=7"])
    specs = parse_space(["lr=1e-4:1e-2:log", "local_epochs=1,2"])
    result = run_tuning(cfg, specs, "grid", trials=None, out_dir=tmp_path)
    assert len(calls) == 6
    assert all(not c.baselines.centralized and not c.baselines.local_only for c in calls)
    assert {(c.train.lr, c.train.local_epochs) for c in calls} == {
        (lr, e) for lr in (1e-4, 1e-3, 1e-2) for e in (1, 2)}
    assert result.best_params == {"lr": pytest.approx(1e-3), "local_epochs": 2}
    assert result.best_value == pytest.approx(0.9)

    table = pd.read_csv(tmp_path / "tuning_results.csv")
    assert list(table.columns[:5]) == ["trial", "lr", "local_epochs", "objective", "seconds"]
    assert len(table) == 6 and (table["state"] == "COMPLETE").all()
    assert sorted(p.name for p in tmp_path.glob("trial-*")) == [f"trial-{i:03d}" for i in range(6)]
    best = load_experiment_config(tmp_path / "best_config.yaml")
    assert best.train.lr == pytest.approx(1e-3) and best.train.local_epochs == 2
    assert best.strategy.rounds == 7 and best.baselines.centralized  # the base config's choices
    summary = json.loads((tmp_path / "tuning_summary.json").read_text())
    assert summary["best_trial"] == int(table.loc[table["objective"].idxmax(), "trial"])
    assert format_results(result.table).splitlines()[1].split()[1] == "0.001"


def test_random_and_tpe_are_reproducible_for_a_seed(tmp_path, monkeypatch):
    _fake_runs(monkeypatch)
    cfg = load_experiment_config(None, ["data.dataset=synthetic", "seed=3"])
    specs = parse_space(["lr=1e-4:1e-2:log", "local_epochs=1:3"])
    for search in ("random", "tpe"):
        first = run_tuning(cfg, specs, search, 4, tmp_path / f"{search}-a").table
        second = run_tuning(cfg, specs, search, 4, tmp_path / f"{search}-b").table
        assert first["lr"].tolist() == second["lr"].tolist()
        assert first["local_epochs"].between(1, 3).all()
        assert ((first["lr"] >= 1e-4) & (first["lr"] <= 1e-2)).all()


def test_failed_trials_are_recorded_and_do_not_stop_the_study(tmp_path, monkeypatch):
    def flaky(cfg, out_dir, verbose=False, argv=None, bundle=None):
        if cfg.train.local_epochs == 1:
            raise RuntimeError("the federated run wrote no results")
        (Path(out_dir) / "metrics").mkdir(parents=True)
        (Path(out_dir) / "metrics" / "rounds.jsonl").write_text(
            json.dumps({"round": 1, "federated_eval": {"auc": 0.7}}))

    monkeypatch.setattr(run_module, "run_experiment", flaky)
    cfg = load_experiment_config(None, ["data.dataset=synthetic"])
    result = run_tuning(cfg, parse_space(["local_epochs=1,2"]), "grid", None, tmp_path)
    states = dict(zip(result.table["local_epochs"], result.table["state"], strict=True))
    assert states == {1: "FAIL", 2: "COMPLETE"}
    assert "RuntimeError" in result.table.loc[result.table["local_epochs"] == 1, "error"].item()
    assert result.best_params == {"local_epochs": 2}


def test_invalid_space_or_objective_fails_before_any_trial(tmp_path, monkeypatch):
    calls = _fake_runs(monkeypatch)
    cfg = load_experiment_config(None, ["data.dataset=synthetic"])
    with pytest.raises(ConfigError, match="batch_size"):
        run_tuning(cfg, parse_space(["batch_size=0,32"]), "grid", None, tmp_path)
    no_eval = load_experiment_config(None, ["strategy.fraction_evaluate=0"])
    with pytest.raises(ConfigError, match="fraction_evaluate"):
        run_tuning(no_eval, parse_space(["lr=1e-3,1e-2"]), "grid", None, tmp_path)
    assert calls == []


def test_cli_parses_the_tune_command():
    args = build_parser().parse_args(
        ["tune", "--search", "random", "--trials", "3", "--space", *SPACE, "--space", "rounds=1,2"]
    )
    assert args.search == "random" and args.trials == 3
    assert [i for group in args.space for i in group] == [*SPACE, "rounds=1,2"]


@pytest.mark.slow
def test_tune_end_to_end_with_real_federated_runs(tmp_path):
    out = tmp_path / "tune"
    code = fl_sim(["tune", "--dataset", "synthetic", "--sites", "2", "--rounds", "1",
                   "--set", "model.kwargs.width=4", "--set", "data.max_samples=200",
                   "--set", "data.image_size=16", "--set", "partition.scheme=iid",
                   "--search", "grid", "--space", "local_epochs=1,2", "--out", str(out)])
    assert code == 0
    table = pd.read_csv(out / "tuning_results.csv")
    assert len(table) == 2 and (table["state"] == "COMPLETE").all()
    for row in table.itertuples():
        trial_dir = out / f"trial-{row.trial:03d}"
        assert not (trial_dir / "models").exists()  # baselines off in trials
        last = json.loads((trial_dir / "metrics" / "rounds.jsonl").read_text().splitlines()[-1])
        assert row.objective == pytest.approx(last["federated_eval"]["auc"])
    best = load_experiment_config(out / "best_config.yaml")
    best_row = table.loc[table["objective"].idxmax()]
    assert best.train.local_epochs == best_row["local_epochs"]
    assert best.data.dataset == "synthetic" and best.partition.num_sites == 2
