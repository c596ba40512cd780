"""Checks every site reply passes before it reaches Flower's aggregation.

Flower's strategies trust what a site sends: the arrays' shapes, their values and the
``num-examples`` that weights the average. :class:`UpdateValidator` screens each training
reply against the round's global model (see ``strategy.validation`` in
:class:`~consilia.common.config.UpdateValidationConfig`):

- the reply holds one weight record and one metric record;
- its arrays have the global model's layout: the same names (the packed keys carry the layout
  fingerprint of :func:`consilia.common.serde.layout_digest`), shapes and dtypes;
- every value is finite;
- ``num-examples`` is a positive whole number, at most ``max_num_examples`` and at most
  ``max_num_examples_growth`` × what the same node reported in its first accepted reply;
- with 3 or more such replies, ``||w_site - w_global||`` is at most
  ``max_update_norm_ratio`` × the round's median update norm.

A reply that fails is dropped (a :class:`Rejection`, named by the existing site-name
mechanism and its node id); a node rejected in ``exclude_after`` rounds is excluded for the
rest of the run (an :class:`Exclusion`, said once) and its replies are ignored. State is kept
per node id, the identity Flower gives the connection, not per claimed name, so one site cannot
get another excluded by sending garbage under its name. Evaluate replies get the metric checks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from consilia.common.config import UpdateValidationConfig
from consilia.common.constants import MetricKey
from consilia.server.site_names import site_name

__all__ = [
    "Exclusion",
    "Rejection",
    "Screening",
    "UpdateValidator",
    "all_finite",
    "example_count_problem",
]

logger = logging.getLogger("consilia")

#: Fewest screened replies for the median-norm check to mean anything.
MIN_REPLIES_FOR_NORM_CHECK = 3
_FIELD = "strategy.validation"


@dataclass(frozen=True)
class Rejection:
    """A reply dropped before aggregation: who sent it and why."""

    site: str
    node: int
    reason: str
    phase: str = "train"

    def to_dict(self) -> dict[str, Any]:
        """Return the ``rounds.jsonl`` form: ``{"site", "node", "phase", "reason"}``."""
        return {"site": self.site, "node": self.node, "phase": self.phase,
                "reason": self.reason}


@dataclass(frozen=True)
class Exclusion:
    """A node excluded for the rest of the run after ``len(rounds)`` rejected rounds."""

    site: str
    node: int
    rounds: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the ``rounds.jsonl`` form: ``{"site", "node", "rejected_rounds"}``."""
        return {"site": self.site, "node": self.node, "rejected_rounds": list(self.rounds)}


@dataclass
class Screening:
    """One round's replies after screening (input order kept)."""

    kept: list[Message] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)


class _RejectedError(Exception):
    """A reply failed a check (the message is the reason)."""


def example_count_problem(value: Any, cap: int, key: str = MetricKey.NUM_EXAMPLES.value
                          ) -> str | None:
    """Return why ``value`` is not a usable example count (``None`` when it is).

    Parameters
    ----------
    value : Any
        The reported count (a missing key is ``None``).
    cap : int
        The largest count accepted.
    key : str
        The metric's name, for the reason.

    Returns
    -------
    str or None
    """
    if value is None:
        return f"'{key}' is missing"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"'{key}' must be a number, not {type(value).__name__}"
    if not math.isfinite(value) or float(value) != int(value):
        return f"'{key}' {value!r} is not a whole number"
    if value <= 0:
        return f"'{key}' {value!r} is not positive"
    if value > cap:
        return f"'{key}' {int(value)} exceeds {_FIELD}.max_num_examples = {cap}"
    return None


def _name(msg: Message) -> str:
    """Return the reply's site name (the existing mechanism), or its node's if that fails."""
    try:
        return site_name(msg)
    except Exception:  # noqa: BLE001 - a malformed site record: name it by its node
        return f"node-{msg.metadata.src_node_id}"


