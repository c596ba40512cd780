"""Write small synthetic DICOM files for tests, and a corpus of fuzzed (hostile) DICOM files.

:func:`write_fuzzed_corpus` writes files that claim huge images (native, RLE, JPEG baseline,
JPEG lossless, JPEG-LS, JPEG 2000, deflated), whose codestreams claim more than their header,
whose fragments are truncated, whose geometry is impossible, or whose rescale / window values
are non-finite or degenerate. It returns, per file, a word the skip reason must contain.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.config import disable_value_validation
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

ANY_REASON = ""
"""Expected-reason value of a fuzzed file that must be skipped for any (non-empty) reason."""

HUGE = 65535
_DEFLATE_BOMB_BYTES = 600 * 2**20  # inflates past the default 512 MB decode limit


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, bits: int, **tags) -> Path:
    """Write a minimal DICOM file from ``pixels`` (extra header elements as keywords)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    with disable_value_validation():  # fuzzed values (NaN, negative widths) on purpose
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _ramp(rows: int = 16, columns: int = 16, dtype: type = np.uint16) -> np.ndarray:
    return (np.arange(rows * columns) % 251).reshape(rows, columns).astype(dtype)


def _compressed(path: Path, uid: str, pixels: np.ndarray, bits: int) -> Path:
    ds = pydicom.dcmread(write_dicom(path, pixels, "MONOCHROME2", bits))
    ds.compress(uid, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_baseline(path: Path) -> Path:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_ramp(32, 32, np.uint8)).save(buffer, format="JPEG", quality=95)
    ds = pydicom.dcmread(write_dicom(path, _ramp(32, 32, np.uint8), "MONOCHROME2", 8))
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return path


