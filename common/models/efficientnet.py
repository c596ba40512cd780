"""EfficientNet-B0 (torchvision) with GroupNorm, a small-image stem, no in-place residual add."""

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

__all__: list[str] = []  # registers "efficientnet_b0"; use build_model


# Defined lazily: subclassing torchvision's block would import torchvision with the registry.
@lazy_block_class("_GNMBConv")
def _mbconv_class() -> type[nn.Module]:
    from torchvision.models.efficientnet import MBConv

    class _GNMBConv(MBConv):
        """torchvision MBConv without the in-place residual add (``result += input``)."""

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            result = self.block(input)
            if self.use_res_connect:
                result = self.stochastic_depth(result) + input
            return result

    return _GNMBConv


@register_model(
    "efficientnet_b0", 8, "EfficientNet-B0 (torchvision) with GroupNorm and a small-image stem",
    dp_grad_sample_mode="hooks",  # hooks 2.3x vs functorch 4.0x with the fast grouped convs
)
def _efficientnet_b0(
    in_channels: int,
    num_classes: int,
    image_size: int,
    dropout: float = 0.2,
    stochastic_depth: float = 0.2,
) -> nn.Module:
    from torchvision.models import efficientnet_b0
    from torchvision.models.efficientnet import MBConv

    model = efficientnet_b0(
        weights=None,
        num_classes=num_classes,
        dropout=float(dropout),
        stochastic_depth_prob=float(stochastic_depth),
        norm_layer=group_norm,
    )
    swap_class(model, MBConv, _mbconv_class())
    stem = model.features[0]
    stem[0] = he_conv(in_channels, stem[0].out_channels, 3, 2 ** stem_halvings(image_size, 1))
    return disable_inplace(model)
