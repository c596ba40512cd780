"""Classifier calibration after the last round: ask the sites for feature statistics, re-fit.

One extra ``query`` message per site (the same Message API round trip as train/evaluate):
the site runs the final global model over its training images once and returns per-class
feature sums (the site trainer's ``SiteTrainer.feature_stats``). The coordinator
merges them and re-fits only the classifier head on virtual features
(:mod:`consilia.common.ccvr`). Sites training with local DP answer with clipped,
Gaussian-noised statistics (the clip bound travels with the query: the run's
``feature_clip_norm``, else the 90th percentile of the final model's feature norms on the
coordinator's test images); classes whose pooled noisy count does not clearly exceed the
noise are left out. When too few sites answer (declined by policy, budget, failure), the
model is left as it is and the reason is logged and recorded.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from consilia.common.ccvr import (
    NOISY_COUNT_SDS,
    CalibrationError,
    FeatureStats,
    classifier_head,
    feature_norms,
    fit_head_on_virtual_features,
)
from consilia.common.config import RunConfig
from consilia.common.constants import ConfigKey, MessageKey, MetricKey, QueryName
from consilia.common.data.images import ImageData
from consilia.common.instructions import RoundInstruction
from consilia.common.serde import arrays_from_model, load_arrays_into_model
from consilia.common.training.inference import eval_loader
from consilia.server.site_names import SiteNames

__all__ = ["CalibrationOutcome", "calibrate_classifier", "central_dp_outcome",
           "feature_clip_norm"]

logger = logging.getLogger("consilia.server")


@dataclass
class CalibrationOutcome:
    """What the calibration step did (written to ``federated_metrics.json``)."""

    applied: bool
    sites: list[str] = field(default_factory=list)
    noised_sites: dict[str, float] = field(default_factory=dict)
    feature_clip_norm: float | None = None
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


def central_dp_outcome() -> CalibrationOutcome:
    """Return the outcome of a central-DP run: calibration skipped, the model kept as it is.

    Central DP protects the released model at the level of whole sites by clipping and
    noising the aggregated updates; a head re-fitted on the sites' exact feature statistics
    would not be covered by that guarantee, so such a run keeps its uncalibrated model.
    """
    reason = ("the run uses central DP: a head re-fitted on the sites' exact feature "
              "statistics would not be covered by its site-level guarantee; the global model "
              "is kept uncalibrated (use local DP for noised statistics)")
    logger.warning("calibration: %s", reason)
    return CalibrationOutcome(applied=False, reason=reason)


def feature_clip_norm(run: RunConfig, baseline: nn.Module, test_data: ImageData | None,
                      arrays: ArrayRecord) -> float | None:
    """Return the L2 bound DP sites clip features to (configured, or from the test set).

    Without a configured bound, the 90th percentile of the final model's head-input norms
    on (up to 2,000, evenly spread) of the coordinator's own test images; None when it has
    none. ``baseline`` is a model of the run's architecture (copied, ``arrays`` loaded).
    """
    configured = run.strategy.calibration.feature_clip_norm
    if configured is not None:
        return float(configured)
    data = test_data
    if data is None or not len(data) or run.task is None:
        return None
    model = copy.deepcopy(baseline)
    load_arrays_into_model(model, arrays)
    pick = np.unique(np.linspace(0, len(data) - 1, min(len(data), 2000)).astype(int))
    subset = ImageData(data.images[pick], data.labels[pick])  # spread over the whole set
    norms = feature_norms(model, eval_loader(subset, run.train, run.task, 256),
                          run.task.num_classes)
    return float(np.quantile(norms, 0.9))


def _number(value: object) -> float:
    """Return a scalar metric as a float (a list makes the statistics unusable)."""
    if not isinstance(value, int | float):
        raise CalibrationError(f"expected a number, got {value!r}")
    return float(value)


def _query_messages(grid: Grid, run: RunConfig, arrays: ArrayRecord,
                    clip_norm: float | None) -> list[Message]:
    config = RoundInstruction.base_config(run)
    config[ConfigKey.SERVER_ROUND.value] = run.strategy.rounds
    config[ConfigKey.QUERY.value] = QueryName.FEATURE_STATS.value
    if clip_norm is not None:
        config[ConfigKey.FEATURE_CLIP_NORM.value] = float(clip_norm)
    messages = []
    for node_id in sorted(grid.get_node_ids()):
        content = RecordDict({MessageKey.ARRAYS.value: arrays,
                              MessageKey.CONFIG.value: ConfigRecord(dict(config))})
        messages.append(Message(content=content, dst_node_id=node_id,
                                message_type=MessageType.QUERY))
    return messages


def calibrate_classifier(
    grid: Grid,
    run: RunConfig,
    arrays: ArrayRecord,
    baseline: nn.Module,
    test_data: ImageData | None,
    site_names: SiteNames,
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
    baseline : nn.Module
        A model of the run's architecture; a copy of it is the scratch model of the fit.
    test_data : ImageData, optional
        The coordinator's test images (for the feature clip norm of DP sites).
    site_names : SiteNames
        Names the replying sites.

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
    outcome = CalibrationOutcome(applied=False)
    try:
        outcome.feature_clip_norm = feature_clip_norm(run, baseline, test_data, arrays)
    except CalibrationError as exc:  # a model without a calibratable head: reported below
        logger.warning("calibration: no feature clip norm for DP sites: %s", exc)
    messages = _query_messages(grid, run, arrays, outcome.feature_clip_norm)
    replies = sorted(grid.send_and_receive(messages, timeout=run.strategy.round_timeout_s),
                     key=site_names.name_of)
    parts: list[FeatureStats] = []
    outcome.statistics_seconds = round(time.perf_counter() - start, 2)
    for msg in replies:
        name = site_names.name_of(msg)
        if msg.has_error():
            outcome.declined[name] = msg.error.reason or f"error code {msg.error.code}"
            continue
        try:
            state = msg.content.array_records[MessageKey.ARRAYS.value].to_torch_state_dict()
            parts.append(FeatureStats.from_arrays({k: v.numpy() for k, v in state.items()}))
            outcome.sites.append(name)
            sigma = _number(msg.content.metric_records[MessageKey.METRICS.value].get(
                MetricKey.DP_NOISE_MULTIPLIER.value, 0.0))
            if sigma > 0:
                outcome.noised_sites[name] = sigma
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
    # a class counts only where its pooled count clearly exceeds the count noise
    count_noise_sd = math.sqrt(sum(3.0 * s**2 for s in outcome.noised_sites.values()))
    fit_start = time.perf_counter()
    model = copy.deepcopy(baseline)  # scratch copy: the recorder's model is its baseline
    load_arrays_into_model(model, arrays)
    try:
        fit = fit_head_on_virtual_features(
            classifier_head(model, task.num_classes), stats,
            virtual_per_class=cfg.virtual_per_class, epochs=cfg.epochs, lr=cfg.lr,
            batch_size=cfg.batch_size,
            seed=run.seed,
            min_count=NOISY_COUNT_SDS * count_noise_sd,
        )
    except CalibrationError as exc:
        outcome.reason = f"{exc}; the global model is kept uncalibrated"
        logger.warning("calibration: %s", outcome.reason)
        return arrays, outcome
    outcome.applied = True
    outcome.classes = [task.class_names[c] for c in fit.classes]
    outcome.images = max(int(round(float(stats.counts.sum()))), 0)
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
