"""Datasets behind one interface: ``load_dataset(cfg, seed) -> DatasetBundle``.

Importing this package registers every dataset in :data:`DATASETS`: ``mednist``,
``synthetic`` and the twelve 2D MedMNIST flags (``pneumoniamnist``, ``breastmnist``, ...).
"""

from consilia.common.data.datasets import medmnist, mednist, synthetic  # noqa: F401 (registration)
from consilia.common.data.datasets.base import (
    DATASETS,
    DatasetBundle,
    DatasetLoader,
    DatasetNotFoundError,
    load_dataset,
    resize_images,
    stratified_split,
    stratified_subsample,
)
from consilia.common.data.datasets.medmnist import MEDMNIST_FLAGS, download_medmnist
from consilia.common.data.datasets.mednist import download_mednist
from consilia.common.data.datasets.synthetic import make_synthetic
from consilia.common.data.sitefile import load_site_npz, save_site_npz

__all__ = [
    "DATASETS",
    "MEDMNIST_FLAGS",
    "DatasetBundle",
    "DatasetLoader",
    "DatasetNotFoundError",
    "download_medmnist",
    "download_mednist",
    "load_dataset",
    "load_site_npz",
    "make_synthetic",
    "resize_images",
    "save_site_npz",
    "stratified_split",
    "stratified_subsample",
]
