"""Contract of the strategy registry: every name a run may configure builds its strategy."""

from __future__ import annotations

import typing
from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from consilia.common.config import DPConfig, StrategyConfig
from consilia.common.registry import UnknownNameError
from consilia.server.central_dp import AccountedServerSideClipping
from consilia.server.round_hooks import RoundHooks
from consilia.server.strategy import STRATEGIES, RecordingStrategy, build_strategy

FLOWER_CLASS = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
                "fedadagrad": FedAdagrad, "fedavgm": FedAvgM, "trimmed-mean": FedTrimmedAvg,
                "median": FedMedian, "krum": Krum, "multi-krum": MultiKrum, "bulyan": Bulyan}


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_the_registry_holds_exactly_the_names_the_config_accepts() -> None:
    allowed = typing.get_args(StrategyConfig.model_fields["name"].annotation)
    assert STRATEGIES.names() == sorted(allowed)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_each_registered_strategy_is_a_recording_flower_strategy(name: str) -> None:
    cfg = StrategyConfig(name=name, rounds=4, min_train_sites=2, min_evaluate_sites=2,
                         min_available_sites=2)
    hooks = RoundHooks()
    strategy = build_strategy(cfg, DPConfig(), hooks)
    assert isinstance(strategy, RecordingStrategy)
    assert isinstance(strategy, FLOWER_CLASS[name])
    assert strategy.hooks is hooks and strategy.total_rounds == 4
    assert strategy.min_train_nodes == 2 and strategy.fraction_train == cfg.fraction_train


def test_fedprox_sends_its_mu_and_fedadam_gets_its_server_optimizer() -> None:
    prox = build_strategy(StrategyConfig(name="fedprox", proximal_mu=0.25, min_train_sites=2,
                                         min_evaluate_sites=2, min_available_sites=2),
                          DPConfig(), None)
    arrays = ArrayRecord(OrderedDict(w=torch.zeros(2)))
    messages = list(prox.configure_train(1, arrays, ConfigRecord({}), _Grid()))
    assert {float(m.content["config"]["proximal-mu"]) for m in messages} == {0.25}
    adam = build_strategy(StrategyConfig(name="fedadam", server_lr=0.05, min_train_sites=2,
                                         min_evaluate_sites=2, min_available_sites=2),
                          DPConfig(), None)
    assert isinstance(adam, FedAdam) and adam.eta == pytest.approx(0.05)


def test_central_dp_wraps_the_registered_strategy_with_the_same_hooks() -> None:
    hooks = RoundHooks()
    strategy = build_strategy(StrategyConfig(name="fedavg"),
                              DPConfig(enabled=True, mode="central"), hooks)
    assert isinstance(strategy, AccountedServerSideClipping)
    assert isinstance(strategy.strategy, RecordingStrategy) and strategy.hooks is hooks


def test_each_strategy_gets_its_own_parameters_from_the_config() -> None:
    cfg = StrategyConfig(
        min_train_sites=7, min_evaluate_sites=2, min_available_sites=7,
        fedyogi={"eta": 0.02, "eta_l": 0.5, "beta_1": 0.7, "beta_2": 0.95, "tau": 1e-4},
        fedadagrad={"eta": 0.3, "tau": 1e-2}, trimmed_mean={"beta": 0.3},
        fedavgm={"server_learning_rate": 0.7, "server_momentum": 0.9},
        krum={"num_malicious_nodes": 2},
        multi_krum={"num_malicious_nodes": 1, "num_nodes_to_select": 3},
        bulyan={"num_malicious_nodes": 1})

    def build(name: str):
        return build_strategy(cfg.model_copy(update={"name": name}), DPConfig(), None)

    yogi = build("fedyogi")
    assert (yogi.eta, yogi.eta_l, yogi.beta_1, yogi.beta_2, yogi.tau) == (0.02, 0.5, 0.7,
                                                                          0.95, 1e-4)
    adagrad = build("fedadagrad")
    assert (adagrad.eta, adagrad.tau, adagrad.beta_1, adagrad.beta_2) == (0.3, 1e-2, 0.0, 0.0)
    avgm = build("fedavgm")
    assert (avgm.server_learning_rate, avgm.server_momentum, avgm.server_opt) == (0.7, 0.9, True)
    assert build("trimmed-mean").beta == 0.3
    krum = build("krum")
    assert (krum.num_malicious_nodes, krum.num_nodes_to_select, krum.min_replies) == (2, 1, 7)
    multi = build("multi-krum")
    assert (multi.num_malicious_nodes, multi.num_nodes_to_select) == (1, 3)
    assert multi.min_replies == 5  # max(2f+3, m+f)
    bulyan = build("bulyan")
    assert (bulyan.num_malicious_nodes, bulyan.min_replies) == (1, 7)  # 4f+3
    assert build("median").min_replies == build("fedavg").min_replies == 1


def test_an_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(UnknownNameError, match="bulyan, fedadagrad, fedadam, fedavg, fedavgm, "
                       "fedprox, fedyogi, krum, median, multi-krum, trimmed-mean"):
        STRATEGIES.get("fedsgd")
