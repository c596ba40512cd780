"""Thin recording subclasses of Flower's strategies (no copy of ``Strategy.start``).

They observe replies (per-site metrics, refusals) and then defer to Flower's own
aggregation; with ``site_evaluation: with-next-round`` they also let the sites evaluate each
global model with the next round's training instead of in an evaluate message of its own.
Central DP wraps them with Flower's server-side clipping wrapper.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from consilia.common.config import DPConfig, StrategyConfig
from consilia.common.constants import ConfigKey
from consilia.server.central_dp import AccountedServerSideClipping
from consilia.server.recorder import RunRecorder, site_name

__all__ = ["build_strategy"]


class _RecordingMixin:
    """Hand every reply to the recorder before Flower aggregates it.

    With ``site_evaluation: with-next-round`` it also moves the sites' evaluation of each
    global model into the next round's train messages: ``configure_train`` asks the sites
    to evaluate the model they receive (rounds 2..R), ``aggregate_train`` hands those
    evaluations to the recorder as the previous round's federated evaluation, and
    ``configure_evaluate`` sends evaluate messages only after the last round.
    """

    recorder: RunRecorder
    site_evaluation: str = "separate"
    total_rounds: int = 0

    @property
    def _evaluate_with_next_round(self) -> bool:
        return (self.site_evaluation == "with-next-round"
                and float(getattr(self, "fraction_evaluate", 1.0)) > 0.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._evaluate_with_next_round and server_round > 1:
            config = ConfigRecord({**config, ConfigKey.EVALUATE_RECEIVED.value: True})
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._evaluate_with_next_round and server_round < self.total_rounds:
            return []  # the sites evaluate this model with the next round's training
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # a fixed order (by site) makes the float sums of aggregation reproducible
        replies = sorted(replies, key=site_name)
        if self._evaluate_with_next_round and server_round > 1:
            self.recorder.record_late_evaluation(
                server_round - 1, server_round, replies,
                lambda contents: self.evaluate_metrics_aggr_fn(  # type: ignore[attr-defined]
                    contents, self.weighted_by_key),  # type: ignore[attr-defined]
            )
        self.recorder.record_replies(server_round, replies, "train")
        answered = sum(1 for msg in replies if not msg.has_error())
        required = int(getattr(self, "min_train_nodes", 1))
        if answered < required:
            # Fewer sites than the minimum answered within the round timeout (dropped out,
            # refused or failed): keep the global model; the next round tries again.
            self.recorder.incomplete_round(server_round, "train", answered, required)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        self.recorder.aggregated("train", metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        # a fixed order (by site) makes the float sums of aggregation reproducible
        replies = sorted(replies, key=site_name)
        if not replies and self._evaluate_with_next_round and server_round < self.total_rounds:
            return None  # nothing was sent: this round's model is evaluated with the next
        self.recorder.record_replies(server_round, replies, "evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        self.recorder.aggregated("federated_eval", metrics)
        return metrics


class RecordingFedAvg(_RecordingMixin, FedAvg):
    """FedAvg that records per-site metrics."""


class RecordingFedProx(_RecordingMixin, FedProx):
    """FedProx (sends ``proximal-mu``; sites add (mu/2)·||w − w_global||²) with recording."""


class RecordingFedAdam(_RecordingMixin, FedAdam):
    """FedAdam (server-side Adam on the aggregated update) with recording."""


def build_strategy(cfg: StrategyConfig, dp: DPConfig, recorder: RunRecorder) -> Strategy:
    """Build the configured strategy (optionally wrapped for central DP)."""
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_sites,
        min_evaluate_nodes=cfg.min_evaluate_sites,
        min_available_nodes=cfg.min_available_sites,
    )
    strategy: Strategy
    if cfg.name == "fedavg":
        strategy = RecordingFedAvg(**common)
    elif cfg.name == "fedprox":
        strategy = RecordingFedProx(**common, proximal_mu=cfg.proximal_mu)
    elif cfg.name == "fedadam":
        strategy = RecordingFedAdam(
            **common, eta=cfg.server_lr, beta_1=cfg.server_beta_1, beta_2=cfg.server_beta_2,
            tau=cfg.server_tau,
        )
    else:  # pragma: no cover - pydantic restricts the names
        raise ValueError(f"unknown strategy {cfg.name}")
    strategy.recorder = recorder  # type: ignore[attr-defined]
    strategy.site_evaluation = cfg.site_evaluation  # type: ignore[attr-defined]
    strategy.total_rounds = cfg.rounds  # type: ignore[attr-defined]
    if dp.enabled and dp.mode == "central":
        strategy = AccountedServerSideClipping(  # client-level DP, accounted per round
            strategy,
            noise_multiplier=dp.central_noise_multiplier,
            clipping_norm=dp.central_clipping_norm,
            num_sampled_clients=cfg.min_train_sites,
            delta=dp.target_delta,
        )
    return strategy
