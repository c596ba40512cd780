"""A seeded synthetic dataset with learnable class-dependent patterns, registered as ``synthetic``.

Each class puts a bright Gaussian blob at its own position on a circle around the image
centre; samples jitter the position, brightness and width and add background noise. A small
CNN separates the classes within one epoch, which makes it the dataset of choice for fast
tests of the whole pipeline. It needs no files.
"""

from __future__ import annotations

import numpy as np

from consilia.common.config import DataConfig
from consilia.common.data.datasets.base import (
    DATASETS,
    DatasetBundle,
    split_fractions_text,
    stratified_split,
)
from consilia.common.data.images import ImageData

__all__ = [
    "SYNTHETIC_CHANNELS",
    "SYNTHETIC_NUM_CLASSES",
    "SYNTHETIC_SAMPLES",
    "SYNTHETIC_SIZE",
    "load_synthetic",
    "make_synthetic",
]

SYNTHETIC_NUM_CLASSES = 3
SYNTHETIC_CHANNELS = 1
SYNTHETIC_SIZE = 28
SYNTHETIC_SAMPLES = 600


def make_synthetic(
    num_samples: int = SYNTHETIC_SAMPLES,
    num_classes: int = SYNTHETIC_NUM_CLASSES,
    channels: int = SYNTHETIC_CHANNELS,
    size: int = SYNTHETIC_SIZE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate blob images whose position depends on the class.

    Parameters
    ----------
    num_samples : int
        Number of images; classes are balanced (round-robin) and then shuffled.
    num_classes : int
        Number of classes (blob positions).
    channels : int
        Channels per image; with several channels each class also has its own colour.
    size : int
        Image side length in pixels (at least 8).
    seed : int
        Seed; the same arguments give identical arrays.

    Returns
    -------
    tuple of np.ndarray
        ``images`` uint8 ``(N, C, size, size)`` and ``labels`` int64 ``(N,)``.

    """
    if num_classes < 2 or num_samples < num_classes or size < 8 or channels < 1:
        raise ValueError(
            "make_synthetic needs num_classes >= 2, num_samples >= num_classes, size >= 8 "
            f"and channels >= 1; got {num_classes}, {num_samples}, {size}, {channels}"
        )
    rng = np.random.default_rng(seed % 2**63)
    labels = rng.permutation(np.arange(num_samples) % num_classes).astype(np.int64)

    angles = 2 * np.pi * np.arange(num_classes) / num_classes
    radius = 0.27 * size
    centre = (size - 1) / 2
    cy = centre + radius * np.sin(angles[labels]) + rng.normal(0, size / 32, num_samples)
    cx = centre + radius * np.cos(angles[labels]) + rng.normal(0, size / 32, num_samples)
    sigma = size / 9 * rng.uniform(0.8, 1.2, num_samples)
    amplitude = rng.uniform(0.6, 0.9, num_samples)

    grid = np.arange(size, dtype=np.float32)
    dy = (grid[None, :] - cy[:, None]) ** 2  # (N, H)
    dx = (grid[None, :] - cx[:, None]) ** 2  # (N, W)
    blob = np.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma[:, None, None] ** 2))
    blob = (amplitude[:, None, None] * blob).astype(np.float32)

    colour = 0.5 + 0.5 * np.cos(angles[:, None] + np.arange(channels)[None, :] * 2.1)
    if channels == 1:
        colour = np.ones((num_classes, 1))
    images = blob[:, None] * colour[labels][:, :, None, None].astype(np.float32)
    images += 0.1 + rng.normal(0, 0.05, images.shape).astype(np.float32)
    images = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    return images, labels


def load_synthetic(cfg: DataConfig, seed: int) -> DatasetBundle:
    """Generate the synthetic dataset and split it (seeded, stratified).

    Parameters
    ----------
    cfg : DataConfig
        ``max_samples`` (total images, default 600), ``image_size`` (default 28),
        ``val_fraction`` and ``test_fraction``.
    seed : int
        Seed of the images and of the split.

    Returns
    -------
    DatasetBundle
        3 classes, 1 channel.

    """
    size = cfg.image_size or SYNTHETIC_SIZE
    total = cfg.max_samples or SYNTHETIC_SAMPLES
    images, labels = make_synthetic(total, SYNTHETIC_NUM_CLASSES, SYNTHETIC_CHANNELS, size, seed)
    full = ImageData(images, labels)
    train_idx, val_idx, test_idx = stratified_split(
        labels, cfg.val_fraction, cfg.test_fraction, seed
    )
    fractions = split_fractions_text(cfg.val_fraction, cfg.test_fraction)
    return DatasetBundle(
        name="synthetic",
        class_names=[f"pattern-{k}" for k in range(SYNTHETIC_NUM_CLASSES)],
        train=full.subset(train_idx),
        val=full.subset(val_idx) if len(val_idx) else None,
        test=full.subset(test_idx),
        in_channels=SYNTHETIC_CHANNELS,
        image_size=size,
        official_split=False,
        split_note=(
            f"seeded stratified {fractions} split (seed {seed}) of {total} generated images"
        ),
        source=None,
    )


DATASETS.register("synthetic", load_synthetic)
