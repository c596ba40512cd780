"""Site data sources: a DICOM tree with a labels CSV and a PNG folder, reports and the cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_testkit import write_dicom
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from consilia.client.site.data_sources import dicom_tree as data_source
from consilia.client.site.data_sources.config import (
    DataSourceConfig,
    DataSourceError,
    DicomSourceConfig,
    ImageFolderSourceConfig,
)
from consilia.client.site.data_sources.loading import load_site_data, scan_site_data

CLASSES = ["normal", "pneumonia"]


def write_dicom_uid(path: Path, pixels: np.ndarray, photometric: str, bits: int, **tags) -> str:
    """Write a minimal DICOM file; return its SOP Instance UID."""
    written = write_dicom(path, pixels, photometric, bits, **tags)
    return str(pydicom.dcmread(written, stop_before_pixels=True).SOPInstanceUID)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def tree(tmp_path: Path, dicom_dir: Path, rng: np.random.Generator) -> dict:
    """A small hospital tree: synthetic files, copies of shared ones, broken and stray files."""
    root = tmp_path / "pacs"
    uids: dict[str, str] = {}
    grey8 = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    uids["ward1/a.dcm"] = write_dicom_uid(
        root / "ward1/a.dcm", grey8, "MONOCHROME2", 8, PatientSex="F"
    )
    grey16 = rng.integers(0, 4096, size=(40, 40), dtype=np.uint16)
    uids["ward1/b.dcm"] = write_dicom_uid(
        root / "ward1/b.dcm", grey16, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096
    )
    rgb = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    uids["ward2/c.dcm"] = write_dicom_uid(root / "ward2/c.dcm", rgb, "RGB", 8, PatientAge="042Y")
    shutil.copy(dicom_dir / "CT_small.dcm", root / "ward2/ct.dcm")
    shutil.copy(dicom_dir / "dicomdirtests_77654033_CR1_6154", root / "ward2/cr_no_extension")
    shutil.copy(dicom_dir / "MR_truncated.dcm", root / "ward2/broken.dcm")
    shutil.copy(dicom_dir / "SC_rgb.dcm", root / "ward2/unlabelled.dcm")
    (root / "ward2/notes.txt").write_text("not an image")
    uids["ward2/ct.dcm"] = str(pydicom.dcmread(root / "ward2/ct.dcm").SOPInstanceUID)
    cr_uid = pydicom.dcmread(root / "ward2/cr_no_extension").SOPInstanceUID
    uids["ward2/cr_no_extension"] = str(cr_uid)
    uids["ward2/broken.dcm"] = str(pydicom.dcmread(root / "ward2/broken.dcm").SOPInstanceUID)
    rows = [
        ("ward1/a.dcm", "normal", "A1"),
        ("ward1\\b.dcm", "pneumonia", "A2"),  # Windows separator
        ("ward2/c.dcm", "normal", "A3"),
        ("ward2/ct.dcm", "pneumonia", "A4"),
        ("./ward2/cr_no_extension", "pneumonia", "A5"),
        ("ward2/broken.dcm", "normal", "A6"),
    ]
    extra_rows = [
        ("ward2/gone.dcm", "normal", "A7"),  # no such file
        ("../outside.dcm", "normal", "A8"),  # leaves the root
    ]
    return {"root": root, "uids": uids, "rows": rows, "extra_rows": extra_rows}


def write_csv(path: Path, header: list[str], rows: list[tuple], delimiter: str = ",") -> Path:
    lines = [delimiter.join(header)] + [delimiter.join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def by_path(tree: dict) -> DicomSourceConfig:
    rows = tree["rows"] + tree["extra_rows"] + [("ward2/c.dcm", "normal", "dup")]
    rows += [("ward1/a.dcm", "Pneumonia", "A9")]  # conflicts with line 2
    write_csv(tree["root"] / "labels.csv", ["path", "label", "patient_id"], rows)
    return DicomSourceConfig(root=tree["root"], labels_csv=Path("labels.csv"))


def test_config_is_a_discriminated_union(tmp_path: Path) -> None:
    adapter = TypeAdapter(DataSourceConfig)
    cfg = adapter.validate_python({"kind": "dicom", "root": str(tmp_path), "labels_csv": "l.csv"})
    assert isinstance(cfg, DicomSourceConfig) and cfg.labels_path == tmp_path / "l.csv"
    folder = adapter.validate_python(
        {"kind": "image_folder", "root": str(tmp_path), "extensions": ["PNG", ".Tif"]}
    )
    assert isinstance(folder, ImageFolderSourceConfig) and folder.extensions == [".png", ".tif"]
    with pytest.raises(ValidationError, match="colum"):
        adapter.validate_python({"kind": "dicom", "root": "x", "labels_csv": "y", "colum": "z"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "nifti", "root": "x"})


def test_dicom_tree_keyed_by_path(by_path: DicomSourceConfig, tmp_path: Path) -> None:
    before = snapshot(by_path.root)
    data, report = load_site_data(
        by_path, CLASSES, in_channels=1, image_size=16, cache_dir=tmp_path / "cache"
    )
    assert snapshot(by_path.root) == before, "source files must never be modified"

    # a.dcm has conflicting labels; broken.dcm is truncated: 4 usable images, CSV row order
    assert [m["path"] for m in data.meta] == [
        "ward1/b.dcm", "ward2/c.dcm", "ward2/ct.dcm", "ward2/cr_no_extension",
    ]  # fmt: skip
    assert data.labels.tolist() == [1, 0, 1, 1]
    assert data.images.shape == (4, 1, 16, 16) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    assert report.counts == {"normal": 1, "pneumonia": 3}
    assert report.files_found == 7  # 6 .dcm-or-preamble files + the extension-less CR
    skipped = {s.path: s.reason for s in report.skipped}
    assert "truncated" in skipped["ward2/broken.dcm"]
    assert "conflicting labels" in skipped["ward1/a.dcm"]
    assert report.unlabelled == ["ward2/unlabelled.dcm"]
    assert any("gone.dcm not found" in m for m in report.missing_files)
    assert any("outside the data root" in m for m in report.missing_files)
    assert any("duplicate row" in n for n in report.notes)
    meta = {m["path"]: m for m in data.meta}
    assert meta["ward2/ct.dcm"]["Modality"] == "CT" and meta["ward2/ct.dcm"]["csv"] == {
        "patient_id": "A4"
    }
    assert meta["ward2/c.dcm"]["PatientAge"] == "042Y"
    assert report.image_sizes["128x128"] == 1 and report.channels == {"grey": 3, "colour": 1}

    text = report.to_text()
    for needle in ("normal", "pneumonia", "ward2/broken.dcm", "Files with no label", "gone.dcm"):
        assert needle in text
    json.dumps(report.to_dict())  # JSON-safe


def test_unknown_label_is_reported_with_hint(tree: dict, tmp_path: Path) -> None:
    rows = [("ward1/a.dcm", "Pneumonia", 1), ("ward1/b.dcm", "", 2), ("ward2/c.dcm", "normal", 3)]
    write_csv(tree["root"] / "labels.csv", ["path", "label", "n"], rows)
    cfg = DicomSourceConfig(root=tree["root"], labels_csv=Path("labels.csv"))
    report = scan_site_data(cfg, CLASSES)
    assert report.unknown_labels == {"Pneumonia": ["ward1/a.dcm"]}
    assert any("ward1/b.dcm" in u and "empty label" in u for u in report.unlabelled)
    assert "did you mean 'pneumonia'" in report.to_text()
    assert report.counts == {"normal": 1, "pneumonia": 0}
    assert report.empty_classes == ["pneumonia"]


def test_dicom_tree_keyed_by_uid(tree: dict, tmp_path: Path) -> None:
    root = tree["root"]
    shutil.copy(root / "ward1/b.dcm", root / "ward1/b_copy.dcm")  # same UID twice
    rows = [(tree["uids"][p.replace("\\", "/").lstrip("./")], lab) for p, lab, _ in tree["rows"]]
    rows.append(("1.2.3.999", "normal"))
    write_csv(tmp_path / "uids.csv", ["uid", "diagnosis"], rows, delimiter=";")
    cfg = DicomSourceConfig(
        root=root,
        labels_csv=tmp_path / "uids.csv",
        key="sop_instance_uid",
        uid_column="uid",
        label_column="diagnosis",
    )
    data, report = load_site_data(cfg, CLASSES, 1, 16, tmp_path / "cache")
    assert report.counts == {"normal": 2, "pneumonia": 3}
    assert len(data) == 5
    skipped = {s.path: s.reason for s in report.skipped}
    assert "duplicate" in skipped["ward1/b_copy.dcm"] and "truncated" in skipped["ward2/broken.dcm"]
    assert any("1.2.3.999" in m for m in report.missing_files)
    assert report.unlabelled == ["ward2/unlabelled.dcm"]
    assert {m["SOPInstanceUID"] for m in data.meta} <= set(tree["uids"].values())


def test_second_load_uses_the_cache(
    by_path: DicomSourceConfig, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    first, report1 = load_site_data(by_path, CLASSES, 1, 16, cache)
    assert report1.decoded_now == 5 and report1.cache_hits == 0  # 4 good + 1 broken

    def must_not_decode(*args, **kwargs):
        raise AssertionError("DICOM decoded again despite the cache")

    monkeypatch.setattr(data_source, "read_dicom", must_not_decode)
    second, report2 = load_site_data(by_path, CLASSES, 1, 16, cache)
    assert report2.cache_hits == 5 and report2.decoded_now == 0
    np.testing.assert_array_equal(first.images, second.images)
    assert [m["path"] for m in first.meta] == [m["path"] for m in second.meta]
    assert {s.path: s.reason for s in report2.skipped} == {
        s.path: s.reason for s in report1.skipped
    }
    assert report2.counts == report1.counts and report2.image_sizes == report1.image_sizes

    monkeypatch.undo()  # other parameters are other cache entries
    _, report3 = load_site_data(by_path, CLASSES, 3, 16, cache)
    assert report3.decoded_now == 5


def test_edited_file_is_decoded_again(tree: dict, tmp_path: Path, rng) -> None:
    root = tree["root"]
    write_csv(root / "labels.csv", ["path", "label"], [("ward1/a.dcm", "normal")])
    cfg = DicomSourceConfig(root=root, labels_csv=Path("labels.csv"))
    first, _ = load_site_data(cfg, CLASSES, 1, 8, tmp_path / "c")
    write_dicom(root / "ward1/a.dcm", np.zeros((20, 30), np.uint8), "MONOCHROME2", 8)
    second, report = load_site_data(cfg, CLASSES, 1, 8, tmp_path / "c")
    assert report.decoded_now == 1 and not second.images.any() and first.images.any()


def test_channel_conversion(tree: dict, tmp_path: Path) -> None:
    root = tree["root"]
    write_csv(
        root / "labels.csv",
        ["path", "label"],
        [("ward1/a.dcm", "normal"), ("ward2/c.dcm", "normal")],
    )
    cfg = DicomSourceConfig(root=root, labels_csv=Path("labels.csv"))
    rgb_data, _ = load_site_data(cfg, CLASSES, 3, 10, tmp_path / "c")
    grey = rgb_data.images[0]
    assert grey.shape == (3, 10, 10) and (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    grey_data, _ = load_site_data(cfg, CLASSES, 1, 10, tmp_path / "c")
    source = pydicom.dcmread(root / "ward2/c.dcm").pixel_array.astype(np.float64)  # 10x12x3
    assert grey_data.images.shape == (2, 1, 10, 10)
    # BT.601 luma of the (resized) colour image, within resize/rounding tolerance
    luma = source @ np.array([0.299, 0.587, 0.114])
    assert abs(float(grey_data.images[1].mean()) - float(luma.mean())) < 3.0


def test_header_scan_matches_load(by_path: DicomSourceConfig, tmp_path: Path) -> None:
    report = scan_site_data(by_path, CLASSES)
    _, loaded = load_site_data(by_path, CLASSES, 1, 16, tmp_path / "cache")
    assert not report.decoded and "header check only" in report.to_text()
    assert report.counts == loaded.counts
    assert {s.path for s in report.skipped} == {s.path for s in loaded.skipped}
    decoded = scan_site_data(by_path, CLASSES, decode=True)
    assert decoded.decoded and decoded.counts == loaded.counts


def test_bad_csv_errors_name_file_and_column(tree: dict, tmp_path: Path) -> None:
    root = tree["root"]
    write_csv(root / "labels.csv", ["file", "label"], [("ward1/a.dcm", "normal")])
    cfg = DicomSourceConfig(root=root, labels_csv=Path("labels.csv"))
    with pytest.raises(DataSourceError, match=r"labels\.csv has no column 'path'.*path_column"):
        scan_site_data(cfg, CLASSES)
    write_csv(root / "labels.csv", ["path", "class"], [("ward1/a.dcm", "normal")])
    with pytest.raises(DataSourceError, match=r"no column 'label'.*label_column"):
        load_site_data(cfg, CLASSES, 1, 8, tmp_path / "c")
    missing = DicomSourceConfig(root=root, labels_csv=tmp_path / "nope.csv")
    with pytest.raises(DataSourceError, match="nope.csv not found"):
        scan_site_data(missing, CLASSES)
    (root / "labels.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataSourceError, match="cannot be read"):
        scan_site_data(cfg, CLASSES)
    with pytest.raises(DataSourceError, match="not a folder"):
        scan_site_data(DicomSourceConfig(root=tmp_path / "none", labels_csv=Path("l.csv")), CLASSES)


def test_excel_style_csv_with_bom(tree: dict, tmp_path: Path) -> None:
    root = tree["root"]
    (root / "labels.csv").write_text("\ufeffpath ; label\nward1/a.dcm ; normal\n", encoding="utf-8")
    cfg = DicomSourceConfig(root=root, labels_csv=Path("labels.csv"))
    assert scan_site_data(cfg, CLASSES).counts == {"normal": 1, "pneumonia": 0}


def test_invalid_task_arguments(by_path: DicomSourceConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in_channels"):
        load_site_data(by_path, CLASSES, 2, 16, tmp_path)
    with pytest.raises(ValueError, match="duplicates"):
        load_site_data(by_path, ["a", "a"], 1, 16, tmp_path)


# ---------------------------------------------------------------------------------------
# Folder-per-class PNG/JPEG source
# ---------------------------------------------------------------------------------------


def test_image_folder_source(tmp_path: Path, rng: np.random.Generator) -> None:
    root = tmp_path / "images"
    for sub in ("normal", "pneumonia/sub", "other"):
        (root / sub).mkdir(parents=True)
    grey = rng.integers(0, 256, size=(12, 12), dtype=np.uint8)
    Image.fromarray(grey).save(root / "normal/a.png")
    Image.fromarray(rng.integers(0, 256, size=(20, 10, 3), dtype=np.uint8)).save(
        root / "pneumonia/sub/b.jpg"
    )
    Image.fromarray(grey).save(root / "other/c.png")
    Image.fromarray(grey).save(root / "loose.png")
    (root / "normal/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "normal/readme.txt").write_text("ignored")
    cfg = ImageFolderSourceConfig(root=root)
    data, report = load_site_data(cfg, CLASSES, 1, 12, tmp_path / "cache")
    assert report.counts == {"normal": 1, "pneumonia": 1}
    assert [m["path"] for m in data.meta] == ["normal/a.png", "pneumonia/sub/b.jpg"]
    assert data.labels.tolist() == [0, 1] and data.images.shape == (2, 1, 12, 12)
    np.testing.assert_array_equal(data.images[0, 0], grey)  # same size, 8-bit: exact
    assert report.unknown_labels == {"other": ["other/c.png"]}
    assert report.unlabelled == ["loose.png (not inside a class folder)"]
    assert [s.path for s in report.skipped] == ["normal/broken.png"]
    assert any("without an image extension" in n for n in report.notes)
    scan = scan_site_data(cfg, CLASSES)
    assert scan.counts == report.counts and [s.path for s in scan.skipped] == ["normal/broken.png"]
