"""Shared building blocks of the architectures: GroupNorm, small-image stems, DP-safe fixes.

Also the mechanism that keeps models picklable although some of their block classes are
defined inside functions (so that importing this package does not import torchvision):
:func:`lazy_block_class` registers such a class's factory and names the class as an
attribute of the package, and the package's module ``__getattr__`` (PEP 562) resolves that
name through :func:`lazy_block_class_named` when pickle or ``torch.load`` looks it up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

from torch import nn

__all__ = [
    "PICKLE_MODULE",
    "STEM_FLOOR",
    "disable_inplace",
    "group_norm",
    "groupnorm_groups",
    "he_conv",
    "lazy_block_class",
    "lazy_block_class_named",
    "picklable",
    "stem_halvings",
    "swap_class",
]

#: Stems stop downsampling before the feature map gets narrower than this (pixels).
STEM_FLOOR = 14

#: The module whose attributes the lazily defined classes are (where pickle looks them up):
#: the package, so the names stay ``consilia.common.models.<class>`` as before the split.
PICKLE_MODULE = __name__.rpartition(".")[0]

_LAZY_CLASS_FACTORIES: dict[str, Callable[[], type[nn.Module]]] = {}


def groupnorm_groups(channels: int) -> int:
    """Return the GroupNorm group count for ``channels`` (DP-safe BatchNorm replacement).

    Parameters
    ----------
    channels : int
        Number of channels to normalise.

    Returns
    -------
    int
        The largest of 8, 4, 2 that divides ``channels``, else 1.

    """
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    """Return a GroupNorm with up to 32 groups (Wu & He), used by the ImageNet-style nets.

    Parameters
    ----------
    channels : int
        Number of channels to normalise.

    Returns
    -------
    torch.nn.GroupNorm
        ``gcd(32, channels)`` groups over ``channels`` channels.

    """
    return nn.GroupNorm(math.gcd(32, channels), channels)


def stem_halvings(image_size: int, max_halvings: int, floor: int = STEM_FLOOR) -> int:
    """Count how many of a stem's ``max_halvings`` stride-2 steps keep the map >= ``floor`` px.

    Parameters
    ----------
    image_size : int
        Square input size in pixels.
    max_halvings : int
        Stride-2 steps of the original (ImageNet) stem.
    floor : int
        Narrowest feature map (pixels) a halving may leave.

    Returns
    -------
    int
        Number of halvings to keep, between 0 and ``max_halvings``.

    """
    halvings = 0
    while halvings < max_halvings and image_size / 2 ** (halvings + 1) >= floor:
        halvings += 1
    return halvings


def disable_inplace(model: nn.Module) -> nn.Module:
    """Turn off ``inplace`` on every activation/dropout (in-place ops break Opacus hooks).

    Parameters
    ----------
    model : torch.nn.Module
        The model to change in place.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    """
    for module in model.modules():
        if getattr(module, "inplace", False):
            setattr(module, "inplace", False)  # noqa: B010 (any module type with the flag)
    return model


def swap_class(model: nn.Module, base: type[nn.Module], replacement: type[nn.Module]) -> None:
    """Give every ``base`` instance the forward of ``replacement`` (a state-free subclass).

    Parameters
    ----------
    model : torch.nn.Module
        The model to change in place.
    base : type
        The exact class whose instances are switched (subclasses are left alone).
    replacement : type
        A subclass of ``base`` that adds no state, only a different ``forward``.

    """
    for module in model.modules():
        if type(module) is base:
            module.__class__ = replacement


def he_conv(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    """Return a bias-free 'same'-padded, He-initialised convolution (followed by a norm).

    Parameters
    ----------
    in_channels, out_channels : int
        Channel counts.
    kernel : int
        Square kernel size (padding is ``kernel // 2``).
    stride : int
        Stride in both directions.

    Returns
    -------
    torch.nn.Conv2d
        The convolution, weights drawn with ``kaiming_normal_`` (fan-out, ReLU gain).

    """
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def picklable(cls: type[nn.Module]) -> type[nn.Module]:
    """Name a lazily defined class as an attribute of the package, so pickle finds it.

    Parameters
    ----------
    cls : type
        A class defined inside a function (its ``__qualname__`` holds ``<locals>``).

    Returns
    -------
    type
        ``cls``, now ``consilia.common.models.<cls.__name__>`` for pickle.

    """
    cls.__qualname__ = cls.__name__
    cls.__module__ = PICKLE_MODULE
    return cls


def lazy_block_class(
    name: str,
) -> Callable[[Callable[[], type[nn.Module]]], Callable[[], type[nn.Module]]]:
    """Register the factory of a block class defined lazily (it needs torchvision).

    The decorated factory is cached (the class is defined once), its class is named
    ``consilia.common.models.<name>`` (:func:`picklable`), and the package resolves ``name``
    through it when a pickled model is loaded.

    Parameters
    ----------
    name : str
        The class's ``__name__``.

    Returns
    -------
    callable
        A decorator turning a zero-argument class factory into its cached, registered form.

    Raises
    ------
    ValueError
        At decoration time if ``name`` is registered twice, or at the first call if the
        factory's class is not called ``name``.

    """

    def _decorate(factory: Callable[[], type[nn.Module]]) -> Callable[[], type[nn.Module]]:
        if name in _LAZY_CLASS_FACTORIES:
            raise ValueError(f"lazy block class '{name}' is already registered")

        @cache
        def _named_class() -> type[nn.Module]:
            cls = factory()
            if cls.__name__ != name:
                raise ValueError(
                    f"lazy block class registered as '{name}' is called '{cls.__name__}'; "
                    "pass the class's own name to lazy_block_class"
                )
            return picklable(cls)

        _LAZY_CLASS_FACTORIES[name] = _named_class
        return _named_class

    return _decorate


def lazy_block_class_named(name: str) -> type[nn.Module]:
    """Return the lazily defined block class called ``name`` (defining it on first use).

    Parameters
    ----------
    name : str
        An attribute name looked up on the package, e.g. by pickle.

    Returns
    -------
    type
        The block class.

    Raises
    ------
    AttributeError
        If no lazy block class has that name (the package has no such attribute).

    """
    factory = _LAZY_CLASS_FACTORIES.get(name)
    if factory is None:
        raise AttributeError(f"module {PICKLE_MODULE!r} has no attribute {name!r}")
    return factory()
