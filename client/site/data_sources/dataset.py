"""A site's labelled images, preprocessed for the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from consilia.common.data.images import ImageData

__all__ = ["SiteDataset"]


@dataclass
class SiteDataset:
    """A site's labelled images, preprocessed for the run.

    Parameters
    ----------
    images : np.ndarray
        ``uint8`` ``(N, C, H, W)`` with ``C = in_channels`` and ``H = W = image_size``.
    labels : np.ndarray
        ``int64`` ``(N,)`` indices into ``class_names``. Order: labels-CSV row order (DICOM)
        or sorted path order (image folder).
    meta : list of dict
        Per image: ``path`` (relative to the root), ``label`` and, for DICOM, header values
        (Modality, PatientSex, PatientAge, BodyPartExamined, SOPInstanceUID, ...) plus
        ``csv`` (the other columns of its labels CSV row).
    class_names : list of str
        The run's label space.

    """

    images: np.ndarray
    labels: np.ndarray
    meta: list[dict[str, Any]]
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def as_split(self) -> ImageData:
        """Return the data as a :class:`consilia.common.data.images.ImageData`."""
        return ImageData(self.images, self.labels, self.meta)
