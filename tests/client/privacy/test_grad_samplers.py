"""Faster DP-SGD step: per-sample gradients equal a naive per-sample loop; same DP update."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consilia.client.privacy.discarded_grads import skip_discarded_conv_grads
from consilia.client.privacy.dpsgd import enable_fast_dp_step
from consilia.client.privacy.grad_samplers import (
    FAST_GRAD_SAMPLERS,
    conv2d_grad_sample,
    fast_grad_samplers_registered,
    group_norm_grad_sample,
    register_fast_grad_samplers,
)
from consilia.common.models import build_model
from consilia.common.training.allocator import retain_freed_memory

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _naive_per_sample(
    layer: nn.Module, x: torch.Tensor, backprops: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One-sample-at-a-time backward of ``sum(layer(x_i) * backprops_i)``."""
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, p in layer.named_parameters()}
    for i in range(x.shape[0]):
        layer.zero_grad(set_to_none=True)
        (layer(x[i : i + 1]) * backprops[i : i + 1]).sum().backward()
        for name, param in layer.named_parameters():
            grads[name].append(param.grad.detach().clone())
    return {name: torch.stack(values) for name, values in grads.items()}


def _assert_same_as_per_sample_loop(layer: nn.Module, sampler, x: torch.Tensor) -> None:
    with torch.no_grad():
        backprops = torch.randn_like(layer(x))
    got = sampler(layer, [x], backprops)
    expected = _naive_per_sample(layer, x, backprops)
    params = dict(layer.named_parameters())
    assert set(got) == {params[name] for name in expected}
    for name, value in expected.items():
        torch.testing.assert_close(got[params[name]], value, **TOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


CONV_GEOMETRIES = [
    # in, out, kernel, stride, padding, dilation, groups, bias, size
    (1, 4, 3, 1, 1, 1, 1, True, 12),  # the default cnn's first layer
    (1, 3, 3, 2, 1, 1, 1, False, 11),
    (3, 5, 3, 1, 1, 1, 1, True, 10),
    (3, 6, 3, 2, 1, 1, 1, True, 13),
    (3, 4, 3, 1, 0, 1, 1, False, 9),
    (3, 6, 5, (2, 1), (2, 1), 1, 3, True, 12),  # groups, uneven stride/padding
    (4, 6, 3, 1, 2, 2, 2, True, 11),  # dilation
    (6, 6, 3, 2, 1, 1, 6, False, 10),  # depthwise
    (4, 8, (1, 3), 1, (0, 1), 1, 1, True, 8),
    (3, 4, 3, 1, "same", 1, 1, True, 9),  # string padding: Opacus' implementation
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv2d_grad_sample_equals_a_per_sample_loop(geometry: tuple, dtype: torch.dtype) -> None:
    cin, cout, kernel, stride, padding, dilation, groups, bias, size = geometry
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias).to(dtype)
    x = torch.randn(5, cin, size, size + 1, dtype=dtype)
    _assert_same_as_per_sample_loop(layer, conv2d_grad_sample, x)


@pytest.mark.parametrize(("groups", "channels", "shape"), [
    (1, 3, (6, 5)), (2, 4, (7, 7)), (4, 8, (5, 6)), (8, 16, (4, 4)), (3, 6, (9,)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_grad_sample_equals_a_per_sample_loop(
    groups: int, channels: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    torch.manual_seed(1)
    layer = nn.GroupNorm(groups, channels).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters
        layer.weight.normal_()
        layer.bias.normal_()
    x = 3 * torch.randn(6, channels, *shape, dtype=dtype) + 2
    _assert_same_as_per_sample_loop(layer, group_norm_grad_sample, x)


def test_empty_batches_fall_back_to_opacus() -> None:
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)
    for layer, sampler, stock in ((conv, conv2d_grad_sample, compute_conv_grad_sample),
                                  (norm, group_norm_grad_sample, compute_group_norm_grad_sample)):
        args = ([torch.zeros(0, layer.weight.shape[0] if layer is norm else 3, 8, 8)],
                torch.zeros(0, 4, 8, 8))
        got, expected = sampler(layer, *args), stock(layer, *args)
        assert {p: v.shape for p, v in got.items()} == {p: v.shape for p, v in expected.items()}


def test_registration_goes_through_opacus_and_is_idempotent() -> None:
    register_fast_grad_samplers()
    register_fast_grad_samplers()
    assert fast_grad_samplers_registered()
    for layer_type, sampler in FAST_GRAD_SAMPLERS.items():
        assert GradSampleModule.GRAD_SAMPLERS[layer_type] is sampler
    assert retain_freed_memory() is retain_freed_memory()  # idempotent (True on glibc)


def _private(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=len(y)),
            noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False,
            grad_sample_mode="hooks",
        )


def test_fast_step_equals_a_manual_dp_sgd_step_from_per_sample_gradients() -> None:
    """Hooks mode + enable_fast_dp_step = clip each torch.func per-sample gradient, sum, step."""
    torch.manual_seed(2)
    model = build_model("cnn", 1, 3, 16, width=8)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 3, (6,))
    clip = 0.05  # small enough that every sample is clipped

    def loss_of(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        out = torch.func.functional_call(model, params, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))(reference, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()], 1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clipping formula
    assert (factor < 1).all()
    expected = {n: reference[n] - 0.5 * torch.einsum("i,i...", factor, g) / len(y)
                for n, g in per_sample.items()}

    private_model, optimizer, _ = _private(model, x, y, clip)
    handles = enable_fast_dp_step(private_model, "hooks")
    assert len(handles) == 2 * 3  # pre-hook + hook per convolution
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(private_model(x), y).backward()
    for name, param in model.named_parameters():
        assert param.requires_grad
        torch.testing.assert_close(param.grad_sample, per_sample[name], **TOL)
        if name.startswith(("0.", "4.", "8.")):  # convolutions: ordinary gradient skipped
            assert param.grad is None, name
    optimizer.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], **TOL)

    for handle in handles:  # removed: ordinary gradients again
        handle.remove()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(private_model(x), y).backward()
    assert model[0].weight.grad is not None


