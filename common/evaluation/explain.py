"""Saliency maps for any registered model: Grad-CAM and occlusion sensitivity (MONAI).

Which method
------------
* CNNs: Grad-CAM (``monai.visualize.GradCAM``) on an automatically chosen layer — a
  per-architecture override from :data:`TARGET_LAYER_OVERRIDES` when there is one, else the
  last ``nn.Conv2d`` of the network (the deepest spatial feature map), or rather the
  activation that follows it (Grad-CAM wants rectified maps; see :func:`find_target_layer`).
* Transformers (ViT and anything containing attention blocks): Grad-CAM is not meaningful —
  the only convolution is the patch embedding, whose output carries no class evidence yet, and
  token maps are not spatial feature maps. These models fall back to occlusion sensitivity
  (``monai.visualize.OcclusionSensitivity``), which is model-agnostic (but costs one forward
  pass per mask position).

Two MONAI traps handled here: ``GradCAM``'s default post-processing maps (min, max) to (1, 0),
i.e. *inverts* the map, so we normalise ourselves (1 = most important); and it registers hooks
on the network that are never removed (and sets ``inplace=False`` on the target layer), so we
always explain a private deep copy of the model.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from monai.visualize import GradCAM, OcclusionSensitivity
from PIL import Image
from torch import nn

__all__ = [
    "TARGET_LAYER_OVERRIDES",
    "Explainer",
    "find_target_layer",
    "gradcam",
    "occlusion",
    "overlay_image",
    "overlay_png",
]

#: Grad-CAM target layer per model class name; ``None`` = no meaningful layer (use occlusion).
TARGET_LAYER_OVERRIDES: dict[str, str | None] = {
    # MONAI DenseNet: the final ReLU after the last dense block (the classic CAM layer).
    "DenseNet": "class_layers.relu",
    "DenseNet121": "class_layers.relu",
    "DenseNet169": "class_layers.relu",
    # ResNets (MONAI, torchvision): the last stage, after its final activation.
    "ResNet": "layer4",
    # Inception nets: the last inception block's concatenated output (the last conv alone
    # would be one branch, a quarter of the channels).
    "GoogLeNet": "inception5b",
    "Inception3": "Mixed_7c",
    "ViT": None,
    "VisionTransformer": None,
    "SwinTransformer": None,
}

_ATTENTION_HINTS = ("Attention", "SABlock", "TransformerBlock")
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish,
)


class _LogitsOnly(nn.Module):
    """Wrap a model whose forward returns ``(logits, extras)`` (MONAI ViT) to return logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, tuple | list) else out


def _is_transformer(model: nn.Module) -> bool:
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, nn.MultiheadAttention) or any(h in name for h in _ATTENTION_HINTS):
            return True
    return False


def find_target_layer(model: nn.Module) -> str | None:
    """Choose the Grad-CAM target layer of ``model``.

    Parameters
    ----------
    model : nn.Module
        Any classifier.

    Returns
    -------
    str or None
        A name from ``model.named_modules()``: the override for the model's class in
        :data:`TARGET_LAYER_OVERRIDES`, else the activation that directly follows the last
        ``nn.Conv2d`` (normalisation layers in between skipped), else that conv itself.
        ``None`` for transformers and models without convolutions (use :func:`occlusion`).

    """
    names = dict(model.named_modules())
    for cls in type(model).__mro__:
        if cls.__name__ in TARGET_LAYER_OVERRIDES:
            layer = TARGET_LAYER_OVERRIDES[cls.__name__]
            if layer is None or layer in names:
                return layer
    if _is_transformer(model):
        return None
    leaves = [(n, m) for n, m in names.items() if n and not any(True for _ in m.children())]
    convs = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    # Prefer the activation right after the last conv (normalisation layers in between are
    # skipped): Grad-CAM needs rectified feature maps; on a conv output that a GroupNorm
    # re-centres, the channel weights nearly cancel and the map can come out all zero.
    for name, module in leaves[convs[-1] + 1:]:
        if isinstance(module, _ACTIVATIONS):
            return name
        if "Norm" not in type(module).__name__:
            break
    return leaves[convs[-1]][0]


