"""The coordinator's run recorder: one record per round, checkpoints, and the run's end.

:class:`RunRecorder` implements the round hooks (:class:`~consilia.server.round_hooks.RoundHooks`)
the strategies call while a round runs, evaluates and checkpoints each global model
(:meth:`RunRecorder.on_global_evaluation`), and writes the round's record when the ServerApp
closes the round (:meth:`RunRecorder.close_round`): a line of ``metrics/rounds.jsonl``, the
rewritten ``metrics/rounds.csv``, the tracker's step and the progress line.
:meth:`RunRecorder.finish` writes the final model, predictions, metrics and plots.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, MetricRecordValues, RecordDict

from consilia.common.config import RunConfig, TaskSpec
from consilia.common.constants import MessageKey, MetricKey
from consilia.common.data.images import ImageData
from consilia.common.evaluation.formatting import format_number as _fmt
from consilia.common.evaluation.metrics import compute_metrics
from consilia.common.evaluation.plots import plot_confusion_matrix, plot_learning_curves
from consilia.common.rundir.layout import RunDir
from consilia.common.rundir.round_records import LATE_KEY, merge_round_records
from consilia.common.serde import load_arrays_into_model, model_from_run_config
from consilia.common.tracking import open_tracker
from consilia.common.training.inference import EvalResult, evaluate_on
from consilia.server.central_dp import CENTRAL_DP_KEY
from consilia.server.checkpoints import save_final_model, save_round_checkpoint
from consilia.server.progress import format_round
from consilia.server.round_csv import flatten, write_rounds_csv
from consilia.server.round_hooks import EvaluationAggregation, RoundHooks
from consilia.server.site_names import SiteNames
from consilia.server.update_validation import Exclusion, Rejection

__all__ = ["RunRecorder"]

logger = logging.getLogger("consilia")


def _as_float(value: Any) -> float:
    """Return a metric value as a float (a list-valued one is an error, as in ``float()``)."""
    if isinstance(value, list):
        raise TypeError(f"metric value must be a number, not a list: {value!r}")
    return float(value)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder(RoundHooks):
    """Collect what happens in each round and write the run directory.

    Parameters
    ----------
    run_dir : Path
        Output directory (see ``docs/run-directory.md``).
    run : RunConfig
        The run configuration (with ``task``).
    test_data : ImageData, optional
        A test split for server-side evaluation of the global model each round.

    Raises
    ------
    ValueError
        If ``run`` has no task.
    """

    def __init__(self, run_dir: Path, run: RunConfig, test_data: ImageData | None = None):
        self.run_dir = RunDir(run_dir)
        self.run = run
        self.test_data = test_data
        self.model = model_from_run_config(run)
        assert run.task is not None  # model_from_run_config refuses a run without a task
        self.task: TaskSpec = run.task
        self.site_names = SiteNames()
        self.rounds: list[dict[str, Any]] = []
        self.last_eval: EvalResult | None = None
        self.calibration: dict[str, Any] | None = None
        self._start = time.perf_counter()
        # the open round: what the strategy reported, then the global evaluation
        self._pending: dict[str, Any] = {}
        self._elapsed_s: float | None = None
        self._server_eval: dict[str, Any] | None = None
        self.run_dir.metrics_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.rounds_jsonl_path.write_text("")
        self.tracker = open_tracker(run.tracking, self.run_dir.path, run.name,
                                    flatten(run.model_dump(mode="json")))

    # -- replies (the strategies' round hooks) ---------------------------------------
    def _record_replies(self, server_round: int, replies: Iterable[Message],
                        phase: str) -> None:
        """Store each site's metrics (and each refusal's reason) for ``server_round``."""
        sites = self._pending.setdefault("sites", {})
        for msg in replies:
            name = self.site_names.name_of(msg)
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                self._pending.setdefault("errors", []).append(
                    {"site": name, "phase": phase, "reason": reason}
                )
                logger.warning("round %d: %s %s failed: %s", server_round, name, phase, reason)
                continue
            for record in msg.content.metric_records.values():
                entry = sites.setdefault(name, {})
                entry.update({k: _clean(_as_float(v)) for k, v in record.items()})
                if entry.get(MetricKey.DP_ENABLED.value) == 0.0:
                    entry[MetricKey.EPSILON.value] = None

    def _store_aggregate(self, key: str, metrics: MetricRecord | None) -> None:
        if metrics is not None:
            self._pending[key] = {k: _clean(_as_float(v)) for k, v in metrics.items()}

    def on_failed_replies(self, server_round: int, replies: Iterable[Message],
                          phase: str) -> None:
        """Record the refusals and failures among ``phase``'s replies."""
        self._record_replies(server_round, replies, phase)

    def on_rejected_replies(self, server_round: int, rejected: Sequence[Rejection],
                            excluded: Sequence[Exclusion]) -> None:
        """Record the replies dropped before aggregation (``rejected``) and exclusions."""
        for rejection in rejected:
            self._pending.setdefault("rejected", []).append(rejection.to_dict())
            logger.warning("round %d: %s's %s reply rejected: %s", server_round,
                           rejection.site, rejection.phase, rejection.reason)
        for exclusion in excluded:
            self._pending.setdefault("excluded", []).append(exclusion.to_dict())
            logger.warning("round %d: %s (node %d) excluded for the rest of the run after "
                           "rejected updates in rounds %s; its replies are ignored",
                           server_round, exclusion.site, exclusion.node,
                           ", ".join(map(str, exclusion.rounds)))

    def on_train_incomplete(self, server_round: int, replies: Iterable[Message],
                            answered: int, required: int) -> None:
        """Record the train replies and that fewer than ``required`` sites answered."""
        self._record_replies(server_round, replies, "train")
        self._pending["incomplete"] = {"phase": "train", "answered": answered,
                                       "required": required}
        logger.warning("round %d: only %d of the required %d site(s) answered train; the "
                       "global model is kept", server_round, answered, required)

    def on_train_aggregated(self, server_round: int, replies: Iterable[Message],
                            metrics: MetricRecord | None) -> None:
        """Record the train replies (per-site metrics, refusals) and their aggregate."""
        self._record_replies(server_round, replies, "train")
        self._store_aggregate("train", metrics)

    def on_central_dp_release(self, server_round: int, release: MetricRecord) -> None:
        """Record the round's central-DP accounting under ``central_dp``."""
        self._store_aggregate(CENTRAL_DP_KEY, release)

    def on_site_evaluation(self, server_round: int, replies: Iterable[Message],
                           metrics: MetricRecord | None) -> None:
        """Record the evaluate replies and their aggregate (``federated_eval``)."""
        self._record_replies(server_round, replies, "evaluate")
        self._store_aggregate("federated_eval", metrics)

    def on_late_site_evaluation(
        self,
        model_round: int,
        with_round: int,
        replies: Iterable[Message],
        aggregate: EvaluationAggregation,
    ) -> None:
        """Record the sites' evaluation of round ``model_round``'s global model.

        With ``site_evaluation: with-next-round`` the sites evaluate each global model when
        it reaches them with the next round's (``with_round``) train message and send the
        result with their training reply. This merges it into ``model_round``'s record and
        appends a late record to ``rounds.jsonl`` (see :mod:`consilia.common.rundir.round_records`).
        ``aggregate`` is the strategy's evaluation-metrics aggregation (weighted by each
        site's number of validation images).
        """
        sites: dict[str, dict[str, Any]] = {}
        contents: list[RecordDict] = []
        for msg in replies:
            if msg.has_error() or not msg.has_content():
                continue
            evaluation = msg.content.config_records.get(MessageKey.EVALUATION.value)
            if evaluation is None:
                continue
            metrics: dict[str, MetricRecordValues] = {
                k: float(v) for k, v in evaluation.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}
            sites[self.site_names.name_of(msg)] = {k: _clean(v) for k, v in metrics.items()}
            contents.append(RecordDict({MessageKey.METRICS.value: MetricRecord(metrics)}))
        if not contents:
            return
        late: dict[str, Any] = {"round": model_round, LATE_KEY: with_round, "sites": sites}
        aggregated = aggregate(contents)
        if aggregated is not None:
            late["federated_eval"] = {k: _clean(_as_float(v)) for k, v in aggregated.items()}
        for i, record in enumerate(self.rounds):
            if record.get("round") == model_round:
                self.rounds[i] = merge_round_records([record, late])[0]
        self._publish(late)

    # -- the global model of each round ----------------------------------------------
    def on_global_evaluation(self, server_round: int,
                             arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the round's global model on the test split and checkpoint it.

        Returns the server-side metrics (``None`` without a test split), as Flower's
        ``evaluate_fn`` does.
        """
        load_arrays_into_model(self.model, arrays)
        self._elapsed_s = round(time.perf_counter() - self._start, 2)
        result = None
        if self.test_data is not None and len(self.test_data):
            res = evaluate_on(self.model, self.test_data, self.run.train, self.task)
            head = compute_metrics(res.y_true, res.y_prob, self.task.class_names).headline()
            self._server_eval = {"loss": res.loss, **{k: _clean(v) for k, v in head.items()}}
            self.last_eval = res
            values: dict[str, MetricRecordValues] = {
                k: float(v) for k, v in self._server_eval.items() if v is not None}
            result = MetricRecord(values)
        save_round_checkpoint(self.run_dir, self.model, self.run, server_round)
        return result

    def close_round(self, server_round: int) -> None:
        """Write ``server_round``'s record (rounds.jsonl, rounds.csv, tracker, progress line)."""
        elapsed = self._elapsed_s
        if elapsed is None:  # closed without a global evaluation
            elapsed = round(time.perf_counter() - self._start, 2)
        record: dict[str, Any] = {"round": server_round, "elapsed_s": elapsed}
        record.update(self._pending)
        if self._server_eval is not None:
            record["server_eval"] = self._server_eval
        self._pending, self._elapsed_s, self._server_eval = {}, None, None
        self.rounds.append(record)
        self._publish(record)

    def _publish(self, record: dict[str, Any]) -> None:
        """Append ``record`` to rounds.jsonl, rewrite rounds.csv, track it and log its line."""
        with self.run_dir.rounds_jsonl_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        write_rounds_csv(self.run_dir.rounds_csv_path, self.rounds)
        if self.tracker is not None:
            self.tracker.log_round(int(record["round"]), flatten(record))
        logger.info(self.progress_line(record))

    def progress_line(self, record: dict[str, Any]) -> str:
        """Human lines for one round: round, loss, AUC, accuracy, epsilon, elapsed, failures."""
        return "\n".join(format_round(record, self.run.strategy.rounds))

    def note_calibration(self, outcome: dict[str, Any]) -> None:
        """Record what the classifier calibration after the last round did."""
        self.calibration = outcome

    # -- end of run -----------------------------------------------------------------
    def finish(self, final_arrays: ArrayRecord | None) -> dict[str, Any]:
        """Write the final model, predictions, metrics and plots; return final metrics."""
        reuse = self.last_eval is not None and final_arrays is None
        if final_arrays is not None and len(final_arrays) > 0:  # empty: no round aggregated
            before = [t.clone() for t in self.model.state_dict().values()]
            load_arrays_into_model(self.model, final_arrays)
            after = list(self.model.state_dict().values())
            # the strategy's final arrays are the ones evaluated after the last round
            reuse = self.last_eval is not None and all(
                a.shape == b.shape and bool((a == b).all())
                for a, b in zip(before, after, strict=True)
            )
        save_final_model(self.run_dir, self.model, self.run,
                         self.rounds[-1]["round"] if self.rounds else 0)
        final: dict[str, Any] = {}
        if self.test_data is not None and len(self.test_data):
            class_names = self.task.class_names
            res = self.last_eval if reuse and self.last_eval is not None else evaluate_on(
                self.model, self.test_data, self.run.train, self.task
            )
            metrics = compute_metrics(res.y_true, res.y_prob, class_names)
            final["federated"] = metrics.to_dict()
            if self.calibration is not None and self.calibration.get("applied") \
                    and self.last_eval is not None and not reuse:
                before_cal = compute_metrics(self.last_eval.y_true, self.last_eval.y_prob,
                                             class_names)
                final["federated_before_calibration"] = before_cal.to_dict()
                logger.info("calibration: test accuracy %.4f -> %.4f, AUC %s -> %s",
                            before_cal.accuracy, metrics.accuracy, _fmt(before_cal.auc),
                            _fmt(metrics.auc))
            self.run_dir.predictions_dir.mkdir(exist_ok=True)
            np.savez_compressed(self.run_dir.prediction_path("federated"),
                                y_true=res.y_true, y_prob=res.y_prob)
            plot_confusion_matrix(metrics.confusion_matrix, class_names,
                                  self.run_dir.plots_dir / "confusion_matrix.png",
                                  title="global model, test split")
        if self.calibration is not None:
            final["calibration"] = self.calibration
        plot_learning_curves(self.rounds, self.run_dir.plots_dir / "learning_curves.png")
        if self.tracker is not None:
            self.tracker.close()
        return final
