"""Vision Transformer (MONAI ViT encoder) with a mean-pooled linear head.

MONAI is imported inside the builder (as it was in the single-module factory), so that
importing the model registry does not import MONAI.
"""

from __future__ import annotations

import torch
from torch import nn

from consilia.common.models.blocks import disable_inplace
from consilia.common.models.spec import ModelSizeError, register_model

__all__: list[str] = []  # registers "vit"; use build_model


class _ViTClassifier(nn.Module):
    """MONAI ViT encoder + a linear head on the mean of the output tokens.

    Mean pooling instead of MONAI's class token: the class token is a parameter of the
    top-level ``ViT`` module, which makes Opacus hand the whole ViT (whose output is a
    tuple) to functorch and fail; pooling keeps every parameter in a tensor-valued module.
    """

    def __init__(self, vit: nn.Module, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _hidden_states = self.vit(x)
        return self.head(tokens.mean(dim=1))


def _vit_patch_size(image_size: int, grid: int = 8) -> int:
    """Return the patch size giving about ``grid`` x ``grid`` tokens, preferring exact divisors."""
    divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
    fits = [p for p in divisors if 4 <= image_size // p <= 16]
    if fits:
        return min(fits, key=lambda p: (abs(image_size // p - grid), -p))
    return max(1, image_size // grid)  # the conv patch embedding drops the remainder


@register_model(
    "vit", 8, "Vision Transformer (MONAI ViT), 4 layers, 128-dim, mean-pooled tokens",
    dp_grad_sample_mode="hooks",  # hooks 1.9x vs functorch/ghost 2.4x; ew fails (unsupported add)
)
def _vit(
    in_channels: int,
    num_classes: int,
    image_size: int,
    patch_size: int = 0,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    mlp_dim: int = 256,
    dropout: float = 0.0,
) -> nn.Module:
    from monai.networks.nets import ViT  # lazy: MONAI is heavy to import

    patch = int(patch_size) or _vit_patch_size(image_size)
    if not 1 <= patch <= image_size:
        raise ModelSizeError(
            f"model 'vit': patch_size {patch} must be between 1 and image_size {image_size}"
        )
    vit = ViT(
        in_channels=in_channels,
        img_size=image_size,
        patch_size=patch,
        hidden_size=int(hidden_size),
        mlp_dim=int(mlp_dim),
        num_layers=int(num_layers),
        num_heads=int(num_heads),
        proj_type="conv",
        pos_embed_type="learnable",
        classification=False,
        dropout_rate=float(dropout),
        spatial_dims=2,
    )
    for block in vit.blocks:
        # MONAI builds this LayerNorm even without cross-attention; its parameters never
        # get a gradient, which Opacus rejects ("Per sample gradient is not initialized").
        if not block.with_cross_attention:
            block.norm_cross_attn = nn.Identity()
    return disable_inplace(_ViTClassifier(vit, int(hidden_size), num_classes))