def _normalise(heat: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] (1 = most important); a constant map becomes all zeros."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    low, high = heat.min(), heat.max()
    if high - low <= 1e-12:
        return np.zeros_like(heat, dtype=np.float32)
    return ((heat - low) / (high - low)).astype(np.float32)


def _as_batch(image: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"image must be (C, H, W) (or (H, W)), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    return x.float()[None]


class Explainer:
    """Reusable saliency maps for one model (hooks are set up once, on a private copy).

    Parameters
    ----------
    model : nn.Module
        The classifier (not modified: a deep copy is explained).
    method : {"auto", "gradcam", "occlusion"}
        ``auto`` = Grad-CAM when :func:`find_target_layer` finds a layer, else occlusion.
        ``gradcam`` on a model without a meaningful layer warns and uses occlusion.
    target_layer : str, optional
        Grad-CAM layer name (overrides the automatic choice).
    mask_size : int, optional
        Occlusion patch side in pixels (default: 1/5 of the image side, at least 2; much
        smaller patches barely move a confident model's probability, giving noisy maps).
    device : str or torch.device
        Where to run.

    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "auto",
        target_layer: str | None = None,
        mask_size: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if method not in {"auto", "gradcam", "occlusion"}:
            raise ValueError(f"method must be auto, gradcam or occlusion, got {method!r}")
        self.device = torch.device(device)
        inner = copy.deepcopy(model).to(self.device).eval()
        for param in inner.parameters():
            param.requires_grad_(True)
        layer = target_layer if target_layer is not None else find_target_layer(inner)
        if layer is not None and layer not in dict(inner.named_modules()):
            raise ValueError(
                f"target layer {layer!r} not found in {type(model).__name__}; pick a name from "
                "model.named_modules()"
            )
        if method == "gradcam" and layer is None:
            warnings.warn(
                f"{type(model).__name__}: no convolutional feature map for Grad-CAM "
                "(transformer or no Conv2d); using occlusion sensitivity instead",
                stacklevel=2,
            )
        self.method = "occlusion" if method == "occlusion" or layer is None else "gradcam"
        self.target_layer = layer if self.method == "gradcam" else None
        self.mask_size = mask_size
        self.model = _LogitsOnly(inner)
        self._cam: GradCAM | None = None
        if self.method == "gradcam":
            self._cam = GradCAM(
                nn_module=self.model,
                target_layers=f"model.{layer}",
                postprocessing=lambda t: t,  # MONAI's default inverts the map
            )

    @torch.no_grad()
    def predict(self, image: Any) -> np.ndarray:
        """Return the softmax probabilities ``(C_classes,)`` for one ``(C, H, W)`` image."""
        logits = self.model(_as_batch(image).to(self.device))
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()

    def __call__(self, image: Any, class_idx: int | None = None) -> np.ndarray:
        """Return the saliency map ``(H, W)`` in [0, 1] for ``class_idx`` (default: argmax)."""
        if self.method == "gradcam":
            return self._gradcam(image, class_idx)
        return self._occlusion(image, class_idx)

    def _gradcam(self, image: Any, class_idx: int | None) -> np.ndarray:
        assert self._cam is not None
        x = _as_batch(image).to(self.device).requires_grad_(True)
        cam = self._cam(x, class_idx=class_idx)
        return _normalise(cam[0, 0].detach().cpu().numpy())

    def _occlusion(self, image: Any, class_idx: int | None) -> np.ndarray:
        x = _as_batch(image).to(self.device)
        height, width = x.shape[-2:]
        mask = self.mask_size or max(2, min(height, width) // 5)
        with torch.no_grad():
            probs = torch.softmax(self.model(x).float(), dim=1)[0]
        target = int(probs.argmax()) if class_idx is None else int(class_idx)
        occ = OcclusionSensitivity(
            nn_module=self.model, mask_size=mask, n_batch=32, verbose=False, overlap=0.5
        )
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MONAI's tensor-indexing notices
            occ_map, _ = occ(x)
        # occ_map: (1, num_classes, H, W), probability of each class with the patch occluded;
        # importance = how much hiding a region lowers the target class probability
        # (min-max scaled: regions whose occlusion raises it get the lowest values).
        drop = float(probs[target]) - occ_map[0, target].cpu().numpy()
        return _normalise(drop)


def gradcam(
    model: nn.Module,
    image: Any,
    class_idx: int | None = None,
    target_layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM map of one image (occlusion for transformers, with a warning).

    Parameters
    ----------
    model : nn.Module
        Any classifier returning logits (not modified).
    image : array-like or Tensor, shape (C, H, W)
        Float in model space (or uint8, scaled by /255).
    class_idx : int, optional
        Class to explain; default: the predicted class.
    target_layer : str, optional
        Layer name; default: :func:`find_target_layer`.

    Returns
    -------
    np.ndarray
        ``(H, W)`` float32 map in [0, 1], the input's size (1 = most important).

    """
    return Explainer(model, method="gradcam", target_layer=target_layer)(image, class_idx)


def occlusion(
    model: nn.Module, image: Any, class_idx: int | None = None, mask_size: int | None = None
) -> np.ndarray:
    """Occlusion-sensitivity map of one image (``monai.visualize.OcclusionSensitivity``).

    Parameters
    ----------
    model : nn.Module
        Any classifier returning logits.
    image : array-like or Tensor, shape (C, H, W)
        Float in model space (or uint8, scaled by /255).
    class_idx : int, optional
        Class to explain; default: the predicted class.
    mask_size : int, optional
        Occluding patch side in pixels (default: 1/5 of the image side).

    Returns
    -------
    np.ndarray
        ``(H, W)`` float32 map in [0, 1]: how much hiding each region lowers the class
        probability (1 = the most important region).

    """
    return Explainer(model, method="occlusion", mask_size=mask_size)(image, class_idx)


def _display_rgb(image: Any) -> np.ndarray:
    """Image (C, H, W)/(H, W)/(H, W, C), any range -> float RGB (H, W, 3) in [0, 1]."""
    arr = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):  # (C, H, W); (H, W, C) passes through
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) with C in (1, 3), got shape {arr.shape}")
    if arr.min() < 0 or arr.max() > 1:  # e.g. z-scored model input: rescale for display
        low, high = arr.min(), arr.max()
        arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def overlay_image(
    image: Any, heatmap: np.ndarray, alpha: float = 0.45, cmap: str = "jet"
) -> np.ndarray:
    """Blend a colour-mapped heatmap over an image.

    Parameters
    ----------
    image : array-like, shape (C, H, W) or (H, W)
        Grey or RGB image (uint8, or float; rescaled to [0, 1] when outside it).
    heatmap : np.ndarray, shape (H, W)
        Map in [0, 1].
    alpha : float
        Heatmap weight (0 = image only).
    cmap : str
        Matplotlib colormap name.

    Returns
    -------
    np.ndarray
        ``(H, W, 3)`` uint8 RGB.

    """
    rgb = _display_rgb(image)
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, 1.0)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap shape {heat.shape} != image size {rgb.shape[:2]}")
    colours = matplotlib.colormaps[cmap](heat)[..., :3]
    blended = (1.0 - alpha) * rgb + alpha * colours
    return np.round(np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8)


def overlay_png(
    image: Any,
    heatmap: np.ndarray,
    path: str | Path,
    alpha: float = 0.45,
    cmap: str = "jet",
    scale: int = 1,
) -> Path:
    """Write :func:`overlay_image` as a PNG (parent folders are created).

    Parameters
    ----------
    image, heatmap, alpha, cmap
        As in :func:`overlay_image`.
    path : str or Path
        Output file.
    scale : int
        Integer upscaling (nearest neighbour) for small images.

    Returns
    -------
    Path
        The written file.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(overlay_image(image, heatmap, alpha, cmap))
    if scale > 1:
        picture = picture.resize(
            (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
        )
    picture.save(path, format="PNG")
    return path

