"""Plain PyTorch training and evaluation loops (no Flower, no DP specifics).

Used identically by the site trainer, the centralized baseline and the local-only baselines,
so every number in a comparison comes from the same code.
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
    "EvalResult",
    "TrainResult",
    "evaluate_model",
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
                objective = loss + proximal_term(model.parameters(), global_params, proximal_mu)
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


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, loss_fn: nn.Module) -> EvalResult:
    """Evaluate ``model``: mean loss, true labels and softmax probabilities."""
    model.eval()
    losses, labels_all, probs_all = 0.0, [], []
    seen = 0
    for images, labels in loader:
        logits = model(images)
        losses += float(loss_fn(logits, labels)) * int(labels.shape[0])
        seen += int(labels.shape[0])
        probs_all.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels_all.append(labels.cpu().numpy())
    if seen == 0:
        raise ValueError("evaluation set is empty")
    return EvalResult(
        loss=losses / seen,
        y_true=np.concatenate(labels_all).astype(np.int64),
        y_prob=np.concatenate(probs_all).astype(np.float64),
    )
