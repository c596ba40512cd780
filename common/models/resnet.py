"""ResNet-18 (torchvision) with GroupNorm, a small-image stem and no in-place residual add."""

from __future__ import annotations

import torch
from torch import nn

from consilia.common.models.blocks import (
    disable_inplace,
    group_norm,
    he_conv,
    lazy_block_class,
    stem_halvings,
    swap_class,
)
from consilia.common.models.spec import register_model

__all__: list[str] = []  # registers "resnet18"; use build_model


# Defined lazily: subclassing torchvision's block would import torchvision with the registry.
@lazy_block_class("_GNBasicBlock")
def _resnet_basic_block_class() -> type[nn.Module]:
    from torchvision.models.resnet import BasicBlock

    class _GNBasicBlock(BasicBlock):
        """torchvision BasicBlock without the in-place residual add (``out += identity``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    return _GNBasicBlock


@register_model(
    "resnet18", 8, "ResNet-18 (torchvision) with GroupNorm and a small-image stem",
    dp_grad_sample_mode="hooks",  # hooks ~ ghost ~10x; functorch/ew slower
)
def _resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18
    from torchvision.models.resnet import BasicBlock

    model = resnet18(weights=None, num_classes=num_classes, norm_layer=group_norm)
    swap_class(model, BasicBlock, _resnet_basic_block_class())
    halvings = stem_halvings(image_size, 2)
    if halvings == 2:  # large images: the original 7x7/2 conv + 3x3/2 max-pool
        model.conv1 = he_conv(in_channels, 64, 7, 2)
    else:  # small images: a 3x3 conv (stride 2 from 28 px up), no max-pool
        model.conv1 = he_conv(in_channels, 64, 3, 2**halvings)
        model.maxpool = nn.Identity()
    return disable_inplace(model)
