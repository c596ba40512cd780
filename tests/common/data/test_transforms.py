"""Tests for consilia.common.data.transforms (resize, augmentation, preprocessing pipelines)."""

from __future__ import annotations

import pickle

import pytest
import torch
from monai.data import MetaTensor, get_track_meta

from consilia.common.config import AugmentationConfig, PreprocessConfig
from consilia.common.data.transforms import (
    ImagePipeline,
    LowFrequencyBiasCorrection,
    build_eval_transform,
    build_train_transform,
    identity,
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
