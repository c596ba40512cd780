"""A DICOM tree with a labels CSV (keyed by relative path or SOP Instance UID)."""

from __future__ import annotations

import csv
import io
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom

from consilia.client.site.data_sources.config import DataSourceError, DicomSourceConfig
from consilia.client.site.data_sources.files import (
    LabelledFile,
    UnusableFileError,
    check_root,
    relative_posix,
    resolve_labels,
    walk_files,
)
from consilia.client.site.data_sources.report import DataReport, SkippedFile
from consilia.common.data.dicom import DicomSkip, FramePolicy, is_probably_dicom, read_dicom

__all__ = [
    "DICOM_SUFFIXES",
    "META_FROM_HEADER",
    "collect_dicom",
    "decode_dicom",
    "dicom_candidates",
    "normalise_rel",
    "read_labels_csv",
    "sop_instance_uid",
]

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
META_FROM_HEADER = (
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


def read_labels_csv(
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


def normalise_rel(value: str, root: Path) -> str | None:
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


def dicom_candidates(root: Path, exclude: Path) -> list[Path]:
    """Files under ``root`` that look like DICOM (known suffix or 'DICM' preamble)."""
    out = []
    excluded = exclude.resolve()
    for path in walk_files(root):
        if path.name.upper() == "DICOMDIR" or path.resolve() == excluded:
            continue
        if path.suffix.lower() in DICOM_SUFFIXES or is_probably_dicom(path):
            out.append(path)
    return out


def sop_instance_uid(path: Path) -> str | None:
    """Read only the SOP Instance UID of ``path`` (:class:`UnusableFileError` if unreadable)."""
    try:
        ds = pydicom.dcmread(
            path, force=True, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        )
    except Exception as exc:
        raise UnusableFileError(f"header not readable: {' '.join(str(exc).split())[:160]}") from exc
    uid = ds.get("SOPInstanceUID")
    return str(uid).strip() if uid else None


def collect_dicom(
    source: DicomSourceConfig, class_names: list[str], report: DataReport
) -> list[LabelledFile]:
    """Return the labelled DICOM files of a source (CSV row order); report every other file."""
    root = check_root(source.root, "DICOM")
    csv_path = source.labels_path
    by_uid = source.key == "sop_instance_uid"
    key_column = source.uid_column if by_uid else source.path_column
    key_option = "uid_column" if by_uid else "path_column"
    rows, _, _ = read_labels_csv(csv_path, key_column, source.label_column, key_option)
    candidates = dicom_candidates(root, csv_path)
    report.files_found = len(candidates)

    uid_to_rel: dict[str, str] = {}
    if by_uid:
        for path in candidates:
            rel = relative_posix(path, root)
            try:
                uid = sop_instance_uid(path)
            except UnusableFileError as skip:
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
            normalised = normalise_rel(key, root)
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
        for rel in (relative_posix(p, root) for p in candidates)
        if rel not in labelled_set and rel not in skipped_set
    )
    return resolve_labels(labelled, conflicts, root, class_names, report)


def decode_dicom(
    path: Path, frame_policy: FramePolicy, max_decoded_megabytes: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a DICOM file into ``float32`` ``(C, H, W)`` in ``[0, 1]`` and its header values.

    Raises :class:`UnusableFileError` with the reason for a file that is not a usable image
    (including one whose decoded size would exceed ``max_decoded_megabytes``).
    """
    try:
        image = read_dicom(
            path, frame_policy=frame_policy, max_decoded_megabytes=max_decoded_megabytes
        )
    except DicomSkip as skip:
        raise UnusableFileError(skip.reason) from skip
    meta = {k: image.meta.get(k) for k in META_FROM_HEADER}
    return image.pixels, meta
