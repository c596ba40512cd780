"""The shared dataset interface: the dataset bundle, the registry, loading and split helpers.

Every dataset module registers a *loader* ``(cfg: DataConfig, seed: int) -> DatasetBundle`` in
:data:`DATASETS` that returns the data at native resolution. :func:`load_dataset` looks the
loader up and then applies the steps common to all datasets: a seeded stratified subsample of
the training pool (``cfg.max_samples``) and an optional resize (``cfg.image_size``).

Images are always ``uint8`` arrays of shape ``(N, C, H, W)`` and labels ``int64`` of shape
``(N,)``, so the partitioner, the site files and the trainers need no per-dataset code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from consilia.common.config import DataConfig, TaskSpec
from consilia.common.data.images import ImageData
from consilia.common.registry import Registry

__all__ = [
    "DATASETS",
    "DatasetBundle",
    "DatasetLoader",
    "DatasetNotFoundError",
    "file_md5",
    "load_dataset",
    "resize_images",
    "stratified_split",
    "stratified_subsample",
]

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the paths searched and the fix.

    Parameters
    ----------
    dataset : str
        Registered dataset name, e.g. ``"mednist"``.
    searched : sequence of Path
        Every location that was looked at, in order.
    download_hint : str
        How to obtain the data (a command or a URL).

    """

    def __init__(self, dataset: str, searched: Sequence[Path], download_hint: str) -> None:
        self.dataset = dataset
        self.searched = [Path(p) for p in searched]
        looked = "\n".join(f"  - {p}" for p in self.searched)
        message = (
            f"dataset '{dataset}' not found; looked for:\n{looked}\n"
            "Point --data-root (or the CONSILIA_DATA_ROOT environment variable, or "
            "data.root in the config) at the folder that contains it, or download it: "
            f"{download_hint}"
        )
        super().__init__(message)


@dataclass
class DatasetBundle:
    """A loaded dataset: its splits plus what a run must know about it.

    Parameters
    ----------
    name : str
        Registered dataset name.
    class_names : list of str
        Class index ``i`` is ``class_names[i]``.
    train, val, test : ImageData
        The splits; ``val`` is ``None`` when there is none (``val_fraction=0``).
    in_channels : int
        Channels per image (1 grey, 3 colour).
    image_size : int
        Side length of the (square) images.
    official_split : bool
        True when the splits are the dataset's official ones.
    split_note : str
        One line saying where the split comes from (e.g. a seeded stratified split).
    source : Path, optional
        The file or folder the data were read from.

    """

    name: str
    class_names: list[str]
    train: ImageData
    val: ImageData | None
    test: ImageData
    in_channels: int
    image_size: int
    official_split: bool
    split_note: str
    source: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def splits(self) -> dict[str, ImageData]:
        """Return the present splits by name (``train``, ``val`` if any, ``test``)."""
        out = {"train": self.train}
        if self.val is not None:
            out["val"] = self.val
        out["test"] = self.test
        return out

    def task_spec(self) -> TaskSpec:
        """Return the :class:`TaskSpec` (label space and geometry) of this dataset."""
        return TaskSpec(
            class_names=list(self.class_names),
            in_channels=self.in_channels,  # type: ignore[arg-type]
            image_size=self.image_size,
        )

    def summary(self) -> str:
        """Return one line: name, sizes, geometry and the split note."""
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits().items())
        return (
            f"{self.name}: {self.num_classes} classes, {self.in_channels}x{self.image_size}"
            f"x{self.image_size}; {sizes}; {self.split_note}"
        )


DatasetLoader = Callable[[DataConfig, int], DatasetBundle]

DATASETS: Registry[DatasetLoader] = Registry("dataset")