def _retag(src: Path, dst: Path, frame: bytes | None = None, **tags) -> Path:
    """Copy ``src`` to ``dst`` with header elements replaced and optionally a new frame."""
    ds = pydicom.dcmread(src)
    if frame is not None:
        ds.PixelData = encapsulate([frame])
    with disable_value_validation():
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _frame(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def _even(data: bytes) -> bytes:
    return data + b"\x00" * (len(data) % 2)


def patch_jpeg_size(codestream: bytes, rows: int, columns: int) -> bytes:
    """Return a JPEG / JPEG-LS codestream whose frame header (SOF) claims ``rows x columns``."""
    data = bytearray(codestream)
    offset = 2
    while offset < len(data):
        marker = data[offset + 1]
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            data[offset + 5 : offset + 9] = struct.pack(">HH", rows, columns)
            return bytes(data)
        offset += 2 + length
    raise ValueError("no SOF segment in the codestream")


def patch_j2k_size(codestream: bytes, rows: int, columns: int) -> bytes:
    """Return a JPEG 2000 codestream whose SIZ segment claims ``rows x columns``."""
    data = bytearray(codestream)
    if data[:4] != b"\xff\x4f\xff\x51":
        raise ValueError("not a bare JPEG 2000 codestream")
    data[8:24] = struct.pack(">IIII", columns, rows, 0, 0)
    return bytes(data)


def _deflate_bomb(path: Path) -> Path:
    """A 64 x 64 image whose deflated dataset inflates to 600 MB (mostly Pixel Data zeros)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.set_pixel_data(_ramp(64, 64, np.uint8), "MONOCHROME2", 8, generate_instance_uid=False)
    del ds.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as handle:
        handle.write(head.getvalue())
        handle.write(packer.compress(body.getvalue()))
        handle.write(packer.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0,
                                                 _DEFLATE_BOMB_BYTES)))
        chunk = b"\x00" * 2**20
        for _ in range(_DEFLATE_BOMB_BYTES // len(chunk)):
            handle.write(packer.compress(chunk))
        handle.write(packer.flush())
    return path


def write_fuzzed_corpus(out: Path, shared_dicom: Path | None = None) -> dict[str, str]:
    """Write hostile DICOM files into ``out``; return ``{file name: expected reason word}``.

    Parameters
    ----------
    out : Path
        Folder to fill (created).
    shared_dicom : Path, optional
        The shared DICOM test files; their JPEG lossless and JPEG-LS images are the sources of
        those syntaxes (no encoder for them is installed). Without it those cases are left out.

    Returns
    -------
    dict
        File name -> a lower-case word its skip reason must contain (:data:`ANY_REASON`: any).

    """
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def native(name: str, reason: str, pixels: np.ndarray | None = None, bits: int = 12,
               **tags) -> None:
        write_dicom(out / name, _ramp() if pixels is None else pixels, "MONOCHROME2", bits,
                    **tags)
        expected[name] = reason

    limit = "decode limit"
    # impossible or huge geometry, native pixel data
    native("native_huge_dims.dcm", limit, Rows=HUGE, Columns=HUGE)
    native("native_huge_frames.dcm", limit, NumberOfFrames=10_000_000)
    native("native_bits_stored_over_allocated.dcm", "bitsstored", BitsStored=20)
    native("native_bits_stored_zero.dcm", "bitsstored", BitsStored=0)
    native("native_bits_allocated_12.dcm", "bitsallocated", BitsAllocated=12)
    native("native_negative_frames.dcm", "numberofframes", NumberOfFrames="-3")
    native("native_zero_rows.dcm", "rows", Rows=0)
    # non-finite or degenerate modality LUT / VOI values, constant image
    native("slope_nan.dcm", "rescaleslope", RescaleSlope="NaN", RescaleIntercept="0")
    native("slope_inf.dcm", "rescaleslope", RescaleSlope="Inf", RescaleIntercept="0")
    native("slope_zero.dcm", "rescaleslope", RescaleSlope="0", RescaleIntercept="0")
    native("slope_1e308.dcm", "float32", RescaleSlope="1e308", RescaleIntercept="0")
    native("intercept_nan.dcm", "rescaleintercept", RescaleSlope="1", RescaleIntercept="NaN")
    native("intercept_1e308.dcm", "float32", RescaleSlope="1", RescaleIntercept="-1e308")
    native("window_width_zero.dcm", "windowwidth", WindowCenter="100", WindowWidth="0")
    native("window_width_negative.dcm", "windowwidth", WindowCenter="100", WindowWidth="-50")
    native("window_center_nan.dcm", "windowcenter", WindowCenter="NaN", WindowWidth="100")
    native("constant.dcm", "constant image", np.full((16, 16), 700, np.uint16))

    # RLE
    rle = _compressed(out / "rle_huge_dims.dcm", RLELossless, _ramp(), 16)
    _retag(rle, rle, Rows=HUGE, Columns=HUGE)
    expected[rle.name] = limit
    _retag(rle, out / "rle_huge_frames.dcm", Rows=16, Columns=16, NumberOfFrames=10_000_000)
    expected["rle_huge_frames.dcm"] = limit
    source = _compressed(out / "rle_truncated.dcm", RLELossless, _ramp(), 16)
    _retag(source, source, frame=_even(_frame(source)[:40]))
    expected[source.name] = ANY_REASON

    # JPEG 2000
    j2k = _compressed(out / "j2k_source.dcm", JPEG2000Lossless, _ramp(64, 64), 16)
    frame = _frame(j2k)
    _retag(j2k, out / "j2k_huge_dims.dcm", Rows=HUGE, Columns=HUGE)
    expected["j2k_huge_dims.dcm"] = limit
    _retag(j2k, out / "j2k_codestream_claims_more.dcm", frame=patch_j2k_size(frame, 60000, 60000))
    expected["j2k_codestream_claims_more.dcm"] = "codestream"
    _retag(j2k, out / "j2k_truncated.dcm", frame=_even(frame[: len(frame) // 2]))
    expected["j2k_truncated.dcm"] = "truncated"
    _retag(j2k, out / "j2k_bits_stored_over_allocated.dcm", BitsStored=17)
    expected["j2k_bits_stored_over_allocated.dcm"] = "bitsstored"
    j2k.unlink()

    # JPEG baseline (Pillow's encoder)
    jpeg = _jpeg_baseline(out / "jpeg_source.dcm")
    frame = _frame(jpeg)
    _retag(jpeg, out / "jpeg_huge_dims.dcm", Rows=HUGE, Columns=HUGE)
    expected["jpeg_huge_dims.dcm"] = limit
    _retag(jpeg, out / "jpeg_codestream_claims_more.dcm",
           frame=patch_jpeg_size(frame, 60000, 60000))
    expected["jpeg_codestream_claims_more.dcm"] = "codestream"
    _retag(jpeg, out / "jpeg_truncated.dcm", frame=_even(frame[: len(frame) // 3]))
    expected["jpeg_truncated.dcm"] = "truncated"
    jpeg.unlink()

    # JPEG lossless and JPEG-LS, from the shared test files
    shared = {
        "jpeg_lossless": "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "jpeg_ls": "MR_small_jpeg_ls_lossless.dcm",
    }
    for stem, name in shared.items():
        if shared_dicom is None or not (shared_dicom / name).is_file():
            continue
        src = shared_dicom / name
        frame = _frame(src)
        _retag(src, out / f"{stem}_huge_dims.dcm", Rows=HUGE, Columns=HUGE)
        expected[f"{stem}_huge_dims.dcm"] = limit
        _retag(src, out / f"{stem}_huge_frames.dcm", NumberOfFrames=100000)
        expected[f"{stem}_huge_frames.dcm"] = limit
        _retag(src, out / f"{stem}_codestream_claims_more.dcm",
               frame=patch_jpeg_size(frame, 60000, 60000))
        expected[f"{stem}_codestream_claims_more.dcm"] = "codestream"
        _retag(src, out / f"{stem}_truncated.dcm", frame=_even(frame[: len(frame) // 3]))
        expected[f"{stem}_truncated.dcm"] = "truncated"

    # deflated: a dataset that inflates past the limit, and one claiming a huge image
    _deflate_bomb(out / "deflate_bomb.dcm")
    expected["deflate_bomb.dcm"] = "inflates"
    small = write_dicom(out / "deflated_huge_dims.dcm", _ramp(), "MONOCHROME2", 12)
    ds = pydicom.dcmread(small)
    ds.Rows = ds.Columns = HUGE
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(small, enforce_file_format=True)
    expected[small.name] = limit
    return expected


def run_under_memory_limit(
    code: str, args: list[str], limit_bytes: int, timeout_s: int = 600
) -> dict:
    """Run ``code`` in a fresh interpreter whose address space is capped at ``limit_bytes``.

    The cap (``resource.setrlimit(RLIMIT_AS, ...)``) is set before anything is imported;
    ``code`` sees ``sys.argv[1:] == args`` and must print one JSON object as its last line.
    The returned object gains ``peak_rss_mb``: the child's peak resident memory (``VmHWM`` of
    ``/proc/self/status``; ``resource.getrusage`` where there is no ``/proc``).
    """
    prelude = textwrap.dedent(f"""\
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))
    """)
    # VmHWM is this process image's own peak; getrusage's ru_maxrss survives exec and so can
    # report the parent's resident size at fork (a large pytest process), not the child's.
    epilogue = textwrap.dedent("""
        import json as _json, resource as _resource
        _peak = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss / 1024
        try:
            with open("/proc/self/status") as _status:
                _peak = next(int(line.split()[1]) for line in _status
                             if line.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            pass
        print(_json.dumps({"peak_rss_mb": _peak}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue, *args],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"child exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-2])
    result.update(json.loads(lines[-1]))
    return result


__all__ = [
    "ANY_REASON",
    "patch_j2k_size",
    "patch_jpeg_size",
    "run_under_memory_limit",
    "write_dicom",
    "write_fuzzed_corpus",
]
