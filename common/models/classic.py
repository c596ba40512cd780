"""The classic deep CNNs from torchvision, made DP-safe: AlexNet and VGG-11.

torchvision is imported inside the builders, so that importing the model registry stays
cheap (only building one of these models pays for it).
"""

from __future__ import annotations

import math

from torch import nn

from consilia.common.models.blocks import disable_inplace, group_norm, stem_halvings
from consilia.common.models.spec import register_model

__all__: list[str] = []  # registers "alexnet" and "vgg11"; use build_model


@register_model(
    "alexnet", 15, "AlexNet (torchvision), small-image stem, 1024-wide classifier by default",
    dp_grad_sample_mode="ghost",  # ghost 2.0x vs hooks 4.9x
)
def _alexnet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    hidden: int = 1024,
    dropout: float = 0.5,
) -> nn.Module:
    from torchvision.models import alexnet

    model = alexnet(weights=None, num_classes=num_classes, dropout=float(dropout))
    # The original 11x11/4 stem is kept from 112 px up; smaller inputs get a gentler stem
    # so that the three 3x3/2 max-pools still leave a feature map (>= 15 px before them).
    halvings = stem_halvings(image_size, 2, floor=28)
    kernel, padding = {0: (3, 1), 1: (5, 2), 2: (11, 2)}[halvings]
    model.features[0] = nn.Conv2d(in_channels, 64, kernel, 2**halvings, padding)
    # Original classifier is 256*6*6 -> 4096 -> 4096 (58M parameters): too big for sites.
    pooled = 3
    width = int(hidden)
    model.avgpool = nn.AdaptiveAvgPool2d(pooled)
    model.classifier = nn.Sequential(
        nn.Dropout(float(dropout)),
        nn.Linear(256 * pooled * pooled, width),
        nn.ReLU(),
        nn.Dropout(float(dropout)),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )
    return disable_inplace(model)


@register_model(
    "vgg11", 8, "VGG-11 (torchvision, config A) with GroupNorm, 512-wide classifier",
    dp_grad_sample_mode="hooks",  # hooks ~ ghost within noise
)
def _vgg11(
    in_channels: int,
    num_classes: int,
    image_size: int,
    hidden: int = 512,
    dropout: float = 0.5,
    norm: bool = True,
) -> nn.Module:
    from torchvision.models import vgg11, vgg11_bn

    builder = vgg11_bn if bool(norm) else vgg11
    model = builder(weights=None, num_classes=num_classes, dropout=float(dropout))
    features = model.features
    features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    nn.init.kaiming_normal_(features[0].weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(features[0].bias)  # as torchvision initialises VGG
    for index, module in enumerate(features):
        if isinstance(module, nn.BatchNorm2d):
            features[index] = group_norm(module.num_features)
    # Five 2x2 max-pools need >= 32 px; on smaller inputs drop the last ones (keep >= 1 px).
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    keep = min(len(pools), int(math.log2(image_size)))
    for index in pools[keep:]:
        features[index] = nn.Identity()
    width = int(hidden)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, width),
        nn.ReLU(),
        nn.Dropout(float(dropout)),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Dropout(float(dropout)),
        nn.Linear(width, num_classes),
    )
    return disable_inplace(model)
