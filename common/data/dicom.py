"""DICOM file -> normalised image array, with a clear reason for every file that is not usable.

Pipeline for one frame (pydicom 3, compressed transfer syntaxes decoded by pylibjpeg):

1. **Decode** the frame(s) chosen by the frame policy with :func:`pydicom.pixels.pixel_array`
   (only the chosen frame is decoded for ``"middle"``/``"first"``). YBR_FULL / YBR_FULL_422
   colour is converted to RGB by pydicom (its default, ``raw=False``).
2. **Greyscale** (MONOCHROME1/2): :func:`~pydicom.pixels.apply_modality_lut` (Rescale Slope /
   Intercept or a Modality LUT) -> :func:`~pydicom.pixels.apply_voi_lut` (VOI LUT Sequence, else
   the first Window Center/Width) -> scale the VOI output range to [0, 1] -> invert MONOCHROME1.
   Enhanced multi-frame objects carry rescale and window in their functional groups
   (*Pixel Value Transformation*, *Frame VOI LUT*); those are used for the chosen frame.
   Without VOI information: 8-bit unsigned data that no modality LUT changed (secondary
   capture, ultrasound, photos) keeps its full range ``[0, 255]`` (so 8-bit images round-trip
   exactly); anything else is scaled by its robust range, the 0.5th to 99.5th percentile of
   the modality values. A window that saturates the whole image falls back to that robust range.
3. **Colour**: RGB (and converted YBR) is divided by ``2**BitsStored - 1``; PALETTE COLOR goes
   through :func:`~pydicom.pixels.apply_color_lut` and is divided by the LUT's entry range.

Frame policy for multi-frame objects: ``"middle"`` (default; frame ``n // 2``), ``"first"``, or
``"mean"`` (every frame through the pipeline, then the per-pixel mean).

Anything not usable raises :class:`DicomSkip` with a short reason (no pixel data, no transfer
syntax, truncated file or pixel data, undecodable codestream, unsupported photometric
interpretation, ...). :func:`read_dicom` never raises anything else.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID

__all__ = [
    "FRAME_POLICIES",
    "DicomImage",
    "DicomSkip",
    "FramePolicy",
    "inspect_dicom",
    "is_probably_dicom",
    "read_dicom",
]

FramePolicy = Literal["middle", "first", "mean"]
FRAME_POLICIES: tuple[str, ...] = ("middle", "first", "mean")

ROBUST_PERCENTILES = (0.5, 99.5)

_GREY = ("MONOCHROME1", "MONOCHROME2")
# YBR_ICT / YBR_RCT only occur with JPEG 2000, whose decoders already return RGB.
_RGB = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PALETTE = "PALETTE COLOR"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Elements the LUT functions read; copied into a per-frame view (see _frame_view).
_VIEW_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
_FRAME_GROUP_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")

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


class DicomSkip(Exception):  # noqa: N818 (a skip, not an error)
    """A DICOM file that cannot be turned into an image; ``reason`` says why in a few words.

    Parameters
    ----------
    reason : str
        Short human-readable reason, e.g. ``"no Pixel Data element (Modality RTPLAN): not an
        image"``.

    """

    def __init__(self, reason: str) -> None:
        self.reason = reason.strip() or "unusable DICOM file"
        super().__init__(self.reason)


@dataclass(frozen=True)
class DicomImage:
    """One decoded DICOM image.

    Parameters
    ----------
    pixels : np.ndarray
        ``float32`` array ``(C, H, W)`` in ``[0, 1]``; ``C`` is 1 (grey) or 3 (RGB).
    meta : dict
        Plain JSON-friendly header values (Modality, PhotometricInterpretation, Rows, Columns,
        NumberOfFrames, BitsStored, TransferSyntaxUID, SOPInstanceUID, PatientSex, PatientAge,
        BodyPartExamined, ...; ``None`` when absent) plus what the pipeline did:
        ``frame_policy``, ``frame_index`` (``None`` for ``"mean"``), ``window`` (a text),
        ``value_range`` (the modality values mapped to 0 and 1, greyscale only),
        ``rescale_slope`` / ``rescale_intercept`` (as applied, ``None`` if absent) and
        ``inverted`` (MONOCHROME1).

    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


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


# ---------------------------------------------------------------------------------------
# Reading and validating the dataset
# ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
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
        return [_plain(v) for v in value]
    return str(value)  # PersonName, UID subclasses, dates


def _safe_get(ds: Dataset, keyword: str) -> Any:
    """Return ``ds.<keyword>`` as a plain value, ``None`` when absent or unreadable."""
    try:
        return _plain(ds.get(keyword))
    except Exception:  # a malformed element must not make a usable image unusable
        return None


