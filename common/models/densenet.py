"""DenseNet-121 (MONAI) with GroupNorm, non in-place ReLU and a small-image stem.

MONAI is imported inside the builder (as it was in the single-module factory), so that
importing the model registry does not import MONAI.
"""

from __future__ import annotations

from torch import nn

from consilia.common.models.blocks import disable_inplace, he_conv, stem_halvings
from consilia.common.models.spec import register_model

__all__: list[str] = []  # registers "densenet121"; use build_model


@register_model(
    "densenet121", 8, "DenseNet-121 (MONAI) with GroupNorm, non in-place ReLU, small-image stem",
    dp_grad_sample_mode="hooks",  # hooks 2.6x vs ghost 4.1x; ew fails (non-contiguous view)
)
def _densenet121(
    in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0
) -> nn.Module:
    from monai.networks.nets import DenseNet121  # lazy: MONAI is heavy to import

    model = DenseNet121(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        pretrained=False,
        norm=("group", {"num_groups": 32}),
        act=("relu", {"inplace": False}),
        dropout_prob=float(dropout),
    )
    halvings = stem_halvings(image_size, 2)
    if halvings < 2:  # small images: 3x3 conv (stride 2 from 28 px up), no max-pool
        model.features.conv0 = he_conv(in_channels, 64, 3, 2**halvings)
        model.features.pool0 = nn.Identity()
    return disable_inplace(model)
