"""Thin recording subclasses of Flower's strategies (no copy of ``Strategy.start``).

They only observe replies (per-site metrics, refusals) and then defer to Flower's own
aggregation. Central DP wraps them with Flower's server-side clipping wrapper.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from consilia.common.config import DPConfig, StrategyConfig
from consilia.server.central_dp import AccountedServerSideClipping
from consilia.server.recorder import RunRecorder, site_name

__all__ = ["build_strategy"]


class _RecordingMixin:
    """Hand every reply to the recorder before Flower aggregates it."""

    recorder: RunRecorder

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # a fixed order (by site) makes the float sums of aggregation reproducible
        replies = sorted(replies, key=site_name)
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
    if dp.enabled and dp.mode == "central":
        strategy = AccountedServerSideClipping(  # client-level DP, accounted per round
            strategy,
            noise_multiplier=dp.central_noise_multiplier,
            clipping_norm=dp.central_clipping_norm,
            num_sampled_clients=cfg.min_train_sites,
            delta=dp.target_delta,
        )
    return strategy
