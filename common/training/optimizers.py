"""Optimizers by name: the :data:`OPTIMIZERS` registry behind ``TrainConfig.optimizer``.

Each entry is a factory ``(params, lr, momentum, weight_decay) -> torch.optim.Optimizer``;
the names are those :class:`~consilia.common.config.TrainConfig` allows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

from consilia.common.registry import Registry, UnknownNameError

__all__ = ["OPTIMIZERS", "OptimizerFactory", "build_optimizer"]

OptimizerName = Literal["sgd", "adam", "rmsprop"]
Params = Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]
#: ``factory(params, lr, momentum, weight_decay) -> optimizer``.
OptimizerFactory = Callable[[Params, float, float, float], torch.optim.Optimizer]

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


def _sgd(params: Params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adam(params: Params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)  # betas: torch defaults


def _rmsprop(
    params: Params, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS.register("sgd", _sgd)
OPTIMIZERS.register("adam", _adam)
OPTIMIZERS.register("rmsprop", _rmsprop)


def build_optimizer(
    name: OptimizerName,
    params: Params,
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
    try:
        factory = OPTIMIZERS.get(name)
    except UnknownNameError as err:
        raise ValueError(str(err)) from None
    return factory(params, lr, momentum, weight_decay)
