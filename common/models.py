"""Model factory: every registered architecture, DP-compatible (GroupNorm, no in-place ops).

Use :func:`build_model` with a :class:`~consilia.common.config.ModelConfig` and the run's
:class:`~consilia.common.config.TaskSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from consilia.common.registry import Registry

__all__ = ["MODELS", "ModelSizeError", "ModelSpec", "build_model", "register_model"]


class ModelSizeError(ValueError):
    """Raised when an architecture cannot take the requested input size."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture.

    Attributes
    ----------
    builder : callable
        ``builder(in_channels, num_classes, image_size, **kwargs) -> nn.Module``.
    min_image_size : int
        Smallest square input (pixels) the architecture accepts.
    description : str
        One line for ``--help`` and docs.
    """

    builder: Callable[..., nn.Module]
    min_image_size: int
    description: str


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(
    name: str, min_image_size: int, description: str
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under ``name`` (decorator)."""

    def _decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name, ModelSpec(builder, min_image_size, description))
        return builder

    return _decorate


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    **kwargs: float | int | str | bool,
) -> nn.Module:
    """Build a registered model for the given input geometry and label space.

    Parameters
    ----------
    name : str
        Registered architecture name (see ``MODELS.names()``).
    in_channels : int
        1 (grey) or 3 (colour).
    num_classes : int
        Number of output logits.
    image_size : int
        Square input size in pixels.
    **kwargs
        Architecture-specific options.

    Raises
    ------
    ModelSizeError
        If the architecture cannot take ``image_size``.
    """
    spec = MODELS.get(name)
    if image_size < spec.min_image_size:
        raise ModelSizeError(
            f"model '{name}' needs images of at least {spec.min_image_size}x"
            f"{spec.min_image_size} px, got {image_size}; set data.image_size to "
            f">= {spec.min_image_size} (images are resized) or choose another model"
        )
    return spec.builder(in_channels, num_classes, image_size, **kwargs)


def _groups(channels: int) -> int:
    """Number of GroupNorm groups for ``channels`` (DP-compatible BatchNorm replacement)."""
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


@register_model("cnn", 8, "small fast CNN (3 conv blocks, GroupNorm); the default")
def _small_cnn(
    in_channels: int, num_classes: int, image_size: int, width: int = 32, dropout: float = 0.0
) -> nn.Module:
    w = int(width)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(_groups(cout), cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(in_channels, w),
        *block(w, 2 * w),
        *block(2 * w, 2 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(float(dropout)),
        nn.Linear(2 * w, num_classes),
    )


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _smoke() -> None:  # pragma: no cover - manual check
    model = build_model("cnn", 1, 6, 64)
    print(model(torch.zeros(2, 1, 64, 64)).shape)
