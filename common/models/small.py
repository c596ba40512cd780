"""Small networks for small images: the default ``cnn`` and LeNet-5."""

from __future__ import annotations

from torch import nn

from consilia.common.models.blocks import groupnorm_groups
from consilia.common.models.spec import register_model

__all__: list[str] = []  # registers "cnn" and "lenet5"; use build_model


@register_model(
    "cnn", 8, "small fast CNN (3 conv blocks, GroupNorm); the default",
    dp_grad_sample_mode="hooks",  # hooks 1.3-1.5x plain vs ew 1.6-1.8x (28-64 px, batch 32-64)
)
def _small_cnn(
    in_channels: int,
    num_classes: int,
    image_size: int,
    width: int = 32,
    dropout: float = 0.0,
    norm: str = "group",
) -> nn.Module:
    w = int(width)
    if norm not in ("group", "none"):
        raise ValueError(f"cnn: norm must be 'group' or 'none', got {norm!r}")

    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
        if norm == "group":
            layers.append(nn.GroupNorm(groupnorm_groups(cout), cout))
        return [*layers, nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(in_channels, w),
        *block(w, 2 * w),
        *block(2 * w, 2 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(float(dropout)),
        nn.Linear(2 * w, num_classes),
    )


@register_model(
    "lenet5", 12, "LeNet-5 (LeCun 1998): 2 conv + 3 fully connected layers, no norm",
    dp_grad_sample_mode="ew",  # ew 1.6x vs ghost 1.7x vs hooks 2.8x (median)
)
def _lenet5(
    in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0
) -> nn.Module:
    # Classic geometry at 28 px (16x5x5 features); larger inputs are pooled to 5x5.
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Dropout(float(dropout)),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )
