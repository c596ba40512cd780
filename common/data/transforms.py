"""Image pipelines (MONAI array transforms): resize, augmentation and preprocessing.

Every pipeline maps one float32 tensor ``(C, H, W)`` with values in ``[0, 1]`` to a float32
tensor ``(C, H', W')`` (``H' = W' = image_size`` when a size is given). Order of operations:

1. resize to ``image_size`` (augmentations then run at the training resolution);
2. training only: random augmentations that imitate acquisition variation (flip, rotation,
   zoom, shift, elastic deformation, then bias field, gamma contrast, Gaussian noise),
   followed by a clamp back to ``[0, 1]``;
3. the deterministic preprocessing shared by training and evaluation: bias-field
   correction, Gaussian denoising, intensity normalisation.

So a training image is augmented as a *raw* image would vary, then goes through exactly the
preprocessing an evaluation image gets. Without normalisation the output stays in ``[0, 1]``;
``zscore`` output is centred (not bounded), ``minmax``/``histogram`` output is in ``[0, 1]``.

Bias-field correction: MONAI has no N4. :class:`LowFrequencyBiasCorrection` estimates the
slowly varying multiplicative field as a heavily Gaussian-smoothed copy of the foreground
(normalised convolution, so the image border and the dark background do not bias the
estimate) and divides the image by it, keeping the foreground's mean intensity. This is a
cheap homomorphic stand-in for N4: it flattens smooth shading, not sharp artefacts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    GaussianSmooth,
    HistogramNormalize,
    NormalizeIntensity,
    Rand2DElastic,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    Randomizable,
    RandomizableTransform,
    RandRotate,
    RandZoom,
    Resize,
    ScaleIntensity,
    Transform,
)
from monai.utils import MAX_SEED

from consilia.common.config import AugmentationConfig, PreprocessConfig

__all__ = [
    "EdgeSafeGaussianSmooth",
    "ImagePipeline",
    "ImageTransform",
    "LowFrequencyBiasCorrection",
    "build_eval_transform",
    "build_train_transform",
    "identity",
]

#: A per-image transform on float32 ``(C, H, W)`` tensors.
ImageTransform = Callable[[torch.Tensor], torch.Tensor]
#: One step of a pipeline (MONAI array transforms are typed to return arrays or tensors).
PipelineStep = Callable[..., Any]

#: Elastic deformation: control-point spacing and displacement magnitude (pixels), as
#: fractions of the image side (64 px: spacing 16 px, displacement std 0.6-1.9 px).
ELASTIC_SPACING_FRACTION = 0.25
ELASTIC_MAGNITUDE_FRACTION = (0.01, 0.03)
#: RandBiasField: Legendre polynomial degree and coefficient range (MONAI defaults).
BIAS_FIELD_DEGREE = 3
BIAS_FIELD_COEFF_RANGE = (0.0, 0.1)


def identity(image: torch.Tensor) -> torch.Tensor:
    """Return ``image`` unchanged (the pipeline when nothing is configured)."""
    return image


def _clamp01(image: torch.Tensor) -> torch.Tensor:
    """Clamp intensities back to ``[0, 1]`` after the intensity augmentations."""
    return torch.clamp(image, 0.0, 1.0)


class _SizeAware(Randomizable):
    """A random transform whose pixel parameters scale with the image it receives.

    ``factory(height, width)`` builds the MONAI transform for one image size; instances are
    cached per size and all share this wrapper's random state (so seeding stays exact).
    """

    def __init__(self, factory: Callable[[int, int], RandomizableTransform]) -> None:
        self.factory = factory
        self._cache: dict[tuple[int, int], RandomizableTransform] = {}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        size = (int(image.shape[-2]), int(image.shape[-1]))
        transform = self._cache.get(size)
        if transform is None:
            transform = self._cache[size] = self.factory(*size)
        if transform.R is not self.R:  # share one stream (also with nested grid samplers)
            transform.set_random_state(state=self.R)
        return transform(image)


def _make_shift(prob: float, shift: float, height: int, width: int) -> RandomizableTransform:
    return RandAffine(
        prob=prob, translate_range=(shift * height, shift * width), padding_mode="border"
    )


def _make_elastic(prob: float, height: int, width: int) -> RandomizableTransform:
    side = min(height, width)
    spacing = max(4.0, ELASTIC_SPACING_FRACTION * side)
    low, high = (f * side for f in ELASTIC_MAGNITUDE_FRACTION)
    return Rand2DElastic(
        spacing=(spacing, spacing), magnitude_range=(low, high), prob=prob, padding_mode="border"
    )


class LowFrequencyBiasCorrection(Transform):
    """Divide out a smooth multiplicative intensity field (a cheap stand-in for N4).

    The field is ``G * (x m) / G * m`` (normalised Gaussian convolution of the foreground
    ``m = x > threshold * max(x)``, sigma = ``sigma_fraction`` of the image side). Because
    the field is smooth it is estimated on a copy area-averaged to about ``work_size``
    pixels a side and upsampled bilinearly (about 10x cheaper at 64 px). Foreground pixels
    are multiplied by ``mean_fg(field) / field``; background pixels are left alone.
    Channels are corrected independently; if a corrected channel exceeds 1 it is rescaled by
    its maximum so the output stays in ``[0, 1]``.

    Parameters
    ----------
    sigma_fraction : float
        Gaussian sigma of the field estimate, as a fraction of the shorter image side.
    foreground_threshold : float
        Pixels above this fraction of the channel maximum count as foreground.
    min_field : float
        The field is floored at this fraction of its foreground mean (no blow-ups).
    work_size : int
        Approximate side (pixels) of the grid the field is estimated on.

    """

    def __init__(
        self,
        sigma_fraction: float = 0.125,
        foreground_threshold: float = 0.05,
        min_field: float = 0.2,
        work_size: int = 16,
    ) -> None:
        if sigma_fraction <= 0 or not 0 <= foreground_threshold < 1 or not 0 < min_field <= 1:
            raise ValueError(
                "LowFrequencyBiasCorrection: need sigma_fraction > 0, "
                "0 <= foreground_threshold < 1 and 0 < min_field <= 1"
            )
        if work_size < 4:
            raise ValueError(f"LowFrequencyBiasCorrection: work_size must be >= 4, got {work_size}")
        self.sigma_fraction = sigma_fraction
        self.foreground_threshold = foreground_threshold
        self.min_field = min_field
        self.work_size = work_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Correct a ``(C, H, W)`` image with values in ``[0, 1]``."""
        x = torch.as_tensor(image, dtype=torch.float32)
        height, width = x.shape[-2:]
        factor = max(1, min(height, width) // self.work_size)
        low_size = (max(1, height // factor), max(1, width // factor))
        peak = x.amax(dim=(-2, -1), keepdim=True)
        mask = (x > self.foreground_threshold * peak).to(x.dtype)
        # area-average x*m and m together, smooth both, divide (normalised convolution)
        stacked = torch.cat([x * mask, mask])[None]
        if factor > 1:
            stacked = torch.nn.functional.interpolate(stacked, size=low_size, mode="area")
        smooth = GaussianSmooth(sigma=self.sigma_fraction * min(low_size))
        stacked = torch.as_tensor(smooth(stacked[0]))[None]
        if factor > 1:
            stacked = torch.nn.functional.interpolate(
                stacked, size=(height, width), mode="bilinear", align_corners=False
            )
        weighted, weight = stacked[0].chunk(2)
        field = weighted / weight.clamp_min(1e-6)
        fg_count = mask.sum(dim=(-2, -1), keepdim=True).clamp_min(1.0)
        fg_mean = (field * mask).sum(dim=(-2, -1), keepdim=True) / fg_count
        field = torch.maximum(field, self.min_field * fg_mean).clamp_min(1e-6)
        corrected = torch.where(mask > 0, x * fg_mean / field, x)
        scale = corrected.amax(dim=(-2, -1), keepdim=True).clamp_min(1.0)
        return corrected / scale


class EdgeSafeGaussianSmooth(Transform):
    """Gaussian denoising that does not darken the image border.

    MONAI's :class:`~monai.transforms.GaussianSmooth` pads with zeros; dividing by the
    smoothed all-ones image (normalised convolution) restores the border, so a constant
    image stays constant.

    Parameters
    ----------
    sigma : float
        Gaussian standard deviation in pixels (> 0).

    """

    def __init__(self, sigma: float) -> None:
        if sigma <= 0:
            raise ValueError(f"train.preprocess.smooth_sigma must be > 0 here, got {sigma}")
        self.sigma = float(sigma)
        self._smooth = GaussianSmooth(sigma=self.sigma)
        self._norm: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Smooth a ``(C, H, W)`` image."""
        x = torch.as_tensor(image, dtype=torch.float32)
        shape = tuple(x.shape[-2:])
        norm = self._norm.get(shape)
        if norm is None:
            ones = torch.ones((1, *shape), dtype=torch.float32)
            norm = self._norm[shape] = torch.as_tensor(self._smooth(ones)).clamp_min(1e-6)
        return torch.as_tensor(self._smooth(x)) / norm


class ImagePipeline(Randomizable):
    """A MONAI :class:`~monai.transforms.Compose` returning plain float32 tensors.

    ``set_random_state(seed)`` reseeds every random transform inside, so the same seed
    gives the same sequence of augmented images.

    Parameters
    ----------
    transforms : sequence of callables
        MONAI array transforms (or plain callables) applied in order to ``(C, H, W)``.
    deterministic : bool
        True when no step is random: :class:`ImageArrayDataset` then applies the pipeline
        once to the whole array instead of once per sample per epoch.

    """

    def __init__(
        self, transforms: Sequence[PipelineStep], deterministic: bool = False
    ) -> None:
        self.compose = Compose(list(transforms))
        self.deterministic = deterministic

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> ImagePipeline:
        """Reseed all random transforms; return ``self``."""
        super().set_random_state(seed=seed, state=state)
        self.compose.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Transform one ``(C, H, W)`` float tensor."""
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            shape = getattr(image, "shape", None)
            raise ValueError(
                f"image pipeline expects a torch tensor (C, H, W), got {type(image).__name__} "
                f"with shape {shape}; add the channel axis yourself (x[None])"
            )
        # Plain tensors in, plain tensors out: MONAI's metadata tracking would cost ~2-3x
        # per sample here (measured) and nothing downstream reads it. The flag is global,
        # so it is switched off only for the duration of this call.
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            out = self.compose(image.to(torch.float32))
        finally:
            set_track_meta(tracking)
        if isinstance(out, MetaTensor):
            out = out.as_tensor()
        return torch.as_tensor(out, dtype=torch.float32).contiguous()


class _ResizeSquare:
    """Resize to ``size x size``: area averaging to shrink, bilinear to enlarge.

    (MONAI's ``anti_aliasing=True`` pre-smooths with zero padding and darkens the border;
    area averaging anti-aliases without that artefact.)
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._shrink = Resize(spatial_size=(size, size), mode="area")
        self._enlarge = Resize(spatial_size=(size, size), mode="bilinear", align_corners=False)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if height == width == self.size:
            return image
        if height >= self.size and width >= self.size:
            return self._shrink(image)
        return self._enlarge(image)


def _resize(image_size: int | None) -> list[PipelineStep]:
    if image_size is None:
        return []
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    return [_ResizeSquare(image_size)]


def _preprocess(pre: PreprocessConfig) -> list[PipelineStep]:
    steps: list[PipelineStep] = []
    if pre.bias_field_correction:
        steps.append(LowFrequencyBiasCorrection())
    if pre.smooth_sigma > 0:
        steps.append(EdgeSafeGaussianSmooth(pre.smooth_sigma))
    if pre.normalize == "zscore":
        steps.append(NormalizeIntensity(channel_wise=True))
    elif pre.normalize == "minmax":
        steps.append(ScaleIntensity(minv=0.0, maxv=1.0, channel_wise=True))
    elif pre.normalize == "histogram":
        steps.append(HistogramNormalize(num_bins=256, min=0, max=1))
    return steps


def _augmentations(aug: AugmentationConfig) -> list[PipelineStep]:
    if not aug.enabled or aug.prob == 0:
        return []
    low, high = aug.contrast_gamma
    if not 0 < low <= high:
        raise ValueError(
            f"train.augmentation.contrast_gamma={aug.contrast_gamma!r}: need 0 < low <= high "
            "(e.g. [0.8, 1.2]; [1, 1] disables it)"
        )
    p = aug.prob
    spatial: list[PipelineStep] = []
    if aug.flip:
        spatial.append(RandFlip(prob=p, spatial_axis=1))
    if aug.rotate_degrees > 0:
        spatial.append(
            RandRotate(range_x=math.radians(aug.rotate_degrees), prob=p, padding_mode="border")
        )
    if aug.zoom > 0:
        spatial.append(
            RandZoom(
                prob=p,
                min_zoom=1.0 - aug.zoom,
                max_zoom=1.0 + aug.zoom,
                mode="bilinear",
                padding_mode="edge",
            )
        )
    if aug.shift > 0:
        spatial.append(_SizeAware(partial(_make_shift, p, aug.shift)))
    if aug.elastic:
        spatial.append(_SizeAware(partial(_make_elastic, p)))
    intensity: list[PipelineStep] = []
    if aug.bias_field:
        intensity.append(
            RandBiasField(degree=BIAS_FIELD_DEGREE, coeff_range=BIAS_FIELD_COEFF_RANGE, prob=p)
        )
    if (low, high) != (1.0, 1.0):
        intensity.append(RandAdjustContrast(prob=p, gamma=(low, high)))
    if aug.noise_std > 0:
        intensity.append(RandGaussianNoise(prob=p, mean=0.0, std=aug.noise_std))
    if not spatial and not intensity:
        return []
    return [*spatial, *intensity, _clamp01]


def build_train_transform(
    aug: AugmentationConfig, pre: PreprocessConfig, image_size: int | None, seed: int
) -> ImageTransform:
    """Build the training pipeline: resize, random augmentations, then preprocessing.

    Parameters
    ----------
    aug : AugmentationConfig
        Which random transforms run (none when ``aug.enabled`` is false).
    pre : PreprocessConfig
        Deterministic preprocessing (same as :func:`build_eval_transform`).
    image_size : int or None
        Square output side in pixels; ``None`` keeps the input size.
    seed : int
        Seeds every random transform: the same seed gives the same augmented sequence.

    Returns
    -------
    callable
        ``f(x) -> y`` on float32 ``(C, H, W)`` tensors in ``[0, 1]``; :func:`identity` when
        nothing is configured. Random pipelines are :class:`ImagePipeline` instances
        (``set_random_state`` reseeds them; :func:`make_loader` does so per worker).

    Raises
    ------
    ValueError
        If ``aug.contrast_gamma`` is not ``0 < low <= high``.

    """
    augmentations = _augmentations(aug)
    steps = [*_resize(image_size), *augmentations, *_preprocess(pre)]
    if not steps:
        return identity
    return ImagePipeline(steps, deterministic=not augmentations).set_random_state(seed=seed)


def build_eval_transform(pre: PreprocessConfig, image_size: int | None) -> ImageTransform:
    """Build the deterministic evaluation pipeline: resize, then preprocessing.

    Parameters
    ----------
    pre : PreprocessConfig
        Bias-field correction, denoising and normalisation settings.
    image_size : int or None
        Square output side in pixels; ``None`` keeps the input size.

    Returns
    -------
    callable
        ``f(x) -> y`` on float32 ``(C, H, W)`` tensors; :func:`identity` when nothing is set.

    """
    steps = [*_resize(image_size), *_preprocess(pre)]
    if not steps:
        return identity
    return ImagePipeline(steps, deterministic=True)
