"""Reading a DICOM file into a pydicom dataset, with a skip reason for every unusable file.

Deflated files (Deflated Explicit VR Little Endian) are inflated in bounded steps first: pydicom
inflates the whole dataset in one call, so a small deflate bomb could otherwise take all memory.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from consilia.common.data.dicom.skip import DicomSkip, first_line

__all__ = [
    "PIXEL_KEYWORDS",
    "is_probably_dicom",
    "plain",
    "read_dataset",
    "safe_get",
    "transfer_syntax",
]

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Room for the header around the pixel data when a deflated dataset is inflated.
_DEFLATED_HEADER_ALLOWANCE = 16 * 2**20
_INFLATE_STEP = 4 * 2**20


def is_probably_dicom(path: Path) -> bool:
    """Return True when ``path`` is a file with the DICOM Part 10 preamble (``DICM`` at 128).

    Cheap (reads 132 bytes); files without a preamble (old ACR-NEMA style) return False.
    """
    try:
        with Path(path).open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def plain(value: Any) -> Any:
    """Return a JSON-friendly copy of a pydicom element value (DS -> float, IS -> int, ...)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [plain(v) for v in value]
    return str(value)  # PersonName, UID subclasses, dates


def safe_get(ds: Dataset, keyword: str) -> Any:
    """Return ``ds.<keyword>`` as a plain value, ``None`` when absent or unreadable."""
    try:
        return plain(ds.get(keyword))
    except Exception:  # a malformed element must not make a usable image unusable
        return None


def transfer_syntax(ds: Dataset) -> UID | None:
    """Return the dataset's Transfer Syntax UID from its file meta, ``None`` when absent."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def _check_deflated_size(path: Path, max_bytes: int) -> None:
    """Inflate a deflated dataset in bounded steps; skip it when it inflates past the cap."""
    try:
        with path.open("rb") as handle:
            preamble = pydicom.filereader.read_preamble(handle, True)
            meta = pydicom.filereader._read_file_meta_info(handle)
            if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
                return
            if preamble is None:
                raise DicomSkip("deflated transfer syntax without the 'DICM' preamble")
            limit = max_bytes + _DEFLATED_HEADER_ALLOWANCE
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            total = 0
            pending = b""
            while True:
                if not pending:
                    pending = handle.read(_INFLATE_STEP)
                    if not pending:
                        break
                total += len(inflater.decompress(pending, _INFLATE_STEP))
                pending = inflater.unconsumed_tail
                if total > limit:
                    raise DicomSkip(
                        f"deflated dataset inflates to more than {limit / 2**20:.0f} MB "
                        "(over the decode limit, max_decoded_megabytes)"
                    )
    except DicomSkip:
        raise
    except Exception:  # not deflated, or unreadable: dcmread reports it
        return


def read_dataset(path: Path, max_bytes: int) -> Dataset:
    """Read and validate the structure of ``path``; raise :class:`DicomSkip` when unusable.

    Parameters
    ----------
    path : Path
        The file.
    max_bytes : int
        The decode limit; a deflated dataset must inflate to at most this (plus header room).

    """
    path = Path(path)
    if not path.is_file():
        raise DicomSkip("file not found" if not path.exists() else "not a regular file")
    _check_deflated_size(path, max_bytes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # force=True also reads files without the 128-byte preamble (e.g. extension-less
            # files from a DICOMDIR tree); the checks below reject what is not DICOM.
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:
            raise DicomSkip(f"not readable as DICOM: {first_line(exc)}") from exc
    if len(ds) == 0:
        # pydicom returns an EMPTY dataset (only a warning) when the file ends inside an
        # encapsulated Pixel Data element; tell that apart from a file that is not DICOM.
        warned = "; ".join(first_line(w.message) for w in caught).replace(str(path), path.name)
        header: Dataset
        try:
            header = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            header = Dataset()
        if len(header) > 0:
            detail = f" ({warned})" if warned else ""
            raise DicomSkip(f"file truncated inside the Pixel Data{detail}")
        raise DicomSkip("no DICOM elements could be read (empty or not a DICOM file)")
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        modality = safe_get(ds, "Modality")
        sop = safe_get(ds, "SOPClassUID")
        what = ", ".join(
            part
            for part in (
                f"Modality {modality}" if modality else "",
                f"SOP Class '{UID(sop).name}'" if sop else "",
            )
            if part
        )
        if not what and transfer_syntax(ds) is None and not is_probably_dicom(path):
            raise DicomSkip("not a DICOM file (no 'DICM' preamble, no file meta, no image)")
        found = f"no Pixel Data element ({what})" if what else "no Pixel Data element"
        raise DicomSkip(f"{found}: not an image")
    if transfer_syntax(ds) is None:
        _infer_transfer_syntax(ds, path)
    return ds


def _infer_transfer_syntax(ds: Dataset, path: Path) -> None:
    """Set the transfer syntax of a file without file meta from how pydicom parsed it.

    Old ACR-NEMA style files have no file meta but a well-formed native dataset; anything
    missing the image geometry is rejected.
    """
    required = ("Rows", "Columns", "BitsAllocated", "PixelData")
    missing = [k for k in required if k not in ds]
    if missing:
        preamble = "" if is_probably_dicom(path) else " and no 'DICM' preamble"
        raise DicomSkip(
            f"file meta has no Transfer Syntax UID (0002,0010){preamble}, and the dataset "
            f"lacks {', '.join(missing)}: pixel data cannot be decoded"
        )
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise DicomSkip("file meta has no Transfer Syntax UID (0002,0010)")
    if implicit:
        uid = pydicom.uid.ImplicitVRLittleEndian
    else:
        uid = pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
