"""MedNIST (6 classes of 64x64 grey medical images), registered as ``mednist``.

Two layouts are read, searched in this order under the data root:

1. ``<root>/mednist/labels.csv`` (columns ``filename,label``; ``filename`` relative to
   ``<root>/mednist/images/``), the layout of the repository's shared data subset;
   ``<root>/labels.csv`` + ``<root>/images/`` when the root is that folder itself;
2. ``<root>/MedNIST/<class>/*.jpeg``, the folder MONAI's ``MedNIST.tar.gz`` extracts to
   (see :func:`download_mednist`).

Decoding ~12k JPEGs takes seconds, so the decoded ``uint8`` array is cached as ``.npz`` under
``default_cache_dir()/datasets/`` (never inside the data root), keyed by a hash of the file
list, the labels and the image file sizes. MedNIST has no official split and no patient IDs:
the loader makes a seeded stratified train/val/test split (neighbouring slices of one scan can
land on both sides, so expect optimistic scores).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from consilia.common.config import DataConfig
from consilia.common.data.datasets.base import (
    DATASETS,
    DatasetBundle,
    DatasetNotFoundError,
    split_fractions_text,
    square_size,
    stratified_split,
)
from consilia.common.data.images import ImageData
from consilia.common.paths import default_cache_dir, resolve_data_root

__all__ = [
    "MEDNIST_MD5",
    "MEDNIST_URL",
    "download_mednist",
    "find_mednist",
    "load_mednist",
    "read_mednist_images",
]

log = logging.getLogger(__name__)

#: MONAI's MedNIST archive (``monai.apps.MedNISTDataset.resource`` / ``.md5``).
MEDNIST_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "MedNIST.tar.gz"
)
MEDNIST_MD5 = "0bc7306e7427e00ad1c5526a6677552d"

_CACHE_VERSION = "mednist-v1"
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def download_mednist(root: Path) -> Path:
    """Download and extract MONAI's ``MedNIST.tar.gz`` (58,954 images, ~60 MB) into ``root``.

    Parameters
    ----------
    root : Path
        Data root; the images land in ``root/MedNIST/<class>/``.

    Returns
    -------
    Path
        The extracted ``root/MedNIST`` folder.

    """
    from monai.apps import download_and_extract

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    download_and_extract(
        MEDNIST_URL,
        filepath=root / "MedNIST.tar.gz",
        output_dir=root,
        hash_val=MEDNIST_MD5,
        hash_type="md5",
    )
    return root / "MedNIST"


def _download_hint(root: Path) -> str:
    return (
        "python -c \"from pathlib import Path; from consilia.common.data.datasets.mednist import "
        f"download_mednist; download_mednist(Path('{root}'))\""
    )


def find_mednist(root: Path) -> tuple[Path, list[tuple[str, str]]]:
    """Locate MedNIST under ``root`` and list its images.

    Returns
    -------
    tuple
        ``(images_dir, entries)`` where ``entries`` are ``(relative_path, label)`` pairs in
        file order.

    Raises
    ------
    DatasetNotFoundError
        If neither layout exists; the message names every path searched.
    ValueError
        If ``labels.csv`` is malformed (the message names the file and the line).

    """
    csv_candidates = [root / "mednist" / "labels.csv", root / "labels.csv"]
    for labels_csv in csv_candidates:
        if labels_csv.is_file():
            return labels_csv.parent / "images", _read_labels_csv(labels_csv)
    monai_dir = root / "MedNIST"
    if monai_dir.is_dir():
        entries = [
            (f"{cls.name}/{f.name}", cls.name)
            for cls in sorted(p for p in monai_dir.iterdir() if p.is_dir())
            for f in sorted(cls.iterdir())
            if f.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if entries:
            return monai_dir, entries
    searched = [*csv_candidates, monai_dir / "<class>" / "*.jpeg"]
    raise DatasetNotFoundError("mednist", searched, _download_hint(root))


def _read_labels_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"filename", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {sorted(missing)}; expected a header "
                "'filename,label' (filename relative to images/)"
            )
        entries = []
        for line, row in enumerate(reader, start=2):
            name, label = (row["filename"] or "").strip(), (row["label"] or "").strip()
            if not name or not label:
                raise ValueError(f"{path}, line {line}: empty filename or label")
            entries.append((name, label))
    if not entries:
        raise ValueError(f"{path}: no rows")
    return entries


def _cache_key(images_dir: Path, entries: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    total_bytes = 0
    for rel, label in entries:
        digest.update(f"{rel},{label}\n".encode())
        try:
            total_bytes += os.stat(images_dir / rel).st_size
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{images_dir / rel}: listed in the MedNIST labels but missing; "
                "re-extract the dataset or fix labels.csv"
            ) from None
    digest.update(f"{len(entries)}:{total_bytes}".encode())
    return digest.hexdigest()[:20]


def read_mednist_images(images_dir: Path, relpaths: list[str]) -> np.ndarray:
    """Decode grey images into a ``uint8`` array ``(N, 1, H, W)``.

    Raises
    ------
    ValueError
        If an image cannot be decoded or its size differs from the first image's.

    """
    first: tuple[int, int] | None = None
    arrays = []
    for rel in relpaths:
        path = images_dir / rel
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("L"), dtype=np.uint8)
        except OSError as exc:
            raise ValueError(f"{path}: cannot decode image ({exc})") from exc
        if first is None:
            first = arr.shape
        elif arr.shape != first:
            raise ValueError(f"{path}: image is {arr.shape}, expected {first} like the others")
        arrays.append(arr)
    return np.stack(arrays)[:, None]


def _load_cached(images_dir: Path, entries: list[tuple[str, str]]) -> np.ndarray:
    cache_dir = default_cache_dir() / "datasets"
    cache_file = cache_dir / f"mednist-{_cache_key(images_dir, entries)}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as data:
                images = data["images"]
            if images.shape[0] == len(entries):
                log.debug("MedNIST: decoded images from cache %s", cache_file)
                return images
        except (OSError, ValueError, KeyError) as exc:
            log.warning("MedNIST: ignoring unreadable cache %s (%s)", cache_file, exc)
    images = read_mednist_images(images_dir, [rel for rel, _ in entries])
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images)
        os.replace(tmp, cache_file)
        log.info("MedNIST: cached %d decoded images at %s", len(images), cache_file)
    except OSError as exc:  # a read-only home must not break loading
        log.warning("MedNIST: cannot write cache %s (%s)", cache_file, exc)
    return images


def load_mednist(cfg: DataConfig, seed: int) -> DatasetBundle:
    """Load MedNIST with a seeded stratified train/val/test split.

    Parameters
    ----------
    cfg : DataConfig
        ``root`` (resolved with :func:`consilia.common.paths.resolve_data_root`),
        ``val_fraction`` and ``test_fraction``.
    seed : int
        Seed of the split.

    Returns
    -------
    DatasetBundle
        Native 64x64 grey images; ``official_split`` is False.

    """
    root = resolve_data_root(cfg.root)
    images_dir, entries = find_mednist(root)
    images = _load_cached(images_dir, entries)
    class_names = sorted({label for _, label in entries})
    lookup = {name: i for i, name in enumerate(class_names)}
    labels = np.array([lookup[label] for _, label in entries], dtype=np.int64)
    meta = [{"file": rel} for rel, _ in entries]
    full = ImageData(images, labels, meta)

    train_idx, val_idx, test_idx = stratified_split(
        labels, cfg.val_fraction, cfg.test_fraction, seed
    )
    fractions = split_fractions_text(cfg.val_fraction, cfg.test_fraction)
    return DatasetBundle(
        name="mednist",
        class_names=class_names,
        train=full.subset(train_idx),
        val=full.subset(val_idx) if len(val_idx) else None,
        test=full.subset(test_idx),
        in_channels=1,
        image_size=square_size(images, images_dir),
        official_split=False,
        split_note=(
            f"seeded stratified {fractions} split (seed {seed}): "
            "MedNIST has no official split"
        ),
        source=images_dir,
    )


DATASETS.register("mednist", load_mednist)
