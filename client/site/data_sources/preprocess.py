"""Turning decoded pixels into the run's model input (size, channels, ``uint8``)."""

from __future__ import annotations

import numpy as np

__all__ = ["to_model_input"]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_model_input(pixels: np.ndarray, in_channels: int, image_size: int) -> np.ndarray:
    """Resize ``float32`` ``(C, H, W)`` in [0, 1] and set the channel count; return uint8."""
    out = pixels
    if out.shape[-2:] != (image_size, image_size):
        # torch only when an image needs resizing: --check and cache hits stay light
        import torch
        from torchvision.transforms.v2 import functional as tvf

        tensor = torch.from_numpy(np.ascontiguousarray(out))[None]
        out = tvf.resize(tensor, [image_size, image_size], antialias=True)[0].numpy()
    if out.shape[0] == 1 and in_channels == 3:
        out = np.repeat(out, 3, axis=0)
    elif out.shape[0] == 3 and in_channels == 1:
        out = np.tensordot(_LUMA, out, axes=1)[None]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
