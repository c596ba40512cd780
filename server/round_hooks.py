"""What the strategies tell the run recorder during a round (:class:`RoundHooks`).

The recording strategies (:mod:`consilia.server.strategy`) and the central-DP wrapper
(:mod:`consilia.server.central_dp`) receive their hooks through ``__init__`` and call them
at the named points of a round; :class:`~consilia.server.recorder.RunRecorder` implements
them. The ServerApp closes each round itself (:meth:`RoundHooks.close_round`) after the
global evaluation of the round's model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from consilia.server.update_validation import Exclusion, Rejection

__all__ = ["EvaluationAggregation", "RoundHooks"]

#: A strategy's aggregation of evaluation metrics over reply contents.
EvaluationAggregation = Callable[[list[RecordDict]], MetricRecord | None]


class RoundHooks:
    """The points of a round at which the recorder learns what happened.

    Every hook does nothing here: a strategy built without a recorder gets this base class,
    and :class:`~consilia.server.recorder.RunRecorder` overrides the hooks it records.
    """

    def on_late_site_evaluation(
        self,
        model_round: int,
        with_round: int,
        replies: Iterable[Message],
        aggregate: EvaluationAggregation,
    ) -> None:
        """Take the sites' evaluation of round ``model_round``'s model, sent with ``with_round``."""

    def on_failed_replies(self, server_round: int, replies: Iterable[Message],
                          phase: str) -> None:
        """Take the error replies (refusals, failures) of ``phase``, kept out of aggregation."""

    def on_rejected_replies(self, server_round: int, rejected: Sequence[Rejection],
                            excluded: Sequence[Exclusion]) -> None:
        """Take the replies dropped before aggregation and the sites excluded from now on."""

    def on_train_incomplete(self, server_round: int, replies: Iterable[Message],
                            answered: int, required: int) -> None:
        """Take the training replies of a round too few sites answered (model kept)."""

    def on_train_aggregated(self, server_round: int, replies: Iterable[Message],
                            metrics: MetricRecord | None) -> None:
        """Take the sites' training replies and their aggregate ``metrics``."""

    def on_central_dp_release(self, server_round: int, release: MetricRecord) -> None:
        """Take the client-level accounting of the round's central-DP release."""

    def on_site_evaluation(self, server_round: int, replies: Iterable[Message],
                           metrics: MetricRecord | None) -> None:
        """Take the sites' evaluate replies and their aggregate ``metrics``."""

    def on_global_evaluation(self, server_round: int,
                             arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate and checkpoint the round's global model (round 0: the initial model)."""
        return None

    def close_round(self, server_round: int) -> None:
        """Write the round's record; nothing more is recorded for it (except a late record)."""
