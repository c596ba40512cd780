"""Faster Opacus per-sample gradients for ``nn.Conv2d`` and ``nn.GroupNorm`` (hooks/ghost modes).

Opacus' hooks mode computes a layer's per-sample gradients from what its hooks captured: the
layer's input (``activations``) and the gradient of the loss w.r.t. its output
(``backprops``, already rescaled by Opacus for the loss reduction). The functions below
return exactly the same per-sample gradients as Opacus' built-in grad samplers, only
faster, and are registered through Opacus' own extension point
(``opacus.grad_sample.register_grad_sampler``) by :func:`register_fast_grad_samplers`.
Clipping, noise and accounting stay Opacus' (``DPOptimizer``, accountant): only *how* the
per-sample gradients are computed changes.

Conv2d (:func:`conv2d_grad_sample`).
    Opacus unfolds the input (``im2col``: a copy ``k·k`` times its size) and runs a batched
    matmul. Instead, the batch is folded into the convolution's groups: sample ``i``'s
    weight gradient is the weight gradient of a grouped convolution in which sample ``i``
    is group ``i`` of a batch of one, so one call to ``torch.nn.grad.conv2d_weight``
    (PyTorch's convolution backward, oneDNN on CPU) yields all of them at the cost of the
    ordinary weight gradient (3-4× faster than unfold + einsum for the default cnn on CPU).
    Layers with string padding (``"same"``/``"valid"``) or a non-zero ``padding_mode``,
    more than :data:`MAX_GROUPED_IN_CHANNELS` input channels per group (where unfold is
    faster), and empty batches keep Opacus' implementation.
GroupNorm (:func:`group_norm_grad_sample`).
    Opacus materialises ``group_norm(x) * backprops`` (two tensors the size of the
    activation map) and sums it. Instead, ``native_group_norm_backward`` is run on the
    batch folded into channels (one sample of ``N·C`` channels in ``N·G`` groups): its
    ``weight``/``bias`` gradients are then exactly the per-sample, per-channel sums, and no
    activation-sized temporary besides the normalised map of the statistics pass is made.

Both are checked against a naive one-sample-at-a-time backward in
``tests/client/privacy/test_grad_samplers.py``.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from torch import nn

#: Wider convolutions (input channels per group) keep Opacus' unfold + matmul, which is the
#: faster one there: on CPU (1 thread, batch 32) the grouped form took 0.3-0.7x Opacus' time
#: up to 64 input channels but 1.9-2.8x from 128 on (ResNet/VGG's deeper layers).
MAX_GROUPED_IN_CHANNELS = 64

__all__ = [
    "MAX_GROUPED_IN_CHANNELS",
    "FAST_GRAD_SAMPLERS",
    "conv2d_grad_sample",
    "fast_grad_samplers_registered",
    "group_norm_grad_sample",
    "register_fast_grad_samplers",
]


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``Conv2d`` (Opacus grad-sampler signature).

    Parameters
    ----------
    layer : nn.Conv2d
        The layer.
    activations : list of Tensor
        ``[input]`` as captured by Opacus' forward hook, shape ``(N, C_in, H, W)``.
    backprops : Tensor
        Gradient of the (rescaled) loss w.r.t. the layer's output, ``(N, C_out, H', W')``.

    Returns
    -------
    dict
        ``{weight: (N, *weight.shape), bias: (N, C_out)}`` for the parameters that require
        gradients.

    """
    x = activations[0]
    n = x.shape[0]
    if (n == 0 or isinstance(layer.padding, str) or layer.padding_mode != "zeros"
            or layer.in_channels // layer.groups > MAX_GROUPED_IN_CHANNELS):
        return compute_conv_grad_sample(layer, activations, backprops)
    x = x.to(backprops.dtype)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out_ch, in_per_group, kh, kw = layer.weight.shape
        grad = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            (n * out_ch, in_per_group, kh, kw),
            backprops.reshape(1, n * out_ch, *backprops.shape[2:]),
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
            groups=n * layer.groups,
        )
        ret[layer.weight] = grad.view(n, out_ch, in_per_group, kh, kw)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret


def group_norm_grad_sample(
    layer: nn.GroupNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``GroupNorm`` (Opacus grad-sampler signature).

    Parameters
    ----------
    layer : nn.GroupNorm
        The layer (affine).
    activations : list of Tensor
        ``[input]``, shape ``(N, C, *)``.
    backprops : Tensor
        Gradient of the (rescaled) loss w.r.t. the layer's output, same shape.

    Returns
    -------
    dict
        ``{weight: (N, C), bias: (N, C)}`` for the parameters that require gradients.

    """
    x = activations[0]
    n, channels = x.shape[0], x.shape[1]
    if n == 0 or x.numel() == 0:
        return compute_group_norm_grad_sample(layer, activations, backprops)
    x = x.to(backprops.dtype).contiguous()
    hw = x.numel() // (n * channels)
    groups = layer.num_groups
    _, mean, rstd = torch.native_group_norm(x, None, None, n, channels, hw, groups, layer.eps)
    _, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
        backprops.contiguous().view(1, n * channels, hw), x.view(1, n * channels, hw),
        mean.view(1, n * groups), rstd.view(1, n * groups), None,
        1, n * channels, hw, n * groups, [False, True, True],
    )
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        ret[layer.weight] = grad_w.view(n, channels)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = grad_b.view(n, channels)
    return ret


#: Layer type -> faster grad sampler registered by :func:`register_fast_grad_samplers`.
FAST_GRAD_SAMPLERS = {nn.Conv2d: conv2d_grad_sample, nn.GroupNorm: group_norm_grad_sample}


def fast_grad_samplers_registered() -> bool:
    """Return whether Opacus currently uses :data:`FAST_GRAD_SAMPLERS` (hooks mode)."""
    samplers = GradSampleModule.GRAD_SAMPLERS
    return all(samplers.get(t) is f for t, f in FAST_GRAD_SAMPLERS.items())


def register_fast_grad_samplers() -> None:
    """Make Opacus (hooks and ghost modes) use :data:`FAST_GRAD_SAMPLERS`; idempotent.

    Process-wide, like every ``register_grad_sampler``; it affects models wrapped before
    and after the call (Opacus looks the sampler up at each backward pass).
    """
    for layer_type, sampler in FAST_GRAD_SAMPLERS.items():
        register_grad_sampler(layer_type)(sampler)
