"""Shared blocks (consilia.common.models.blocks), and pickling every registered model."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import consilia.common.models as models_package
from consilia.common.models import MODELS, blocks, build_model
from consilia.common.models.blocks import (
    groupnorm_groups,
    lazy_block_class,
    lazy_block_class_named,
    stem_halvings,
)

ALL_MODELS = MODELS.names()
LAZY_CLASSES = ["_GNBasicBlock", "_GNConvBlock", "_GNMBConv"]
NUM_CLASSES = 3


def _input_size(name: str) -> int:
    return max(28, MODELS.get(name).min_image_size)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_pickles_and_unpickles(name: str) -> None:
    """torch.save(model) must work although some DP-safe blocks are defined lazily."""
    torch.manual_seed(0)
    size = _input_size(name)
    model = build_model(name, 1, NUM_CLASSES, size).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False).eval()
    assert [type(m) for m in restored.modules()] == [type(m) for m in model.modules()]
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), f"{name}: {key}"
    x = torch.randn(1, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))


def test_a_fresh_interpreter_unpickles_models_with_lazy_blocks(tmp_path: Path) -> None:
    """The loading process has built no model: the package must define the classes on demand."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    names = ["resnet18", "inception", "efficientnet_b0"]
    for name in names:
        model = build_model(name, 1, NUM_CLASSES, 28).eval()
        torch.save(model, tmp_path / f"{name}.pt")
        with torch.no_grad():
            torch.save(model(x), tmp_path / f"{name}.logits.pt")
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "root = Path(sys.argv[1])\n"
        "x = torch.load(root / 'x.pt')\n"
        "for name in sys.argv[2:]:\n"
        "    model = torch.load(root / f'{name}.pt', weights_only=False).eval()\n"
        "    with torch.no_grad():\n"
        "        torch.testing.assert_close(model(x), torch.load(root / f'{name}.logits.pt'))\n"
        "    lazy = {t.__module__ + '.' + t.__qualname__ for t in map(type, model.modules())\n"
        "            if t.__name__.startswith('_GN')}\n"
        "    print(name, sorted(lazy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), *names],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resnet18 ['consilia.common.models._GNBasicBlock']" in done.stdout
    assert "inception ['consilia.common.models._GNConvBlock']" in done.stdout
    assert "efficientnet_b0 ['consilia.common.models._GNMBConv']" in done.stdout


@pytest.mark.parametrize("name", LAZY_CLASSES)
def test_the_package_resolves_each_lazy_block_class(name: str) -> None:
    cls = getattr(models_package, name)
    assert issubclass(cls, nn.Module)
    assert (cls.__module__, cls.__qualname__) == ("consilia.common.models", name)
    assert lazy_block_class_named(name) is cls  # defined once


def test_an_unknown_package_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="consilia.common.models.*_NoSuchBlock"):
        models_package._NoSuchBlock  # noqa: B018
    assert not hasattr(models_package, "_NoSuchBlock")


def test_lazy_block_class_rejects_a_duplicate_and_a_misnamed_class(monkeypatch) -> None:
    monkeypatch.setattr(blocks, "_LAZY_CLASS_FACTORIES", {})

    @lazy_block_class("_Expected")
    def _factory() -> type[nn.Module]:
        class _Other(nn.Module):
            pass

        return _Other

    with pytest.raises(ValueError, match="already registered"):
        lazy_block_class("_Expected")(_factory)
    with pytest.raises(ValueError, match="registered as '_Expected' is called '_Other'"):
        _factory()


@pytest.mark.parametrize(
    "image_size,max_halvings,expected",
    [(28, 2, 1), (64, 2, 2), (16, 2, 0), (224, 3, 3), (56, 3, 2), (112, 2, 2)],
)
def test_stem_halvings_keep_the_map_at_least_14_px(
    image_size: int, max_halvings: int, expected: int
) -> None:
    assert stem_halvings(image_size, max_halvings) == expected
    assert image_size / 2**expected >= 14


@pytest.mark.parametrize("channels,groups", [(32, 8), (12, 4), (6, 2), (7, 1)])
def test_groupnorm_groups_divide_the_channels(channels: int, groups: int) -> None:
    assert groupnorm_groups(channels) == groups
