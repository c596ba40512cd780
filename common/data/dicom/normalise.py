"""Decoded values -> ``[0, 1]``: modality LUT, VOI LUT / window, robust range, colour.

Greyscale (MONOCHROME1/2): :func:`~pydicom.pixels.apply_modality_lut` (Rescale Slope /
Intercept or a Modality LUT) -> :func:`~pydicom.pixels.apply_voi_lut` (VOI LUT Sequence, else
the first Window Center/Width) -> scale the VOI output range to [0, 1] -> invert MONOCHROME1.
Without VOI information: 8-bit unsigned data that no modality LUT changed (secondary capture,
ultrasound, photos) keeps its full range ``[0, 255]`` (so 8-bit images round-trip exactly);
anything else is scaled by its robust range, the 0.5th to 99.5th percentile of the modality
values. A window that saturates the whole image falls back to that robust range.

Parameters that would make the image meaningless are a skip, never silently repaired: a
non-finite or zero Rescale Slope, a non-finite Rescale Intercept, a rescale that maps the stored
values outside the float32 range (e.g. a slope of 1e308), a non-finite Window Center, and a
Window Width that is not a positive finite number.

Colour: RGB (and converted YBR) is divided by ``2**BitsStored - 1``; PALETTE COLOR goes through
:func:`~pydicom.pixels.apply_color_lut` and is divided by the LUT's entry range.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from consilia.common.data.dicom.header import PALETTE
from consilia.common.data.dicom.skip import DicomSkip, first_line

__all__ = ["ROBUST_PERCENTILES", "colour_frame", "grey_frame"]

ROBUST_PERCENTILES = (0.5, 99.5)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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


def _stored_range(view: Dataset) -> tuple[float, float]:
    bits = int(view.get("BitsStored") or view.get("BitsAllocated") or 16)
    if int(view.get("PixelRepresentation") or 0) == 1:
        return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _check_rescale(view: Dataset, slope: float | None, intercept: float | None) -> None:
    """Skip a rescale that is non-finite, zero, or maps stored values beyond float32."""
    if slope is not None and (not math.isfinite(slope) or slope == 0.0):
        raise DicomSkip(f"RescaleSlope {slope:g} is not a non-zero finite number")
    if intercept is not None and not math.isfinite(intercept):
        raise DicomSkip(f"RescaleIntercept {intercept:g} is not a finite number")
    if slope is None and intercept is None:
        return
    lo, hi = _stored_range(view)
    s, b = (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)
    with np.errstate(over="ignore", invalid="ignore"):
        ends = np.array([lo, hi], dtype=np.float64) * s + b
    if not np.all(np.isfinite(ends)) or float(np.abs(ends).max()) > _FLOAT32_MAX:
        raise DicomSkip(
            f"RescaleSlope {s:g} / RescaleIntercept {b:g} map the stored values outside the "
            "float32 range"
        )


def _check_window(center: float | None, width: float | None) -> None:
    if center is None or not math.isfinite(center):
        raise DicomSkip(f"WindowCenter {center} is not a finite number")
    if width is None or not math.isfinite(width) or width <= 0.0:
        raise DicomSkip(f"WindowWidth {width} is not a positive finite number")


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


def _apply_window(
    values: np.ndarray, view: Dataset, info: dict[str, Any]
) -> np.ndarray | None:
    """Window Center/Width -> [0, 1]; ``None`` when the window saturates or cannot apply."""
    center, width = _number(view, "WindowCenter"), _number(view, "WindowWidth")
    _check_window(center, width)
    assert center is not None and width is not None
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    try:
        with np.errstate(over="ignore"):
            mapped = apply_voi_lut(values.astype(np.float64), view, index=0)
            span = 1000.0 * abs(width) + 1.0
            probe = np.array([center - span, center + span], dtype=np.float64)
            bounds = apply_voi_lut(probe, view, index=0)
        candidate = _scale(mapped, float(bounds.min()), float(bounds.max()))
    except Exception as exc:  # e.g. an unknown VOI LUT function: fall back to the robust range
        info["window_note"] = f"window ignored: {first_line(exc, 120)}"
        return None
    if np.ptp(candidate) == 0 and np.ptp(values) > 0:
        info["window_note"] = f"window C={center:g} W={width:g} saturates the whole image; ignored"
        return None
    info["window"] = f"window C={center:g} W={width:g} ({function})"
    info["value_range"] = [center - width / 2.0, center + width / 2.0]
    return candidate


def grey_frame(raw: np.ndarray, view: Dataset) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality LUT -> VOI LUT / window / robust range -> [0, 1] -> invert MONOCHROME1.

    Parameters
    ----------
    raw : np.ndarray
        One decoded frame ``(H, W)``.
    view : Dataset
        The LUT elements that apply to it
        (:func:`~consilia.common.data.dicom.frames.frame_view`).

    Returns
    -------
    tuple
        ``(pixels (1, H, W) float32 in [0, 1], what was done)``.

    Raises
    ------
    DicomSkip
        For unusable rescale or window values, or non-finite modality values.

    """
    info: dict[str, Any] = {
        "rescale_slope": _number(view, "RescaleSlope"),
        "rescale_intercept": _number(view, "RescaleIntercept"),
    }
    if raw.dtype.kind == "f":  # float pixel data: no LUTs apply
        values = raw.astype(np.float64)
        modality_changed = True
    else:
        _check_rescale(view, info["rescale_slope"], info["rescale_intercept"])
        values = apply_modality_lut(raw, view)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise DicomSkip("the modality LUT gives non-finite values")
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
        out = _apply_window(values, view, info)
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


def colour_frame(raw: np.ndarray, ds: Dataset, photometric: str) -> tuple[np.ndarray, dict]:
    """RGB / YBR (already RGB) / PALETTE COLOR frame -> ``(3, H, W)`` float32 in [0, 1]."""
    if photometric == PALETTE:
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
