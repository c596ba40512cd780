"""Optimizer factory for the names allowed in :class:`~consilia.common.config.TrainConfig`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

__all__ = ["OPTIMIZERS", "build_optimizer"]

OptimizerName = Literal["sgd", "adam", "rmsprop"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "rmsprop")


def build_optimizer(
    name: OptimizerName,
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Build a torch optimizer.

    Parameters
    ----------
    name : {"sgd", "adam", "rmsprop"}
        ``sgd`` and ``rmsprop`` use ``momentum``; ``adam`` ignores it (its betas are the
        torch defaults).
    params : iterable
        Model parameters or parameter groups.
    lr : float
        Learning rate (> 0).
    momentum : float
        Momentum for SGD / RMSprop, in ``[0, 1)``.
    weight_decay : float
        L2 penalty (>= 0), as in torch (coupled, not AdamW's decoupled decay).

    Returns
    -------
    torch.optim.Optimizer

    Raises
    ------
    ValueError
        On an unknown name or an out-of-range hyper-parameter.

    """
    if lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"train.momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"train.weight_decay must be >= 0, got {weight_decay}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; allowed: {', '.join(OPTIMIZERS)}")