# ---------------------------------------------------------------------------------------
# Helpers shared by the dataset modules
# ---------------------------------------------------------------------------------------


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sample indices into train/val/test, stratified by label and seeded.

    Parameters
    ----------
    labels : np.ndarray
        Class index per sample.
    val_fraction, test_fraction : float
        Fractions of the whole set for validation and test (``val_fraction`` may be 0).
    seed : int
        Random state; the same seed gives the same split.

    Returns
    -------
    tuple of np.ndarray
        Sorted ``(train_idx, val_idx, test_idx)``; ``val_idx`` is empty when
        ``val_fraction`` is 0. Sizes follow scikit-learn (``ceil`` of each fraction). When
        a class is too small to be stratified the split falls back to a plain seeded one.

    Raises
    ------
    ValueError
        If the fractions leave no training data.

    """
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction ({val_fraction}) + test_fraction ({test_fraction}) must be < 1"
        )
    labels = np.asarray(labels)
    idx = np.arange(labels.shape[0])
    rest, test = _split(idx, labels, test_fraction, seed)
    if val_fraction > 0:
        train, val = _split(rest, labels, val_fraction / (1.0 - test_fraction), seed)
    else:
        train, val = rest, np.zeros((0,), np.int64)
    return np.sort(train), np.sort(val), np.sort(test)


def _split(
    idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        return train_test_split(
            idx, test_size=fraction, stratify=labels[idx], random_state=seed % 2**32
        )
    except ValueError:  # a class too small to appear on both sides
        log.warning("class too small for a stratified split; splitting without stratification")
        return train_test_split(idx, test_size=fraction, random_state=seed % 2**32)


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Return ``n`` sorted indices drawn without replacement, stratified by label.

    Returns all indices when ``n >= len(labels)``. Classes too small to be stratified
    fall back to a plain seeded draw.
    """
    labels = np.asarray(labels)
    total = labels.shape[0]
    if n >= total:
        return np.arange(total)
    idx = np.arange(total)
    try:
        keep, _ = train_test_split(
            idx, train_size=n, stratify=labels, random_state=seed % 2**32
        )
    except ValueError:  # a class with a single member, or n < number of classes
        keep = np.random.default_rng(seed % 2**32).choice(total, size=n, replace=False)
    return np.sort(keep)


def resize_images(images: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """Resize ``uint8`` images ``(N, C, H, W)`` to ``(N, C, size, size)`` (antialiased bilinear).

    Uses :func:`torchvision.transforms.v2.functional.resize`, which works on ``uint8``
    tensors directly. Returns the input unchanged when it already has that size.
    """
    import torch
    from torchvision.transforms.v2 import functional as tvf

    if images.shape[-2:] == (size, size):
        return images
    out = np.empty(images.shape[:2] + (size, size), dtype=np.uint8)
    for start in range(0, images.shape[0], chunk):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
        out[start : start + chunk] = tvf.resize(batch, [size, size], antialias=True).numpy()
    return out


def file_md5(path: Path, block: int = 1 << 20) -> str:
    """Return the hexadecimal MD5 digest of a file (read in blocks)."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _resize_split(split: ImageData | None, size: int) -> ImageData | None:
    if split is None:
        return None
    return ImageData(resize_images(split.images, size), split.labels, split.meta)


def load_dataset(cfg: DataConfig, seed: int) -> DatasetBundle:
    """Load the dataset named by ``cfg.dataset``.

    Parameters
    ----------
    cfg : DataConfig
        Dataset name, root, split fractions, ``max_samples`` and ``image_size``.
    seed : int
        Seed for every random step (split, subsample).

    Returns
    -------
    DatasetBundle
        With ``train`` reduced to a seeded stratified subsample of ``cfg.max_samples``
        images when set (validation and test are kept whole so scores stay comparable),
        and every split resized to ``cfg.image_size`` when set.

    Raises
    ------
    consilia.common.registry.UnknownNameError
        If the dataset name is not registered (the message lists the known names).
    DatasetNotFoundError
        If the dataset's files are missing.

    """
    loader = DATASETS.get(cfg.dataset)
    bundle = loader(cfg, seed)
    if cfg.max_samples is not None and cfg.max_samples < len(bundle.train):
        keep = stratified_subsample(bundle.train.labels, cfg.max_samples, seed)
        before = len(bundle.train)
        bundle.train = bundle.train.subset(keep)
        bundle.notes.append(
            f"train subsampled to {len(keep)} of {before} (stratified, seed {seed})"
        )
    if cfg.image_size is not None and cfg.image_size != bundle.image_size:
        native = bundle.image_size
        bundle.train = _resize_split(bundle.train, cfg.image_size)  # type: ignore[assignment]
        bundle.val = _resize_split(bundle.val, cfg.image_size)
        bundle.test = _resize_split(bundle.test, cfg.image_size)  # type: ignore[assignment]
        bundle.image_size = cfg.image_size
        bundle.notes.append(f"resized from {native} to {cfg.image_size} px")
    return bundle


def square_size(images: np.ndarray, source: object) -> int:
    """Return the side of square images ``(N, C, S, S)``; raise naming ``source`` otherwise."""
    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(f"{source}: images are {h}x{w}; only square images are supported")
    return int(h)


def split_fractions_text(val_fraction: float, test_fraction: float) -> str:
    """Return e.g. ``"70/10/20"`` for the train/val/test percentages."""
    val = round(val_fraction * 100)
    test = round(test_fraction * 100)
    return f"{100 - val - test}/{val}/{test}"

