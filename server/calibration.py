"""Classifier calibration after the last round: ask the sites for feature statistics, re-fit.

One extra ``query`` message per site (the same Message API round trip as train/evaluate):
the site runs the final global model over its training images once and returns per-class
feature sums (:meth:`consilia.client.trainer.SiteTrainer.feature_stats`). The coordinator
merges them and re-fits only the classifier head on virtual features
(:mod:`consilia.common.calibration`). When too few sites answer (declined by policy, local DP,
failure), the model is left as it is and the reason is logged and recorded.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from consilia.common.calibration import (
    CalibrationError,
    FeatureStats,
    classifier_head,
    fit_head_on_virtual_features,
)
from consilia.common.config import RunConfig
from consilia.common.constants import ConfigKey, MessageKey, QueryName
from consilia.common.instructions import RoundInstruction
from consilia.common.serde import arrays_from_model, load_arrays_into_model
from consilia.server.recorder import RunRecorder

__all__ = ["CalibrationOutcome", "calibrate_classifier"]

logger = logging.getLogger("consilia.server")


@dataclass
class CalibrationOutcome:
    """What the calibration step did (written to ``federated_metrics.json``)."""

    applied: bool
    sites: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    images: int = 0
    virtual_per_class: int = 0
    epochs: int = 0
    final_loss: float | None = None
    statistics_seconds: float = 0.0
    fit_seconds: float = 0.0
    seconds: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)


def _query_messages(grid: Grid, run: RunConfig, arrays: ArrayRecord) -> list[Message]:
    config = RoundInstruction.base_config(run)
    config[ConfigKey.SERVER_ROUND.value] = run.strategy.rounds
    config[ConfigKey.QUERY.value] = QueryName.FEATURE_STATS.value
    messages = []
    for node_id in sorted(grid.get_node_ids()):
        content = RecordDict({MessageKey.ARRAYS.value: arrays,
                              MessageKey.CONFIG.value: ConfigRecord(dict(config))})
        messages.append(Message(content=content, dst_node_id=node_id,
                                message_type=MessageType.QUERY))
    return messages


def calibrate_classifier(
    grid: Grid, run: RunConfig, arrays: ArrayRecord, recorder: RunRecorder
) -> tuple[ArrayRecord, CalibrationOutcome]:
    """Re-fit the global model's classifier head on the sites' pooled feature statistics.

    Parameters
    ----------
    grid : Grid
        The Flower Grid of the run (simulation or deployment).
    run : RunConfig
        The run; ``run.strategy.calibration`` holds the settings.
    arrays : ArrayRecord
        The final global model.
    recorder : RunRecorder
        A copy of its model is the scratch model of the fit.

    Returns
    -------
    (ArrayRecord, CalibrationOutcome)
        The calibrated model (or ``arrays`` unchanged when calibration could not be done)
        and what happened.
    """
    cfg = run.strategy.calibration
    task = run.task
    assert task is not None  # RoundInstruction.base_config refuses runs without a task
    start = time.perf_counter()
    messages = _query_messages(grid, run, arrays)
    replies = sorted(grid.send_and_receive(messages, timeout=run.strategy.round_timeout_s),
                     key=recorder.name_of)
    parts: list[FeatureStats] = []
    outcome = CalibrationOutcome(applied=False)
    outcome.statistics_seconds = round(time.perf_counter() - start, 2)
    for msg in replies:
        name = recorder.name_of(msg)
        if msg.has_error():
            outcome.declined[name] = msg.error.reason or f"error code {msg.error.code}"
            continue
        try:
            state = msg.content[MessageKey.ARRAYS.value].to_torch_state_dict()
            parts.append(FeatureStats.from_arrays({k: v.numpy() for k, v in state.items()}))
            outcome.sites.append(name)
        except (KeyError, CalibrationError) as exc:
            outcome.declined[name] = f"unusable statistics: {exc}"
    for name, reason in outcome.declined.items():
        logger.warning("calibration: %s did not send feature statistics: %s", name, reason)
    required = cfg.min_sites or run.strategy.min_train_sites
    if len(parts) < required:
        outcome.reason = (f"only {len(parts)} of the required {required} site(s) sent feature "
                          "statistics; the global model is kept uncalibrated")
        logger.warning("calibration: %s", outcome.reason)
        outcome.seconds = round(time.perf_counter() - start, 2)
        return arrays, outcome
    stats = FeatureStats.merge(parts)
    fit_start = time.perf_counter()
    model = copy.deepcopy(recorder.model)  # scratch copy: the recorder's model is its baseline
    load_arrays_into_model(model, arrays)
    try:
        fit = fit_head_on_virtual_features(
            classifier_head(model, task.num_classes), stats,
            virtual_per_class=cfg.virtual_per_class, epochs=cfg.epochs, lr=cfg.lr,
            batch_size=cfg.batch_size,
            seed=run.seed,
        )
    except CalibrationError as exc:
        outcome.reason = f"{exc}; the global model is kept uncalibrated"
        logger.warning("calibration: %s", outcome.reason)
        return arrays, outcome
    outcome.applied = True
    outcome.classes = [task.class_names[c] for c in fit.classes]
    outcome.images = int(stats.counts.sum())
    outcome.virtual_per_class = fit.virtual_per_class
    outcome.epochs = fit.epochs
    outcome.final_loss = round(fit.final_loss, 5)
    outcome.fit_seconds = round(time.perf_counter() - fit_start, 2)
    outcome.seconds = round(time.perf_counter() - start, 2)
    logger.info(
        "calibration: classifier head re-fitted on %d virtual features per class (%d classes) "
        "from the feature statistics of %d site(s), %d images (statistics %.1f s, fit %.1f s)",
        fit.virtual_per_class, len(fit.classes), len(parts), outcome.images,
        outcome.statistics_seconds, outcome.fit_seconds,
    )
    return arrays_from_model(model), outcome
