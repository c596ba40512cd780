"""The strategy registry: thin recording subclasses of Flower's strategies.

Each registered strategy is a Flower strategy (``FedAvg``, ``FedProx``, ``FedAdam``,
``FedYogi``, ``FedAdagrad``, ``FedAvgM``, ``FedTrimmedAvg``, ``FedMedian``, ``Krum``,
``MultiKrum``, ``Bulyan``) with :class:`RecordingStrategy` in front of it: it tells the
recorder's round hooks (:class:`~consilia.server.round_hooks.RoundHooks`, passed through
``__init__``) what the sites replied and then defers to Flower's own aggregation (no copy
of ``Strategy.start``).
Before that, every reply passes :class:`~consilia.server.update_validation.UpdateValidator`
(layout, finite values, example counts, update norm; ``strategy.validation``): a bad reply
is dropped and recorded, the round goes on with the others.
With ``site_evaluation: with-next-round`` it also lets the sites evaluate each global model
with the next round's training instead of in an evaluate message of its own.
:func:`build_strategy` builds the configured one from :data:`STRATEGIES`; central DP wraps
it with Flower's server-side clipping wrapper (:mod:`consilia.server.central_dp`; only
fedavg, fedprox and fedadam, see ``RunConfig``).

What Flower 1.42's robust aggregators do with ``num-examples`` and FedProx's settings:

- ``num-examples`` is still required in every reply and screened by the update validator;
  ``median``, ``trimmed-mean`` and ``bulyan`` ignore it for the weights (each accepted reply
  counts once), ``krum`` returns the selected reply as it is, and ``multi-krum`` averages its
  selected replies weighted by ``num-examples``. The train metrics (loss, ...) are always
  the ``num-examples``-weighted mean, over all accepted replies (``median``,
  ``trimmed-mean``) or over the selected ones (``krum``, ``multi-krum``, ``bulyan``).
- Only ``fedprox`` sends ``proximal-mu``: under every other strategy the sites train
  without the proximal term and ``strategy.proximal_mu`` is ignored.
- Integer arrays come back as float64 (as with Flower's FedAvg).
- A round with fewer accepted replies than the strategy can aggregate (Bulyan ``4f+3``,
  Krum ``2f+3``, Multi-Krum ``max(2f+3, m+f)``;
  :meth:`~consilia.common.config.StrategyConfig.min_replies`) or than ``min_train_sites``
  keeps the global model and is recorded as incomplete.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
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
    Strategy,
)

from consilia.common.config import DPConfig, StrategyConfig
from consilia.common.constants import ConfigKey
from consilia.common.registry import Registry
from consilia.server.central_dp import AccountedServerSideClipping
from consilia.server.round_hooks import RoundHooks
from consilia.server.site_names import site_name
from consilia.server.update_validation import (
    Rejection,
    UpdateValidator,
    all_finite,
    example_count_problem,
)

__all__ = [
    "STRATEGIES",
    "RecordingBulyan",
    "RecordingFedAdagrad",
    "RecordingFedAdam",
    "RecordingFedAvg",
    "RecordingFedAvgM",
    "RecordingFedMedian",
    "RecordingFedProx",
    "RecordingFedTrimmedAvg",
    "RecordingFedYogi",
    "RecordingKrum",
    "RecordingMultiKrum",
    "RecordingStrategy",
    "build_strategy",
]


class RecordingStrategy(FedAvg):
    """Hand every reply to the round hooks, then let Flower aggregate it.

    Put it in front of a Flower strategy of the FedAvg family
    (``class RecordingFedProx(RecordingStrategy, FedProx)``): its methods run first and
    ``super()`` reaches that strategy's own.

    With ``site_evaluation: with-next-round`` it also moves the sites' evaluation of each
    global model into the next round's train messages: ``configure_train`` asks the sites
    to evaluate the model they receive (rounds 2..R), ``aggregate_train`` hands those
    evaluations to the hooks as the previous round's federated evaluation, and
    ``configure_evaluate`` sends evaluate messages only after the last round.

    Parameters
    ----------
    hooks : RoundHooks
        Told what happened at each point of a round (the run recorder).
    site_evaluation : str
        ``"with-next-round"`` or ``"separate"`` (see above).
    total_rounds : int
        Rounds of the run (the last one's model gets evaluate messages of its own).
    validator : UpdateValidator
        Screens every reply before aggregation (shared with a central-DP wrapper, which
        screens before it clips).
    min_replies : int
        Fewest accepted replies the Flower strategy can aggregate (Bulyan, Krum); a round
        needs this many and ``min_train_nodes``.
    **flower_options
        The Flower strategy's own arguments.
    """

    def __init__(self, hooks: RoundHooks, *, site_evaluation: str, total_rounds: int,
                 validator: UpdateValidator, min_replies: int = 1,
                 **flower_options: Any) -> None:
        super().__init__(**flower_options)
        self.min_replies = min_replies
        self.hooks = hooks
        self.site_evaluation = site_evaluation
        self.total_rounds = total_rounds
        self.validator = validator

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return the Flower strategy's arguments from ``cfg`` (sampling, minimum sites)."""
        return dict(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=cfg.min_train_sites,
            min_evaluate_nodes=cfg.min_evaluate_sites,
            min_available_nodes=cfg.min_available_sites,
        )

    @classmethod
    def from_config(cls, cfg: StrategyConfig, hooks: RoundHooks) -> Self:
        """Build the strategy ``cfg`` describes, telling ``hooks`` what happens."""
        return cls(hooks, site_evaluation=cfg.site_evaluation, total_rounds=cfg.rounds,
                   validator=UpdateValidator(cfg.validation),
                   min_replies=cfg.min_replies()[0], **cls.flower_options(cfg))

    @property
    def _evaluate_with_next_round(self) -> bool:
        return self.site_evaluation == "with-next-round" and float(self.fraction_evaluate) > 0.0

    def _aggregate_evaluation(self, contents: list[RecordDict]) -> MetricRecord | None:
        """Aggregate the sites' evaluations of the received model (sane example counts only)."""
        cap = self.validator.cfg.max_num_examples
        usable = [c for c in contents if all(
            example_count_problem(m.get(self.weighted_by_key), cap) is None
            for m in c.metric_records.values())]
        return self.evaluate_metrics_aggr_fn(usable, self.weighted_by_key) if usable else None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's train messages; from round 2 they ask to evaluate the received model."""
        self.validator.expect(arrays)  # the layout and reference of this round's replies
        if self._evaluate_with_next_round and server_round > 1:
            config = ConfigRecord({**config, ConfigKey.EVALUATE_RECEIVED.value: True})
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's evaluate messages (none before the last round when evaluating with training)."""
        if self._evaluate_with_next_round and server_round < self.total_rounds:
            return []  # the sites evaluate this model with the next round's training
        return super().configure_evaluate(server_round, arrays, config, grid)

    def screen_train_replies(self, server_round: int,
                             replies: Iterable[Message]) -> list[Message]:
        """Drop excluded sites' replies and bad updates (recorded); keep the rest in order."""
        replies = self.validator.drop_excluded(replies)
        if self.validator.screened_round == server_round:
            return replies  # a wrapper (central DP) screened them before clipping
        screening = self.validator.screen(server_round, replies)
        if screening.rejected or screening.excluded:
            self.hooks.on_rejected_replies(server_round, screening.rejected, screening.excluded)
        return screening.kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, record and aggregate the replies (the global model is kept if too few pass)."""
        # a fixed order (by site) makes the float sums of aggregation reproducible
        replies = self.screen_train_replies(server_round, sorted(replies, key=site_name))
        if self._evaluate_with_next_round and server_round > 1:
            self.hooks.on_late_site_evaluation(server_round - 1, server_round, replies,
                                               self._aggregate_evaluation)
        answered = sum(1 for msg in replies if not msg.has_error())
        required = max(int(self.min_train_nodes), self.min_replies)
        if answered < required:
            # Fewer sites than the minimum answered within the round timeout (dropped out,
            # refused, failed or rejected): keep the global model; the next round tries again.
            self.hooks.on_train_incomplete(server_round, replies, answered, required)
            return None, None
        arrays, metrics = super().aggregate_train(server_round,
                                                  self.validator.aggregation_view(replies))
        if arrays is not None:
            arrays = self.validator.restore_dtypes(arrays)
        if arrays is not None and not all_finite(arrays):  # only if the accepted ones overflow
            self.hooks.on_rejected_replies(server_round, [Rejection(
                "aggregate", -1, "the aggregate of the accepted updates is not finite; the "
                "global model is kept")], [])
            arrays = None
        self.hooks.on_train_aggregated(server_round, replies, metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Screen, record and aggregate the evaluate replies."""
        # a fixed order (by site) makes the float sums of aggregation reproducible
        replies = sorted(self.validator.drop_excluded(replies), key=site_name)
        if not replies and self._evaluate_with_next_round and server_round < self.total_rounds:
            return None  # nothing was sent: this round's model is evaluated with the next
        replies, rejected = self.validator.screen_evaluation(replies)
        if rejected:
            self.hooks.on_rejected_replies(server_round, rejected, [])
        metrics = super().aggregate_evaluate(server_round,
                                             self.validator.aggregation_view(replies))
        self.hooks.on_site_evaluation(server_round, replies, metrics)
        return metrics


class RecordingFedAvg(RecordingStrategy):
    """FedAvg that records per-site metrics."""


class RecordingFedProx(RecordingStrategy, FedProx):
    """FedProx (sends ``proximal-mu``; sites add (mu/2)·||w − w_global||²) with recording."""

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus ``proximal_mu``."""
        return {**super().flower_options(cfg), "proximal_mu": cfg.proximal_mu}


class RecordingFedAdam(RecordingStrategy, FedAdam):
    """FedAdam (server-side Adam on the aggregated update) with recording."""

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus the server optimizer's (``eta``, betas, ``tau``)."""
        return {**super().flower_options(cfg), "eta": cfg.server_lr,
                "beta_1": cfg.server_beta_1, "beta_2": cfg.server_beta_2,
                "tau": cfg.server_tau}


class RecordingFedYogi(RecordingStrategy, FedYogi):
    """FedYogi (server-side Yogi on the aggregated update, ``strategy.fedyogi``) with recording."""

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus ``eta``, ``eta_l``, the betas and ``tau``."""
        return {**super().flower_options(cfg), **cfg.fedyogi.model_dump()}


class RecordingFedAdagrad(RecordingStrategy, FedAdagrad):
    """FedAdagrad (server-side Adagrad, ``strategy.fedadagrad``) with recording."""

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus ``eta``, ``eta_l`` and ``tau``."""
        return {**super().flower_options(cfg), **cfg.fedadagrad.model_dump()}


class RecordingFedAvgM(RecordingStrategy, FedAvgM):
    """FedAvgM (server SGD with momentum, ``strategy.fedavgm``) with recording.

    Flower's FedAvgM remembers the model it sent only once and then its own last aggregate;
    here each round's pseudo-gradient is taken against the model that round actually sent
    (they differ when a round's aggregate was not finite and the global model was kept).
    """

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus ``server_learning_rate`` and ``server_momentum``."""
        return {**super().flower_options(cfg), **cfg.fedavgm.model_dump()}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the model this round sends, then Flower's train messages."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)


class RecordingFedTrimmedAvg(RecordingStrategy, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (``strategy.trimmed_mean.beta`` cut at each end)."""

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus ``beta``."""
        return {**super().flower_options(cfg), **cfg.trimmed_mean.model_dump()}


class RecordingFedMedian(RecordingStrategy, FedMedian):
    """Coordinate-wise median of the accepted replies, with recording."""


class RecordingKrum(RecordingStrategy, Krum):
    """Krum: the reply closest to its n−f−2 nearest others (``strategy.krum``)."""

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus ``num_malicious_nodes``."""
        return {**super().flower_options(cfg), **cfg.krum.model_dump()}


class RecordingMultiKrum(RecordingStrategy, MultiKrum):
    """Multi-Krum: the weighted mean of the m best Krum scores (``strategy.multi_krum``)."""

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus ``num_malicious_nodes`` and ``num_nodes_to_select``."""
        return {**super().flower_options(cfg), **cfg.multi_krum.model_dump()}


class RecordingBulyan(RecordingStrategy, Bulyan):
    """Bulyan: Multi-Krum selection then a trimmed mean around the median (``strategy.bulyan``)."""

    @classmethod
    def flower_options(cls, cfg: StrategyConfig) -> dict[str, Any]:
        """Return FedAvg's arguments plus ``num_malicious_nodes``."""
        return {**super().flower_options(cfg), **cfg.bulyan.model_dump()}


#: The strategies a run may name in ``strategy.name``.
STRATEGIES: Registry[type[RecordingStrategy]] = Registry("strategy")
STRATEGIES.register("fedavg", RecordingFedAvg)
STRATEGIES.register("fedprox", RecordingFedProx)
STRATEGIES.register("fedadam", RecordingFedAdam)
STRATEGIES.register("fedyogi", RecordingFedYogi)
STRATEGIES.register("fedadagrad", RecordingFedAdagrad)
STRATEGIES.register("fedavgm", RecordingFedAvgM)
STRATEGIES.register("trimmed-mean", RecordingFedTrimmedAvg)
STRATEGIES.register("median", RecordingFedMedian)
STRATEGIES.register("krum", RecordingKrum)
STRATEGIES.register("multi-krum", RecordingMultiKrum)
STRATEGIES.register("bulyan", RecordingBulyan)


def build_strategy(cfg: StrategyConfig, dp: DPConfig, hooks: RoundHooks | None) -> Strategy:
    """Build the configured strategy (optionally wrapped for central DP).

    Parameters
    ----------
    cfg : StrategyConfig
        ``cfg.name`` picks the strategy from :data:`STRATEGIES`.
    dp : DPConfig
        ``mode: central`` wraps it with client-level DP.
    hooks : RoundHooks or None
        Told what happens in each round (the run recorder); ``None`` records nothing.

    Returns
    -------
    Strategy
    """
    hooks = hooks if hooks is not None else RoundHooks()
    recording = STRATEGIES.get(cfg.name).from_config(cfg, hooks)
    strategy: Strategy = recording
    if dp.enabled and dp.mode == "central":
        strategy = AccountedServerSideClipping(  # client-level DP, accounted per round
            recording,
            noise_multiplier=dp.central_noise_multiplier,
            clipping_norm=dp.central_clipping_norm,
            num_sampled_clients=cfg.min_train_sites,
            hooks=hooks,
            delta=dp.target_delta,
            screen=recording.screen_train_replies,  # before clipping touches the arrays
        )
    return strategy
