"""Scanning (``--check``) and loading a site's data source: the two public entry points."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from consilia.client.site.data_sources.cache import DecodedImageCache, file_sha256
from consilia.client.site.data_sources.config import (
    DataSourceConfig,
    DicomSourceConfig,
    ImageFolderSourceConfig,
)
from consilia.client.site.data_sources.dataset import SiteDataset
from consilia.client.site.data_sources.dicom_tree import collect_dicom, decode_dicom
from consilia.client.site.data_sources.files import LabelledFile, UnusableFileError
from consilia.client.site.data_sources.image_folder import (
    collect_folder,
    decode_picture,
    probe_picture,
)
from consilia.client.site.data_sources.preprocess import to_model_input
from consilia.client.site.data_sources.report import DataReport, SkippedFile
from consilia.common.data.dicom import DicomSkip, inspect_dicom

__all__ = ["load_site_data", "scan_site_data"]


def _collect(
    source: DataSourceConfig, class_names: list[str], report: DataReport
) -> list[LabelledFile]:
    if isinstance(source, DicomSourceConfig):
        return collect_dicom(source, class_names, report)
    if isinstance(source, ImageFolderSourceConfig):
        return collect_folder(source, class_names, report)
    raise TypeError(f"unknown data source type {type(source).__name__}")


def _validate_task(class_names: list[str], in_channels: int | None, image_size: int | None) -> None:
    if not class_names:
        raise ValueError("class_names is empty; the run's task must list its classes")
    dupes = [n for n, c in Counter(class_names).items() if c > 1]
    if dupes:
        raise ValueError(f"class_names has duplicates: {dupes}")
    if in_channels is not None and in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3; got {in_channels}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive; got {image_size}")


def _record(report: DataReport, entry: LabelledFile, meta: dict[str, Any], channels: int) -> None:
    report.counts[report.class_names[entry.label]] += 1
    if meta.get("Rows") and meta.get("Columns"):
        report.image_sizes[f"{meta['Rows']}x{meta['Columns']}"] += 1
    report.channels["colour" if channels == 3 else "grey"] += 1
    if meta.get("Modality"):
        report.modalities[str(meta["Modality"])] += 1


def _progress(items: list[LabelledFile], enabled: bool, desc: str) -> Iterable[LabelledFile]:
    if not enabled:
        return items
    from tqdm import tqdm  # only with a progress bar (start-up)

    return tqdm(items, desc=desc, unit="file")


def _reader(source: DataSourceConfig) -> Callable[[Path], tuple[np.ndarray, dict[str, Any]]]:
    if isinstance(source, DicomSourceConfig):
        policy, limit = source.frame_policy, source.max_decoded_megabytes
        return lambda path: decode_dicom(path, policy, limit)
    return decode_picture


def scan_site_data(
    source: DataSourceConfig, class_names: list[str], decode: bool = False
) -> DataReport:
    """Check a data source and report what a load would find, without building tensors.

    Parameters
    ----------
    source : DicomSourceConfig or ImageFolderSourceConfig
        The site's data source.
    class_names : list of str
        The run's label space.
    decode : bool
        False (default): DICOM headers only (structure, transfer syntax, pixel data present
        and long enough); pictures are opened but not decoded. True: decode every image too
        (finds corrupt compressed codestreams; slower).

    Returns
    -------
    DataReport
        Counts per class, native sizes and every problem.

    Raises
    ------
    DataSourceError
        If the root is missing or the labels CSV is unreadable or lacks a needed column.

    """
    _validate_task(class_names, None, None)
    report = DataReport(source.describe(), list(class_names), decoded=decode)
    entries = _collect(source, class_names, report)
    reader = _reader(source)
    for entry in entries:
        try:
            if decode:
                report.decoded_now += 1
                pixels, meta = reader(entry.path)
                channels = int(pixels.shape[0])
            elif isinstance(source, DicomSourceConfig):
                meta = inspect_dicom(entry.path, source.max_decoded_megabytes)
                photometric = str(meta.get("PhotometricInterpretation") or "")
                channels = 1 if photometric.startswith("MONOCHROME") else 3
            else:
                meta, channels = probe_picture(entry.path)
        except (UnusableFileError, DicomSkip) as skip:
            reason = skip.reason if isinstance(skip, DicomSkip) else str(skip)
            report.skipped.append(SkippedFile(entry.rel, reason))
            continue
        _record(report, entry, meta, channels)
    return report


def load_site_data(
    source: DataSourceConfig,
    class_names: list[str],
    in_channels: int,
    image_size: int,
    cache_dir: Path,
    progress: bool = False,
) -> tuple[SiteDataset, DataReport]:
    """Load, preprocess and cache every labelled image of a site.

    Parameters
    ----------
    source : DicomSourceConfig or ImageFolderSourceConfig
        The site's data source.
    class_names : list of str
        The run's label space; labels outside it are reported, not loaded.
    in_channels : int
        1 or 3: grey images are copied to RGB, colour images converted to grey as needed.
    image_size : int
        Output side length (square).
    cache_dir : Path
        Folder for preprocessed images (created); keyed by file content and parameters.
    progress : bool
        Show a progress bar.

    Returns
    -------
    tuple
        ``(SiteDataset, DataReport)``. The dataset is empty when nothing is usable; the report
        says why.

    Raises
    ------
    DataSourceError
        If the root is missing or the labels CSV is unreadable or lacks a needed column.
    ValueError
        For an invalid ``class_names``, ``in_channels`` or ``image_size``.

    """
    _validate_task(class_names, in_channels, image_size)
    report = DataReport(source.describe(), list(class_names), decoded=True)
    entries = _collect(source, class_names, report)
    if isinstance(source, DicomSourceConfig):  # both decide what decodes, and the skips
        decoding = f"{source.frame_policy};{source.max_decoded_megabytes}"
    else:
        decoding = "-"
    cache = DecodedImageCache(
        cache_dir, f"{source.kind};{decoding};{in_channels};{image_size}", report
    )
    reader = _reader(source)
    images: list[np.ndarray] = []
    labels: list[int] = []
    metas: list[dict[str, Any]] = []
    for entry in _progress(entries, progress, "loading site images"):
        try:
            digest = file_sha256(entry.path)
        except OSError as exc:
            report.skipped.append(SkippedFile(entry.rel, f"cannot be read: {exc.strerror}"))
            continue
        cached = cache.get(digest)
        if isinstance(cached, str):
            report.cache_hits += 1
            report.skipped.append(SkippedFile(entry.rel, cached))
            continue
        if cached is not None:
            report.cache_hits += 1
            image, meta = cached
            native_channels = int(meta.pop("native_channels", in_channels))
        else:
            report.decoded_now += 1
            try:
                pixels, meta = reader(entry.path)
            except UnusableFileError as skip:
                cache.put(digest, None, None, str(skip))
                report.skipped.append(SkippedFile(entry.rel, str(skip)))
                continue
            native_channels = int(pixels.shape[0])
            image = to_model_input(pixels, in_channels, image_size)
            cache.put(digest, image, {**meta, "native_channels": native_channels})
        _record(report, entry, meta, native_channels)
        images.append(image)
        labels.append(entry.label)
        metas.append(
            {"path": entry.rel, "label": class_names[entry.label], **meta, "csv": entry.extra}
        )
    if images:
        stacked = np.stack(images)
    else:
        stacked = np.zeros((0, in_channels, image_size, image_size), np.uint8)
    dataset = SiteDataset(stacked, np.asarray(labels, dtype=np.int64), metas, list(class_names))
    return dataset, report
