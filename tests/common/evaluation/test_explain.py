"""Tests for consilia.common.evaluation.explain (Grad-CAM / occlusion saliency maps, overlays)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from consilia.common.evaluation.explain import (
    Explainer,
    find_target_layer,
    gradcam,
    occlusion,
    overlay_image,
    overlay_png,
)
from consilia.common.models import MODELS, build_model

SIZE = 32
BLOB_RADIUS = 4


def _blob_data(n: int, rng: np.random.Generator):
    """Class 1 = a bright Gaussian blob at a random place; class 0 = background only."""
    x = rng.normal(0.2, 0.05, (n, 1, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 2, n)
    centres = rng.integers(6, SIZE - 6, (n, 2))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in np.flatnonzero(y == 1):
        cy, cx = centres[i]
        x[i, 0] += 0.8 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0**2))
    return torch.from_numpy(x), torch.from_numpy(y), centres


@pytest.fixture(scope="module")
def blob_model():
    """The registered CNN trained a few steps to detect the blob (~0.5 s on one core)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y, _ = _blob_data(512, rng)
    model = build_model("cnn", 1, 2, SIZE, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        idx = torch.randint(0, len(y), (32,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    model.eval()
    test_x, test_y, centres = _blob_data(40, np.random.default_rng(1))
    accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.9, f"blob model did not learn (accuracy {accuracy:.2f})"
    return model, test_x[test_y == 1], centres[(test_y == 1).numpy()]


def _inside(centre) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.hypot(yy - centre[0], xx - centre[1]) <= BLOB_RADIUS


def test_target_layer_is_the_activation_after_the_last_conv():
    model = build_model("cnn", 1, 3, SIZE)
    layer = find_target_layer(model)
    modules = dict(model.named_modules())
    assert isinstance(modules[layer], nn.ReLU)
    names = list(modules)
    last_conv = max(i for i, n in enumerate(names) if isinstance(modules[n], nn.Conv2d))
    assert names.index(layer) > last_conv


def test_gradcam_map_has_input_size_and_unit_range(blob_model):
    model, images, _ = blob_model
    heat = gradcam(model, images[0])
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    assert heat.std() > 0


def test_gradcam_non_square_rgb_input():
    torch.manual_seed(0)
    model = build_model("cnn", 3, 4, 40)
    heat = gradcam(model, torch.rand(3, 40, 56), class_idx=2)
    assert heat.shape == (40, 56)
    assert np.all((heat >= 0) & (heat <= 1))


def test_gradcam_peaks_on_the_blob(blob_model):
    model, images, centres = blob_model
    explainer = Explainer(model)
    assert explainer.method == "gradcam"
    diffs, near = [], 0
    for image, centre in zip(images, centres, strict=True):
        heat = explainer(image, class_idx=1)
        inside = _inside(centre)
        diffs.append(heat[inside].mean() - heat[~inside].mean())
        peak = np.unravel_index(heat.argmax(), heat.shape)
        near += np.hypot(peak[0] - centre[0], peak[1] - centre[1]) <= 2 * BLOB_RADIUS
    assert min(diffs) > 0.05, "Grad-CAM should be higher on the blob than elsewhere"
    assert near / len(images) >= 0.7


def test_occlusion_peaks_on_the_blob(blob_model):
    model, images, centres = blob_model
    diffs = []
    for image, centre in zip(images[:8], centres[:8], strict=True):
        heat = occlusion(model, image, class_idx=1)  # default patch: 1/5 of the side
        assert heat.shape == (SIZE, SIZE) and heat.std() > 0
        inside = _inside(centre)
        diffs.append(heat[inside].mean() - heat[~inside].mean())
    assert min(diffs) > 0.05 and np.mean(diffs) > 0.15


def test_explaining_does_not_modify_the_model(blob_model):
    model, images, _ = blob_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    for _ in range(3):
        gradcam(model, images[0])
    hooks_after = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks_after == hooks_before  # MONAI's hooks live on a private copy
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not model.training


class _TinyViT(nn.Module):
    """Patch embedding + one attention block, returning (logits, extras) like MONAI's ViT."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 16, kernel_size=8, stride=8)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(tokens, tokens, tokens)
        return self.head(out.mean(dim=1)), [out]


def test_transformer_falls_back_to_occlusion():
    torch.manual_seed(0)
    model = _TinyViT().eval()
    assert find_target_layer(model) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heat = gradcam(model, torch.rand(1, SIZE, SIZE))
    assert any("occlusion" in str(w.message) for w in caught)
    assert heat.shape == (SIZE, SIZE) and heat.std() > 0


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_gets_a_full_size_map(name):
    """Contract: any registered model yields an (H, W) map in [0, 1]."""
    spec = MODELS.get(name)
    size = max(32, spec.min_image_size)
    torch.manual_seed(0)
    model = build_model(name, 1, 2, size).eval()
    heat = Explainer(model, mask_size=size // 4)(torch.rand(1, size, size))
    assert heat.shape == (size, size)
    assert np.all((heat >= 0) & (heat <= 1))


def test_overlay_png_writes_blended_rgb(tmp_path):
    image = np.zeros((1, 8, 8), np.float32)
    heat = np.zeros((8, 8), np.float32)
    heat[2:4, 2:4] = 1.0
    rgb = overlay_image(image, heat, alpha=0.5)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(rgb[3, 3], rgb[6, 6])  # hot spot differs from background
    path = overlay_png(image, heat, tmp_path / "sub" / "o.png", scale=4)
    with Image.open(path) as picture:
        assert picture.size == (32, 32) and picture.mode == "RGB"
    zscored = np.random.default_rng(0).normal(0, 1, (3, 8, 8))  # out of [0, 1]: rescaled
    assert overlay_image(zscored, heat).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="heatmap shape"):
        overlay_image(image, np.zeros((4, 4)))
