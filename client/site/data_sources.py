"""A hospital's own images: a DICOM tree with a labels CSV, or a folder of PNG/JPEG per class.

The site config (``client/site/config.py``) embeds one :data:`DataSourceConfig` as its ``data``
field. :func:`scan_site_data` checks a source without building tensors (``--check``);
:func:`load_site_data` decodes, resizes and caches every labelled image and returns the
:class:`SiteDataset` plus a :class:`DataReport` that lists every file it could not use and why.

Rules:

* Source files are only ever opened read-only; nothing is written under the data root.
* Preprocessed images are cached in ``cache_dir`` under the SHA-256 of the file's bytes plus the
  preprocessing parameters (image size, channels, frame policy, pipeline/decoder versions), so
  a second load decodes nothing, and an edited file is decoded again. Skips are cached too.
* No file is dropped silently: unusable files, labels outside the class list, files without a
  label and CSV rows without a file all appear in the report.
* Images are resized to ``image_size`` x ``image_size`` (antialiased bilinear, the same
  resize as :func:`consilia.common.data.datasets.base.resize_images`) and converted to the run's
  channel count (grey -> RGB by copying; RGB -> grey with ITU-R BT.601 luma weights).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
import pydicom
from pydantic import Field, field_validator

from consilia.common.config import StrictModel
from consilia.common.data.dicom import (
    DicomSkip,
    FramePolicy,
    inspect_dicom,
    is_probably_dicom,
    read_dicom,
)

__all__ = [
    "DataReport",
    "DataSourceConfig",
    "DataSourceError",
    "DicomSourceConfig",
    "ImageFolderSourceConfig",
    "SiteDataset",
    "SkippedFile",
    "load_site_data",
    "scan_site_data",
]

CACHE_VERSION = 1
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_MAX_LISTED = 20
_META_FROM_HEADER = (
    "Modality",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientSex",
    "PatientAge",
    "BodyPartExamined",
    "ViewPosition",
    "Manufacturer",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "window",
    "frame_index",
)


class DataSourceError(ValueError):
    """The data source itself is unusable (missing root, bad labels CSV); says what to fix."""


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


class DicomSourceConfig(StrictModel):
    """A tree of DICOM files plus a CSV that gives each file its label.

    ``labels_csv`` may be absolute or relative to ``root``. With ``key="relative_path"`` the
    CSV's ``path_column`` holds paths relative to ``root`` (forward or back slashes); with
    ``key="sop_instance_uid"`` its ``uid_column`` holds SOP Instance UIDs and the tree is
    scanned for them. Further CSV columns (e.g. ``split``, ``patient_id``) are carried into each
    image's ``meta["csv"]``.
    """

    kind: Literal["dicom"] = "dicom"
    root: Path
    labels_csv: Path
    key: Literal["relative_path", "sop_instance_uid"] = "relative_path"
    path_column: str = "path"
    uid_column: str = "sop_instance_uid"
    label_column: str = "label"
    frame_policy: FramePolicy = "middle"

    @property
    def labels_path(self) -> Path:
        """The labels CSV, resolved against ``root`` when relative."""
        csv_path = self.labels_csv.expanduser()
        return csv_path if csv_path.is_absolute() else self.root.expanduser() / csv_path

    def describe(self) -> str:
        """One line naming the tree, the CSV and the key."""
        return (
            f"DICOM tree {self.root} (labels {self.labels_path}, keyed by {self.key}, "
            f"{self.frame_policy} frame of multi-frame files)"
        )


class ImageFolderSourceConfig(StrictModel):
    """Ordinary image files in one sub-folder per class: ``root/<class name>/**/<file>``."""

    kind: Literal["image_folder"] = "image_folder"
    root: Path
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg"], min_length=1)

    @field_validator("extensions")
    @classmethod
    def _dotted_lower(cls, value: list[str]) -> list[str]:
        return ["." + ext.lower().lstrip(".") for ext in value]

    def describe(self) -> str:
        """One line naming the folder and the extensions."""
        return f"image folder {self.root} (one sub-folder per class; {', '.join(self.extensions)})"


DataSourceConfig = Annotated[
    DicomSourceConfig | ImageFolderSourceConfig, Field(discriminator="kind")
]


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass
class SkippedFile:
    """A file that was found but not used."""

    path: str
    reason: str


@dataclass
class DataReport:
    """What a scan or load found: per-class counts, sizes and every problem, for hospital IT.

    Parameters
    ----------
    source : str
        One line describing the source.
    class_names : list of str
        The run's label space.
    decoded : bool
        True when pixels were decoded (a load or ``scan_site_data(decode=True)``); False for a
        header-only check.

    """

    source: str
    class_names: list[str]
    decoded: bool = False
    files_found: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    image_sizes: Counter[str] = field(default_factory=Counter)
    channels: Counter[str] = field(default_factory=Counter)
    modalities: Counter[str] = field(default_factory=Counter)
    skipped: list[SkippedFile] = field(default_factory=list)
    unknown_labels: dict[str, list[str]] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cache_hits: int = 0
    decoded_now: int = 0

    def __post_init__(self) -> None:
        for name in self.class_names:
            self.counts.setdefault(name, 0)

    @property
    def n_usable(self) -> int:
        """Number of usable labelled images."""
        return int(sum(self.counts.values()))

    @property
    def n_problems(self) -> int:
        """Number of files/rows that were not used (skipped, unknown label, unlabelled, missing)."""
        unknown = sum(len(v) for v in self.unknown_labels.values())
        return len(self.skipped) + unknown + len(self.unlabelled) + len(self.missing_files)

    @property
    def empty_classes(self) -> list[str]:
        """Classes of the run without any usable image here."""
        return [name for name in self.class_names if self.counts.get(name, 0) == 0]

    def to_dict(self) -> dict[str, Any]:
        """Return the full report as JSON-safe data (every listed file included)."""
        return {
            "source": self.source,
            "class_names": list(self.class_names),
            "decoded": self.decoded,
            "files_found": self.files_found,
            "usable": self.n_usable,
            "counts": dict(self.counts),
            "empty_classes": self.empty_classes,
            "image_sizes": dict(self.image_sizes.most_common()),
            "channels": dict(self.channels),
            "modalities": dict(self.modalities.most_common()),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "unknown_labels": {k: list(v) for k, v in self.unknown_labels.items()},
            "unlabelled": list(self.unlabelled),
            "missing_files": list(self.missing_files),
            "notes": list(self.notes),
            "cache_hits": self.cache_hits,
            "decoded_now": self.decoded_now,
            "problems": self.n_problems,
        }

    def to_text(self) -> str:
        """Return a plain report for the hospital's IT staff (long lists are shortened)."""
        lines = [f"Site data: {self.source}"]
        if self.decoded:
            lines.append(
                f"Pixels decoded: yes ({self.cache_hits} from cache, {self.decoded_now} now)"
            )
        else:
            lines.append(
                "Pixels decoded: no (header check only; a corrupt compressed image is found "
                "only when the data are loaded)"
            )
        lines.append("")
        lines.append(f"Usable images: {self.n_usable} of {self.files_found} files found")
        width = max((len(n) for n in self.class_names), default=0)
        for name in self.class_names:
            lines.append(f"  {name:<{width}}  {self.counts.get(name, 0)}")
        if self.empty_classes:
            lines.append(
                f"  WARNING: no usable image for class(es) {', '.join(self.empty_classes)}"
            )
        if self.image_sizes:
            lines.append(f"Image sizes (native, rows x columns): {_size_summary(self.image_sizes)}")
        if self.channels:
            lines.append("Channels: " + ", ".join(f"{k} {v}" for k, v in self.channels.items()))
        if self.modalities:
            lines.append(
                "Modalities: " + ", ".join(f"{k} {v}" for k, v in self.modalities.most_common())
            )
        lines.append("")
        if not self.n_problems:
            lines.append("Problems: none")
        else:
            lines.append(f"Problems: {self.n_problems} file(s) or CSV row(s) not used")
            if self.skipped:
                lines.append(f"  Unusable files ({len(self.skipped)}):")
                lines += _listed([f"{s.path}: {s.reason}" for s in self.skipped])
            if self.unknown_labels:
                total = sum(len(v) for v in self.unknown_labels.values())
                lines.append(
                    f"  Labels not in the class list {self.class_names} "
                    f"({len(self.unknown_labels)} label(s), {total} file(s)):"
                )
                for label, paths in sorted(self.unknown_labels.items()):
                    close = difflib.get_close_matches(label, self.class_names, n=1, cutoff=0.6)
                    close += [c for c in self.class_names if c.lower() == label.lower()]
                    hint = f" (did you mean '{close[-1]}'?)" if close else ""
                    example = f", e.g. {paths[0]}" if paths else ""
                    lines.append(f"    '{label}': {len(paths)} file(s){hint}{example}")
            if self.unlabelled:
                lines.append(f"  Files with no label ({len(self.unlabelled)}):")
                lines += _listed(self.unlabelled)
            if self.missing_files:
                lines.append(
                    f"  Labels CSV rows with no matching file ({len(self.missing_files)}):"
                )
                lines += _listed(self.missing_files)
        if self.notes:
            lines.append("")
            lines.append("Notes:")
            lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _listed(items: list[str], indent: str = "    ") -> list[str]:
    out = [f"{indent}{item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        out.append(f"{indent}... and {len(items) - _MAX_LISTED} more (see the JSON report)")
    return out


def _size_summary(sizes: Counter[str]) -> str:
    def area(key: str) -> int:
        rows, cols = (int(v) for v in key.split("x"))
        return rows * cols

    common = ", ".join(f"{k} ({v})" for k, v in sizes.most_common(5))
    more = f", {len(sizes) - 5} other sizes" if len(sizes) > 5 else ""
    ordered = sorted(sizes, key=area)
    return f"{common}{more}; smallest {ordered[0]}, largest {ordered[-1]}"


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

    def as_split(self) -> Any:
        """Return the data as a :class:`consilia.common.data.datasets.base.ImageSplit`."""
        from consilia.common.data.datasets.base import ImageSplit

        return ImageSplit(self.images, self.labels, self.meta)


# ---------------------------------------------------------------------------------------
# Finding labelled files
# ---------------------------------------------------------------------------------------


@dataclass
class _Entry:
    rel: str
    path: Path
    label: int
    extra: dict[str, str] = field(default_factory=dict)


class _SkipError(Exception):
    """A file that cannot be used (reason in ``args[0]``)."""


def _walk(root: Path) -> Iterable[Path]:
    """Yield the regular files under ``root`` in sorted order, skipping hidden entries."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _check_root(root: Path, what: str) -> Path:
    root = root.expanduser()
    if not root.is_dir():
        raise DataSourceError(
            f"{what} root {root} is not a folder; set data.root in the site config to the "
            "folder that holds the images"
        )
    return root


def _read_labels_csv(
    path: Path, key_column: str, label_column: str, key_option: str
) -> tuple[list[tuple[int, dict[str, str]]], str, str]:
    """Return ``[(line number, row)]`` of the CSV; raise :class:`DataSourceError` naming the fix."""
    if not path.is_file():
        raise DataSourceError(
            f"labels CSV {path} not found; set data.labels_csv in the site config "
            "(absolute, or relative to data.root)"
        )
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataSourceError(
            f"labels CSV {path} cannot be read ({exc}); save it as a UTF-8 CSV file"
        ) from exc
    first = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=first.count) if first.strip() else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataSourceError(f"labels CSV {path} is empty; it needs a header row") from None
    except csv.Error as exc:
        raise DataSourceError(f"labels CSV {path} is not valid CSV: {exc}") from exc
    for column, option in ((key_column, key_option), (label_column, "label_column")):
        if column not in header:
            raise DataSourceError(
                f"labels CSV {path} has no column '{column}' (columns found: "
                f"{', '.join(repr(h) for h in header) or 'none'}); rename the column or set "
                f"data.{option} in the site config"
            )
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            padded = values + [""] * (len(header) - len(values))
            rows.append(
                (reader.line_num, {h: v.strip() for h, v in zip(header, padded, strict=False)})
            )
    except csv.Error as exc:
        raise DataSourceError(
            f"labels CSV {path} is not valid CSV near line {reader.line_num}: {exc}"
        ) from exc
    return rows, key_column, label_column


def _normalise_rel(value: str, root: Path) -> str | None:
    """Return ``value`` as a POSIX path relative to ``root``; None when it leaves the root."""
    text = value.replace("\\", "/")
    candidate = Path(text)
    if candidate.is_absolute():
        try:
            return candidate.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return None
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return PurePosixPath(*parts).as_posix()


def _dicom_candidates(root: Path, exclude: Path) -> list[Path]:
    """Files under ``root`` that look like DICOM (known suffix or 'DICM' preamble)."""
    out = []
    excluded = exclude.resolve()
    for path in _walk(root):
        if path.name.upper() == "DICOMDIR" or path.resolve() == excluded:
            continue
        if path.suffix.lower() in DICOM_SUFFIXES or is_probably_dicom(path):
            out.append(path)
    return out


def _sop_instance_uid(path: Path) -> str | None:
    """Read only the SOP Instance UID of ``path``; raise :class:`_SkipError` when unreadable."""
    try:
        ds = pydicom.dcmread(
            path, force=True, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        )
    except Exception as exc:
        raise _SkipError(f"header not readable: {' '.join(str(exc).split())[:160]}") from exc
    uid = ds.get("SOPInstanceUID")
    return str(uid).strip() if uid else None


def _collect_dicom(
    source: DicomSourceConfig, class_names: list[str], report: DataReport
) -> list[_Entry]:
    root = _check_root(source.root, "DICOM")
    csv_path = source.labels_path
    by_uid = source.key == "sop_instance_uid"
    key_column = source.uid_column if by_uid else source.path_column
    key_option = "uid_column" if by_uid else "path_column"
    rows, _, _ = _read_labels_csv(csv_path, key_column, source.label_column, key_option)
    candidates = _dicom_candidates(root, csv_path)
    report.files_found = len(candidates)

    uid_to_rel: dict[str, str] = {}
    if by_uid:
        for path in candidates:
            rel = _rel(path, root)
            try:
                uid = _sop_instance_uid(path)
            except _SkipError as skip:
                report.skipped.append(SkippedFile(rel, str(skip)))
                continue
            if not uid:
                report.skipped.append(
                    SkippedFile(rel, "no SOP Instance UID (labels are keyed by UID)")
                )
            elif uid in uid_to_rel:
                report.skipped.append(
                    SkippedFile(rel, f"same SOP Instance UID as {uid_to_rel[uid]} (duplicate)")
                )
            else:
                uid_to_rel[uid] = rel

    labelled: dict[str, tuple[int, str, dict[str, str]]] = {}  # rel -> (line, label, extra)
    conflicts: dict[str, list[str]] = {}
    for line, row in rows:
        key = row.get(key_column, "")
        label = row.get(source.label_column, "")
        extra = {k: v for k, v in row.items() if k not in (key_column, source.label_column)}
        if not key:
            report.missing_files.append(f"line {line}: empty {key_column}")
            continue
        if by_uid:
            found = uid_to_rel.get(key)
            if found is None:
                report.missing_files.append(f"line {line}: no file with SOP Instance UID {key}")
                continue
            rel = found
        else:
            normalised = _normalise_rel(key, root)
            if normalised is None:
                report.missing_files.append(f"line {line}: {key} is outside the data root")
                continue
            rel = normalised
            if not (root / rel).is_file():
                report.missing_files.append(f"line {line}: {key} not found")
                continue
        if rel in labelled:
            previous_line, previous_label, _ = labelled[rel]
            if previous_label != label:
                conflicts.setdefault(rel, [f"'{previous_label}' (line {previous_line})"])
                conflicts[rel].append(f"'{label}' (line {line})")
            else:
                report.notes.append(f"line {line}: duplicate row for {rel} ignored")
            continue
        labelled[rel] = (line, label, extra)

    labelled_set = set(labelled)
    skipped_set = {s.path for s in report.skipped}
    report.unlabelled.extend(
        rel
        for rel in (_rel(p, root) for p in candidates)
        if rel not in labelled_set and rel not in skipped_set
    )
    return _entries(labelled, conflicts, root, class_names, report)


def _entries(
    labelled: dict[str, tuple[int, str, dict[str, str]]],
    conflicts: dict[str, list[str]],
    root: Path,
    class_names: list[str],
    report: DataReport,
) -> list[_Entry]:
    index = {name: i for i, name in enumerate(class_names)}
    entries = []
    for rel in labelled:  # CSV row order (folder sources: sorted walk order)
        line, label, extra = labelled[rel]
        if rel in conflicts:
            report.skipped.append(
                SkippedFile(rel, "conflicting labels in the CSV: " + ", ".join(conflicts[rel]))
            )
        elif not label:
            report.unlabelled.append(f"{rel} (line {line}: empty label)")
        elif label not in index:
            report.unknown_labels.setdefault(label, []).append(rel)
        else:
            entries.append(_Entry(rel, root / rel, index[label], extra))
    return entries


def _collect_folder(
    source: ImageFolderSourceConfig, class_names: list[str], report: DataReport
) -> list[_Entry]:
    root = _check_root(source.root, "image folder")
    labelled: dict[str, tuple[int, str, dict[str, str]]] = {}
    ignored = 0
    for path in _walk(root):
        if path.suffix.lower() not in source.extensions:
            ignored += 1
            continue
        report.files_found += 1
        rel = _rel(path, root)
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
    return _entries(labelled, {}, root, class_names, report)


def _collect(source: DataSourceConfig, class_names: list[str], report: DataReport) -> list[_Entry]:
    if isinstance(source, DicomSourceConfig):
        return _collect_dicom(source, class_names, report)
    if isinstance(source, ImageFolderSourceConfig):
        return _collect_folder(source, class_names, report)
    raise TypeError(f"unknown data source type {type(source).__name__}")


# ---------------------------------------------------------------------------------------
# Decoding, preprocessing and the cache
# ---------------------------------------------------------------------------------------


def _decode_dicom(path: Path, frame_policy: FramePolicy) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        image = read_dicom(path, frame_policy=frame_policy)
    except DicomSkip as skip:
        raise _SkipError(skip.reason) from skip
    meta = {k: image.meta.get(k) for k in _META_FROM_HEADER}
    return image.pixels, meta


def _decode_picture(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a PNG/JPEG/... with Pillow into ``float32`` ``(C, H, W)`` in ``[0, 1]``."""
    from PIL import Image, UnidentifiedImageError

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
        raise _SkipError(f"not a readable image: {' '.join(str(exc).split())[:160]}") from exc
    meta = {"Rows": size[1], "Columns": size[0], "image_mode": mode}
    return np.ascontiguousarray(arr), meta


def _to_model_input(pixels: np.ndarray, in_channels: int, image_size: int) -> np.ndarray:
    """Resize ``float32`` ``(C, H, W)`` in [0, 1] and set the channel count; return uint8."""
    out = pixels
    if out.shape[-2:] != (image_size, image_size):
        import torch
        from torchvision.transforms.v2 import functional as tvf

        tensor = torch.from_numpy(np.ascontiguousarray(out))[None]
        out = tvf.resize(tensor, [image_size, image_size], antialias=True)[0].numpy()
    if out.shape[0] == 1 and in_channels == 3:
        out = np.repeat(out, 3, axis=0)
    elif out.shape[0] == 3 and in_channels == 1:
        out = np.tensordot(_LUMA, out, axes=1)[None]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _pipeline_signature() -> str:
    """Cache-key part that changes when the decoding code or decoder versions change."""
    versions = []
    for package in ("pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pillow"):
        try:
            versions.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    return f"v{CACHE_VERSION};" + ";".join(versions)


def _file_sha256(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class _Cache:
    """Preprocessed images on disk, one small ``.npz`` per (file content, parameters)."""

    def __init__(self, cache_dir: Path, params: str, report: DataReport) -> None:
        self.params = hashlib.sha256(f"{params};{_pipeline_signature()}".encode()).hexdigest()[:16]
        self.dir: Path | None = Path(cache_dir).expanduser() / "site-data"
        self.report = report
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            report.notes.append(f"cache folder {self.dir} not usable ({exc}); nothing cached")
            self.dir = None

    def _file(self, digest: str) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / digest[:2] / f"{digest}-{self.params}.npz"

    def get(self, digest: str) -> tuple[np.ndarray, dict[str, Any]] | str | None:
        """Return ``(image, meta)``, a cached skip reason, or None on a miss."""
        path = self._file(digest)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if "reason" in data.files:
                    return str(data["reason"])
                return data["image"], json.loads(str(data["meta"]))
        except Exception:  # a damaged cache entry is just a miss
            return None

    def put(
        self, digest: str, image: np.ndarray | None, meta: dict | None, reason: str = ""
    ) -> None:
        """Store a preprocessed image (or a skip reason) atomically."""
        path = self._file(digest)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            if image is None:
                np.savez(tmp, reason=np.array(reason))
            else:
                np.savez(tmp, image=image, meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        except OSError as exc:
            self.report.notes.append(f"cache write failed ({exc}); continuing without it")
            self.dir = None


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


def _record(report: DataReport, entry: _Entry, meta: dict[str, Any], channels: int) -> None:
    report.counts[report.class_names[entry.label]] += 1
    if meta.get("Rows") and meta.get("Columns"):
        report.image_sizes[f"{meta['Rows']}x{meta['Columns']}"] += 1
    report.channels["colour" if channels == 3 else "grey"] += 1
    if meta.get("Modality"):
        report.modalities[str(meta["Modality"])] += 1


def _progress(items: list[_Entry], enabled: bool, desc: str) -> Iterable[_Entry]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file")


def _reader(source: DataSourceConfig) -> Callable[[Path], tuple[np.ndarray, dict[str, Any]]]:
    if isinstance(source, DicomSourceConfig):
        policy = source.frame_policy
        return lambda path: _decode_dicom(path, policy)
    return _decode_picture


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


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
                pixels, meta = reader(entry.path)
                channels = int(pixels.shape[0])
            elif isinstance(source, DicomSourceConfig):
                meta = inspect_dicom(entry.path)
                photometric = str(meta.get("PhotometricInterpretation") or "")
                channels = 1 if photometric.startswith("MONOCHROME") else 3
            else:
                meta, channels = _probe_picture(entry.path)
        except (_SkipError, DicomSkip) as skip:
            reason = skip.reason if isinstance(skip, DicomSkip) else str(skip)
            report.skipped.append(SkippedFile(entry.rel, reason))
            continue
        _record(report, entry, meta, channels)
    return report


def _probe_picture(path: Path) -> tuple[dict[str, Any], int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
            mode, size = img.mode, img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise _SkipError(f"not a readable image: {' '.join(str(exc).split())[:160]}") from exc
    grey = mode in ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F")
    return {"Rows": size[1], "Columns": size[0]}, 1 if grey else 3


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
    policy = source.frame_policy if isinstance(source, DicomSourceConfig) else "-"
    cache = _Cache(cache_dir, f"{source.kind};{policy};{in_channels};{image_size}", report)
    reader = _reader(source)
    images: list[np.ndarray] = []
    labels: list[int] = []
    metas: list[dict[str, Any]] = []
    for entry in _progress(entries, progress, "loading site images"):
        try:
            digest = _file_sha256(entry.path)
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
            except _SkipError as skip:
                cache.put(digest, None, None, str(skip))
                report.skipped.append(SkippedFile(entry.rel, str(skip)))
                continue
            native_channels = int(pixels.shape[0])
            image = _to_model_input(pixels, in_channels, image_size)
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