def _only_record(records: Any, what: str) -> Any:
    if len(records) != 1:
        raise _RejectedError(f"the reply holds {len(records)} {what} records; expected one")
    return next(iter(records.values()))


def _scalar_metrics(metrics: MetricRecord) -> None:
    for key, value in metrics.items():
        if isinstance(value, list):
            raise _RejectedError(f"metric '{key}' is a list; expected one number")


def _check_layout(arrays: ArrayRecord, expected: ArrayRecord) -> dict[str, np.ndarray]:
    """Return the reply's arrays as numpy, after checking names, shapes, dtypes, finiteness."""
    missing = sorted(set(expected.keys()) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(expected.keys()))
    if missing or extra:
        raise _RejectedError(f"weights do not match the global model's layout (missing {missing}, "
                        f"unexpected {extra})")
    out: dict[str, np.ndarray] = {}
    for key, like in expected.items():
        sent: Array = arrays[key]
        if tuple(sent.shape) != tuple(like.shape) or sent.dtype != like.dtype:
            raise _RejectedError(f"array '{key}' is {sent.dtype}{list(sent.shape)}; the global "
                            f"model's is {like.dtype}{list(like.shape)}")
        try:
            value = sent.numpy()
        except Exception as exc:  # noqa: BLE001 - a malformed array is the sender's fault
            raise _RejectedError(f"array '{key}' cannot be read: {exc}") from None
        if value.shape != tuple(like.shape) or str(value.dtype) != like.dtype:
            raise _RejectedError(f"array '{key}' decodes to {value.dtype}{list(value.shape)}; "
                            f"expected {like.dtype}{list(like.shape)}")
        if np.issubdtype(value.dtype, np.inexact):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            if bad:
                raise _RejectedError(f"array '{key}' holds {bad} NaN or infinite value(s)")
        out[key] = value
    return out


def _update_norm(arrays: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray]) -> float:
    """``||w_site - w_global||`` over the floating-point arrays (in float64)."""
    total = 0.0
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.inexact):
            diff = value.astype(np.float64) - global_arrays[key].astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


