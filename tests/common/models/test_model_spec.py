"""The model registry and factory (consilia.common.models.spec) and the package's exports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from torch import nn

import consilia.common.models as models_package
from consilia.common.models import MODELS, build_model, count_parameters, register_model
from consilia.common.models.spec import builder_options
from consilia.common.registry import UnknownNameError

ALL_MODELS = MODELS.names()
NUM_CLASSES = 3


def test_expected_architectures_are_registered() -> None:
    expected = {
        "cnn", "lenet5", "alexnet", "vgg11", "resnet18",
        "inception", "efficientnet_b0", "densenet121", "vit",
    }
    assert expected <= set(ALL_MODELS)


def test_package_exports_the_public_names() -> None:
    assert set(models_package.__all__) == {
        "DEFAULT_DP_GRAD_SAMPLE_MODE", "MODELS", "ModelSizeError", "ModelSpec",
        "build_model", "count_parameters", "register_model",
    }
    for name in models_package.__all__:
        assert getattr(models_package, name) is not None


def test_importing_the_package_registers_every_model_without_torchvision_or_monai() -> None:
    """A fresh interpreter: one import registers all nine; the heavy libraries stay lazy."""
    code = (
        "import json, sys\n"
        "from consilia.common.models import MODELS\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'monai'})\n"
        "print(json.dumps({'names': MODELS.names(), 'heavy': heavy}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=300)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["names"] == ALL_MODELS
    assert len(report["names"]) == 9
    assert report["heavy"] == []


@pytest.mark.parametrize("name", ALL_MODELS)
def test_spec_is_documented(name: str) -> None:
    spec = MODELS.get(name)
    assert spec.min_image_size >= 1
    assert spec.description.strip()
    assert "\n" not in spec.description


def test_builder_options_are_the_arguments_after_the_geometry() -> None:
    assert builder_options(MODELS.get("cnn").builder) == ["width", "dropout", "norm"]
    assert builder_options(MODELS.get("resnet18").builder) == []


def test_unknown_model_lists_allowed_names() -> None:
    with pytest.raises(UnknownNameError) as excinfo:
        build_model("no_such_net", 1, NUM_CLASSES, 28)
    message = str(excinfo.value)
    assert "no_such_net" in message
    for name in ALL_MODELS:
        assert name in message


def test_unknown_option_lists_allowed_options() -> None:
    with pytest.raises(ValueError, match="allowed: width, dropout") as excinfo:
        build_model("cnn", 1, NUM_CLASSES, 28, depth=3)
    assert "depth" in str(excinfo.value)


@pytest.mark.parametrize("in_channels,num_classes", [(0, 3), (1, 0)])
def test_bad_geometry_is_rejected(in_channels: int, num_classes: int) -> None:
    with pytest.raises(ValueError, match="in_channels and num_classes"):
        build_model("cnn", in_channels, num_classes, 28)


def test_count_parameters_skips_frozen() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert count_parameters(model) == (4 * 3 + 3) + (3 * 2 + 2)
    model[0].requires_grad_(False)
    assert count_parameters(model) == 3 * 2 + 2


def test_register_model_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn", 8, "duplicate")(lambda c, n, s: nn.Identity())
