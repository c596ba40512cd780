"""Site data sources: a DICOM tree with a labels CSV and a PNG folder, reports and the cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_testkit import run_under_memory_limit, write_dicom, write_fuzzed_corpus
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
from consilia.client.site.data_sources.report import DATA_REPORT_FILE, DataReport

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


SCAN_FUZZED_TREE = """
import json, sys
from pathlib import Path
from consilia.client.site.data_sources.config import DicomSourceConfig
from consilia.client.site.data_sources.loading import scan_site_data
source = DicomSourceConfig(root=Path(sys.argv[1]), labels_csv=Path("labels.csv"))
out = {}
for decode in (False, True):
    report = scan_site_data(source, ["normal", "pneumonia"], decode=decode)
    path = report.write_json(Path(sys.argv[2]) / f"decode-{decode}" / "data-report.json")
    out[str(decode)] = {"json": str(path), "text": report.to_text()}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fuzzed_tree_scan_lists_every_file_with_its_reason(
    tmp_path: Path, dicom_dir: Path
) -> None:
    root = tmp_path / "pacs"
    expected = write_fuzzed_corpus(root / "fuzz", dicom_dir)
    good = np.arange(400, dtype=np.uint16).reshape(20, 20)
    write_dicom(root / "good.dcm", good, "MONOCHROME2", 12)
    rows = [(f"fuzz/{name}", "normal") for name in sorted(expected)] + [("good.dcm", "pneumonia")]
    write_csv(root / "labels.csv", ["path", "label"], rows)
    result = run_under_memory_limit(
        SCAN_FUZZED_TREE, [str(root), str(tmp_path / "state")], 1536 * 2**20
    )
    print(f"peak RSS scanning {len(expected) + 1} files twice: {result['peak_rss_mb']:.0f} MB")
    assert result["peak_rss_mb"] < 1024
    for decode in ("False", "True"):
        report = json.loads(Path(result[decode]["json"]).read_text())
        skipped = {s["path"]: s["reason"] for s in report["skipped"]}
        assert set(skipped) <= {f"fuzz/{name}" for name in expected}
        assert report["counts"] == {"normal": len(expected) - len(skipped), "pneumonia": 1}
        assert all(reason for reason in skipped.values())
        if len(skipped) > 20:  # the text lists 20 and names the JSON file for the rest
            assert f"full list in {result[decode]['json']}" in result[decode]["text"]
    decoded = json.loads(Path(result["True"]["json"]).read_text())
    assert len(decoded["skipped"]) > 20
    assert decoded["counts"] == {"normal": 0, "pneumonia": 1}  # no fuzzed file is trained on
    assert decoded["decoded_now"] == len(expected) + 1 and decoded["cache_hits"] == 0
    assert f"Pixels decoded: yes ({len(expected) + 1} file(s) decoded)" in result["True"]["text"]
    reasons = {s["path"]: s["reason"] for s in decoded["skipped"]}
    for name, word in expected.items():
        assert word in reasons[f"fuzz/{name}"].lower(), (name, reasons[f"fuzz/{name}"])


def test_decode_limit_is_a_site_setting(tmp_path: Path) -> None:
    root = tmp_path / "pacs"
    pixels = (np.arange(256 * 256) % 4000).reshape(256, 256).astype(np.uint16)  # 128 KiB
    write_dicom(root / "a.dcm", pixels, "MONOCHROME2", 12)
    write_dicom(root / "b.dcm", pixels[:8, :8], "MONOCHROME2", 12)
    write_csv(root / "labels.csv", ["path", "label"], [("a.dcm", "normal"), ("b.dcm", "normal")])
    adapter = TypeAdapter(DataSourceConfig)
    base = {"kind": "dicom", "root": str(root), "labels_csv": "labels.csv"}
    assert adapter.validate_python(base).max_decoded_megabytes == 512
    with pytest.raises(ValidationError, match="max_decoded_megabytes"):
        adapter.validate_python({**base, "max_decoded_megabytes": 0})
    # a decode limit under a.dcm's size: a.dcm is skipped by the header scan and by a load
    assert scan_site_data(adapter.validate_python(base), CLASSES).counts["normal"] == 2
    tight = adapter.validate_python({**base, "max_decoded_megabytes": 0.1})
    scan = scan_site_data(tight, CLASSES)
    data, loaded = load_site_data(tight, CLASSES, 1, 8, tmp_path / "cache")
    for report in (scan, loaded):
        assert [(s.path, "decode limit" in s.reason) for s in report.skipped] == [("a.dcm", True)]
    assert len(data) == 1
    # the limit is part of the cache key: a cached skip is not reused under another limit
    _, wider = load_site_data(adapter.validate_python(base), CLASSES, 1, 8, tmp_path / "cache")
    assert not wider.skipped and wider.decoded_now == 2


def test_report_text_says_what_was_decoded(tmp_path: Path) -> None:
    report = DataReport("a source", CLASSES, decoded=True)
    assert "Pixels decoded: none (no labelled file to decode)" in report.to_text()
    report.decoded_now = 3
    assert "Pixels decoded: yes (3 file(s) decoded)" in report.to_text()
    report.cache_hits = 2
    assert "yes (3 file(s) decoded now, 2 from the cache)" in report.to_text()
    report.unlabelled = [f"f{i}.dcm" for i in range(25)]
    assert f"... and 5 more (not listed here; fl-client --check writes every one to " \
        f"{DATA_REPORT_FILE}" in report.to_text()
    path = report.write_json(tmp_path / "state" / DATA_REPORT_FILE)
    assert json.loads(path.read_text())["unlabelled"] == report.unlabelled
    assert f"... and 5 more (full list in {path})" in report.to_text()


def test_check_decode_counts_decodes_and_writes_the_json_report(
    by_path: DicomSourceConfig, tmp_path: Path
) -> None:
    from site_testkit import write_site

    from consilia.client.site.check import run_site_check

    data = {"kind": "dicom", "root": str(by_path.root), "labels_csv": "labels.csv"}
    site = write_site(tmp_path / "site", data=data, class_names=CLASSES)
    report = run_site_check(site, decode=True)
    state = tmp_path / "site" / "state"
    full = json.loads((state / DATA_REPORT_FILE).read_text())
    assert "Pixels decoded: yes (5 file(s) decoded)" in report.data_text  # 4 good + 1 broken
    assert "0 from cache" not in report.data_text
    (line,) = [r for r in report.results if r.name == "data"]
    assert line.detail.endswith(f"full report: {state / DATA_REPORT_FILE}")
    reasons = {s["path"]: s["reason"] for s in full["skipped"]}
    assert "truncated" in reasons["ward2/broken.dcm"] and all(reasons.values())
    assert full["decoded_now"] == 5 and full["unlabelled"] == ["ward2/unlabelled.dcm"]
