"""The one image container: ``uint8`` images ``(N, C, H, W)`` with ``int64`` labels ``(N,)``.

Every dataset split, site file, partition shard, test set and training set is an
:class:`ImageData`, so the partitioner, the site files and the trainers need no per-dataset
code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ImageData"]


@dataclass
class ImageData:
    """Images and labels of one split, site or pool.

    Parameters
    ----------
    images : np.ndarray
        ``uint8`` array of shape ``(N, C, H, W)``.
    labels : np.ndarray
        Integer class indices of shape ``(N,)``; stored as ``int64``.
    meta : list of dict, optional
        Per-sample metadata (e.g. the source file name), same length as ``images``.

    Raises
    ------
    ValueError
        On a wrong dtype or rank, mismatched lengths, negative labels or metadata of the
        wrong length.

    """

    images: np.ndarray
    labels: np.ndarray
    meta: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"ImageData.images must be uint8 of shape (N, C, H, W); "
                f"got {images.dtype} {images.shape}"
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"ImageData.labels must have shape ({images.shape[0]},); got {labels.shape}"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"ImageData.labels must be integers; got {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError("ImageData.labels must be non-negative class indices")
        if self.meta is not None and len(self.meta) != images.shape[0]:
            raise ValueError(
                f"ImageData.meta has {len(self.meta)} entries for {images.shape[0]} images"
            )
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Return the number of samples of each class (length ``num_classes``)."""
        return np.bincount(self.labels, minlength=num_classes)[:num_classes]

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageData:
        """Return the samples at ``indices`` (a copy), keeping their metadata."""
        idx = np.asarray(indices, dtype=np.int64)
        meta = [self.meta[i] for i in idx] if self.meta is not None else None
        return ImageData(self.images[idx], self.labels[idx], meta)

    @classmethod
    def empty_like(cls, other: ImageData) -> ImageData:
        """Return an empty container with the same channel count and image size as ``other``."""
        _, c, h, w = other.images.shape
        return cls(np.zeros((0, c, h, w), np.uint8), np.zeros((0,), np.int64))
