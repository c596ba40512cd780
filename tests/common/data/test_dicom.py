"""DICOM -> [0, 1] array: every shared test file, plus synthetic files for each pipeline step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_testkit import write_dicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from consilia.common.data.dicom import (
    DicomImage,
    DicomSkip,
    inspect_dicom,
    is_probably_dicom,
    read_dicom,
)

# (C, H, W) of every usable shared file (see shared/data/README.md, section 2).
EXPECTED_SHAPES: dict[str, tuple[int, int, int]] = {
    "CT_small.dcm": (1, 128, 128),
    "ExplVR_BigEnd.dcm": (3, 60, 80),
    "JPGExtended.dcm": (1, 1024, 256),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": (1, 768, 1024),
    "MR-SIEMENS-DICOM-WithOverlays.dcm": (1, 484, 484),
    "MR_small.dcm": (1, 64, 64),
    "MR_small_RLE.dcm": (1, 64, 64),
    "MR_small_bigendian.dcm": (1, 64, 64),
    "MR_small_implicit.dcm": (1, 64, 64),
    "MR_small_jp2klossless.dcm": (1, 64, 64),
    "MR_small_jpeg_ls_lossless.dcm": (1, 64, 64),
    "OBXXXX1A_rle.dcm": (3, 600, 800),
    "RG1_J2KI.dcm": (1, 1955, 1841),
    "SC_rgb.dcm": (3, 100, 100),
    "SC_rgb_jpeg_dcmtk.dcm": (3, 100, 100),
    "SC_rgb_rle_2frame.dcm": (3, 100, 100),
    "bad_sequence.dcm": (1, 512, 512),
    "dicomdirtests_77654033_CR1_6154": (1, 16, 16),
    "eCT_Supplemental.dcm": (1, 512, 512),
    "emri_small.dcm": (1, 64, 64),
    "examples_ybr_color.dcm": (3, 240, 320),
    "image_dfl.dcm": (1, 512, 512),
}

# The deliberately broken files and a word their skip reason must contain.
BROKEN: dict[str, str] = {
    "MR_truncated.dcm": "truncated",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "JPEG2000-embedded-sequence-delimiter.dcm": "could not be decoded",
    "meta_missing_tsyntax.dcm": "transfer syntax",
    "no_meta.dcm": "not a dicom file",
    "rtplan_truncated.dcm": "no pixel data",
}

MR_SMALL_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
]


@pytest.fixture(scope="module")
def decoded(dicom_dir: Path) -> dict[str, DicomImage | DicomSkip]:
    """Decode every shared file once per module (RG1_J2KI is a 1955x1841 JPEG 2000)."""
    out: dict[str, DicomImage | DicomSkip] = {}
    for path in sorted(dicom_dir.iterdir()):
        try:
            out[path.name] = read_dicom(path)
        except DicomSkip as skip:
            out[path.name] = skip
    return out


# ---------------------------------------------------------------------------------------
# Every shared file
# ---------------------------------------------------------------------------------------


def test_every_shared_file_is_classified(dicom_dir: Path) -> None:
    names = {p.name for p in dicom_dir.iterdir() if p.is_file() and p.name != "README.md"}
    assert names == set(EXPECTED_SHAPES) | set(BROKEN)


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_usable_file_decodes_to_unit_range(name: str, decoded: dict) -> None:
    result = decoded[name]
    assert isinstance(result, DicomImage), f"{name} skipped: {getattr(result, 'reason', '')}"
    pixels = result.pixels
    assert pixels.dtype == np.float32
    assert pixels.shape == EXPECTED_SHAPES[name]
    assert np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert pixels.max() > pixels.min(), "image must not be blank"
    meta = result.meta
    assert meta["Rows"] == pixels.shape[1] and meta["Columns"] == pixels.shape[2]
    assert meta["TransferSyntaxUID"]
    assert meta["window"]
    for key in ("Modality", "SOPInstanceUID", "PatientSex", "PatientAge", "BodyPartExamined"):
        assert key in meta


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_is_skipped_with_reason(name: str, decoded: dict) -> None:
    result = decoded[name]
    assert isinstance(result, DicomSkip)
    assert result.reason and BROKEN[name] in result.reason.lower()


@pytest.mark.parametrize("name", sorted(set(BROKEN) - {"JPEG2000-embedded-sequence-delimiter.dcm"}))
def test_header_check_finds_broken_files_without_decoding(name: str, dicom_dir: Path) -> None:
    with pytest.raises(DicomSkip) as info:
        inspect_dicom(dicom_dir / name)
    assert BROKEN[name] in info.value.reason.lower()


def test_header_check_accepts_good_file(dicom_dir: Path) -> None:
    meta = inspect_dicom(dicom_dir / "dicomdirtests_77654033_CR1_6154")
    assert (meta["Rows"], meta["Columns"], meta["Modality"]) == (16, 16, "CR")
    assert meta["PhotometricInterpretation"] == "MONOCHROME1"


def test_transfer_syntaxes_of_one_image_agree(decoded: dict) -> None:
    """MR_small re-encoded losslessly (RLE, big endian, implicit, J2K, JPEG-LS) is one image."""
    reference = decoded["MR_small.dcm"].pixels
    for name in MR_SMALL_VARIANTS:
        np.testing.assert_allclose(decoded[name].pixels, reference, atol=1e-6, err_msg=name)


def test_ybr_jpeg_is_converted_to_rgb(decoded: dict) -> None:
    rgb = decoded["SC_rgb.dcm"].pixels
    ybr = decoded["SC_rgb_jpeg_dcmtk.dcm"].pixels
    assert np.abs(rgb - ybr).max() < 0.05  # lossy JPEG of the same test pattern
    np.testing.assert_allclose(rgb[:, 0, 0], [1.0, 0.0, 0.0])  # top-left is pure red


def test_monochrome1_is_inverted(decoded: dict, dicom_dir: Path) -> None:
    for name in ("dicomdirtests_77654033_CR1_6154", "RG1_J2KI.dcm"):
        raw = pydicom.dcmread(dicom_dir / name).pixel_array.astype(np.float64).ravel()
        out = decoded[name].pixels.ravel()
        assert decoded[name].meta["inverted"] is True
        ordered = out[np.argsort(raw, kind="stable")]
        assert np.all(np.diff(ordered) <= 1e-6), f"{name}: output must fall as raw value rises"
        assert np.corrcoef(raw, out)[0, 1] < -0.99


def test_ct_modality_lut_is_applied(decoded: dict, dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "CT_small.dcm")
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    assert intercept == -1024.0
    meta = decoded["CT_small.dcm"].meta
    assert (meta["rescale_slope"], meta["rescale_intercept"]) == (slope, intercept)
    hounsfield = ds.pixel_array * slope + intercept
    np.testing.assert_allclose(meta["value_range"], np.percentile(hounsfield, [0.5, 99.5]))
    expected = np.clip((hounsfield - meta["value_range"][0]) / np.ptp(meta["value_range"]), 0, 1)
    np.testing.assert_allclose(decoded["CT_small.dcm"].pixels[0], expected, atol=1e-6)


def test_palette_colour_gives_rgb(decoded: dict, dicom_dir: Path) -> None:
    result = decoded["OBXXXX1A_rle.dcm"]
    ds = pydicom.dcmread(dicom_dir / "OBXXXX1A_rle.dcm")
    expected = np.moveaxis(apply_color_lut(ds.pixel_array, ds) / 65535.0, -1, 0)
    np.testing.assert_allclose(result.pixels, expected, atol=1e-6)
    assert not np.allclose(result.pixels[0], result.pixels[2]), "palette must give real colour"


def test_multiframe_policies(dicom_dir: Path, decoded: dict) -> None:
    path = dicom_dir / "emri_small.dcm"
    frames = pydicom.dcmread(path).pixel_array.astype(np.float64)  # (10, 64, 64), no window

    def robust(frame: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(frame, [0.5, 99.5])
        return np.clip((frame - lo) / (hi - lo), 0, 1)

    middle = decoded["emri_small.dcm"]
    assert (middle.meta["frame_policy"], middle.meta["frame_index"]) == ("middle", 5)
    np.testing.assert_allclose(middle.pixels[0], robust(frames[5]), atol=1e-6)
    first = read_dicom(path, frame_policy="first")
    assert first.meta["frame_index"] == 0
    np.testing.assert_allclose(first.pixels[0], robust(frames[0]), atol=1e-6)
    mean = read_dicom(path, frame_policy="mean")
    assert mean.meta["frames_used"] == 10 and mean.meta["frame_index"] is None
    np.testing.assert_allclose(mean.pixels[0], np.mean([robust(f) for f in frames], 0), atol=1e-5)
    assert decoded["examples_ybr_color.dcm"].meta["frame_index"] == 15
    assert decoded["eCT_Supplemental.dcm"].meta["frame_index"] == 1


def test_enhanced_ct_uses_functional_groups(decoded: dict) -> None:
    meta = decoded["eCT_Supplemental.dcm"].meta
    assert meta["rescale_intercept"] == -1024.0
    assert meta["window"].startswith("window C=49 W=102")


def test_bad_frame_policy_is_a_caller_error(dicom_dir: Path) -> None:
    with pytest.raises(ValueError, match="frame_policy"):
        read_dicom(dicom_dir / "MR_small.dcm", frame_policy="last")  # type: ignore[arg-type]


def test_is_probably_dicom(dicom_dir: Path, tmp_path: Path) -> None:
    assert is_probably_dicom(dicom_dir / "CT_small.dcm")
    assert is_probably_dicom(dicom_dir / "dicomdirtests_77654033_CR1_6154")
    assert not is_probably_dicom(dicom_dir / "no_meta.dcm")
    (tmp_path / "notes.txt").write_text("hello")
    assert not is_probably_dicom(tmp_path / "notes.txt")
    assert not is_probably_dicom(tmp_path / "missing.dcm")


# ---------------------------------------------------------------------------------------
# Synthetic files: each pipeline step checked against a hand computation
# ---------------------------------------------------------------------------------------


def test_rescale_is_applied_before_the_window(tmp_path: Path) -> None:
    raw = np.linspace(0, 2000, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = write_dicom(
        tmp_path / "ct.dcm", raw, "MONOCHROME2", 12,
        RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400,
    )  # fmt: skip
    out = read_dicom(path).pixels[0]
    hu = raw.astype(np.float64) - 1024
    # DICOM LINEAR window (PS3.3 C.11.2.1.2.1) over [0, 4095] then scaled to [0, 1]
    expected = np.clip((hu - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_signed_monochrome1_with_window(tmp_path: Path) -> None:
    raw = np.linspace(-500, 500, 16 * 16).reshape(16, 16).astype(np.int16)
    path = write_dicom(
        tmp_path / "m1.dcm", raw, "MONOCHROME1", 16, WindowCenter=0, WindowWidth=1000
    )
    out = read_dicom(path).pixels[0]
    expected = 1.0 - np.clip((raw - (0 - 0.5)) / (1000 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_eight_bit_without_window_keeps_full_range(tmp_path: Path, rng) -> None:
    raw = rng.integers(40, 200, size=(20, 30), dtype=np.uint8)
    path = write_dicom(tmp_path / "sc.dcm", raw, "MONOCHROME2", 8)
    result = read_dicom(path)
    assert result.meta["window"] == "full 8-bit range"
    np.testing.assert_array_equal(np.rint(result.pixels[0] * 255).astype(np.uint8), raw)


def test_sixteen_bit_without_window_uses_robust_range(tmp_path: Path) -> None:
    raw = np.full((20, 20), 1000, np.uint16)
    raw[0, 0] = 65000  # one hot pixel must not squash the image
    raw[10:, :] = 3000
    result = read_dicom(write_dicom(tmp_path / "mr.dcm", raw, "MONOCHROME2", 16))
    assert result.meta["window"].startswith("robust range")
    assert result.pixels[0, 5, 5] == 0.0 and result.pixels[0, 15, 5] == 1.0


def test_window_saturating_everything_falls_back(tmp_path: Path) -> None:
    raw = np.linspace(100, 200, 100).reshape(10, 10).astype(np.uint16)
    path = write_dicom(
        tmp_path / "w.dcm", raw, "MONOCHROME2", 12, WindowCenter=3000, WindowWidth=10
    )
    result = read_dicom(path)
    assert "saturates" in result.meta["window_note"]
    assert result.pixels.max() == 1.0 and result.pixels.min() == 0.0


def test_constant_image_is_skipped(tmp_path: Path) -> None:
    raw = np.full((8, 8), 700, np.uint16)
    with pytest.raises(DicomSkip, match="constant image"):
        read_dicom(write_dicom(tmp_path / "c.dcm", raw, "MONOCHROME2", 12))


def test_rgb_eight_bit_roundtrip(tmp_path: Path, rng) -> None:
    raw = rng.integers(0, 256, size=(12, 14, 3), dtype=np.uint8)
    result = read_dicom(write_dicom(tmp_path / "rgb.dcm", raw, "RGB", 8))
    assert result.pixels.shape == (3, 12, 14)
    np.testing.assert_array_equal(
        np.rint(result.pixels * 255).astype(np.uint8), raw.transpose(2, 0, 1)
    )


def test_file_without_file_meta_is_read(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.set_pixel_data(np.arange(64, dtype=np.uint16).reshape(8, 8), "MONOCHROME2", 12)
    del ds.file_meta
    path = tmp_path / "acr_nema_style"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    assert not is_probably_dicom(path)
    result = read_dicom(path)
    assert result.pixels.shape == (1, 8, 8)
    assert result.meta["TransferSyntaxUID"] == pydicom.uid.ImplicitVRLittleEndian


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 10, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, bytes(range(256)) * 50],
    ids=["empty", "zeros", "png-like", "random-bytes"],
)
def test_garbage_never_crashes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(content)
    with pytest.raises(DicomSkip) as info:
        read_dicom(path)
    assert info.value.reason


def test_truncated_copy_of_good_file_is_skipped(dicom_dir: Path, tmp_path: Path) -> None:
    data = (dicom_dir / "MR_small_jp2klossless.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 500])
    with pytest.raises(DicomSkip) as info:
        read_dicom(path)
    assert "truncated" in info.value.reason or "decoded" in info.value.reason


def test_missing_path_and_directory_are_skips(tmp_path: Path) -> None:
    with pytest.raises(DicomSkip, match="not found"):
        read_dicom(tmp_path / "nope.dcm")
    with pytest.raises(DicomSkip, match="not a regular file"):
        read_dicom(tmp_path)
