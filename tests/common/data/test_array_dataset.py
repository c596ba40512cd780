"""Tests for consilia.common.data.array_dataset (the in-memory dataset and its fast paths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consilia.common.config import AugmentationConfig, PreprocessConfig
from consilia.common.data.array_dataset import ImageArrayDataset
from consilia.common.data.transforms import (
    ImagePipeline,
    build_eval_transform,
    build_train_transform,
)

ALL_ON = AugmentationConfig(enabled=True, prob=1.0, elastic=True, bias_field=True)


def test_dataset_fast_path() -> None:
    images = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    labels = np.array([1, 0], dtype=np.int32)
    ds = ImageArrayDataset(images, labels)
    assert len(ds) == 2
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, [1, 0])
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (1, 4, 4)
    torch.testing.assert_close(x, torch.from_numpy(images[1]).float() / 255)
    assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == 0


def test_dataset_with_deterministic_transform_precomputes_once() -> None:
    images = np.full((3, 1, 8, 8), 255, dtype=np.uint8)
    transform = build_eval_transform(PreprocessConfig(), 4)
    ds = ImageArrayDataset(images, np.array([0, 1, 2]), transform)
    x, y = ds[2]
    assert x.shape == (1, 4, 4)
    torch.testing.assert_close(x, torch.ones(1, 4, 4))
    assert int(y) == 2
    assert ds.transform is transform

    calls = []

    def counting(image: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return transform(image)

    pipeline = ImagePipeline([counting], deterministic=True)
    ds = ImageArrayDataset(images, np.array([0, 1, 2]), pipeline)
    _ = [ds[i] for i in range(3)] + [ds[i] for i in range(3)]
    assert len(calls) == 3  # once per image, at construction


def test_dataset_with_random_transform_runs_per_sample() -> None:
    images = np.full((2, 1, 8, 8), 200, dtype=np.uint8)
    transform = build_train_transform(ALL_ON, PreprocessConfig(), 6, seed=0)
    ds = ImageArrayDataset(images, np.array([0, 1]), transform)
    first, second = ds[0][0], ds[0][0]
    assert first.shape == (1, 6, 6)
    assert not torch.equal(first, second)  # a fresh augmentation on every access


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((2, 1, 4, 4), dtype=np.float32), np.array([0, 1]), "uint8"),
        (np.zeros((2, 4, 4), dtype=np.uint8), np.array([0, 1]), "channel axis"),
        (np.zeros((2, 1, 4, 4), dtype=np.uint8), np.array([0.0, 1.0]), "integer"),
        (np.zeros((2, 1, 4, 4), dtype=np.uint8), np.array([0, 1, 1]), "2 images but 3"),
    ],
)
def test_dataset_validation(images, labels, match) -> None:
    with pytest.raises(ValueError, match=match):
        ImageArrayDataset(images, labels)
