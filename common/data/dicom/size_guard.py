"""The decode limit: image geometry checked, and the decoded size bounded, before any decode.

pydicom allocates the full size a header claims before it finds that the pixel data cannot
fill it (an RLE file claiming 65535 x 65535 pixels takes 8.2 GB before failing), and a JPEG,
JPEG-LS or JPEG 2000 decoder allocates what its codestream claims, whatever the DICOM header
says. So every file is checked first:

* the geometry is sane: positive Rows and Columns, a whole positive NumberOfFrames,
  BitsAllocated of 1, 8, 16, 32 or 64, 1 <= BitsStored <= BitsAllocated;
* Rows x Columns x frames x SamplesPerPixel x BitsAllocated / 8 is at most the decode limit
  (:data:`DEFAULT_MAX_DECODED_MEGABYTES` unless the caller sets one), for every transfer
  syntax;
* for JPEG, JPEG-LS and JPEG 2000, each frame that will be decoded has a codestream whose own
  size is no larger than the header's, and that ends with its end marker (EOI / EOC, ``FFD9``;
  a truncated codestream may otherwise decode into a partly invented image).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame

from consilia.common.data.dicom.skip import DicomSkip

__all__ = [
    "DEFAULT_MAX_DECODED_MEGABYTES",
    "MEGABYTE",
    "check_codestreams",
    "check_decoded_size",
    "check_geometry",
    "codestream_size",
    "decoded_nbytes",
    "max_decoded_bytes",
]

MEGABYTE = 2**20
DEFAULT_MAX_DECODED_MEGABYTES = 512
"""Default decode limit (MB of decoded pixel data per file); a site sets its own."""

_BITS_ALLOCATED = (1, 8, 16, 32, 64)


def max_decoded_bytes(megabytes: float | None) -> int:
    """Return the decode limit in bytes for ``megabytes`` (the default when ``None``)."""
    value = DEFAULT_MAX_DECODED_MEGABYTES if megabytes is None else megabytes
    if not value > 0:
        raise ValueError(f"the decode limit must be positive; got {value!r} MB")
    return int(value * MEGABYTE)


def _whole(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def check_geometry(meta: dict[str, Any], has_integer_pixels: bool) -> None:
    """Raise :class:`DicomSkip` when the header's image geometry is impossible.

    Parameters
    ----------
    meta : dict
        Header values (``Rows``, ``Columns``, ``NumberOfFrames``, ``BitsAllocated``,
        ``BitsStored``, ``PixelRepresentation``); ``NumberOfFrames`` is replaced by its
        whole-number value (1 when absent).
    has_integer_pixels : bool
        True for Pixel Data (integer samples), False for Float / Double Float Pixel Data.

    """
    rows, columns = _whole(meta.get("Rows")), _whole(meta.get("Columns"))
    if rows is None or columns is None or (rows == 0 and columns == 0):
        raise DicomSkip("image has no Rows/Columns")
    if rows < 1 or columns < 1:
        raise DicomSkip(f"image has {rows} Rows and {columns} Columns (both must be positive)")
    frames_value = meta.get("NumberOfFrames")
    if frames_value in (None, ""):
        frames = 1
    else:
        frames = _whole(frames_value) or 0
        if frames < 1:
            raise DicomSkip(f"NumberOfFrames {frames_value!r} is not a positive whole number")
    meta["NumberOfFrames"] = frames
    if not has_integer_pixels:
        return
    allocated = _whole(meta.get("BitsAllocated"))
    if allocated not in _BITS_ALLOCATED:
        raise DicomSkip(
            f"BitsAllocated {meta.get('BitsAllocated')!r} is not one of 1, 8, 16, 32, 64"
        )
    stored_value = meta.get("BitsStored")
    stored = _whole(stored_value) if stored_value not in (None, "") else allocated
    if stored is None or not 1 <= stored <= allocated:
        raise DicomSkip(
            f"BitsStored {stored_value!r} does not fit BitsAllocated {allocated} "
            "(need 1 <= BitsStored <= BitsAllocated)"
        )
    representation = meta.get("PixelRepresentation")
    if representation not in (None, "", 0, 1):
        raise DicomSkip(f"PixelRepresentation {representation!r} is neither 0 nor 1")


def decoded_nbytes(meta: dict[str, Any], default_bits: int = 8) -> int:
    """Return Rows x Columns x frames x SamplesPerPixel x BitsAllocated / 8, rounded up."""
    samples = _whole(meta.get("SamplesPerPixel")) or 1
    bits = _whole(meta.get("BitsAllocated")) or default_bits
    total_bits = (
        int(meta["Rows"]) * int(meta["Columns"]) * int(meta["NumberOfFrames"]) * samples * bits
    )
    return (total_bits + 7) // 8


def check_decoded_size(meta: dict[str, Any], max_bytes: int, default_bits: int = 8) -> None:
    """Raise :class:`DicomSkip` when the decoded pixel data would exceed ``max_bytes``."""
    needed = decoded_nbytes(meta, default_bits)
    if needed > max_bytes:
        samples = _whole(meta.get("SamplesPerPixel")) or 1
        bits = _whole(meta.get("BitsAllocated")) or default_bits
        raise DicomSkip(
            f"decoded image would take {_megabytes(needed)} MB ({meta['Rows']} x "
            f"{meta['Columns']} x {meta['NumberOfFrames']} frame(s) x {samples} sample(s) x "
            f"{bits} bits), over the decode limit of {_megabytes(max_bytes)} MB "
            "(max_decoded_megabytes)"
        )


def _megabytes(nbytes: int) -> str:
    value = nbytes / MEGABYTE
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _jpeg_size(codestream: bytes) -> tuple[int, int, int] | None:
    """Return ``(rows, columns, components)`` from a JPEG / JPEG-LS SOF segment."""
    if codestream[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 4 <= len(codestream):
        if codestream[offset] != 0xFF:
            return None
        marker = codestream[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        (length,) = struct.unpack(">H", codestream[offset + 2 : offset + 4])
        # SOF0-SOF15 except DHT (C4), JPG (C8), DAC (CC); SOF55 (F7) is JPEG-LS
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            body = codestream[offset + 4 : offset + 10]
            if len(body) < 6:
                return None
            _, rows, columns, components = struct.unpack(">BHHB", body)
            return rows, columns, components
        if marker == 0xDA:  # start of scan before any frame header
            return None
        offset += 2 + length
    return None


def _j2k_size(codestream: bytes) -> tuple[int, int, int] | None:
    """Return ``(rows, columns, components)`` from a JPEG 2000 SIZ segment (JP2 box aware)."""
    offset = 0
    if codestream.startswith(b"\x00\x00\x00\x0c\x6a\x50\x20\x20"):
        offset = 12
        while offset + 8 <= len(codestream):
            (length,) = struct.unpack(">I", codestream[offset : offset + 4])
            if codestream[offset + 4 : offset + 8] == b"jp2c":
                offset += 8
                break
            if length < 8:
                return None
            offset += length
    siz = codestream[offset : offset + 42]
    if len(siz) < 42 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", siz[8:24])
    (components,) = struct.unpack(">H", siz[40:42])
    return max(ysiz - y0, 0), max(xsiz - x0, 0), components


def codestream_size(codestream: bytes) -> tuple[int, int, int] | None:
    """Return ``(rows, columns, components)`` a JPEG-family codestream claims, else ``None``."""
    head = bytes(codestream[:65536])
    return _jpeg_size(head) or _j2k_size(head)


def _frames(ds: Dataset, indices: list[int] | None, n_frames: int) -> Iterator[bytes]:
    if indices is None:
        yield from generate_frames(ds.PixelData, number_of_frames=n_frames)
        return
    for index in indices:
        yield get_frame(ds.PixelData, index, number_of_frames=n_frames)


def check_codestreams(ds: Dataset, meta: dict[str, Any], indices: list[int] | None) -> None:
    """Raise :class:`DicomSkip` when a JPEG-family frame claims more than the header, or is cut.

    Parameters
    ----------
    ds : Dataset
        An encapsulated (compressed) dataset.
    meta : dict
        Its checked header values.
    indices : list of int or None
        The frames that will be decoded; ``None`` for every frame.

    """
    ts = ds.file_meta.TransferSyntaxUID
    if not (ts.is_compressed and ts.is_encapsulated) or "PixelData" not in ds:
        return
    if ts == "1.2.840.10008.1.2.5":  # RLE: decoded to the header's size, checked already
        return
    rows, columns = int(meta["Rows"]), int(meta["Columns"])
    samples = int(meta.get("SamplesPerPixel") or 1)
    try:
        for frame in _frames(ds, indices, int(meta["NumberOfFrames"])):
            claimed = codestream_size(frame)
            if claimed is None:
                continue
            if b"\xff\xd9" not in bytes(frame[-16:]).rstrip(b"\x00"):  # allow padding
                raise DicomSkip(
                    f"Pixel Data truncated: a frame's {ts.name} codestream has no end marker"
                )
            c_rows, c_columns, c_components = claimed
            if c_rows * c_columns * max(c_components, 1) > rows * columns * samples:
                raise DicomSkip(
                    f"pixel data could not be decoded ({ts.name}): a frame's codestream "
                    f"claims {c_rows} x {c_columns} x {c_components} samples, more than the "
                    f"header's {rows} x {columns} x {samples}"
                )
    except DicomSkip:
        raise
    except Exception:  # damaged encapsulation: the decoder reports it
        return
