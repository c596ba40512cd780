"""Plain PyTorch training loop and its helpers (no Flower, no DP specifics).

Used identically by the site trainer, the centralized baseline and the local-only baselines,
so every number in a comparison comes from the same code. Evaluation and prediction live in
:mod:`consilia.common.training.inference`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = [
    "TrainResult",
    "proximal_term",
    "seed_everything",
    "snapshot_params",
    "train_epochs",
]


@dataclass
class TrainResult:
    """Outcome of local training.

    Attributes
    ----------
    loss : float
        Mean per-sample training loss over all epochs (task loss, without the proximal term).
    num_examples : int
        Number of training *samples* (``len(dataset)``), never the number of batches.
    steps : int
        Optimizer steps taken.
    seconds : float
        Wall time.
    """

    loss: float
    num_examples: int
    steps: int
    seconds: float


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU runs are then bit-reproducible)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def snapshot_params(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of the trainable parameters (the FedProx anchor ``w_global``)."""
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Sequence[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx proximal term ``(mu / 2) * sum_i ||w_i - w_global_i||^2`` (squared norm).

    Flower's FedProx docstring uses the plain (non-squared) norm and a generator that is
    exhausted after one batch; this is the formulation of Li et al. (2020).
    """
    trainable = [p for p in params if p.requires_grad]
    if len(trainable) != len(global_params):
        raise ValueError(
            f"proximal term: {len(trainable)} parameters vs {len(global_params)} anchors"
        )
    total = torch.zeros((), device=trainable[0].device if trainable else "cpu")
    for w, g in zip(trainable, global_params, strict=True):
        total = total + (w - g).pow(2).sum()
    return 0.5 * mu * total


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    epochs: int,
    proximal_mu: float = 0.0,
    global_params: Sequence[torch.Tensor] | None = None,
    num_examples: int | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``epochs`` epochs.

    Parameters
    ----------
    model, loader, optimizer, loss_fn
        The usual torch objects (they may be Opacus-wrapped).
    epochs : int
        Local epochs.
    proximal_mu : float
        FedProx ``mu``; 0 disables the term. The term is added to the optimised loss.
    global_params : sequence of Tensor, optional
        Detached global weights (required when ``proximal_mu > 0``).
    num_examples : int, optional
        Samples in the training set; defaults to ``len(loader.dataset)``.
    on_epoch_end : callable, optional
        ``f(epoch, mean_loss)`` progress callback.
    """
    if proximal_mu > 0 and global_params is None:
        raise ValueError("proximal_mu > 0 needs global_params (use snapshot_params)")
    anchors: Sequence[torch.Tensor] = global_params if global_params is not None else ()
    start = time.perf_counter()
    model.train()
    total_loss, total_seen, steps = 0.0, 0, 0
    for epoch in range(epochs):
        epoch_loss, epoch_seen = 0.0, 0
        for images, labels in loader:
            if images.shape[0] == 0:  # Poisson sampling can yield empty batches
                continue
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = loss_fn(logits, labels)
            objective = loss
            if proximal_mu > 0:
                objective = loss + proximal_term(model.parameters(), anchors, proximal_mu)
            objective.backward()
            optimizer.step()
            steps += 1
            batch = int(labels.shape[0])
            epoch_loss += float(loss.detach()) * batch
            epoch_seen += batch
        total_loss += epoch_loss
        total_seen += epoch_seen
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch_loss / max(epoch_seen, 1))
    n = num_examples if num_examples is not None else len(loader.dataset)  # type: ignore[arg-type]
    return TrainResult(
        loss=total_loss / max(total_seen, 1),
        num_examples=int(n),
        steps=steps,
        seconds=time.perf_counter() - start,
    )
