"""Contract tests run for every registered model: forward/backward, Opacus, DP safety."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consilia.common.models import MODELS, ModelSizeError, build_model, count_parameters

# Opacus hooks on the first layer fire without input gradients: expected, not a problem.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

ALL_MODELS = MODELS.names()
NUM_CLASSES = 3
# (in_channels, image_size): the MedMNIST-like grey size and the MedNIST-like colour size.
GEOMETRIES = [(1, 28), (3, 64)]


@pytest.fixture(autouse=True)
def _quiet_and_seeded() -> None:
    torch.manual_seed(0)
    # Opacus warns about secure RNG and poisson sampling; irrelevant to these contracts.
    logging.getLogger("opacus").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="opacus")


def _no_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout/stochastic-depth probability so that outputs are deterministic."""
    for module in model.modules():
        if isinstance(getattr(module, "p", None), float):
            module.p = 0.0
    return model


@pytest.mark.parametrize("in_channels,image_size", GEOMETRIES, ids=["1x28", "3x64"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name: str, in_channels: int, image_size: int) -> None:
    if image_size < MODELS.get(name).min_image_size:
        with pytest.raises(ModelSizeError, match=name):
            build_model(name, in_channels, NUM_CLASSES, image_size)
        return
    model = build_model(name, in_channels, NUM_CLASSES, image_size).train()
    x = torch.randn(2, in_channels, image_size, image_size)
    target = torch.tensor([0, 2])

    logits = model(x)
    nn.functional.cross_entropy(logits, target).backward()

    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    # Every trainable parameter takes part (an unused one breaks Opacus) with a finite grad.
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite grad"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_odd_image_size_forward(name: str) -> None:
    size = max(45, MODELS.get(name).min_image_size)
    model = build_model(name, 1, NUM_CLASSES, size).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, size, size)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_opacus_validator_strict(name: str) -> None:
    model = build_model(name, 3, NUM_CLASSES, 64)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_no_inplace_modules(name: str) -> None:
    model = build_model(name, 1, NUM_CLASSES, 28 if MODELS.get(name).min_image_size <= 28 else 64)
    inplace = [type(m).__name__ for m in model.modules() if getattr(m, "inplace", False)]
    assert inplace == []


@pytest.mark.parametrize("name", ALL_MODELS)
def test_min_image_size_is_exact(name: str) -> None:
    minimum = MODELS.get(name).min_image_size
    model = build_model(name, 1, NUM_CLASSES, minimum).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, minimum, minimum)).shape == (1, NUM_CLASSES)

    with pytest.raises(ModelSizeError) as excinfo:
        build_model(name, 1, NUM_CLASSES, minimum - 1)
    message = str(excinfo.value)
    assert f"'{name}'" in message
    assert str(minimum) in message
    assert "data.image_size" in message


def test_options_are_honoured() -> None:
    small = build_model("vit", 1, NUM_CLASSES, 28, hidden_size=64, num_layers=2, mlp_dim=128)
    default = build_model("vit", 1, NUM_CLASSES, 28)
    assert count_parameters(small) < count_parameters(default)
    patch_conv = next(m for m in small.modules() if isinstance(m, nn.Conv2d))
    assert patch_conv.kernel_size == (4, 4)  # 28 px -> 7x7 grid of 4 px patches
    explicit = build_model("vit", 1, NUM_CLASSES, 28, patch_size=7)
    patch_conv = next(m for m in explicit.modules() if isinstance(m, nn.Conv2d))
    assert patch_conv.kernel_size == (7, 7)
    wide = build_model("cnn", 1, NUM_CLASSES, 28, width=8)
    assert count_parameters(wide) < count_parameters(build_model("cnn", 1, NUM_CLASSES, 28))


@pytest.mark.parametrize(
    "name,image_size,first_stride",
    [("resnet18", 28, 2), ("resnet18", 16, 1), ("resnet18", 128, 2),
     ("densenet121", 28, 2), ("efficientnet_b0", 20, 1), ("alexnet", 28, 1)],
)
def test_stem_adapts_to_small_images(name: str, image_size: int, first_stride: int) -> None:
    model = build_model(name, 1, NUM_CLASSES, image_size)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    assert first_conv.stride == (first_stride, first_stride)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_same_architecture_exchanges_weights(name: str) -> None:
    """Server and sites build the same model independently: state dicts must line up."""
    first = build_model(name, 1, NUM_CLASSES, 28 if MODELS.get(name).min_image_size <= 28 else 64)
    second = build_model(name, 1, NUM_CLASSES, 28 if MODELS.get(name).min_image_size <= 28 else 64)
    second.load_state_dict(first.state_dict(), strict=True)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_per_sample_gradients_match_single_sample_backward(name: str) -> None:
    """Opacus hooks must give each sample its own gradient (in-place ops would corrupt them)."""
    # float64: deep nets (EfficientNet) drift by ~1e-3 in float32 between the two paths.
    model = _no_dropout(build_model(name, 1, NUM_CLASSES, 28)).double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    target = torch.tensor([1, 2])
    expected = []
    for i in range(2):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i : i + 1]), target[i : i + 1]).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    nn.functional.cross_entropy(wrapped(x), target, reduction="sum").backward()

    for param_name, param in model.named_parameters():
        assert param.grad_sample is not None, f"{name}: no per-sample grad for {param_name}"
        for i in range(2):
            torch.testing.assert_close(
                param.grad_sample[i], expected[i][param_name], rtol=1e-6, atol=1e-9,
                msg=lambda m, p=param_name: f"{name}.{p}: {m}",
            )
    wrapped._close()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_opacus_private_step(name: str) -> None:
    model = build_model(name, 1, NUM_CLASSES, 28)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, NUM_CLASSES, (8,)))
    loader = DataLoader(data, batch_size=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    private_model, private_opt, private_loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks",
    )
    x, y = next((bx, by) for bx, by in private_loader if len(by) > 0)
    private_opt.zero_grad()
    nn.functional.cross_entropy(private_model(x), y).backward()
    private_opt.step()

    for param_name, param in model.named_parameters():
        assert param.grad_sample is None or param.grad_sample.shape[0] == len(y)
        assert torch.isfinite(param).all(), f"{name}: {param_name} not finite after DP step"
        assert not torch.equal(param.detach(), before[param_name]), f"{param_name} not updated"


# Opacus grad-sample modes per model, measured with opacus 1.6: Expanded Weights ("ew")
# cannot handle MONAI DenseNet's concatenated views nor ViT's position-embedding add.
EW_UNSUPPORTED = {"densenet121", "vit"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["functorch", "ew", "ghost"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_opacus_other_grad_sample_modes(name: str, mode: str) -> None:
    model = build_model(name, 1, NUM_CLASSES, 28)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = TensorDataset(torch.randn(4, 1, 28, 28), torch.randint(0, NUM_CLASSES, (4,)))
    loader = DataLoader(data, batch_size=4)
    criterion = nn.CrossEntropyLoss()
    engine = PrivacyEngine()
    kwargs = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "grad_sample_mode": mode,
              "poisson_sampling": False}
    if mode == "ghost":
        private_model, private_opt, criterion, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, **kwargs
        )
    else:
        private_model, private_opt, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, **kwargs
        )
    x, y = data.tensors
    before = next(model.parameters()).detach().clone()

    def step() -> None:
        private_opt.zero_grad()
        criterion(private_model(x), y).backward()
        private_opt.step()

    if mode == "ew" and name in EW_UNSUPPORTED:
        with pytest.raises(RuntimeError):
            step()
        return
    step()
    assert not torch.equal(next(model.parameters()).detach(), before)
