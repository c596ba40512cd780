"""Test kit for the evaluation tests: binary scores with a known AUC and toy image models."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FixedThresholdModel", "binary_scores", "intensity_site"]


def binary_scores(rng: np.random.Generator, n_per_class: int, d: float):
    """Negatives ~ N(0, 1), positives ~ N(d, 1): the true AUC is Phi(d / sqrt(2))."""
    neg = rng.normal(0.0, 1.0, n_per_class)
    pos = rng.normal(d, 1.0, n_per_class)
    y = np.r_[np.zeros(n_per_class, int), np.ones(n_per_class, int)]
    score = 1.0 / (1.0 + np.exp(-np.r_[neg, pos]))  # monotone: same AUC as the raw scores
    return y, np.stack([1 - score, score], axis=1)


class FixedThresholdModel(torch.nn.Module):
    """Predicts class 1 iff the mean intensity is above a threshold."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([self.threshold - m, m - self.threshold], dim=1) * 50 + self.dummy


def intensity_site(rng: np.random.Generator, n: int, low: int, high: int):
    """Binary site whose class-1 images have intensity ``high`` and class-0 ``low``."""
    labels = rng.integers(0, 2, n)
    level = np.where(labels == 1, high, low)
    images = np.broadcast_to(level[:, None, None, None], (n, 1, 4, 4)).astype(np.uint8)
    return images.copy(), labels
