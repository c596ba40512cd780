"""Seeded data loaders: shuffling and per-worker augmentation streams follow one seed."""

from __future__ import annotations

import torch
from monai.transforms import Randomizable
from monai.utils import MAX_SEED
from torch.utils.data import DataLoader, Dataset, get_worker_info

__all__ = ["make_loader"]


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream (derived from the loader seed)."""
    info = get_worker_info()
    if info is None:
        return
    dataset = info.dataset
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # e.g. torch.utils.data.Subset
    transform = getattr(dataset, "transform", None)
    if isinstance(transform, Randomizable):
        transform.set_random_state(seed=info.seed % MAX_SEED)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0
) -> DataLoader:
    """Build a :class:`~torch.utils.data.DataLoader` whose shuffling is reproducible.

    Parameters
    ----------
    dataset : Dataset
        Map-style dataset (e.g. :class:`ImageArrayDataset`).
    batch_size : int
        Samples per batch (>= 1).
    shuffle : bool
        Reshuffle every epoch (the order depends only on ``seed`` and the epoch).
    seed : int
        Seeds the loader's own ``torch.Generator``; with workers, each worker's augmentation
        stream is reseeded from it too.
    num_workers : int
        Loader worker processes (0 = load in the calling process).

    Returns
    -------
    DataLoader

    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )
