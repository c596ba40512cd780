"""The coordinator's run recorder: per-round metrics, checkpoints and progress lines."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from consilia.client.trainer import ImageData, evaluate_on
from consilia.common.config import RunConfig
from consilia.common.constants import MessageKey
from consilia.common.evaluation.metrics import compute_metrics
from consilia.common.evaluation.plots import plot_confusion_matrix, plot_learning_curves
from consilia.common.rundir.round_records import LATE_KEY, merge_round_records
from consilia.common.serde import load_arrays_into_model, model_from_run_config, save_checkpoint
from consilia.common.tracking import open_tracker
from consilia.server.progress import format_round

__all__ = ["RunRecorder", "flatten", "site_name"]

logger = logging.getLogger("consilia")


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dotted keys (for the CSV view)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def site_name(msg: Message) -> str:
    """Return the replying site's name (``node-<id>`` when the reply carries none)."""
    site = msg.content.config_records.get(MessageKey.SITE.value) if msg.has_content() else None
    if site is not None and "name" in site:
        return str(site["name"])
    return f"node-{msg.metadata.src_node_id}"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


class RunRecorder:
    """Collect what happens in each round and write the run directory.

    Parameters
    ----------
    run_dir : Path
        Output directory (see ``docs/run-directory.md``).
    run : RunConfig
        The run configuration (with ``task``).
    test_data : ImageData, optional
        A test split for server-side evaluation of the global model each round.
    """

    def __init__(self, run_dir: Path, run: RunConfig, test_data: ImageData | None = None):
        self.run_dir = Path(run_dir)
        self.run = run
        self.test_data = test_data
        self.model = model_from_run_config(run)
        self.rounds: list[dict[str, Any]] = []
        self._pending: dict[str, Any] = {}
        self._start = time.perf_counter()
        self.last_eval = None
        self.calibration: dict[str, Any] | None = None
        self._names: dict[int, str] = {}  # node id -> site name, learnt from replies
        (self.run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._jsonl = self.run_dir / "metrics" / "rounds.jsonl"
        self._jsonl.write_text("")
        self.tracker = open_tracker(run.tracking, self.run_dir, run.name,
                                    flatten(run.model_dump(mode="json")))

    # -- replies -------------------------------------------------------------------
    def name_of(self, msg: Message) -> str:
        """Return the site name of a reply; an error reply gets the name its node used before."""
        name = site_name(msg)
        node = int(msg.metadata.src_node_id)
        if msg.has_error() or not msg.has_content():
            return self._names.get(node, name)
        self._names[node] = name
        return name

    def record_replies(self, server_round: int, replies: Iterable[Message], phase: str) -> None:
        """Store each site's metrics (and each refusal's reason) for ``server_round``."""
        sites = self._pending.setdefault("sites", {})
        for msg in replies:
            name = self.name_of(msg)
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                self._pending.setdefault("errors", []).append(
                    {"site": name, "phase": phase, "reason": reason}
                )
                logger.warning("round %d: %s %s failed: %s", server_round, name, phase, reason)
                continue
            for record in msg.content.metric_records.values():
                entry = sites.setdefault(name, {})
                entry.update({k: _clean(float(v)) for k, v in record.items()})
                if entry.get("dp-enabled") == 0.0:
                    entry["epsilon"] = None

    def incomplete_round(self, server_round: int, phase: str, answered: int,
                         required: int) -> None:
        """Note that fewer than ``required`` sites answered ``phase`` (global model kept)."""
        self._pending["incomplete"] = {"phase": phase, "answered": answered,
                                       "required": required}
        logger.warning("round %d: only %d of the required %d site(s) answered %s; the global "
                       "model is kept", server_round, answered, required, phase)

    def aggregated(self, phase: str, metrics: MetricRecord | None) -> None:
        """Store the strategy's aggregated metrics of ``phase`` ("train" or "federated_eval")."""
        if metrics is not None:
            self._pending[phase] = {k: _clean(float(v)) for k, v in metrics.items()}

    def record_late_evaluation(
        self,
        model_round: int,
        with_round: int,
        replies: Iterable[Message],
        aggregate: Callable[[list[RecordDict]], MetricRecord | None],
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
            metrics = {k: float(v) for k, v in evaluation.items()
                       if isinstance(v, int | float) and not isinstance(v, bool)}
            sites[self.name_of(msg)] = {k: _clean(v) for k, v in metrics.items()}
            contents.append(RecordDict({MessageKey.METRICS.value: MetricRecord(metrics)}))
        if not contents:
            return
        late: dict[str, Any] = {"round": model_round, LATE_KEY: with_round, "sites": sites}
        aggregated = aggregate(contents)
        if aggregated is not None:
            late["federated_eval"] = {k: _clean(float(v)) for k, v in aggregated.items()}
        for i, record in enumerate(self.rounds):
            if record.get("round") == model_round:
                self.rounds[i] = merge_round_records([record, late])[0]
        self._publish(late)

    # -- server-side evaluation (also the per-round checkpoint hook) ------------------
    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global model, checkpoint it and write this round's line."""
        load_arrays_into_model(self.model, arrays)
        record: dict[str, Any] = {"round": server_round,
                                  "elapsed_s": round(time.perf_counter() - self._start, 2)}
        record.update(self._pending)
        self._pending = {}
        result = None
        if self.test_data is not None and len(self.test_data):
            res = evaluate_on(self.model, self.test_data, self.run.train, self.run.task)
            head = compute_metrics(res.y_true, res.y_prob, self.run.task.class_names).headline()
            record["server_eval"] = {"loss": res.loss, **{k: _clean(v) for k, v in head.items()}}
            self.last_eval = res
            result = MetricRecord({k: float(v) for k, v in record["server_eval"].items()
                                   if v is not None})
        if server_round > 0:
            save_checkpoint(self.run_dir / "checkpoints" / f"round-{server_round:03d}.pt",
                            self.model, self.run, server_round)
        self.rounds.append(record)
        self._publish(record)
        return result

    def _publish(self, record: dict[str, Any]) -> None:
        """Append ``record`` to rounds.jsonl, rewrite rounds.csv, track it and log its line."""
        with self._jsonl.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._write_csv()
        if self.tracker is not None:
            self.tracker.log_round(int(record["round"]), flatten(record))
        logger.info(self.progress_line(record))

    def progress_line(self, record: dict[str, Any]) -> str:
        """Human lines for one round: round, loss, AUC, accuracy, epsilon, elapsed, failures."""
        return "\n".join(format_round(record, self.run.strategy.rounds))

    def _write_csv(self) -> None:
        rows = [flatten(r) for r in self.rounds]
        columns: list[str] = []
        for row in rows:
            columns.extend(c for c in row if c not in columns and c != "errors")
        with (self.run_dir / "metrics" / "rounds.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

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
        save_checkpoint(self.run_dir / "global_model.pt", self.model, self.run,
                        self.rounds[-1]["round"] if self.rounds else 0)
        final: dict[str, Any] = {}
        if self.test_data is not None and len(self.test_data):
            res = self.last_eval if reuse else evaluate_on(
                self.model, self.test_data, self.run.train, self.run.task
            )
            metrics = compute_metrics(res.y_true, res.y_prob, self.run.task.class_names)
            final["federated"] = metrics.to_dict()
            if self.calibration is not None and self.calibration.get("applied") \
                    and self.last_eval is not None and not reuse:
                before = compute_metrics(self.last_eval.y_true, self.last_eval.y_prob,
                                         self.run.task.class_names)
                final["federated_before_calibration"] = before.to_dict()
                logger.info("calibration: test accuracy %.4f -> %.4f, AUC %s -> %s",
                            before.accuracy, metrics.accuracy, _fmt(before.auc),
                            _fmt(metrics.auc))
            (self.run_dir / "predictions").mkdir(exist_ok=True)
            np.savez_compressed(self.run_dir / "predictions" / "federated.npz",
                                y_true=res.y_true, y_prob=res.y_prob)
            plot_confusion_matrix(metrics.confusion_matrix, self.run.task.class_names,
                                  self.run_dir / "plots" / "confusion_matrix.png",
                                  title="global model, test split")
        if self.calibration is not None:
            final["calibration"] = self.calibration
        plot_learning_curves(self.rounds, self.run_dir / "plots" / "learning_curves.png")
        if self.tracker is not None:
            self.tracker.close()
        return final
