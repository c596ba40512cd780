"""Tests for consilia.common.data.loaders (seeded shuffling and per-worker augmentation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consilia.common.config import AugmentationConfig, PreprocessConfig
from consilia.common.data.array_dataset import ImageArrayDataset
from consilia.common.data.loaders import make_loader
from consilia.common.data.transforms import build_train_transform

ALL_ON = AugmentationConfig(enabled=True, prob=1.0, elastic=True, bias_field=True)


def _labels_in_order(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_loader_shuffle_is_seeded() -> None:
    images = np.zeros((20, 1, 4, 4), dtype=np.uint8)
    ds = ImageArrayDataset(images, np.arange(20))
    first = _labels_in_order(make_loader(ds, 4, shuffle=True, seed=3))
    assert first == _labels_in_order(make_loader(ds, 4, shuffle=True, seed=3))
    assert first != _labels_in_order(make_loader(ds, 4, shuffle=True, seed=4))
    assert sorted(first) == list(range(20))
    assert _labels_in_order(make_loader(ds, 4, shuffle=False, seed=3)) == list(range(20))
    xb, yb = next(iter(make_loader(ds, 4, shuffle=False, seed=0)))
    assert xb.shape == (4, 1, 4, 4) and yb.dtype == torch.int64
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, shuffle=True, seed=0)


def test_loader_augmentation_reproducible_and_distinct_per_worker() -> None:
    images = np.full((4, 1, 16, 16), 128, dtype=np.uint8)
    images[:, :, 4:12, 2:6] = 250

    def batches(num_workers: int) -> list[torch.Tensor]:
        transform = build_train_transform(ALL_ON, PreprocessConfig(), None, seed=0)
        ds = ImageArrayDataset(images, np.zeros(4, dtype=np.int64), transform)
        subset = torch.utils.data.Subset(ds, [0, 1, 2, 3])  # workers find the transform inside
        loader = make_loader(subset, 1, shuffle=False, seed=11, num_workers=num_workers)
        return [x for x, _ in loader]

    serial = batches(0)
    assert all(torch.equal(a, b) for a, b in zip(serial, batches(0), strict=True))
    parallel = batches(2)
    assert all(torch.equal(a, b) for a, b in zip(parallel, batches(2), strict=True))
    # batch 0 comes from worker 0, batch 1 from worker 1: same input, different streams
    assert not torch.equal(parallel[0], parallel[1])