def _first_line(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def _read_dataset(path: Path) -> Dataset:
    """Read and validate the structure of ``path``; raise :class:`DicomSkip` when unusable."""
    path = Path(path)
    if not path.is_file():
        raise DicomSkip("file not found" if not path.exists() else "not a regular file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # force=True also reads files without the 128-byte preamble (e.g. extension-less
            # files from a DICOMDIR tree); the checks below reject what is not DICOM.
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:
            raise DicomSkip(f"not readable as DICOM: {_first_line(exc)}") from exc
    if len(ds) == 0:
        # pydicom returns an EMPTY dataset (only a warning) when the file ends inside an
        # encapsulated Pixel Data element; tell that apart from a file that is not DICOM.
        warned = "; ".join(_first_line(w.message) for w in caught).replace(str(path), path.name)
        header: Dataset
        try:
            header = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            header = Dataset()
        if len(header) > 0:
            detail = f" ({warned})" if warned else ""
            raise DicomSkip(f"file truncated inside the Pixel Data{detail}")
        raise DicomSkip("no DICOM elements could be read (empty or not a DICOM file)")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        modality = _safe_get(ds, "Modality")
        sop = _safe_get(ds, "SOPClassUID")
        what = ", ".join(
            part
            for part in (
                f"Modality {modality}" if modality else "",
                f"SOP Class '{UID(sop).name}'" if sop else "",
            )
            if part
        )
        if not what and _transfer_syntax(ds) is None and not is_probably_dicom(path):
            raise DicomSkip("not a DICOM file (no 'DICM' preamble, no file meta, no image)")
        found = f"no Pixel Data element ({what})" if what else "no Pixel Data element"
        raise DicomSkip(f"{found}: not an image")
    if _transfer_syntax(ds) is None:
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


def _check_image_header(ds: Dataset, path: Path) -> dict[str, Any]:
    """Validate the image pixel module; return the header part of the metadata."""
    meta = {keyword: _safe_get(ds, keyword) for keyword in _META_KEYWORDS}
    ts = _transfer_syntax(ds)
    meta["TransferSyntaxUID"] = str(ts) if ts else None
    meta["TransferSyntax"] = ts.name if ts else None
    frames: Any = meta.get("NumberOfFrames")
    try:
        meta["NumberOfFrames"] = max(int(frames), 1) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        meta["NumberOfFrames"] = 1
    photometric = str(meta.get("PhotometricInterpretation") or "").strip().upper()
    meta["PhotometricInterpretation"] = photometric or None
    samples = meta.get("SamplesPerPixel") or 1
    if not meta.get("Rows") or not meta.get("Columns"):
        raise DicomSkip("image has no Rows/Columns")
    if photometric in _GREY:
        if samples != 1:
            raise DicomSkip(f"{photometric} with {samples} samples per pixel (expected 1)")
    elif photometric in _RGB:
        if samples != 3:
            raise DicomSkip(f"{photometric} with {samples} samples per pixel (expected 3)")
    elif photometric == _PALETTE:
        if "RedPaletteColorLookupTableDescriptor" not in ds:
            raise DicomSkip("PALETTE COLOR image without a palette lookup table")
    elif photometric:
        raise DicomSkip(f"unsupported photometric interpretation {photometric}")
    elif "PixelData" in ds:
        raise DicomSkip("no Photometric Interpretation (0028,0004)")
    else:
        meta["PhotometricInterpretation"] = "MONOCHROME2"  # float pixel data
    if ts is not None and not ts.is_compressed and "PixelData" in ds:
        bits = int(meta.get("BitsAllocated") or 8)
        expected_bits = (
            int(meta["Rows"]) * int(meta["Columns"]) * int(samples) * meta["NumberOfFrames"] * bits
        )
        expected = (expected_bits + 7) // 8
        try:
            actual = len(ds.PixelData)
        except Exception as exc:
            raise DicomSkip(f"Pixel Data unreadable: {_first_line(exc)}") from exc
        if actual < expected:
            raise DicomSkip(f"Pixel Data truncated ({actual} of {expected} bytes)")
    meta["path"] = str(path)
    return meta


def inspect_dicom(path: Path) -> dict[str, Any]:
    """Check a DICOM file's structure and header without decoding its pixels.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    dict
        The header metadata that :func:`read_dicom` would return (without the pipeline keys).

    Raises
    ------
    DicomSkip
        For every problem that can be seen without decoding (unreadable or truncated file,
        no pixel data, no transfer syntax, unsupported photometric interpretation, native
        Pixel Data shorter than the geometry needs). A corrupt compressed codestream is only
        found by :func:`read_dicom`.

    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value; we report
        try:
            ds = _read_dataset(Path(path))
            return _check_image_header(ds, Path(path))
        except DicomSkip:
            raise
        except Exception as exc:  # never crash on a file
            raise DicomSkip(f"unexpected error reading the header: {_first_line(exc)}") from exc


# ---------------------------------------------------------------------------------------
# Pixel pipeline
# ---------------------------------------------------------------------------------------


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """Return a small dataset with the LUT-relevant elements that apply to frame ``index``.

    Top-level elements first, then the Shared and this frame's Per-frame Functional Groups
    (Enhanced CT/MR/XA objects keep Rescale and Window there).
    """
    view = Dataset()
    if getattr(ds, "file_meta", None) is not None:
        view.file_meta = ds.file_meta
    implicit, little = ds.original_encoding
    if implicit is not None and little is not None:
        view.set_original_encoding(implicit, little, ds.original_character_set)
    for keyword in _VIEW_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups: list[Dataset] = []
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            groups.append(shared[0])
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and index < len(per_frame):
            groups.append(per_frame[index])
    except Exception:  # malformed functional groups: keep the top-level values
        groups = []
    for group in groups:
        for sequence in _FRAME_GROUP_SEQUENCES:
            items = group.get(sequence)
            if not items:
                continue
            for element in items[0]:
                if element.keyword in _VIEW_KEYWORDS:
                    view[element.tag] = element
    return view


def _number(ds: Dataset, keyword: str, position: int = 0) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            value = value[position]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _voi_kind(view: Dataset) -> str | None:
    """Return ``"lut"``, ``"window"`` or ``None``, mirroring :func:`apply_voi_lut`'s choice."""
    sequence = view.get("VOILUTSequence")
    if sequence and None not in (
        sequence[0].get("LUTDescriptor"),
        sequence[0].get("LUTData"),
    ):
        return "lut"
    if view.get("WindowCenter") not in (None, "") and view.get("WindowWidth") not in (None, ""):
        return "window"
    return None


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(finite, ROBUST_PERCENTILES)
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    return float(lo), float(hi)


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        return np.zeros(values.shape, np.float32)
    out = (values.astype(np.float64) - lo) / (hi - lo)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)


def _grey_frame(raw: np.ndarray, view: Dataset) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality LUT -> VOI LUT / window / robust range -> [0, 1] -> invert MONOCHROME1."""
    info: dict[str, Any] = {
        "rescale_slope": _number(view, "RescaleSlope"),
        "rescale_intercept": _number(view, "RescaleIntercept"),
    }
    if raw.dtype.kind == "f":  # float pixel data: no LUTs apply
        values = raw.astype(np.float64)
        modality_changed = True
    else:
        values = apply_modality_lut(raw, view)
        modality_changed = bool(view.get("ModalityLUTSequence")) or (
            info["rescale_slope"] not in (None, 1.0) or info["rescale_intercept"] not in (None, 0.0)
        )
    kind = _voi_kind(view)
    out: np.ndarray | None = None
    if kind == "lut":
        ints = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        mapped = apply_voi_lut(ints, view, index=0, prefer_lut=True)
        descriptor = view.VOILUTSequence[0].LUTDescriptor
        entries = int(descriptor[0]) or 2**16
        domain = np.arange(int(descriptor[1]), int(descriptor[1]) + entries, dtype=np.int64)
        table = apply_voi_lut(domain, view, index=0, prefer_lut=True)
        out = _scale(mapped, float(table.min()), float(table.max()))
        info["window"] = "VOI LUT Sequence"
        info["value_range"] = [float(domain[0]), float(domain[-1])]
    elif kind == "window":
        center, width = _number(view, "WindowCenter"), _number(view, "WindowWidth")
        function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        try:
            assert center is not None and width is not None
            with np.errstate(over="ignore"):
                mapped = apply_voi_lut(values.astype(np.float64), view, index=0)
                span = 1000.0 * abs(width) + 1.0
                probe = np.array([center - span, center + span], dtype=np.float64)
                bounds = apply_voi_lut(probe, view, index=0)
            candidate = _scale(mapped, float(bounds.min()), float(bounds.max()))
            if np.ptp(candidate) == 0 and np.ptp(values) > 0:
                info["window_note"] = (
                    f"window C={center:g} W={width:g} saturates the whole image; ignored"
                )
            else:
                out = candidate
                info["window"] = f"window C={center:g} W={width:g} ({function})"
                info["value_range"] = [center - width / 2.0, center + width / 2.0]
        except Exception as exc:  # invalid width/function: fall back to the robust range
            info["window_note"] = f"window ignored: {_first_line(exc, 120)}"
    if out is None:
        bits = int(view.get("BitsStored") or 0)
        unsigned = int(view.get("PixelRepresentation") or 0) == 0
        if raw.dtype.kind in "ui" and 0 < bits <= 8 and unsigned and not modality_changed:
            lo, hi = 0.0, float(2**bits - 1)
            info["window"] = f"full {bits}-bit range"
        else:
            lo, hi = _robust_range(values)
            p_lo, p_hi = ROBUST_PERCENTILES
            info["window"] = f"robust range p{p_lo:g}-p{p_hi:g}"
            if not hi > lo:
                info["window"] = "constant image"
        info["value_range"] = [lo, hi]
        out = _scale(values, lo, hi)
    inverted = str(view.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    if inverted:
        out = 1.0 - out
    info["inverted"] = inverted
    return out[None], info


def _colour_frame(raw: np.ndarray, ds: Dataset, photometric: str) -> tuple[np.ndarray, dict]:
    if photometric == _PALETTE:
        rgb = apply_color_lut(raw, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        top = float(2 ** (16 if bits > 8 else 8) - 1)
        window = f"palette colour LUT ({bits}-bit entries)"
    else:
        rgb = raw
        bits = int(ds.get("BitsStored") or 8)
        top = float(2**bits - 1)
        window = f"full {bits}-bit range"
    out = np.clip(rgb.astype(np.float32) / top, 0.0, 1.0)
    return np.moveaxis(out, -1, 0), {"window": window, "inverted": False}


def _frame_indices(n_frames: int, policy: str) -> list[int] | None:
    if policy == "middle":
        return [n_frames // 2]
    if policy == "first":
        return [0]
    return None  # mean: all frames


def _decode(ds: Dataset, index: int | None) -> np.ndarray:
    ts = _transfer_syntax(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=index)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Unable to decode as exceptions"):
            lines = lines[1:2]  # the first plugin's own error
        message = _first_line(ValueError(" ".join(lines))) if lines else type(exc).__name__
        if "less than expected" in message or "truncated" in message.lower():
            raise DicomSkip(f"Pixel Data truncated: {message}") from exc
        name = ts.name if ts else "unknown transfer syntax"
        raise DicomSkip(f"pixel data could not be decoded ({name}): {message}") from exc


def read_dicom(path: Path, frame_policy: FramePolicy = "middle") -> DicomImage:
    """Read a DICOM file into a ``float32`` ``(C, H, W)`` array in ``[0, 1]``.

    Parameters
    ----------
    path : Path
        The file (any name; extension-less files are fine).
    frame_policy : {"middle", "first", "mean"}
        Which frame of a multi-frame object becomes the image (see the module docstring).

    Returns
    -------
    DicomImage
        ``pixels`` with 1 channel (MONOCHROME1/2) or 3 (RGB, YBR, PALETTE COLOR) and ``meta``.

    Raises
    ------
    DicomSkip
        When the file is not a usable image; ``reason`` says why. Nothing else is raised.
    ValueError
        Only for a ``frame_policy`` that is not one of :data:`FRAME_POLICIES` (a caller bug).

    """
    if frame_policy not in FRAME_POLICIES:
        raise ValueError(f"frame_policy must be one of {FRAME_POLICIES}; got {frame_policy!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value; we report
        try:
            return _read_dicom(Path(path), frame_policy)
        except DicomSkip:
            raise
        except MemoryError as exc:
            raise DicomSkip("image too large to decode in memory") from exc
        except Exception as exc:  # never crash on a file: anything unforeseen becomes a skip
            raise DicomSkip(f"unexpected error: {type(exc).__name__}: {_first_line(exc)}") from exc


def _read_dicom(path: Path, frame_policy: str) -> DicomImage:
    ds = _read_dataset(path)
    meta = _check_image_header(ds, path)
    photometric = str(meta["PhotometricInterpretation"])
    n_frames = int(meta["NumberOfFrames"])
    indices = _frame_indices(n_frames, frame_policy) if n_frames > 1 else [None]
    if indices is None:
        stack = _decode(ds, None)
        frames = [(i, stack[i]) for i in range(stack.shape[0])]
    else:
        frames = [(i if i is not None else 0, _decode(ds, i)) for i in indices]
    outputs: list[np.ndarray] = []
    info: dict[str, Any] = {}
    for index, raw in frames:
        if photometric in _GREY:
            if raw.ndim != 2:
                raise DicomSkip(f"unexpected decoded shape {raw.shape} for a grey frame")
            pixels, info = _grey_frame(raw, _frame_view(ds, index))
        else:
            if raw.ndim != 2 + (photometric != _PALETTE) or (
                photometric != _PALETTE and raw.shape[-1] != 3
            ):
                raise DicomSkip(f"unexpected decoded shape {raw.shape} for {photometric}")
            pixels, info = _colour_frame(raw, ds, photometric)
        outputs.append(pixels)
    out = outputs[0] if len(outputs) == 1 else np.mean(outputs, axis=0, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DicomSkip("non-finite values after normalisation")
    meta.update(info)
    meta["frame_policy"] = frame_policy if n_frames > 1 else "single"
    meta["frame_index"] = None if indices is None else (indices[0] or 0)
    meta["frames_used"] = len(outputs)
    return DicomImage(np.ascontiguousarray(out, dtype=np.float32), meta)
