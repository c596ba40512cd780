"""The model registry: what a registered architecture is, and how one is built.

A :class:`ModelSpec` carries its builder, the smallest input it accepts and the Opacus
grad-sample mode that ``dp.grad_sample_mode="auto"`` picks for it. The family modules of
this package register their builders with :func:`register_model`; :func:`build_model`
checks the geometry and options and calls the builder.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from consilia.common.registry import Registry

__all__ = [
    "DEFAULT_DP_GRAD_SAMPLE_MODE",
    "MODELS",
    "ModelSizeError",
    "ModelSpec",
    "build_model",
    "builder_options",
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
    """Register a builder under ``name`` (decorator), with its measured DP grad-sample mode.

    Parameters
    ----------
    name : str
        Registered name (``model.name`` in the run config).
    min_image_size : int
        Smallest square input (pixels) the architecture accepts.
    description : str
        One line for ``--help`` and docs.
    dp_grad_sample_mode : str
        Opacus grad-sample mode that ``dp.grad_sample_mode="auto"`` picks for this model.

    Returns
    -------
    callable
        A decorator that registers the builder and returns it unchanged.

    Raises
    ------
    ValueError
        If ``name`` is already registered.

    """

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
    options = builder_options(spec.builder)
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


def builder_options(builder: Callable[..., nn.Module]) -> list[str]:
    """Return the names of a builder's architecture options (after the three geometry args).

    Parameters
    ----------
    builder : callable
        A registered builder, ``builder(in_channels, num_classes, image_size, **options)``.

    Returns
    -------
    list of str
        The option names in signature order (the keys ``model.kwargs`` may hold).

    """
    params = list(inspect.signature(builder).parameters.values())[3:]
    return [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
