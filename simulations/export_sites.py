"""Write simulated sites as DICOM trees, so a deployment rehearsal reads files like a hospital's.

Each image becomes a DICOM Secondary Capture object (SOP Class 1.2.840.10008.5.1.4.1.1.7,
Explicit VR Little Endian, 8-bit MONOCHROME2 for grey, RGB for colour) with synthetic
identifiers only: PatientName ``Anonymous^Rehearsal``, PatientID ``<SITE>-<n>`` (e.g.
``SITE00-000123``), UIDs derived deterministically from the seed, site name and image number
(``pydicom.uid.generate_uid(entropy_srcs=...)``). Layout::

    out_dir/<site>/images/<class>/<n>.dcm
    out_dir/<site>/labels.csv        # path,label,sop_instance_uid[,split]

which is exactly what :class:`consilia.client.site.data_sources.config.DicomSourceConfig` reads
(``root=out_dir/<site>``, ``labels_csv=labels.csv``). The pixels are written without a window,
so :func:`consilia.common.data.dicom.read_dicom` returns them unchanged (8-bit full range).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from consilia.common.data.sitefile import load_site_npz
from consilia.common.rundir.layout import RunDir

__all__ = [
    "PATIENT_NAME",
    "export_partition_to_dicom",
    "export_site_dicoms",
    "make_secondary_capture",
]

PATIENT_NAME = "Anonymous^Rehearsal"
_BASE_DATE = dt.date(2024, 1, 1)
_CSV_COLUMNS = ("path", "label", "sop_instance_uid")


def _uid(seed: int, site_name: str, n: int, what: str) -> str:
    return str(
        generate_uid(entropy_srcs=["consilia-rehearsal", str(seed), site_name, what, str(n)])
    )


def _site_code(site_name: str) -> str:
    code = re.sub(r"[^A-Za-z0-9]", "", site_name).upper()
    return code or "SITE"


def _folder_name(class_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", class_name).strip("._")
    return safe or "class"


def make_secondary_capture(
    image: np.ndarray, *, site_name: str, seed: int, n: int, series_description: str = ""
) -> Dataset:
    """Build one Secondary Capture dataset (with file meta) from a ``uint8`` image.

    Parameters
    ----------
    image : np.ndarray
        ``uint8`` ``(C, H, W)`` with ``C`` 1 (MONOCHROME2) or 3 (RGB).
    site_name : str
        Site display name, e.g. ``site-00`` (gives PatientID ``SITE00-<n>``).
    seed : int
        Seed of the deterministic UIDs and dates.
    n : int
        Image number within the site.
    series_description : str
        Free text, e.g. the class and split.

    Returns
    -------
    pydicom.dataset.Dataset
        Ready for ``pydicom.dcmwrite(path, ds, enforce_file_format=True)``.

    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"image must be uint8 (C, H, W) with C 1 or 3; got {image.dtype} {image.shape}"
        )
    sop_uid = _uid(seed, site_name, n, "sop")
    date = (_BASE_DATE + dt.timedelta(days=(seed + n) % 365)).strftime("%Y%m%d")
    time = f"{(n // 3600) % 24:02d}{(n // 60) % 60:02d}{n % 60:02d}"

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CONSILIA_SIM"  # SH: at most 16 chars

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(seed, site_name, n, "study")
    ds.SeriesInstanceUID = _uid(seed, site_name, n, "series")
    ds.PatientName = PATIENT_NAME
    ds.PatientID = f"{_site_code(site_name)}-{n:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic rehearsal data (no real patient)"
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{n:06d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = n + 1
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "Consilia rehearsal exporter"
    ds.InstitutionName = site_name
    ds.SeriesDescription = series_description
    ds.BurnedInAnnotation = "NO"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    if image.shape[0] == 1:
        ds.set_pixel_data(
            np.ascontiguousarray(image[0]), "MONOCHROME2", 8, generate_instance_uid=False
        )
    else:
        rgb = np.ascontiguousarray(np.moveaxis(image, 0, -1))
        ds.set_pixel_data(rgb, "RGB", 8, generate_instance_uid=False)
    # set_pixel_data replaces the transfer syntax only for compressed data; keep ours explicit
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def export_site_dicoms(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    out_dir: Path,
    site_name: str,
    seed: int,
    *,
    splits: Sequence[str] | None = None,
) -> Path:
    """Write one site's images as DICOM files plus its ``labels.csv``.

    Parameters
    ----------
    images : np.ndarray
        ``uint8`` ``(N, C, H, W)``, ``C`` 1 or 3.
    labels : np.ndarray
        Class indices ``(N,)`` (or ``(N, 1)``).
    class_names : list of str
        Label space; ``labels`` index into it.
    out_dir : Path
        The site folder ``out_dir/<site_name>`` is created (an existing ``labels.csv`` and the
        files it names are overwritten).
    site_name : str
        Folder and PatientID prefix, e.g. ``site-00``.
    seed : int
        Makes UIDs and dates reproducible: the same inputs give byte-identical files.
    splits : sequence of str, optional
        Per-image split name (e.g. ``train``/``val``); adds a ``split`` column.

    Returns
    -------
    Path
        The site folder (use it as ``data.root``; ``labels.csv`` sits in it).

    Raises
    ------
    ValueError
        For images that are not ``uint8`` ``(N, C, H, W)``, labels of another length or out of
        range, or ``splits`` of another length.

    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 (N, C, H, W) with C 1 or 3; got {images.dtype} {images.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names) - 1}] (class_names)")
    if splits is not None and len(splits) != images.shape[0]:
        raise ValueError(f"{len(splits)} split names for {images.shape[0]} images")
    site_dir = Path(out_dir) / site_name
    folders = {i: _folder_name(name) for i, name in enumerate(class_names)}
    if len(set(folders.values())) != len(folders):
        folders = {i: f"{i:02d}_{name}" for i, name in folders.items()}
    rows = []
    for n in range(images.shape[0]):
        label = int(labels[n])
        rel = Path("images") / folders[label] / f"{n:06d}.dcm"
        split = splits[n] if splits is not None else ""
        description = f"{class_names[label]} {split}".strip()
        ds = make_secondary_capture(
            images[n], site_name=site_name, seed=seed, n=n, series_description=description
        )
        path = site_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        row = {
            "path": rel.as_posix(),
            "label": class_names[label],
            "sop_instance_uid": ds.SOPInstanceUID,
        }
        if splits is not None:
            row["split"] = split
        rows.append(row)
    columns = list(_CSV_COLUMNS) + (["split"] if splits is not None else [])
    site_dir.mkdir(parents=True, exist_ok=True)
    with (site_dir / "labels.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return site_dir


def _partition_seed(partition_dir: Path) -> int | None:
    summary = RunDir(partition_dir).partition_json_path
    if not summary.is_file():
        return None
    try:
        return int(json.loads(summary.read_text(encoding="utf-8"))["seed"])
    except (ValueError, KeyError, TypeError):
        return None


def export_partition_to_dicom(
    partition_dir: Path, out_dir: Path, seed: int | None = None
) -> list[Path]:
    """Export every site of a saved simulation partition (train + val) as DICOM.

    Parameters
    ----------
    partition_dir : Path
        Folder written by ``consilia.simulations.partition.save_partition`` (holding
        ``sites/site-XX.npz``), or the ``sites`` folder itself.
    out_dir : Path
        Where ``<site>/images/...`` and ``<site>/labels.csv`` are written.
    seed : int, optional
        UID seed; defaults to the partition's seed from ``partition.json`` (else 0).

    Returns
    -------
    list of Path
        The site folders, in site order. Each ``labels.csv`` has a ``split`` column
        (``train`` / ``val``).

    Raises
    ------
    FileNotFoundError
        If no ``site-*.npz`` file is found (the message names the folder).

    """
    partition_dir = Path(partition_dir)
    layout = RunDir(partition_dir)
    if layout.sites_dir.is_dir():
        sites_dir, files = layout.sites_dir, layout.site_files()
    else:  # the sites folder itself
        sites_dir, files = partition_dir, sorted(partition_dir.glob("site-*.npz"))
    if not files:
        raise FileNotFoundError(
            f"no site-*.npz files in {sites_dir}; create the partition first with fl-sim"
        )
    if seed is None:
        seed = _partition_seed(partition_dir)
        seed = 0 if seed is None else seed
    site_dirs = []
    for path in files:
        train, val, class_names = load_site_npz(path)
        images = np.concatenate([train.images, val.images])
        labels = np.concatenate([train.labels, val.labels])
        splits = ["train"] * len(train) + ["val"] * len(val)
        site_dirs.append(
            export_site_dicoms(images, labels, class_names, out_dir, path.stem, seed, splits=splits)
        )
    return site_dirs
