"""GoogLeNet / Inception v1 (torchvision) with GroupNorm conv blocks and a small-image stem."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from consilia.common.models.blocks import (
    disable_inplace,
    group_norm,
    lazy_block_class,
    stem_halvings,
)
from consilia.common.models.spec import register_model

__all__: list[str] = []  # registers "inception"; use build_model


# Defined lazily, like the blocks that subclass torchvision's (one mechanism for all three).
@lazy_block_class("_GNConvBlock")
def _googlenet_conv_block_class() -> type[nn.Module]:
    class _GNConvBlock(nn.Module):
        """GoogLeNet's conv-norm-ReLU unit with GroupNorm and a non in-place ReLU."""

        def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                     stride: int = 1, padding: int = 0) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                  padding=padding, bias=False)
            self.bn = group_norm(out_channels)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.bn(self.conv(x)))

    return _GNConvBlock


@register_model(
    "inception", 8, "GoogLeNet / Inception v1 (torchvision), GroupNorm, no aux heads",
    dp_grad_sample_mode="hooks",  # hooks 2.7x vs ghost 4.1x
)
def _inception(
    in_channels: int, num_classes: int, image_size: int, dropout: float = 0.2
) -> nn.Module:
    from torchvision.models import googlenet
    from torchvision.models.googlenet import Inception, InceptionAux

    conv_block = _googlenet_conv_block_class()
    model = googlenet(
        weights=None,
        num_classes=num_classes,
        aux_logits=False,
        transform_input=False,
        init_weights=True,
        dropout=float(dropout),
        # GoogLeNet does not hand its conv block to the Inception modules: pass it ourselves.
        blocks=[conv_block, partial(Inception, conv_block=conv_block), InceptionAux],
    )
    # The stem halves three times (7x7/2 conv, two max-pools): 224 px -> 28 px.
    halvings = stem_halvings(image_size, 3)
    if halvings == 3:
        model.conv1 = conv_block(in_channels, 64, kernel_size=7, stride=2, padding=3)
    else:  # small images: 3x3 conv (stride 2 from 28 px up), max-pool1 from 56 px up
        stride = 2 if halvings >= 1 else 1
        model.conv1 = conv_block(in_channels, 64, kernel_size=3, stride=stride, padding=1)
        if halvings < 2:
            model.maxpool1 = nn.Identity()
        model.maxpool2 = nn.Identity()
    return disable_inplace(model)
