from pathlib import Path

import pytest

from consilia.common.config import (
    ConfigError,
    ExperimentConfig,
    RunConfig,
    apply_overrides,
    load_experiment_config,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"


def test_defaults_are_the_documented_main_job():
    cfg = ExperimentConfig()
    assert cfg.data.dataset == "mednist"
    assert cfg.partition.num_sites == 5
    assert cfg.partition.scheme == "dirichlet"
    assert cfg.partition.alpha == 0.5
    assert cfg.strategy.name == "fedprox"
    assert cfg.model.name == "cnn"


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_validates(path):
    cfg = load_experiment_config(path)
    assert cfg.strategy.rounds >= 1


def test_bad_choice_names_field_and_allowed_values(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("strategy:\n  name: fedsgd\n")
    with pytest.raises(ConfigError) as info:
        load_experiment_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "strategy.name" in message
    assert ("'fedavg', 'fedprox', 'fedadam', 'fedyogi', 'fedadagrad', 'fedavgm', "
            "'trimmed-mean', 'median', 'krum', 'multi-krum' or 'bulyan'") in message
    assert "fedsgd" in message


def test_unknown_field_is_an_error_not_silently_ignored():
    with pytest.raises(ConfigError, match=r"train\.lrate: unknown field"):
        load_experiment_config(None, ["train.lrate=0.1"])


def test_unknown_model_lists_registered_models():
    with pytest.raises(ConfigError, match=r"model\.name.*unknown model 'resnet999'.*cnn"):
        load_experiment_config(None, ["model.name=resnet999"])


def test_minimum_sites_cannot_exceed_federation_size():
    with pytest.raises(ConfigError, match="exceeds partition.num_sites"):
        load_experiment_config(None, ["partition.num_sites=3", "strategy.min_train_sites=4"])


def test_overrides_parse_yaml_scalars_and_create_sections():
    overrides = ["train.lr=1e-3", "partition.feature_skew.enabled=true", "model.kwargs={width: 8}"]
    data = apply_overrides({"train": {"lr": 0.1}}, overrides)
    assert data["train"]["lr"] == 1e-3
    assert data["partition"]["feature_skew"]["enabled"] is True
    assert data["model"]["kwargs"] == {"width": 8}


def test_malformed_override_is_reported():
    with pytest.raises(ConfigError, match="expected section.field=value"):
        apply_overrides({}, ["train.lr"])


def test_toml_files_load(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[strategy]\nname = "fedavg"\nrounds = 3\n')
    cfg = load_experiment_config(path)
    assert cfg.strategy.name == "fedavg" and cfg.strategy.rounds == 3


def test_run_config_is_the_coordinator_subset():
    cfg = load_experiment_config(None, ["strategy.rounds=7", "dp.enabled=true"])
    run = cfg.run_config()
    assert isinstance(run, RunConfig)
    assert run.strategy.rounds == 7 and run.dp.enabled
    assert not hasattr(run, "partition")
