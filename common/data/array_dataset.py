"""Images and labels held in memory as arrays, served as a torch ``Dataset``."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from consilia.common.data.transforms import ImageTransform, identity

__all__ = ["ImageArrayDataset"]


class ImageArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images and labels held in memory as arrays.

    Parameters
    ----------
    images : np.ndarray
        ``uint8`` array ``(N, C, H, W)``.
    labels : np.ndarray
        Integer class indices ``(N,)`` (stored as ``int64``).
    transform : callable, optional
        Applied to each float32 ``(C, H, W)`` image in ``[0, 1]``. Fast paths: without a
        transform (or with :func:`identity`) the whole array is converted to a float tensor
        once and items are plain tensor views; a deterministic :class:`ImagePipeline`
        (no augmentation) is applied once to every image here and cached the same way.
        Only random pipelines run per sample.

    Raises
    ------
    ValueError
        On wrong dtypes, ranks or mismatched lengths.

    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: ImageTransform | None = None,
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"ImageArrayDataset: images must be uint8 (N, C, H, W), got {images.dtype} "
                f"{images.shape}; convert with (x * 255).round().astype(np.uint8) and add the "
                "channel axis"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"ImageArrayDataset: labels must be integer class indices (N,), got "
                f"{labels.dtype} {labels.shape}"
            )
        if len(labels) != len(images):
            raise ValueError(f"ImageArrayDataset: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels: np.ndarray = labels.astype(np.int64, copy=False)
        self.transform = None if transform is identity else transform
        self._labels_t = torch.tensor(self.labels, dtype=torch.int64)
        self._float: torch.Tensor | None = None
        if self.transform is None or getattr(self.transform, "deterministic", False):
            self._float = torch.tensor(images, dtype=torch.float32).div_(255.0)
            if self.transform is not None and len(images):
                self._float = torch.stack([self.transform(x) for x in self._float])

    def __len__(self) -> int:
        """Return the number of samples."""
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image float32 (C, H, W), label int64 scalar)``."""
        if self._float is not None:
            return self._float[index], self._labels_t[index]
        image = torch.tensor(self.images[index], dtype=torch.float32).div_(255.0)
        assert self.transform is not None
        return self.transform(image), self._labels_t[index]
