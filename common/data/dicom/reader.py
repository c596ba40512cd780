"""``read_dicom``: one DICOM file -> a ``float32`` ``(C, H, W)`` image in ``[0, 1]``, or a skip.

Steps: read the dataset (:mod:`~consilia.common.data.dicom.dataset`), check the header and the
decode limit (:mod:`~consilia.common.data.dicom.header`,
:mod:`~consilia.common.data.dicom.size_guard`), decode the frame(s) the frame policy chooses
(:mod:`~consilia.common.data.dicom.frames`, :mod:`~consilia.common.data.dicom.decode`),
normalise (:mod:`~consilia.common.data.dicom.normalise`), and skip an image that came out
constant (nothing to learn from).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from consilia.common.data.dicom.dataset import read_dataset
from consilia.common.data.dicom.decode import decode_frames
from consilia.common.data.dicom.frames import FRAME_POLICIES, FramePolicy, frame_indices, frame_view
from consilia.common.data.dicom.header import GREY, PALETTE, check_image_header
from consilia.common.data.dicom.normalise import colour_frame, grey_frame
from consilia.common.data.dicom.size_guard import max_decoded_bytes
from consilia.common.data.dicom.skip import DicomSkip, first_line

__all__ = ["DicomImage", "read_dicom"]


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


def read_dicom(
    path: Path,
    frame_policy: FramePolicy = "middle",
    max_decoded_megabytes: float | None = None,
) -> DicomImage:
    """Read a DICOM file into a ``float32`` ``(C, H, W)`` array in ``[0, 1]``.

    Parameters
    ----------
    path : Path
        The file (any name; extension-less files are fine).
    frame_policy : {"middle", "first", "mean"}
        Which frame of a multi-frame object becomes the image
        (see :mod:`~consilia.common.data.dicom.frames`).
    max_decoded_megabytes : float, optional
        The decode limit: a file whose decoded pixel data would take more is skipped before
        anything is decoded (default
        :data:`~consilia.common.data.dicom.size_guard.DEFAULT_MAX_DECODED_MEGABYTES`).

    Returns
    -------
    DicomImage
        ``pixels`` with 1 channel (MONOCHROME1/2) or 3 (RGB, YBR, PALETTE COLOR) and ``meta``.

    Raises
    ------
    DicomSkip
        When the file is not a usable image; ``reason`` says why. Nothing else is raised.
    ValueError
        Only for a ``frame_policy`` that is not one of :data:`FRAME_POLICIES` or a limit that
        is not positive (caller bugs).

    """
    if frame_policy not in FRAME_POLICIES:
        raise ValueError(f"frame_policy must be one of {FRAME_POLICIES}; got {frame_policy!r}")
    max_bytes = max_decoded_bytes(max_decoded_megabytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value; we report
        try:
            return _read_dicom(Path(path), frame_policy, max_bytes)
        except DicomSkip:
            raise
        except MemoryError as exc:
            raise DicomSkip("image too large to decode in memory") from exc
        except Exception as exc:  # never crash on a file: anything unforeseen becomes a skip
            raise DicomSkip(f"unexpected error: {type(exc).__name__}: {first_line(exc)}") from exc


def _read_dicom(path: Path, frame_policy: str, max_bytes: int) -> DicomImage:
    ds = read_dataset(path, max_bytes)
    meta = check_image_header(ds, path, max_bytes)
    photometric = str(meta["PhotometricInterpretation"])
    n_frames = int(meta["NumberOfFrames"])
    indices = frame_indices(n_frames, frame_policy)
    outputs: list[np.ndarray] = []
    info: dict[str, Any] = {}
    for index, raw in decode_frames(ds, meta, indices):
        if photometric in GREY:
            if raw.ndim != 2:
                raise DicomSkip(f"unexpected decoded shape {raw.shape} for a grey frame")
            pixels, info = grey_frame(raw, frame_view(ds, index))
        else:
            if raw.ndim != 2 + (photometric != PALETTE) or (
                photometric != PALETTE and raw.shape[-1] != 3
            ):
                raise DicomSkip(f"unexpected decoded shape {raw.shape} for {photometric}")
            pixels, info = colour_frame(raw, ds, photometric)
        outputs.append(pixels)
    out = outputs[0] if len(outputs) == 1 else np.mean(outputs, axis=0, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DicomSkip("non-finite values after normalisation")
    if out.size == 0 or float(out.max()) == float(out.min()):
        raise DicomSkip("constant image: every pixel has the same value (nothing to learn)")
    meta.update(info)
    meta["frame_policy"] = frame_policy if n_frames > 1 else "single"
    meta["frame_index"] = None if indices is None else indices[0]
    meta["frames_used"] = len(outputs)
    return DicomImage(np.ascontiguousarray(out, dtype=np.float32), meta)