class UpdateValidator:
    """Screen site replies before aggregation; remember rejections and exclusions per node.

    Parameters
    ----------
    cfg : UpdateValidationConfig
        The limits (``strategy.validation``).
    weight_key : str
        The metric aggregation weights replies by.
    """

    def __init__(self, cfg: UpdateValidationConfig,
                 weight_key: str = MetricKey.NUM_EXAMPLES.value) -> None:
        self.cfg = cfg
        self.weight_key = weight_key
        #: the round whose train replies were screened last (a wrapper screens before clipping)
        self.screened_round: int | None = None
        self._global: ArrayRecord | None = None
        self._global_numpy: dict[str, np.ndarray] | None = None
        self._first_count: dict[int, int] = {}
        self._rejected_rounds: dict[int, set[int]] = {}
        self._excluded: dict[int, str] = {}

    # -- the round's global model ------------------------------------------------------
    def expect(self, arrays: ArrayRecord) -> None:
        """Take the global model the round's train messages carry (the reference layout)."""
        if arrays is not self._global:
            self._global, self._global_numpy = arrays, None

    def _reference(self) -> tuple[ArrayRecord, dict[str, np.ndarray]] | None:
        if self._global is None or len(self._global) == 0:
            return None
        if self._global_numpy is None:
            self._global_numpy = {k: v.numpy() for k, v in self._global.items()}
        return self._global, self._global_numpy

    def restore_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Cast an aggregate back to the global model's dtypes (integers rounded).

        Flower's weighted averages come back as floating point even for integer arrays (e.g.
        a step counter); the next round's layout check would then refuse every honest reply.
        Arrays whose dtype already matches are returned as they are.
        """
        reference = self._reference()
        if reference is None:
            return arrays
        _, expected = reference
        restored: dict[str, Array] = {}
        changed = False
        for key, array in arrays.items():
            like = expected.get(key)
            value = array.numpy()
            if like is not None and value.dtype != like.dtype:
                if np.issubdtype(like.dtype, np.integer):
                    value = np.rint(value)
                value = value.astype(like.dtype)
                changed = True
            restored[key] = Array(value)
        return ArrayRecord(restored) if changed else arrays

    # -- exclusion ---------------------------------------------------------------------
    @property
    def excluded_nodes(self) -> dict[int, str]:
        """Excluded node ids and the site names they used."""
        return dict(self._excluded)

    def drop_excluded(self, replies: Iterable[Message]) -> list[Message]:
        """Return ``replies`` without those of excluded nodes (ignored for the rest of the run)."""
        kept = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if node in self._excluded:
                logger.debug("ignoring a reply of excluded site %s (node %d)",
                             self._excluded[node], node)
                continue
            kept.append(msg)
        return kept

    def _note_rejections(self, server_round: int,
                         rejected: Sequence[Rejection]) -> list[Exclusion]:
        limit = self.cfg.exclude_after
        excluded = []
        for rejection in rejected:
            rounds = self._rejected_rounds.setdefault(rejection.node, set())
            rounds.add(server_round)
            if limit is not None and len(rounds) >= limit \
                    and rejection.node not in self._excluded:
                self._excluded[rejection.node] = rejection.site
                excluded.append(Exclusion(rejection.site, rejection.node,
                                          tuple(sorted(rounds))))
        return excluded

    # -- train replies -----------------------------------------------------------------
    def _example_count(self, metrics: MetricRecord, node: int) -> int:
        value = metrics.get(self.weight_key)
        problem = example_count_problem(value, self.cfg.max_num_examples, self.weight_key)
        if problem is not None:
            raise _RejectedError(problem)
        count = int(value)  # type: ignore[arg-type]  # a number, checked above
        first = self._first_count.get(node)
        growth = self.cfg.max_num_examples_growth
        if first is not None and count > first * growth:
            raise _RejectedError(f"'{self.weight_key}' {count} exceeds {growth:g} × the {first} "
                            f"this site reported first ({_FIELD}.max_num_examples_growth)")
        return count

    def _screen_one(self, msg: Message) -> tuple[int, float | None]:
        """Check one content reply; return its example count and update norm."""
        content = msg.content
        metrics = _only_record(content.metric_records, "metric")
        _scalar_metrics(metrics)
        count = self._example_count(metrics, int(msg.metadata.src_node_id))
        arrays = _only_record(content.array_records, "weight")
        reference = self._reference()
        if reference is None:  # no global model seen (a strategy used without configure_train)
            for key, value in arrays.items():
                array = value.numpy()
                if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
                    raise _RejectedError(f"array '{key}' holds NaN or infinite values")
            return count, None
        expected, expected_numpy = reference
        numpy_arrays = _check_layout(arrays, expected)
        norm = _update_norm(numpy_arrays, expected_numpy)
        if not math.isfinite(norm):
            raise _RejectedError("the update is too large to measure (its norm overflows)")
        return count, norm

    def screen(self, server_round: int, replies: Iterable[Message]) -> Screening:
        """Screen one round's train replies (error replies pass through untouched).

        Parameters
        ----------
        server_round : int
            The round the replies answer.
        replies : iterable of Message
            Replies of nodes not excluded (see :meth:`drop_excluded`).

        Returns
        -------
        Screening
            The replies to aggregate (plus the error replies), the rejections and the nodes
            excluded from now on.
        """
        self.screened_round = server_round
        replies = list(replies)
        passed: dict[int, tuple[int, float | None]] = {}  # index -> (count, norm)
        rejected: dict[int, Rejection] = {}
        for index, msg in enumerate(replies):
            if msg.has_error() or not msg.has_content():
                continue
            try:
                passed[index] = self._screen_one(msg)
            except _RejectedError as why:
                rejected[index] = self._rejection(msg, str(why))
            except Exception as exc:  # noqa: BLE001 - nothing a site sends may stop the run
                rejected[index] = self._rejection(msg, f"unreadable reply: {exc!r}")
        rejected.update(self._norm_outliers(replies, passed))
        logger.debug("round %d: update norms %s", server_round,
                     {_name(replies[i]): norm for i, (_c, norm) in passed.items()})
        for index, (count, _norm) in passed.items():
            if index not in rejected:
                self._first_count.setdefault(int(replies[index].metadata.src_node_id), count)
        ordered = [rejected[i] for i in sorted(rejected)]
        return Screening(
            kept=[msg for i, msg in enumerate(replies) if i not in rejected],
            rejected=ordered,
            excluded=self._note_rejections(server_round, ordered),
        )

    def _norm_outliers(self, replies: list[Message],
                       passed: dict[int, tuple[int, float | None]]) -> dict[int, Rejection]:
        ratio = self.cfg.max_update_norm_ratio
        norms = {i: norm for i, (_count, norm) in passed.items() if norm is not None}
        if ratio is None or len(norms) < MIN_REPLIES_FOR_NORM_CHECK:
            return {}
        median = float(np.median(list(norms.values())))
        if median <= 0.0:
            return {}
        return {
            i: self._rejection(replies[i], f"update norm {norm:.4g} is {norm / median:.3g} × "
                               f"the round's median {median:.4g} (limit "
                               f"{_FIELD}.max_update_norm_ratio = {ratio:g})")
            for i, norm in norms.items() if norm > ratio * median
        }

    @staticmethod
    def _rejection(msg: Message, reason: str, phase: str = "train") -> Rejection:
        return Rejection(_name(msg), int(msg.metadata.src_node_id), reason, phase)

    # -- evaluate replies ----------------------------------------------------------------
    def screen_evaluation(self, replies: Iterable[Message]) -> tuple[list[Message],
                                                                     list[Rejection]]:
        """Keep the evaluate replies Flower can aggregate (one metric record, sane counts)."""
        kept, rejected = [], []
        for msg in replies:
            if msg.has_error() or not msg.has_content():
                kept.append(msg)
                continue
            try:
                metrics = _only_record(msg.content.metric_records, "metric")
                _scalar_metrics(metrics)
                problem = example_count_problem(metrics.get(self.weight_key),
                                                self.cfg.max_num_examples, self.weight_key)
                if problem is not None:
                    raise _RejectedError(problem)
                kept.append(msg)
            except _RejectedError as why:
                rejected.append(self._rejection(msg, str(why), "evaluate"))
            except Exception as exc:  # noqa: BLE001 - nothing a site sends may stop the run
                rejected.append(self._rejection(msg, f"unreadable reply: {exc!r}", "evaluate"))
        return kept, rejected

    # -- what Flower's aggregation gets ------------------------------------------------
    def aggregation_view(self, replies: list[Message]) -> list[Message]:
        """Return replies Flower's consistency check accepts (the metric keys all of them share).

        Flower stops the run when replies' metric keys differ (a site that trains with DP
        under its own policy also reports ``delta``). Honest replies of one kind are returned
        as they are; otherwise each is rebuilt with its weights and the shared metrics.
        """
        content = [m for m in replies if not m.has_error() and m.has_content()]
        key_sets = [set(next(iter(m.content.metric_records.values())).keys()) for m in content]
        if not key_sets or all(keys == key_sets[0] for keys in key_sets):
            return replies
        shared = set.intersection(*key_sets)
        view = []
        for msg in replies:
            if msg.has_error() or not msg.has_content():
                view.append(msg)
                continue
            record = RecordDict(dict(msg.content.array_records.items()))
            (metrics_name, metrics), = msg.content.metric_records.items()
            record[metrics_name] = MetricRecord({k: v for k, v in metrics.items() if k in shared})
            view.append(Message(content=record, dst_node_id=int(msg.metadata.src_node_id),
                                message_type=msg.metadata.message_type))
        return view


def all_finite(arrays: ArrayRecord) -> bool:
    """Whether every floating-point value of ``arrays`` is finite."""
    for value in arrays.values():
        array = value.numpy()
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            return False
    return True
