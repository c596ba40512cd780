"""Bounded decoding: a fuzzed DICOM corpus read in a memory-capped process, a reason per file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_testkit import (
    ANY_REASON,
    patch_j2k_size,
    patch_jpeg_size,
    run_under_memory_limit,
    write_dicom,
    write_fuzzed_corpus,
)

from consilia.common.data.dicom import DicomSkip, inspect_dicom, read_dicom
from consilia.common.data.dicom.size_guard import codestream_size, decoded_nbytes

MEMORY_LIMIT = 1536 * 2**20  # address space of the reading process (imports take ~200 MB)
PEAK_RSS_TARGET_MB = 1024

# Reasons the header check alone must find (no decoding).
HEADER_WORDS = ("decode limit", "inflates", "bitsstored", "bitsallocated", "numberofframes", "rows")

READ_EVERY_FILE = """
import json, sys
from pathlib import Path
from consilia.common.data.dicom import DicomSkip, inspect_dicom, read_dicom
out = {}
for path in sorted(Path(sys.argv[1]).iterdir()):
    entry = {}
    for stage, read in (("header", inspect_dicom), ("decode", read_dicom)):
        try:
            read(path)
            entry[stage] = None
        except DicomSkip as skip:
            entry[stage] = skip.reason
    out[path.name] = entry
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, dicom_dir: Path) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("fuzzed")
    return folder, write_fuzzed_corpus(folder, dicom_dir)


@pytest.mark.slow
def test_fuzzed_corpus_is_skipped_with_reasons_under_a_memory_cap(corpus: tuple) -> None:
    folder, expected = corpus
    result = run_under_memory_limit(READ_EVERY_FILE, [str(folder)], MEMORY_LIMIT)
    peak = result.pop("peak_rss_mb")
    assert set(result) == set(expected)
    for name, word in expected.items():
        reason = result[name]["decode"]
        assert reason, f"{name} was decoded; it must be skipped"
        assert word in reason.lower(), f"{name}: {reason!r} lacks {word!r}"
        assert "too large to decode in memory" not in reason  # the guard, not a MemoryError
        if word in HEADER_WORDS:
            header = result[name]["header"]
            assert header and word in header.lower(), f"{name}: header check said {header!r}"
    print(f"peak RSS reading {len(expected)} fuzzed files: {peak:.0f} MB")
    assert peak < PEAK_RSS_TARGET_MB


def test_corpus_covers_every_syntax_and_flaw(corpus: tuple) -> None:
    _, expected = corpus
    for stem in ("native", "rle", "j2k", "jpeg", "jpeg_lossless", "jpeg_ls", "deflated"):
        assert f"{stem}_huge_dims.dcm" in expected
    for flaw in ("slope_nan", "slope_inf", "slope_1e308", "window_width_zero",
                 "window_width_negative", "constant", "native_bits_stored_over_allocated",
                 "jpeg_ls_truncated", "j2k_codestream_claims_more", "deflate_bomb"):
        assert f"{flaw}.dcm" in expected
    assert ANY_REASON in expected.values()  # rle_truncated: any decoder reason will do


def test_decode_limit_is_configurable(tmp_path: Path) -> None:
    pixels = (np.arange(256 * 256) % 4000).reshape(256, 256).astype(np.uint16)  # 128 KiB
    path = write_dicom(tmp_path / "mr.dcm", pixels, "MONOCHROME2", 12)
    assert decoded_nbytes(inspect_dicom(path)) == 256 * 256 * 2
    assert read_dicom(path, max_decoded_megabytes=0.125).pixels.shape == (1, 256, 256)
    with pytest.raises(DicomSkip, match=r"over the decode limit of 0.1 MB"):
        read_dicom(path, max_decoded_megabytes=0.1)
    with pytest.raises(DicomSkip, match="decode limit"):
        inspect_dicom(path, max_decoded_megabytes=0.1)
    with pytest.raises(ValueError, match="positive"):
        read_dicom(path, max_decoded_megabytes=0)


def test_codestream_sizes_are_read_from_the_headers(dicom_dir: Path) -> None:
    import pydicom
    from pydicom.encaps import get_frame

    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                 "JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        ds = pydicom.dcmread(dicom_dir / name)
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
        assert codestream_size(frame) == (ds.Rows, ds.Columns, ds.SamplesPerPixel), name
        patch = patch_j2k_size if name.endswith("jp2klossless.dcm") else patch_jpeg_size
        assert codestream_size(patch(frame, 7, 9))[:2] == (7, 9)
    assert codestream_size(b"not a codestream") is None


def test_window_width_below_one_still_falls_back(tmp_path: Path) -> None:
    """A positive width too small for LINEAR is not degenerate: the robust range is used."""
    raw = np.linspace(100, 200, 100).reshape(10, 10).astype(np.uint16)
    path = write_dicom(
        tmp_path / "w.dcm", raw, "MONOCHROME2", 12, WindowCenter=150, WindowWidth=0.5
    )
    result = read_dicom(path)
    assert "window ignored" in result.meta["window_note"]
    assert result.meta["window"].startswith("robust range")
