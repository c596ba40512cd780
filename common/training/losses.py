"""Classification losses on ``(logits (N, C), targets (N,) int64)``, optionally class-weighted.

Every loss is a per-sample loss averaged over the batch: ``mean_i(w[y_i] * l_i)`` for
cross-entropy and focal loss, ``mean_i(mean_k(w[k] * l_ik))`` for one-hot BCE. Weighted
losses are therefore divided by the batch size ``N``, *not* by ``sum_i w[y_i]`` as
:class:`torch.nn.CrossEntropyLoss` does. That is what Opacus assumes with
``loss_reduction="mean"``: the batch loss and the per-sample losses agree in every
grad-sample mode. Each module also honours ``reduction`` in ``{"mean", "sum", "none"}``
(Opacus ghost clipping switches it to ``"none"`` to get per-sample losses ``(N,)``). No
in-place operations touch the autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from consilia.common.registry import Registry, UnknownNameError

__all__ = [
    "LOSSES",
    "BCEOneHotLoss",
    "ClassificationLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LossFactory",
    "build_loss",
    "class_weights_from_counts",
]

LossName = Literal["cross_entropy", "bce", "focal"]
_REDUCTIONS = ("mean", "sum", "none")


def class_weights_from_counts(class_counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency class weights, normalised to mean 1 over the classes present.

    Classes with zero count get weight 1 (neutral: they have no samples to up-weight, and
    for one-hot BCE the weight also scales that class's negatives).

    Parameters
    ----------
    class_counts : np.ndarray
        Number of training samples per class, shape ``(C,)``.

    Returns
    -------
    np.ndarray
        float64 weights ``(C,)``; e.g. counts ``[10, 30]`` give ``[1.5, 0.5]``.

    Raises
    ------
    ValueError
        If counts are not 1-D, negative, non-finite or all zero.

    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"class_counts must be 1-D with one entry per class, got {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"class_counts must be non-negative counts, got {counts.tolist()}")
    present = counts > 0
    if not present.any():
        raise ValueError("class_counts are all zero: no training samples to weight")
    weights = np.ones_like(counts)
    inverse = 1.0 / counts[present]
    weights[present] = inverse / inverse.mean()
    return weights


class ClassificationLoss(nn.Module):
    """Base class: subclasses return per-sample losses ``(N,)``; this applies ``reduction``.

    Parameters
    ----------
    num_classes : int
        Number of logit columns ``C``.
    weight : torch.Tensor, optional
        Per-class weights ``(C,)`` (a buffer: moves with ``.to(device)``).
    reduction : {"mean", "sum", "none"}
        How per-sample losses are combined.

    """

    weight: torch.Tensor | None

    def __init__(
        self, num_classes: int, weight: torch.Tensor | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.num_classes = num_classes
        self.reduction = reduction
        self.register_buffer("weight", weight)

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the loss of each sample, shape ``(N,)``."""
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits (N, C)`` against class indices ``targets (N,)``."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: logits must be (N, {self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        if targets.shape != logits.shape[:1]:
            raise ValueError(
                f"{type(self).__name__}: targets must be class indices (N,) = "
                f"{tuple(logits.shape[:1])}, got {tuple(targets.shape)}"
            )
        losses = self.per_sample(logits, targets.long())
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses

    def _one_hot(self, targets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(targets, self.num_classes).to(like.dtype)


class CrossEntropyLoss(ClassificationLoss):
    """Softmax cross-entropy; weighted per-sample by ``weight[y]``."""

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return ``weight[y_i] * CE_i``, shape ``(N,)``."""
        return F.cross_entropy(logits, targets, weight=self.weight, reduction="none")


class BCEOneHotLoss(ClassificationLoss):
    """Binary cross-entropy with logits on one-hot targets (one sigmoid per class).

    The per-sample loss is the mean over classes of ``weight[k] * BCE_ik``, so the batch
    mean equals :class:`torch.nn.BCEWithLogitsLoss` with ``weight`` over ``(N, C)``.
    """

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the class-averaged BCE of each sample, shape ``(N,)``."""
        weight = None if self.weight is None else self.weight.unsqueeze(0)
        losses = F.binary_cross_entropy_with_logits(
            logits, self._one_hot(targets, logits), weight=weight, reduction="none"
        )
        return losses.mean(dim=1)


class FocalLoss(ClassificationLoss):
    """Softmax focal loss ``-w[y] (1 - p_y)^gamma log p_y`` (Lin et al., 2017).

    Computed here rather than with MONAI's ``FocalLoss`` for two measured reasons: MONAI's
    ``reduction="mean"`` also averages over the classes (so ``gamma = 0`` gives CE / C),
    and for ``0 < gamma < 1`` its ``(1 - p) ** gamma`` has an infinite derivative where a
    confident prediction rounds ``p`` to 1, which turns the whole gradient into NaN. Here
    ``1 - p`` is ``-expm1(log p)`` floored at the smallest normal float, so ``gamma = 0``
    is exactly the cross-entropy and every ``gamma >= 0`` has finite gradients. The tests
    check it against MONAI's ``FocalLoss`` for ``gamma = 2``.

    Parameters
    ----------
    num_classes : int
        Number of logit columns.
    gamma : float
        Focusing parameter (>= 0).
    weight : torch.Tensor, optional
        Per-class weights ``(C,)``.
    reduction : {"mean", "sum", "none"}
        How per-sample losses are combined.

    """

    def __init__(
        self,
        num_classes: int,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, weight, reduction)
        if gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return ``weight[y_i] * FL_i``, shape ``(N,)``."""
        log_p = F.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
        one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
        losses = -(one_minus_p**self.gamma) * log_p
        if self.weight is not None:
            losses = losses * self.weight.to(losses.dtype)[targets]
        return losses


#: ``factory(num_classes, class weights or None, focal_gamma) -> loss module``.
LossFactory = Callable[[int, torch.Tensor | None, float], nn.Module]

#: The losses ``TrainConfig.loss`` allows, by name.
LOSSES: Registry[LossFactory] = Registry("loss")


def _cross_entropy(num_classes: int, weight: torch.Tensor | None, gamma: float) -> nn.Module:
    return CrossEntropyLoss(num_classes, weight)


def _bce(num_classes: int, weight: torch.Tensor | None, gamma: float) -> nn.Module:
    return BCEOneHotLoss(num_classes, weight)


def _focal(num_classes: int, weight: torch.Tensor | None, gamma: float) -> nn.Module:
    return FocalLoss(num_classes, gamma, weight)


LOSSES.register("cross_entropy", _cross_entropy)
LOSSES.register("bce", _bce)
LOSSES.register("focal", _focal)


def build_loss(
    loss: LossName,
    num_classes: int,
    class_counts: np.ndarray | None = None,
    focal_gamma: float = 2.0,
) -> nn.Module:
    """Build the training loss named in :class:`~consilia.common.config.TrainConfig`.

    Parameters
    ----------
    loss : {"cross_entropy", "bce", "focal"}
        Softmax cross-entropy, one-hot BCE with logits, or softmax focal loss.
    num_classes : int
        Number of classes ``C`` (>= 2).
    class_counts : np.ndarray, optional
        Per-class training sample counts ``(C,)``; given → inverse-frequency weights
        normalised to mean 1 (:func:`class_weights_from_counts`); ``None`` → unweighted.
    focal_gamma : float
        Focusing parameter of the focal loss (ignored by the others).

    Returns
    -------
    nn.Module
        ``module(logits (N, C), targets (N,) int64) -> scalar`` (mean over the batch).

    Raises
    ------
    ValueError
        On an unknown name, ``num_classes < 2``, or counts of the wrong length.

    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    weight: torch.Tensor | None = None
    if class_counts is not None:
        counts = np.asarray(class_counts)
        if counts.shape != (num_classes,):
            raise ValueError(
                f"class_counts has shape {counts.shape}, expected ({num_classes},): one count "
                "per class in task.class_names order"
            )
        weight = torch.as_tensor(class_weights_from_counts(counts), dtype=torch.float32)
    try:
        factory = LOSSES.get(loss)
    except UnknownNameError as err:
        raise ValueError(str(err)) from None
    return factory(num_classes, weight, focal_gamma)
