"""The site trainer: local fit/evaluate on the site's own data. No Flower imports.

Used by the ClientApp in both simulation and deployment, and by the local-only baseline.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from consilia.common.ccvr import FeatureStats, collect_feature_stats
from consilia.common.config import TaskSpec, TrainConfig
from consilia.common.constants import MetricKey
from consilia.common.data.array_dataset import ImageArrayDataset
from consilia.common.data.images import ImageData
from consilia.common.data.loaders import make_loader
from consilia.common.data.transforms import build_train_transform
from consilia.common.evaluation.metrics import compute_metrics
from consilia.common.instructions import RoundInstruction
from consilia.common.models import build_model
from consilia.common.serde import clean_state_dict
from consilia.common.training.engine import seed_everything, snapshot_params, train_epochs
from consilia.common.training.inference import eval_dataset, eval_loader, evaluate_on
from consilia.common.training.losses import build_loss
from consilia.common.training.optimizers import build_optimizer

if TYPE_CHECKING:  # annotations only: the trainer runs without Opacus when DP is off
    from consilia.client.privacy.controller import PrivacyController

__all__ = ["SiteTrainer", "build_task_model", "train_model"]


def build_task_model(model_name: str, kwargs: dict, task: TaskSpec) -> nn.Module:
    """Build the run's model for the task's geometry and label space."""
    return build_model(model_name, task.in_channels, task.num_classes, task.image_size, **kwargs)


def _train_dataset(
    data: ImageData, train: TrainConfig, task: TaskSpec, seed: int
) -> ImageArrayDataset:
    """Return ``data`` with the training pipeline (augmented when augmentation is enabled)."""
    if not train.augmentation.enabled:
        return eval_dataset(data, train, task)
    transform = build_train_transform(train.augmentation, train.preprocess, task.image_size, seed)
    return ImageArrayDataset(data.images, data.labels, transform=transform)


def train_model(
    model: nn.Module,
    data: ImageData,
    train: TrainConfig,
    task: TaskSpec,
    epochs: int,
    seed: int,
    proximal_mu: float = 0.0,
    privacy: PrivacyController | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> tuple[float, int, int]:
    """Train ``model`` in place on ``data``; returns ``(mean loss, num_examples, steps)``.

    ``privacy``, when given, is a DP controller whose ``wrap`` method makes the model,
    optimizer and loader private (see :mod:`consilia.client.privacy.controller`).
    """
    seed_everything(seed)
    loader = make_loader(
        _train_dataset(data, train, task, seed), train.batch_size, shuffle=True, seed=seed
    )
    optimizer = build_optimizer(
        train.optimizer, model.parameters(), train.lr, train.momentum, train.weight_decay
    )
    counts = data.class_counts(task.num_classes) if train.class_weights else None
    loss_fn = build_loss(train.loss, task.num_classes, counts, train.focal_gamma)
    anchors = snapshot_params(model) if proximal_mu > 0 else None
    if privacy is not None:
        return privacy.train(
            model, optimizer, loader, loss_fn, epochs, proximal_mu, anchors
        )
    result = train_epochs(
        model, loader, optimizer, loss_fn, epochs, proximal_mu, anchors,
        num_examples=len(data), on_epoch_end=on_epoch_end,
    )
    return result.loss, result.num_examples, result.steps


@dataclass
class SiteTrainer:
    """Fit and evaluate the global model on one site's data.

    Parameters
    ----------
    name : str
        Site name reported to the coordinator.
    train_data, val_data : ImageData
        The site's training data and its held-out split.
    site_index : int
        Used to derive per-site seeds.
    threads : int, optional
        ``torch.set_num_threads`` for this process.
    privacy_factory : callable, optional
        ``f(instruction, n_train) -> controller | None`` providing DP per round.
    """

    name: str
    train_data: ImageData
    val_data: ImageData | None
    site_index: int = 0
    threads: int | None = None
    privacy_factory: Callable[[RoundInstruction, int], PrivacyController | None] | None = None
    _model_cache: dict = field(default_factory=dict, repr=False)

    def _built_model(self, instr: RoundInstruction) -> nn.Module:
        if self.threads:
            torch.set_num_threads(self.threads)
        key = (instr.model.model_dump_json(), instr.task.model_dump_json())
        model = self._model_cache.get(key)
        if model is None:
            model = build_task_model(instr.model.name, dict(instr.model.kwargs), instr.task)
            self._model_cache.clear()
            self._model_cache[key] = model
        return model

    def _model(self, instr: RoundInstruction, state: OrderedDict) -> nn.Module:
        model = self._built_model(instr)
        model.load_state_dict(state, strict=True)
        return model

    def state_template(self, instr: RoundInstruction) -> OrderedDict:
        """Return the run's model ``state_dict`` (names, shapes, dtypes) for unpacking weights."""
        return cast(OrderedDict, self._built_model(instr).state_dict())

    def fit(self, state: OrderedDict, instr: RoundInstruction) -> tuple[OrderedDict, dict]:
        """Train from the global ``state``; return the new weights and scalar metrics."""
        start = time.perf_counter()
        model = self._model(instr, state)
        privacy = (
            self.privacy_factory(instr, len(self.train_data)) if self.privacy_factory else None
        )
        seed = instr.seed * 100_003 + instr.server_round * 1_009 + self.site_index
        loss, num_examples, _steps = train_model(
            model, self.train_data, instr.train, instr.task, instr.train.local_epochs, seed,
            proximal_mu=instr.proximal_mu, privacy=privacy,
        )
        metrics = {
            MetricKey.TRAIN_LOSS.value: float(loss),
            MetricKey.NUM_EXAMPLES.value: int(num_examples),
            MetricKey.TRAIN_SECONDS.value: time.perf_counter() - start,
            MetricKey.DP_ENABLED.value: 0.0,
            MetricKey.EPSILON.value: 0.0,
        }
        if privacy is not None:
            metrics[MetricKey.DP_ENABLED.value] = 1.0
            metrics[MetricKey.EPSILON.value] = float(privacy.spent_epsilon())
            metrics[MetricKey.DELTA.value] = float(
                privacy.effective_delta(len(self.train_data))
            )
            metrics.update(privacy.reply_metrics())  # which accountant the site used
        inner = getattr(model, "_module", model)
        return clean_state_dict(inner.state_dict()), metrics

    @property
    def has_validation_data(self) -> bool:
        """Whether the site holds a non-empty held-out split to evaluate on."""
        return self.val_data is not None and len(self.val_data) > 0

    def evaluate(self, state: OrderedDict, instr: RoundInstruction) -> dict:
        """Evaluate the global ``state`` on the site's held-out split."""
        if not self.has_validation_data:
            raise ValueError(f"site {self.name} has no held-out validation data")
        data = self.val_data
        assert data is not None  # has_validation_data
        model = self._model(instr, state)
        res = evaluate_on(model, data, instr.train, instr.task)
        head = compute_metrics(res.y_true, res.y_prob, instr.task.class_names).headline()
        return {
            MetricKey.EVAL_LOSS.value: float(res.loss),
            MetricKey.ACCURACY.value: float(head["accuracy"]),
            MetricKey.BALANCED_ACCURACY.value: float(head["balanced_accuracy"]),
            MetricKey.AUC.value: _finite(head["auc"]),
            MetricKey.F1.value: float(head["f1"]),
            MetricKey.NUM_EXAMPLES.value: res.num_examples,
        }


    def feature_stats(
        self, state: OrderedDict, instr: RoundInstruction, min_class_count: int
    ) -> FeatureStats:
        """Per-class sums of the global model's head-input features over the training split.

        Classes with fewer than ``min_class_count`` images here are withheld (zeros).
        """
        if not len(self.train_data):
            raise ValueError(f"site {self.name} has no training images")
        model = self._model(instr, state)
        loader = eval_loader(self.train_data, instr.train, instr.task, 256)
        return collect_feature_stats(model, loader, instr.task.num_classes, min_class_count)

    def trains_with_dp(self, instr: RoundInstruction) -> object | None:
        """Return the privacy controller when this site trains ``instr``'s run with local DP."""
        if self.privacy_factory is None:
            return None
        return self.privacy_factory(instr, len(self.train_data))

    def private_feature_stats(
        self,
        state: OrderedDict,
        instr: RoundInstruction,
        privacy: PrivacyController,
        clip_norm: float,
    ) -> tuple[FeatureStats, float, float]:
        """Feature statistics through the Gaussian mechanism, accounted before they leave.

        Features are clipped to ``clip_norm``; no class is withheld (the noise protects a
        rare class, and withholding by the true count would itself disclose it). The release
        is recorded in the privacy ledger first (refused if it does not fit the budget).

        Returns
        -------
        tuple
            ``(noised statistics, lifetime epsilon after the release, noise multiplier)``.
        """
        if not len(self.train_data):
            raise ValueError(f"site {self.name} has no training images")
        if privacy.release_noise_multiplier is None:
            raise ValueError(f"site {self.name}: no noise is planned for a statistics release")
        sigma = float(privacy.release_noise_multiplier)
        epsilon = privacy.release_feature_statistics(
            len(self.train_data))
        model = self._model(instr, state)
        loader = eval_loader(self.train_data, instr.train, instr.task, 256)
        stats = collect_feature_stats(model, loader, instr.task.num_classes, 1,
                                      clip_norm=clip_norm)
        rng = privacy.release_rng()
        return stats.with_gaussian_noise(sigma, clip_norm, rng), float(epsilon), sigma


def _finite(value: float) -> float:
    """Metric records cannot carry None; report an undefined AUC as -1 (documented)."""
    return float(value) if value is not None and np.isfinite(value) else -1.0
