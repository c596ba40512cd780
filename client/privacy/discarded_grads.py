"""Skip the ordinary ``Conv2d`` gradients that DP-SGD discards (Opacus hooks mode only).

In hooks mode autograd computes every parameter's ordinary (batch-summed) gradient *and*
Opacus' hooks compute the per-sample gradients from the layer's input and output gradient.
``DPOptimizer`` then overwrites ``p.grad`` with the clipped, noised sum of the per-sample
gradients, so the ordinary weight and bias gradients of each convolution are computed for
nothing (for the default cnn on CPU: 5-10 % of a DP-SGD step).

:func:`skip_discarded_conv_grads` stops autograd from computing them: a forward pre-hook
turns ``requires_grad`` off for the convolution's own parameters while its forward builds
the graph, and a forward hook turns it back on *before* Opacus' activation hook runs
(``prepend=True``; also when the forward raises). The output gradient still flows: through
the input when that requires grad, otherwise (the first convolution, fed with data) the
forward hook marks the output itself as a leaf that requires grad, which is all autograd
needs to reach it. Opacus' backward hook therefore receives the same output gradient and
computes the same per-sample gradients; only ``p.grad`` stays ``None`` until
``DPOptimizer`` sets it to the clipped, noised sum. Nothing upstream of a first
convolution needs a gradient, so marking its output changes no other gradient.

Never use it in ghost mode (its second backward pass needs the ordinary gradients) or
outside DP-SGD; remove the handles (``PrivateTraining.close``) to restore the layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["skip_discarded_conv_grads"]


def skip_discarded_conv_grads(module: nn.Module) -> list[RemovableHandle]:
    """Stop autograd from computing the ordinary gradients of ``module``'s ``Conv2d`` layers.

    Parameters
    ----------
    module : nn.Module
        The model trained with Opacus in hooks mode (the original module or its
        ``GradSampleModule``).

    Returns
    -------
    list of RemovableHandle
        Remove them to restore ordinary behaviour.

    """
    handles: list[RemovableHandle] = []
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            switched: list[nn.Parameter] = []
            handles.append(layer.register_forward_pre_hook(_freezer(switched)))
            handles.append(
                layer.register_forward_hook(_restorer(switched), prepend=True, always_call=True)
            )
    return handles


def _freezer(switched: list[nn.Parameter]) -> Any:
    def hook(layer: nn.Module, _args: tuple[Any, ...]) -> None:
        if not (torch.is_grad_enabled() and layer.training):
            return
        for param in layer.parameters(recurse=False):
            if param.requires_grad:
                param.requires_grad_(False)
                switched.append(param)

    return hook


def _restorer(switched: list[nn.Parameter]) -> Any:
    def hook(_layer: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        if not switched:
            return
        while switched:
            switched.pop().requires_grad_(True)
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)  # nothing upstream needs grad: keep the output a leaf

    return hook
