"""Find and read the files ``fl-predict`` classifies: DICOM, PNG, JPEG, BMP, TIFF."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from consilia.common.data.dicom import DicomSkip, is_probably_dicom, read_dicom

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "UnreadableFileError",
    "collect_inputs",
    "load_image",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})


class UnreadableFileError(Exception):
    """A file that cannot be classified; the message says why (listed in ``skipped.csv``)."""


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders (recursively) into the list of files to classify.

    Explicitly named files are always tried. Inside folders, files with an image or DICOM
    suffix, extension-less files and files with the DICOM magic bytes are taken; hidden
    files and folders are ignored.

    Returns
    -------
    tuple
        ``(files in a stable order, [(input, reason)] for inputs that do not exist)``.

    """
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if any(part.startswith(".") for part in rel.parts) or not child.is_file():
                    continue
                suffix = child.suffix.lower()
                if (suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES or suffix == ""
                        or is_probably_dicom(child)):
                    files.append(child)
        else:
            missing.append((str(path), "no such file or folder"))
    unique = list(dict.fromkeys(files))
    return unique, missing


def _read_dicom(path: Path) -> np.ndarray:
    try:
        return np.asarray(read_dicom(path).pixels, dtype=np.float32)
    except DicomSkip as exc:
        raise UnreadableFileError(f"DICOM: {exc}") from None


def _read_picture(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
                # 16-bit/float grey (e.g. 12-bit exports): min-max scaled to [0, 1]
                arr = np.asarray(picture, dtype=np.float32)
                low, high = float(arr.min()), float(arr.max())
                arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
                return arr[None]
            if picture.mode in {"1", "L", "LA"}:
                return np.asarray(picture.convert("L"), dtype=np.float32)[None] / 255.0
            rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
            return np.moveaxis(rgb, -1, 0)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UnreadableFileError(f"not a readable image ({exc})") from None


def load_image(path: Path, in_channels: int) -> tuple[np.ndarray, str]:
    """Read one file as float32 ``(in_channels, H, W)`` in [0, 1].

    PNG/JPEG/BMP/TIFF go through Pillow; everything else is read as DICOM
    (``consilia.common.data.dicom.read_dicom``). RGB is converted to grey with ITU-R 601 luma
    weights; grey is repeated to 3 channels.

    Raises
    ------
    UnreadableFileError
        With the reason, when the file is not a usable image.

    """
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES and not is_probably_dicom(path):
        pixels, source = _read_picture(path), "image"
    else:
        pixels, source = _read_dicom(path), "dicom"
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3) or min(pixels.shape[1:]) < 2:
        raise UnreadableFileError(
            f"unsupported pixel array shape {pixels.shape} (expected (1|3, H, W))"
        )
    if not np.all(np.isfinite(pixels)):
        raise UnreadableFileError("pixel data contains NaN/inf")
    if pixels.shape[0] == 3 and in_channels == 1:
        pixels = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), pixels, axes=1)[None]
    elif pixels.shape[0] == 1 and in_channels == 3:
        pixels = np.repeat(pixels, 3, axis=0)
    return np.clip(pixels, 0.0, 1.0).astype(np.float32), source
