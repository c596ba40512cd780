"""Header checks of a DICOM image: photometric interpretation, geometry, size and completeness.

:func:`inspect_dicom` runs every check that needs no pixel decoding (``fl-client --check``
without ``--decode``); :func:`~consilia.common.data.dicom.reader.read_dicom` runs the same
checks before it decodes anything.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from consilia.common.data.dicom.dataset import read_dataset, safe_get, transfer_syntax
from consilia.common.data.dicom.size_guard import (
    check_decoded_size,
    check_geometry,
    decoded_nbytes,
    max_decoded_bytes,
)
from consilia.common.data.dicom.skip import DicomSkip, first_line

__all__ = ["GREY", "PALETTE", "RGB", "check_image_header", "inspect_dicom"]

GREY = ("MONOCHROME1", "MONOCHROME2")
# YBR_ICT / YBR_RCT only occur with JPEG 2000, whose decoders already return RGB.
RGB = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
PALETTE = "PALETTE COLOR"

_META_KEYWORDS = (
    "Modality",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientSex",
    "PatientAge",
    "BodyPartExamined",
    "ViewPosition",
    "Manufacturer",
)


def _check_photometric(ds: Dataset, meta: dict[str, Any]) -> None:
    photometric = str(meta.get("PhotometricInterpretation") or "").strip().upper()
    meta["PhotometricInterpretation"] = photometric or None
    samples = meta.get("SamplesPerPixel") or 1
    if photometric in GREY:
        if samples != 1:
            raise DicomSkip(f"{photometric} with {samples} samples per pixel (expected 1)")
    elif photometric in RGB:
        if samples != 3:
            raise DicomSkip(f"{photometric} with {samples} samples per pixel (expected 3)")
    elif photometric == PALETTE:
        if "RedPaletteColorLookupTableDescriptor" not in ds:
            raise DicomSkip("PALETTE COLOR image without a palette lookup table")
    elif photometric:
        raise DicomSkip(f"unsupported photometric interpretation {photometric}")
    elif "PixelData" in ds:
        raise DicomSkip("no Photometric Interpretation (0028,0004)")
    else:
        meta["PhotometricInterpretation"] = "MONOCHROME2"  # float pixel data


def check_image_header(ds: Dataset, path: Path, max_bytes: int) -> dict[str, Any]:
    """Validate the image pixel module and the decode limit; return the header metadata.

    Parameters
    ----------
    ds : Dataset
        A dataset from :func:`~consilia.common.data.dicom.dataset.read_dataset`.
    path : Path
        The file (recorded in the metadata as ``path``).
    max_bytes : int
        The decode limit: the decoded pixel data may take at most this many bytes.

    Returns
    -------
    dict
        Plain header values (see :class:`~consilia.common.data.dicom.reader.DicomImage`).

    Raises
    ------
    DicomSkip
        For an impossible geometry, an unsupported photometric interpretation, a decoded size
        over the limit, or native Pixel Data shorter than the geometry needs.

    """
    meta = {keyword: safe_get(ds, keyword) for keyword in _META_KEYWORDS}
    ts = transfer_syntax(ds)
    meta["TransferSyntaxUID"] = str(ts) if ts else None
    meta["TransferSyntax"] = ts.name if ts else None
    integer_pixels = "PixelData" in ds
    check_geometry(meta, integer_pixels)
    _check_photometric(ds, meta)
    float_bits = 64 if "DoubleFloatPixelData" in ds else 32
    default_bits = 8 if integer_pixels else float_bits
    check_decoded_size(meta, max_bytes, default_bits)
    if ts is not None and not ts.is_compressed and integer_pixels:
        expected = decoded_nbytes(meta)
        try:
            actual = len(ds.PixelData)
        except Exception as exc:
            raise DicomSkip(f"Pixel Data unreadable: {first_line(exc)}") from exc
        if actual < expected:
            raise DicomSkip(f"Pixel Data truncated ({actual} of {expected} bytes)")
    meta["path"] = str(path)
    return meta


def inspect_dicom(path: Path, max_decoded_megabytes: float | None = None) -> dict[str, Any]:
    """Check a DICOM file's structure and header without decoding its pixels.

    Parameters
    ----------
    path : Path
        The file.
    max_decoded_megabytes : float, optional
        The decode limit in MB (default
        :data:`~consilia.common.data.dicom.size_guard.DEFAULT_MAX_DECODED_MEGABYTES`).

    Returns
    -------
    dict
        The header metadata that :func:`~consilia.common.data.dicom.reader.read_dicom` would
        return (without the pipeline keys).

    Raises
    ------
    DicomSkip
        For every problem that can be seen without decoding (unreadable or truncated file,
        no pixel data, no transfer syntax, impossible geometry, decoded size over the limit,
        unsupported photometric interpretation, native Pixel Data shorter than the geometry
        needs). A corrupt compressed codestream or unusable LUT values are only found by
        ``read_dicom``.
    ValueError
        Only for a limit that is not positive (a caller bug).

    """
    max_bytes = max_decoded_bytes(max_decoded_megabytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value; we report
        try:
            ds = read_dataset(Path(path), max_bytes)
            return check_image_header(ds, Path(path), max_bytes)
        except DicomSkip:
            raise
        except Exception as exc:  # never crash on a file
            raise DicomSkip(f"unexpected error reading the header: {first_line(exc)}") from exc
