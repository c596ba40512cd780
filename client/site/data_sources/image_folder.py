"""A folder of pictures (PNG/JPEG/...), one sub-folder per class."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from consilia.client.site.data_sources.config import ImageFolderSourceConfig
from consilia.client.site.data_sources.files import (
    LabelledFile,
    UnusableFileError,
    check_root,
    relative_posix,
    resolve_labels,
    walk_files,
)
from consilia.client.site.data_sources.report import DataReport

__all__ = ["collect_folder", "decode_picture", "probe_picture"]


def collect_folder(
    source: ImageFolderSourceConfig, class_names: list[str], report: DataReport
) -> list[LabelledFile]:
    """Return the pictures of a class-folder source (sorted walk order); report the others."""
    root = check_root(source.root, "image folder")
    labelled: dict[str, tuple[int, str, dict[str, str]]] = {}
    ignored = 0
    for path in walk_files(root):
        if path.suffix.lower() not in source.extensions:
            ignored += 1
            continue
        report.files_found += 1
        rel = relative_posix(path, root)
        parts = PurePosixPath(rel).parts
        if len(parts) == 1:
            report.unlabelled.append(f"{rel} (not inside a class folder)")
            continue
        labelled[rel] = (0, parts[0], {})
    if ignored:
        report.notes.append(
            f"{ignored} file(s) without an image extension ({', '.join(source.extensions)}) "
            "were ignored"
        )
    return resolve_labels(labelled, {}, root, class_names, report)


def decode_picture(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a PNG/JPEG/... with Pillow into ``float32`` ``(C, H, W)`` in ``[0, 1]``."""
    from PIL import Image, UnidentifiedImageError  # only when a picture is read (start-up)

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("1", "L", "LA"):
                arr = np.asarray(img.convert("L"), dtype=np.float32)[None] / 255.0
            elif mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                values = np.asarray(img, dtype=np.float64)
                lo, hi = np.percentile(values, (0.5, 99.5))
                if not hi > lo:
                    lo, hi = float(values.min()), float(values.max())
                scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
                arr = np.clip(scaled, 0, 1).astype(np.float32)[None]
            else:
                rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
                arr = np.moveaxis(rgb, -1, 0)
            size = img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = f"not a readable image: {' '.join(str(exc).split())[:160]}"
        raise UnusableFileError(reason) from exc
    meta = {"Rows": size[1], "Columns": size[0], "image_mode": mode}
    return np.ascontiguousarray(arr), meta


def probe_picture(path: Path) -> tuple[dict[str, Any], int]:
    """Verify a picture without decoding it; return its size and channel count."""
    from PIL import Image, UnidentifiedImageError  # only when a picture is read (start-up)

    try:
        with Image.open(path) as img:
            img.verify()
            mode, size = img.mode, img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = f"not a readable image: {' '.join(str(exc).split())[:160]}"
        raise UnusableFileError(reason) from exc
    grey = mode in ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F")
    return {"Rows": size[1], "Columns": size[0]}, 1 if grey else 3