def test_skipping_ordinary_gradients_keeps_per_sample_gradients_and_restores_on_error() -> None:
    torch.manual_seed(3)
    plain, fast = build_model("cnn", 1, 3, 16, width=8), build_model("cnn", 1, 3, 16, width=8)
    fast.load_state_dict(plain.state_dict())
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4,))
    wrapped = [_private(m, x, y, 1.0)[0] for m in (plain, fast)]
    handles = skip_discarded_conv_grads(wrapped[1])
    for m in wrapped:
        nn.functional.cross_entropy(m(x), y).backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad_sample, a.grad_sample, **TOL, msg=name)

    with pytest.raises(RuntimeError):  # a failing forward leaves the parameters trainable
        wrapped[1](torch.randn(2, 5, 16, 16))
    assert all(p.requires_grad for p in fast.parameters())
    with torch.no_grad():  # evaluation is untouched
        assert not wrapped[1](x).requires_grad
    for handle in handles:
        handle.remove()


def test_wide_convolutions_keep_opacus_unfold_and_agree_with_it():
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from consilia.client.privacy.grad_samplers import MAX_GROUPED_IN_CHANNELS, conv2d_grad_sample

    torch.manual_seed(0)
    for cin in (MAX_GROUPED_IN_CHANNELS, 2 * MAX_GROUPED_IN_CHANNELS):
        layer = torch.nn.Conv2d(cin, 8, 3, padding=1)
        x = torch.randn(3, cin, 6, 6)
        g = torch.randn(3, 8, 6, 6)
        ours = conv2d_grad_sample(layer, [x], g)
        ref = compute_conv_grad_sample(layer, [x], g)
        for p in (layer.weight, layer.bias):
            torch.testing.assert_close(ours[p], ref[p], rtol=1e-4, atol=1e-5)
