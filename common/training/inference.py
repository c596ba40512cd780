"""The one inference path: run a model over images and return softmax class probabilities.

Every evaluation in the project goes through :func:`_forward_pass` (no gradients, softmax in
float32, probabilities returned as float64):

* :func:`evaluate_model` over a loader of ``(images, labels)`` batches (mean loss too);
* :func:`evaluate_on` over an :class:`~consilia.common.data.images.ImageData` with the run's
  evaluation preprocessing (the site trainer, the coordinator's test set, the baselines);
* :func:`predict_proba` over a plain stack of images (cross-site matrices, reports).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from consilia.common.config import TaskSpec, TrainConfig
from consilia.common.data.array_dataset import ImageArrayDataset
from consilia.common.data.images import ImageData
from consilia.common.data.loaders import make_loader
from consilia.common.data.transforms import ImageTransform, build_eval_transform, identity
from consilia.common.training.losses import build_loss

__all__ = [
    "EvalResult",
    "eval_dataset",
    "eval_loader",
    "eval_transform_for",
    "evaluate_model",
    "evaluate_on",
    "predict_proba",
]


@dataclass
class EvalResult:
    """Outcome of evaluation: mean loss plus labels and class probabilities."""

    loss: float
    y_true: np.ndarray
    y_prob: np.ndarray

    @property
    def num_examples(self) -> int:
        """Number of evaluated samples."""
        return int(self.y_true.shape[0])


@dataclass
class _PassOutputs:
    """What one forward pass over a sequence of batches collected."""

    probs: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    loss_sum: float = 0.0
    seen: int = 0


def _logits(output: Any) -> torch.Tensor:
    """Model output -> logits (MONAI's ViT returns ``(logits, hidden_states)``)."""
    if isinstance(output, tuple | list):
        output = output[0]
    return output


@torch.no_grad()
def _forward_pass(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    loss_fn: nn.Module | None = None,
    device: torch.device | None = None,
) -> _PassOutputs:
    """Run ``model`` over ``batches`` (the model's train/eval mode is left to the caller).

    Each batch is ``(images, labels or None)``; images are moved to ``device`` when given.
    The loss (summed per sample) is computed only with ``loss_fn`` and labels.
    """
    out = _PassOutputs()
    for images, labels in batches:
        if device is not None:
            images = images.to(device)
        logits = _logits(model(images))
        count = int(images.shape[0])
        if labels is not None:
            if loss_fn is not None:
                out.loss_sum += float(loss_fn(logits, labels)) * count
            out.labels.append(labels.cpu().numpy())
        out.seen += count
        out.probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return out


def evaluate_model(model: nn.Module, loader: DataLoader, loss_fn: nn.Module) -> EvalResult:
    """Evaluate ``model`` (switched to eval mode): mean loss, true labels, probabilities.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``(B, C)``.
    loader : DataLoader
        Yields ``(images, labels)`` batches already in model space.
    loss_fn : nn.Module
        Loss whose per-batch mean is weighted by the batch size.

    Returns
    -------
    EvalResult
        Mean loss, ``int64`` labels and ``float64`` probabilities.

    Raises
    ------
    ValueError
        If the loader yields no samples.

    """
    model.eval()
    result = _forward_pass(model, loader, loss_fn)
    if result.seen == 0:
        raise ValueError("evaluation set is empty")
    return EvalResult(
        loss=result.loss_sum / result.seen,
        y_true=np.concatenate(result.labels).astype(np.int64),
        y_prob=np.concatenate(result.probs).astype(np.float64),
    )


def eval_dataset(data: ImageData, train: TrainConfig, task: TaskSpec) -> ImageArrayDataset:
    """Return ``data`` as a dataset with the run's evaluation preprocessing (no augmentation)."""
    transform = build_eval_transform(train.preprocess, task.image_size)
    return ImageArrayDataset(data.images, data.labels, transform=transform)


def eval_loader(
    data: ImageData, train: TrainConfig, task: TaskSpec, batch_size: int
) -> DataLoader:
    """Return an unshuffled loader of ``data`` with evaluation preprocessing (no augmentation)."""
    return make_loader(eval_dataset(data, train, task), batch_size, shuffle=False, seed=0)


def evaluate_on(
    model: nn.Module, data: ImageData, train: TrainConfig, task: TaskSpec, batch_size: int = 256
) -> EvalResult:
    """Evaluate ``model`` on ``data`` with the run's evaluation preprocessing and loss.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits.
    data : ImageData
        Images and labels to evaluate on.
    train : TrainConfig
        Supplies the preprocessing, the loss and the focal ``gamma`` (no class weights).
    task : TaskSpec
        Supplies the image size and the number of classes.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    EvalResult

    """
    loader = eval_loader(data, train, task, batch_size)
    loss_fn = build_loss(train.loss, task.num_classes, None, train.focal_gamma)
    return evaluate_model(model, loader, loss_fn)


def eval_transform_for(run_config: Any) -> ImageTransform | None:
    """Return the run's evaluation transform (resize + preprocessing), or ``None`` if none.

    Uses :func:`consilia.common.data.transforms.build_eval_transform` with
    ``run_config.train.preprocess`` and ``run_config.task.image_size``.
    """
    task = getattr(run_config, "task", None)
    size = task.image_size if task is not None else None
    transform = build_eval_transform(run_config.train.preprocess, size)
    return None if transform is identity else transform


def _image_batches(
    x: torch.Tensor, batch_size: int, transform: ImageTransform | None
) -> Iterator[tuple[torch.Tensor, None]]:
    """Yield ``(float batch in model space, None)`` slices of the image stack ``x``."""
    for start in range(0, x.shape[0], batch_size):
        batch = x[start:start + batch_size]
        batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        if transform is not None:
            batch = torch.stack([transform(img) for img in batch])
        yield batch, None


def predict_proba(
    model: nn.Module,
    images: Any,
    batch_size: int = 256,
    transform: ImageTransform | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Softmax class probabilities of ``model`` on a stack of images.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``(B, C)``; run in eval mode without gradients (its
        previous train/eval mode is restored afterwards).
    images : array-like or Tensor, shape (N, C, H, W)
        ``uint8`` (scaled to [0, 1] by /255, as in training) or float already in model space.
    batch_size : int
        Images per forward pass.
    transform : callable, optional
        Per-image ``(C, H, W)`` float transform applied before the model (the run's eval
        transform, see :func:`eval_transform_for`).
    device : str or torch.device, optional
        Defaults to the device of the model's parameters.

    Returns
    -------
    np.ndarray
        ``(N, C)`` float64 probabilities.

    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        result = _forward_pass(
            model, _image_batches(x, batch_size, transform), device=torch.device(device)
        )
    finally:
        model.train(was_training)
    if not result.probs:
        raise ValueError("predict_proba: no images given")
    return np.concatenate(result.probs).astype(np.float64)
