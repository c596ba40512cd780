"""Baselines on the same splits as the federation: centralized (pooled) and local-only.

Both use the same training loop, model, optimizer and loss as the sites, and the same
total sample-epochs as the federated run (rounds x local epochs over the same samples).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from consilia.client.trainer import build_task_model, train_model
from consilia.common.config import RunConfig
from consilia.common.data.images import ImageData
from consilia.common.evaluation.metrics import compute_metrics
from consilia.common.model_files import save_model_file
from consilia.common.rundir.layout import RunDir
from consilia.common.training.inference import EvalResult, evaluate_on

__all__ = ["BaselineResult", "run_centralized", "run_local_only"]

logger = logging.getLogger("consilia")


@dataclass
class BaselineResult:
    """A trained baseline model's test-split evaluation."""

    name: str
    metrics: dict
    evaluation: EvalResult
    seconds: float


def _fit_and_score(
    name: str, data: ImageData, test: ImageData, run: RunConfig, epochs: int, seed: int,
    run_dir: Path,
) -> BaselineResult:
    import time

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build_task_model(run.model.name, dict(run.model.kwargs), run.task)

    def progress(epoch: int, loss: float) -> None:
        logger.debug("%s epoch %d/%d loss %.4f", name, epoch + 1, epochs, loss)

    train_model(model, data, run.train, run.task, epochs, seed, on_epoch_end=progress)
    res = evaluate_on(model, test, run.train, run.task)
    metrics = compute_metrics(res.y_true, res.y_prob, run.task.class_names).to_dict()
    layout = RunDir(run_dir)
    save_model_file(layout.model_path(name), model, run, 0, {"baseline": name})
    layout.predictions_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(layout.prediction_path(name), y_true=res.y_true,
                        y_prob=res.y_prob)
    return BaselineResult(name, metrics, res, time.perf_counter() - start)


def run_centralized(
    sites: Sequence[ImageData], test: ImageData, run: RunConfig, run_dir: Path
) -> BaselineResult:
    """Train one model on the pooled site training data for rounds x local epochs."""
    pooled = ImageData(
        np.concatenate([s.images for s in sites]), np.concatenate([s.labels for s in sites])
    )
    epochs = run.strategy.rounds * run.train.local_epochs
    return _fit_and_score("centralized", pooled, test, run, epochs, run.seed + 7, run_dir)


def run_local_only(
    sites: Sequence[tuple[str, ImageData]], test: ImageData, run: RunConfig, run_dir: Path
) -> list[BaselineResult]:
    """Train one model per site on that site alone; evaluate each on the common test split."""
    epochs = run.strategy.rounds * run.train.local_epochs
    results = []
    for i, (name, data) in enumerate(sites):
        results.append(
            _fit_and_score(f"local-{name}", data, test, run, epochs, run.seed + 11 + i, run_dir)
        )
    return results
