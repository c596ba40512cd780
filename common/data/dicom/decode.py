"""Pixel decoding: the chosen frame(s) through pydicom, after the size and codestream checks.

Compressed transfer syntaxes (RLE, JPEG baseline / lossless, JPEG-LS, JPEG 2000) are decoded by
pylibjpeg through pydicom 3; YBR_FULL / YBR_FULL_422 colour comes back as RGB (pydicom's
default, ``raw=False``). A decoder's error becomes a :class:`DicomSkip` with its first line.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from consilia.common.data.dicom.dataset import transfer_syntax
from consilia.common.data.dicom.size_guard import check_codestreams
from consilia.common.data.dicom.skip import DicomSkip, first_line

__all__ = ["decode_frames"]


def _decode(ds: Dataset, index: int | None) -> np.ndarray:
    ts = transfer_syntax(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=index)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Unable to decode as exceptions"):
            lines = lines[1:2]  # the first plugin's own error
        message = first_line(ValueError(" ".join(lines))) if lines else type(exc).__name__
        if "less than expected" in message or "truncated" in message.lower():
            raise DicomSkip(f"Pixel Data truncated: {message}") from exc
        name = ts.name if ts else "unknown transfer syntax"
        raise DicomSkip(f"pixel data could not be decoded ({name}): {message}") from exc


def decode_frames(
    ds: Dataset, meta: dict[str, Any], indices: list[int] | None
) -> list[tuple[int, np.ndarray]]:
    """Decode the frames ``indices`` (``None``: every frame) of a header-checked dataset.

    Parameters
    ----------
    ds : Dataset
        A dataset whose header passed
        :func:`~consilia.common.data.dicom.header.check_image_header` (so its decoded size is
        within the limit).
    meta : dict
        Its header metadata.
    indices : list of int or None
        Frames to decode.

    Returns
    -------
    list of (int, np.ndarray)
        ``(frame index, decoded frame)`` in frame order.

    """
    ts = transfer_syntax(ds)
    if ts is not None and ts.is_encapsulated:
        check_codestreams(ds, meta, indices)
    if int(meta["NumberOfFrames"]) <= 1:
        return [(0, _decode(ds, None))]
    if indices is None:
        stack = _decode(ds, None)
        return [(i, stack[i]) for i in range(stack.shape[0])]
    return [(i, _decode(ds, i)) for i in indices]
