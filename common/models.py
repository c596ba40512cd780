"""Model factory: every registered architecture, DP-compatible (GroupNorm, no in-place ops).

Use :func:`build_model` with a :class:`~consilia.common.config.ModelConfig` and the run's
:class:`~consilia.common.config.TaskSpec`.

Every entry is built from scratch (no pretrained weights, nothing downloads) and is
Opacus-compatible by construction: GroupNorm instead of BatchNorm, no in-place activations
and no in-place residual additions (an in-place op on the output of a module that carries
Opacus' backward hooks breaks per-sample gradients, opacus issue #828). The ImageNet stems
are adapted to small medical images: a stem downsamples only while its feature map stays
at least 14 px wide (28 px -> 14, 64 px -> 16; 224 px keeps the original stem).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import torch
from torch import nn

from consilia.common.registry import Registry

__all__ = [
    "DEFAULT_DP_GRAD_SAMPLE_MODE",
    "MODELS",
    "ModelSizeError",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "register_model",
]


class ModelSizeError(ValueError):
    """Raised when an architecture cannot take the requested input size."""


#: Grad-sample mode of a model registered without a measurement, and of a name that is not
#: registered (``hooks`` works for every Opacus-valid model).
DEFAULT_DP_GRAD_SAMPLE_MODE = "hooks"


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
    dp_grad_sample_mode : str
        Opacus grad-sample mode that ``dp.grad_sample_mode="auto"`` picks for this model:
        the fastest mode that worked and gave the same update as ``hooks`` (noise 0),
        measured on CPU with 1 thread (batch 16 at 32 px; the cnn also at batch 64, 28 and
        64 px; see docs/benchmarks.md). Where two modes were within measurement noise,
        ``hooks`` is kept (it handles empty batches natively). The cnn was re-measured with
        the fast DP step (interleaved A/B, width 16), the others before it existed.

    """

    builder: Callable[..., nn.Module]
    min_image_size: int
    description: str
    dp_grad_sample_mode: str = DEFAULT_DP_GRAD_SAMPLE_MODE


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(
    name: str,
    min_image_size: int,
    description: str,
    dp_grad_sample_mode: str = DEFAULT_DP_GRAD_SAMPLE_MODE,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under ``name`` (decorator), with its measured DP grad-sample mode."""

    def _decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(
            name, ModelSpec(builder, min_image_size, description, dp_grad_sample_mode)
        )
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
        Architecture-specific options (the keyword arguments of the entry's builder).

    Returns
    -------
    torch.nn.Module
        A freshly initialised model mapping ``(N, in_channels, image_size, image_size)``
        to ``(N, num_classes)`` logits.

    Raises
    ------
    UnknownNameError
        If ``name`` is not registered (the message lists the allowed names).
    ModelSizeError
        If the architecture cannot take ``image_size``.
    ValueError
        If ``in_channels``/``num_classes`` are not positive or an option is unknown.

    """
    spec = MODELS.get(name)
    if in_channels < 1 or num_classes < 1:
        raise ValueError(
            f"model '{name}': in_channels and num_classes must be >= 1, got "
            f"in_channels={in_channels}, num_classes={num_classes}"
        )
    if image_size < spec.min_image_size:
        raise ModelSizeError(
            f"model '{name}' needs images of at least {spec.min_image_size}x"
            f"{spec.min_image_size} px, got {image_size}; set data.image_size to "
            f">= {spec.min_image_size} (images are resized) or choose another model"
        )
    options = _builder_options(spec.builder)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        allowed = ", ".join(options) or "(none)"
        raise ValueError(
            f"model '{name}' has no option(s) {', '.join(unknown)} in model.kwargs; "
            f"allowed: {allowed}"
        )
    return spec.builder(in_channels, num_classes, image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    int
        Sum of ``numel()`` over parameters with ``requires_grad``.

    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _builder_options(builder: Callable[..., nn.Module]) -> list[str]:
    """Return the names of a builder's architecture options (after the three geometry args)."""
    params = list(inspect.signature(builder).parameters.values())[3:]
    return [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


# --------------------------------------------------------------------------- helpers

#: Stems stop downsampling before the feature map gets narrower than this (pixels).
_STEM_FLOOR = 14


def _groups(channels: int) -> int:
    """Return the GroupNorm group count for ``channels`` (DP-safe BatchNorm replacement)."""
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


def _group_norm(channels: int) -> nn.GroupNorm:
    """Return a GroupNorm with up to 32 groups (Wu & He), used by the ImageNet-style nets."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _stem_halvings(image_size: int, max_halvings: int, floor: int = _STEM_FLOOR) -> int:
    """Count how many of a stem's ``max_halvings`` stride-2 steps keep the map >= ``floor`` px."""
    halvings = 0
    while halvings < max_halvings and image_size / 2 ** (halvings + 1) >= floor:
        halvings += 1
    return halvings


def _disable_inplace(model: nn.Module) -> nn.Module:
    """Turn off ``inplace`` on every activation/dropout (in-place ops break Opacus hooks)."""
    for module in model.modules():
        if getattr(module, "inplace", False):
            setattr(module, "inplace", False)  # noqa: B010 (any module type with the flag)
    return model


def _swap_class(model: nn.Module, base: type[nn.Module], replacement: type[nn.Module]) -> None:
    """Give every ``base`` instance the forward of ``replacement`` (a state-free subclass)."""
    for module in model.modules():
        if type(module) is base:
            module.__class__ = replacement


def _picklable(cls: type[nn.Module]) -> type[nn.Module]:
    """Name a lazily defined class as a module attribute, so pickle/torch.save find it."""
    cls.__qualname__ = cls.__name__
    cls.__module__ = __name__
    return cls


def __getattr__(name: str) -> type[nn.Module]:
    """Resolve the lazily defined block classes (PEP 562), e.g. when unpickling a model."""
    factories = {
        "_GNBasicBlock": _resnet_basic_block_class,
        "_GNConvBlock": _googlenet_conv_block_class,
        "_GNMBConv": _mbconv_class,
    }
    if name in factories:
        return factories[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    """Return a bias-free 'same'-padded, He-initialised convolution (followed by a norm)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


# --------------------------------------------------------------------------- entries


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
            layers.append(nn.GroupNorm(_groups(cout), cout))
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
    halvings = _stem_halvings(image_size, 2, floor=28)
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
    return _disable_inplace(model)


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
            features[index] = _group_norm(module.num_features)
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
    return _disable_inplace(model)


@cache
def _resnet_basic_block_class() -> type[nn.Module]:
    from torchvision.models.resnet import BasicBlock

    @_picklable
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

    model = resnet18(weights=None, num_classes=num_classes, norm_layer=_group_norm)
    _swap_class(model, BasicBlock, _resnet_basic_block_class())
    halvings = _stem_halvings(image_size, 2)
    if halvings == 2:  # large images: the original 7x7/2 conv + 3x3/2 max-pool
        model.conv1 = _conv(in_channels, 64, 7, 2)
    else:  # small images: a 3x3 conv (stride 2 from 28 px up), no max-pool
        model.conv1 = _conv(in_channels, 64, 3, 2**halvings)
        model.maxpool = nn.Identity()
    return _disable_inplace(model)


@cache
def _googlenet_conv_block_class() -> type[nn.Module]:
    @_picklable
    class _GNConvBlock(nn.Module):
        """GoogLeNet's conv-norm-ReLU unit with GroupNorm and a non in-place ReLU."""

        def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                     stride: int = 1, padding: int = 0) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                  padding=padding, bias=False)
            self.bn = _group_norm(out_channels)
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
    halvings = _stem_halvings(image_size, 3)
    if halvings == 3:
        model.conv1 = conv_block(in_channels, 64, kernel_size=7, stride=2, padding=3)
    else:  # small images: 3x3 conv (stride 2 from 28 px up), max-pool1 from 56 px up
        stride = 2 if halvings >= 1 else 1
        model.conv1 = conv_block(in_channels, 64, kernel_size=3, stride=stride, padding=1)
        if halvings < 2:
            model.maxpool1 = nn.Identity()
        model.maxpool2 = nn.Identity()
    return _disable_inplace(model)


@cache
def _mbconv_class() -> type[nn.Module]:
    from torchvision.models.efficientnet import MBConv

    @_picklable
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
        norm_layer=_group_norm,
    )
    _swap_class(model, MBConv, _mbconv_class())
    stem = model.features[0]
    stem[0] = _conv(in_channels, stem[0].out_channels, 3, 2 ** _stem_halvings(image_size, 1))
    return _disable_inplace(model)


@register_model(
    "densenet121", 8, "DenseNet-121 (MONAI) with GroupNorm, non in-place ReLU, small-image stem",
    dp_grad_sample_mode="hooks",  # hooks 2.6x vs ghost 4.1x; ew fails (non-contiguous view)
)
def _densenet121(
    in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0
) -> nn.Module:
    from monai.networks.nets import DenseNet121

    model = DenseNet121(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        pretrained=False,
        norm=("group", {"num_groups": 32}),
        act=("relu", {"inplace": False}),
        dropout_prob=float(dropout),
    )
    halvings = _stem_halvings(image_size, 2)
    if halvings < 2:  # small images: 3x3 conv (stride 2 from 28 px up), no max-pool
        model.features.conv0 = _conv(in_channels, 64, 3, 2**halvings)
        model.features.pool0 = nn.Identity()
    return _disable_inplace(model)


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
    from monai.networks.nets import ViT

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
    return _disable_inplace(_ViTClassifier(vit, int(hidden_size), num_classes))


def _smoke() -> None:  # pragma: no cover - manual check
    model = build_model("cnn", 1, 6, 64)
    print(model(torch.zeros(2, 1, 64, 64)).shape)
