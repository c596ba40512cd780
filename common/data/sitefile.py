"""The per-site ``.npz`` file a simulated hospital's ClientApp loads.

Written by ``consilia.simulations.partition.save_partition`` and read by the client side, so
it lives in ``common`` (clients must not import ``simulations``). Keys: ``train_images``,
``train_labels``, ``val_images``, ``val_labels`` (uint8 ``(N, C, H, W)`` / int64 ``(N,)``) and
``class_names`` (a unicode array); optional ``train_indices`` / ``val_indices`` record which
samples of the pooled training set the site holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from consilia.common.data.images import ImageData

__all__ = ["SITE_NPZ_KEYS", "load_site_npz", "save_site_npz"]

SITE_NPZ_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "class_names")


def save_site_npz(
    path: Path,
    train: ImageData,
    val: ImageData,
    class_names: list[str],
    **extra: np.ndarray,
) -> Path:
    """Write one site's data (uncompressed, for fast loading; written atomically).

    Parameters
    ----------
    path : Path
        Target file, e.g. ``out/sites/site-00.npz``; parent folders are created.
    train, val : ImageData
        The site's training and held-out validation data.
    class_names : list of str
        The federation's label space (every site stores all of it).
    **extra : np.ndarray
        Further arrays to store (e.g. ``train_indices``).

    Returns
    -------
    Path
        ``path``.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    arrays: dict[str, Any] = {
        "train_images": train.images,
        "train_labels": train.labels,
        "val_images": val.images,
        "val_labels": val.labels,
        "class_names": np.asarray(class_names, dtype=str),
        **extra,
    }
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_site_npz(path: Path) -> tuple[ImageData, ImageData, list[str]]:
    """Read a site file written by :func:`save_site_npz`.

    Returns
    -------
    tuple
        ``(train, val, class_names)``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (the message names it).
    ValueError
        If a key is missing or an array is malformed (the message names the file).

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: site data file not found; check the site's data-dir (node config) or "
            "re-create the partition with fl-sim"
        )
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in SITE_NPZ_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; expected {list(SITE_NPZ_KEYS)}")
        try:
            train = ImageData(data["train_images"], data["train_labels"])
            val = ImageData(data["val_images"], data["val_labels"])
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        class_names = [str(c) for c in data["class_names"].tolist()]
    return train, val, class_names
