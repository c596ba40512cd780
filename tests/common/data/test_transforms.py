"""Tests for consilia.common.data.transforms (pipelines, in-memory dataset, seeded loaders)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, get_track_meta

from consilia.common.config import AugmentationConfig, PreprocessConfig
from consilia.common.data.transforms import (
    ImageArrayDataset,
    ImagePipeline,
    LowFrequencyBiasCorrection,
    build_eval_transform,
    build_train_transform,
    identity,
    make_loader,
)

ALL_ON = AugmentationConfig(enabled=True, prob=1.0, elastic=True, bias_field=True)
ONLY_NOTHING = dict(
    flip=False, rotate_degrees=0.0, zoom=0.0, shift=0.0, noise_std=0.0, contrast_gamma=(1.0, 1.0)
)


def _image(channels: int = 1, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(channels, height, width, generator=gen)


def _only(**on: object) -> AugmentationConfig:
    return AugmentationConfig(enabled=True, prob=1.0, **{**ONLY_NOTHING, **on})


def test_nothing_configured_is_identity() -> None:
    assert build_train_transform(AugmentationConfig(), PreprocessConfig(), None, 0) is identity
    assert build_eval_transform(PreprocessConfig(), None) is identity
    # enabled but every transform switched off (or prob 0) is still free
    assert build_train_transform(_only(), PreprocessConfig(), None, 0) is identity
    zero_p = AugmentationConfig(enabled=True, prob=0.0)
    assert build_train_transform(zero_p, PreprocessConfig(), None, 0) is identity
    x = _image()
    assert identity(x) is x


@pytest.mark.parametrize("channels", [1, 3])
def test_train_output_shape_dtype_range(channels: int) -> None:
    transform = build_train_transform(ALL_ON, PreprocessConfig(), image_size=24, seed=0)
    for seed in range(5):
        out = transform(_image(channels, 40, 50, seed))
        assert type(out) is torch.Tensor and not isinstance(out, MetaTensor)
        assert out.shape == (channels, 24, 24) and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert get_track_meta()  # the global MONAI flag is restored after each call


def test_pipelines_pickle_for_spawned_workers() -> None:
    pre = PreprocessConfig(normalize="zscore", smooth_sigma=1.0, bias_field_correction=True)
    transform = build_train_transform(ALL_ON, pre, 16, seed=5)
    clone = pickle.loads(pickle.dumps(transform))
    x = _image()
    assert torch.equal(clone(x), transform(x))


def test_eval_resize_only() -> None:
    transform = build_eval_transform(PreprocessConfig(), image_size=16)
    out = transform(torch.full((1, 32, 32), 0.25))
    assert out.shape == (1, 16, 16)
    torch.testing.assert_close(out, torch.full((1, 16, 16), 0.25))


def test_same_seed_same_augmentations_different_seed_differs() -> None:
    images = [_image(seed=s) for s in range(6)]
    a = build_train_transform(ALL_ON, PreprocessConfig(), 32, seed=7)
    b = build_train_transform(ALL_ON, PreprocessConfig(), 32, seed=7)
    c = build_train_transform(ALL_ON, PreprocessConfig(), 32, seed=8)
    out_a = [a(x) for x in images]
    out_b = [b(x) for x in images]
    out_c = [c(x) for x in images]
    assert all(torch.equal(p, q) for p, q in zip(out_a, out_b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(out_a, out_c, strict=True))
    # reseeding replays the stream
    assert isinstance(a, ImagePipeline)
    a.set_random_state(seed=7)
    assert torch.equal(a(images[0]), out_a[0])


@pytest.mark.parametrize(
    "on",
    [
        {"rotate_degrees": 30.0},
        {"zoom": 0.3},
        {"shift": 0.2},
        {"noise_std": 0.1},
        {"contrast_gamma": (0.5, 0.6)},
        {"elastic": True},
        {"bias_field": True},
    ],
    ids=lambda d: next(iter(d)),
)
def test_each_augmentation_changes_the_image(on: dict) -> None:
    x = _image(height=32, width=32)
    transform = build_train_transform(_only(**on), PreprocessConfig(), None, seed=0)
    out = transform(x)
    assert out.shape == x.shape
    assert (out - x).abs().max() > 1e-3


def test_flip_is_horizontal() -> None:
    x = _image()
    transform = build_train_transform(_only(flip=True), PreprocessConfig(), None, seed=0)
    assert torch.equal(transform(x), torch.flip(x, dims=[2]))


def test_invalid_contrast_gamma() -> None:
    aug = AugmentationConfig(enabled=True, contrast_gamma=(1.2, 0.8))
    with pytest.raises(ValueError, match="contrast_gamma"):
        build_train_transform(aug, PreprocessConfig(), None, 0)


def test_pipeline_rejects_images_without_channel_axis() -> None:
    transform = build_eval_transform(PreprocessConfig(normalize="zscore"), None)
    with pytest.raises(ValueError, match="channel axis"):
        transform(torch.rand(32, 32))


def test_zscore_minmax_histogram() -> None:
    x = _image(channels=3) * 0.5 + 0.2
    z = build_eval_transform(PreprocessConfig(normalize="zscore"), None)(x)
    torch.testing.assert_close(z.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(1, 2), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    m = build_eval_transform(PreprocessConfig(normalize="minmax"), None)(x)
    torch.testing.assert_close(m.amin(dim=(1, 2)), torch.zeros(3))
    torch.testing.assert_close(m.amax(dim=(1, 2)), torch.ones(3))
    h = build_eval_transform(PreprocessConfig(normalize="histogram"), None)(x * 0.3)
    assert h.min() >= 0 and h.max() <= 1 and h.max() > 0.9  # contrast stretched to [0, 1]


def test_train_applies_the_same_preprocessing_as_eval() -> None:
    pre = PreprocessConfig(normalize="zscore", smooth_sigma=1.0)
    train = build_train_transform(AugmentationConfig(), pre, 16, seed=0)
    evaluate = build_eval_transform(pre, 16)
    x = _image()
    torch.testing.assert_close(train(x), evaluate(x))


def test_smoothing_reduces_noise() -> None:
    noisy = 0.5 + 0.1 * torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = build_eval_transform(PreprocessConfig(smooth_sigma=1.5), None)(noisy)
    assert out[:, 8:-8, 8:-8].std() < 0.5 * noisy[:, 8:-8, 8:-8].std()
    # no dark frame: a constant image stays constant up to the border
    flat = build_eval_transform(PreprocessConfig(smooth_sigma=2.0), None)(
        torch.full((2, 20, 24), 0.7)
    )
    torch.testing.assert_close(flat, torch.full((2, 20, 24), 0.7))


def test_bias_field_correction_flattens_smooth_shading() -> None:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disk = (((yy - 32) ** 2 + (xx - 32) ** 2) < 26**2).float()
    field = 0.6 + 0.8 * xx / 63  # 0.6 -> 1.4 from left to right
    image = (0.6 * disk * field)[None]
    corrected = LowFrequencyBiasCorrection()(image)
    inner = (((yy - 32) ** 2 + (xx - 32) ** 2) < 20**2)[None]

    def cv(t: torch.Tensor) -> float:
        values = t[inner]
        return float(values.std() / values.mean())

    assert cv(corrected) < 0.35 * cv(image)
    assert corrected.min() >= 0 and corrected.max() <= 1
    assert torch.equal(corrected[disk[None] == 0], image[disk[None] == 0])  # background kept
    pipeline = build_eval_transform(PreprocessConfig(bias_field_correction=True), None)
    torch.testing.assert_close(pipeline(image), corrected)


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
