"""Strategy parameters in the config: defaults match Flower 1.42, bad values fail in one line."""

from __future__ import annotations

import inspect
import typing

import pytest
from flwr.serverapp.strategy import Bulyan, FedAdagrad, FedAvgM, FedTrimmedAvg, FedYogi, MultiKrum

from consilia.common.config import ConfigError, StrategyConfig, load_experiment_config


def _defaults(flower_class: type) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(flower_class).parameters.items()}


@pytest.mark.parametrize(("section", "flower_class"), [
    ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad), ("fedavgm", FedAvgM),
    ("trimmed_mean", FedTrimmedAvg), ("multi_krum", MultiKrum), ("bulyan", Bulyan),
])
def test_each_parameter_section_has_flowers_names_and_defaults(section: str,
                                                               flower_class: type) -> None:
    ours = getattr(StrategyConfig(), section).model_dump()
    flower = _defaults(flower_class)
    assert ours == {name: flower[name] for name in ours}


def test_strategy_names_include_the_optimizers_and_robust_aggregators() -> None:
    allowed = set(typing.get_args(StrategyConfig.model_fields["name"].annotation))
    assert {"fedyogi", "fedadagrad", "fedavgm", "trimmed-mean", "median", "krum",
            "multi-krum", "bulyan"} <= allowed


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_experiment_config(None, overrides)
    return str(info.value)


def test_bulyan_needs_4f_plus_3_sites() -> None:
    message = _error(["strategy.name=bulyan", "strategy.bulyan.num_malicious_nodes=1",
                      "partition.num_sites=6"])
    line = next(x for x in message.splitlines() if "bulyan" in x)
    assert "strategy.bulyan.num_malicious_nodes=1 (4f+3) needs at least 7 training sites" in line
    assert "partition.num_sites=6" in line
    ok = load_experiment_config(None, ["strategy.name=bulyan", "partition.num_sites=7",
                                       "strategy.bulyan.num_malicious_nodes=1"])
    assert ok.strategy.bulyan.num_malicious_nodes == 1


def test_bulyan_counts_the_sites_without_the_holdout() -> None:
    message = _error(["strategy.name=bulyan", "partition.num_sites=3",
                      "partition.holdout_site=2"])
    assert "needs at least 3 training sites" in message and "less the holdout_site" in message


def test_krum_and_multi_krum_need_enough_sites() -> None:
    assert "strategy.krum.num_malicious_nodes=1 (2f+3) needs at least 5" in _error(
        ["strategy.name=krum", "strategy.krum.num_malicious_nodes=1", "partition.num_sites=4"])
    message = _error(["strategy.name=multi-krum", "strategy.multi_krum.num_nodes_to_select=5",
                      "strategy.multi_krum.num_malicious_nodes=1", "partition.num_sites=5"])
    assert "num_nodes_to_select=5 (max(2f+3, m+f)) needs at least 6" in message


def test_the_parameters_of_a_strategy_not_chosen_are_not_checked_against_the_sites() -> None:
    cfg = load_experiment_config(None, ["strategy.name=median", "partition.num_sites=2",
                                        "strategy.bulyan.num_malicious_nodes=3"])
    assert cfg.strategy.name == "median"


@pytest.mark.parametrize(("override", "field"), [
    ("strategy.trimmed_mean.beta=0.5", "strategy.trimmed_mean.beta"),
    ("strategy.fedyogi.beta_2=1.0", "strategy.fedyogi.beta_2"),
    ("strategy.fedavgm.server_momentum=-0.1", "strategy.fedavgm.server_momentum"),
    ("strategy.krum.num_malicious_nodes=-1", "strategy.krum.num_malicious_nodes"),
    ("strategy.multi_krum.num_nodes_to_select=0", "strategy.multi_krum.num_nodes_to_select"),
    ("strategy.median.beta=0.1", "strategy.median"),
])
def test_a_bad_parameter_names_its_field(override: str, field: str) -> None:
    assert any(line.strip().startswith(f"- {field}") for line in _error([override]).splitlines())


@pytest.mark.parametrize("name", ["median", "krum", "fedyogi", "fedavgm"])
def test_central_dp_refuses_aggregates_its_noise_does_not_cover(name: str) -> None:
    message = _error([f"strategy.name={name}", "dp.enabled=true", "dp.mode=central"])
    assert f"strategy.name={name} cannot run with dp.mode=central" in message
