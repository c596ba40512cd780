"""Config sections of the task, the data, the partition, the model and local training."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from consilia.common.config.base import StrictModel

__all__ = [
    "AugmentationConfig",
    "DataConfig",
    "FeatureSkewConfig",
    "ModelConfig",
    "PartitionConfig",
    "PreprocessConfig",
    "TaskSpec",
    "TrainConfig",
]


class TaskSpec(StrictModel):
    """The label space and input geometry every participant must agree on."""

    class_names: list[str] = Field(min_length=2)
    in_channels: Literal[1, 3] = 1
    image_size: int = Field(default=64, ge=8, le=1024)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


class AugmentationConfig(StrictModel):
    """Training-time augmentations (MONAI random transforms); all off when ``enabled`` is false."""

    enabled: bool = False
    prob: float = Field(default=0.5, ge=0, le=1, description="probability of each random transform")
    rotate_degrees: float = Field(default=10.0, ge=0, le=180)
    flip: bool = True
    zoom: float = Field(default=0.1, ge=0, le=0.5, description="max relative zoom in/out")
    shift: float = Field(
        default=0.05, ge=0, le=0.5, description="max translation, fraction of size"
    )
    noise_std: float = Field(default=0.02, ge=0)
    contrast_gamma: tuple[float, float] = (0.8, 1.2)
    elastic: bool = False
    bias_field: bool = False


class PreprocessConfig(StrictModel):
    """Deterministic preprocessing applied to train and eval images alike."""

    normalize: Literal["none", "zscore", "minmax", "histogram"] = "none"
    smooth_sigma: float = Field(default=0.0, ge=0, description="Gaussian denoising sigma (0 = off)")
    bias_field_correction: bool = False


class DataConfig(StrictModel):
    """Which dataset to load and how to split it when it has no official split."""

    dataset: str = "mednist"
    root: Path | None = None
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    max_samples: int | None = Field(
        default=None, ge=10, description="subsample the pool (quick runs)"
    )
    image_size: int | None = Field(
        default=None, ge=8, le=1024, description="resize (None = native)"
    )


class FeatureSkewConfig(StrictModel):
    """Per-site "scanner" shift: gamma/contrast, noise level, blur/resolution."""

    enabled: bool = False
    strength: float = Field(default=1.0, ge=0, le=3, description="scales every per-site shift")


class PartitionConfig(StrictModel):
    """How the pooled training data are split into virtual hospitals."""

    num_sites: int = Field(default=5, ge=1, le=10000)
    scheme: Literal["iid", "dirichlet", "pathological", "quantity"] = "dirichlet"
    alpha: float = Field(
        default=0.5, gt=0, description="Dirichlet concentration (label or quantity)"
    )
    classes_per_site: int = Field(default=2, ge=1, description="for scheme=pathological")
    min_samples_per_site: int = Field(default=10, ge=1)
    site_val_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="each site's held-out split"
    )
    feature_skew: FeatureSkewConfig = FeatureSkewConfig()
    holdout_site: int | None = Field(
        default=None,
        ge=0, description="leave-one-site-out: this site never trains and is evaluated "
        "at the end (external validation); the federation runs with num_sites - 1 sites"
    )


class ModelConfig(StrictModel):
    """Which registered architecture to build."""

    name: str = "cnn"
    kwargs: dict[str, float | int | str | bool] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from consilia.common.models import MODELS

        if value not in MODELS:
            raise ValueError(f"unknown model '{value}'; allowed: {', '.join(MODELS.names())}")
        return value


class TrainConfig(StrictModel):
    """Local training at each site (and in the baselines)."""

    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    lr: float = Field(default=1e-3, gt=0, le=10)
    optimizer: Literal["sgd", "adam", "rmsprop"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    loss: Literal["cross_entropy", "bce", "focal"] = "cross_entropy"
    focal_gamma: float = Field(default=2.0, ge=0)
    class_weights: bool = Field(
        default=False, description="weight the loss by inverse class frequency"
    )
    augmentation: AugmentationConfig = AugmentationConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    num_threads: int | None = Field(default=None, ge=1, description="torch threads (None = auto)")
