"""Rehearsal exporter: simulated sites written as DICOM read back to the same pixels and labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from consilia.client.site.data_sources.config import DicomSourceConfig
from consilia.client.site.data_sources.loading import load_site_data
from consilia.common.data.dicom import read_dicom
from consilia.common.data.images import ImageData
from consilia.common.data.sitefile import save_site_npz
from consilia.simulations.export_sites import export_partition_to_dicom, export_site_dicoms

CLASSES = ["AbdomenCT", "Chest X-ray"]  # a space: folder names are sanitised, labels are not


def read_rows(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "labels.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("channels", [1, 3])
def test_export_reads_back_exactly(tmp_path: Path, rng: np.random.Generator, channels: int) -> None:
    images = rng.integers(0, 256, size=(6, channels, 12, 12), dtype=np.uint8)
    labels = np.array([0, 1, 1, 0, 1, 0])
    site = export_site_dicoms(images, labels, CLASSES, tmp_path / "out", "site-03", seed=5)
    assert site == tmp_path / "out" / "site-03"
    rows = read_rows(site)
    assert [r["label"] for r in rows] == [CLASSES[i] for i in labels]
    for n, row in enumerate(rows):
        back = read_dicom(site / row["path"])
        assert back.meta["SOPInstanceUID"] == row["sop_instance_uid"]
        np.testing.assert_array_equal(np.rint(back.pixels * 255).astype(np.uint8), images[n])

    cfg = DicomSourceConfig(root=site, labels_csv=Path("labels.csv"))
    data, report = load_site_data(cfg, CLASSES, channels, 12, tmp_path / "cache")
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert report.n_problems == 0 and report.counts == {"AbdomenCT": 3, "Chest X-ray": 3}
    by_uid = DicomSourceConfig(root=site, labels_csv=Path("labels.csv"), key="sop_instance_uid")
    data_uid, _ = load_site_data(by_uid, CLASSES, channels, 12, tmp_path / "cache")
    np.testing.assert_array_equal(data_uid.images, images)


def test_exported_header_is_valid_secondary_capture(tmp_path: Path) -> None:
    images = np.zeros((2, 3, 4, 5), np.uint8)
    site = export_site_dicoms(images, np.array([1, 0]), CLASSES, tmp_path, "site-00", seed=1)
    path = site / read_rows(site)[0]["path"]
    assert path.parent.name == "Chest_X-ray" and path.name == "000000.dcm"
    ds = pydicom.dcmread(path)  # no force: a proper Part 10 file with preamble
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.Modality, ds.ConversionType, ds.PhotometricInterpretation) == ("OT", "WSD", "RGB")
    assert str(ds.PatientName) == "Anonymous^Rehearsal" and ds.PatientID == "SITE00-000000"
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsStored) == (4, 5, 3, 8)
    assert len(ds.StudyDate) == 8 and ds.StudyInstanceUID != ds.SeriesInstanceUID


def test_uids_are_deterministic_per_seed(tmp_path: Path, rng: np.random.Generator) -> None:
    images = rng.integers(0, 256, size=(3, 1, 4, 4), dtype=np.uint8)
    labels = np.array([0, 1, 0])
    a = export_site_dicoms(images, labels, CLASSES, tmp_path / "a", "site-01", seed=9)
    b = export_site_dicoms(images, labels, CLASSES, tmp_path / "b", "site-01", seed=9)
    c = export_site_dicoms(images, labels, CLASSES, tmp_path / "c", "site-01", seed=10)
    d = export_site_dicoms(images, labels, CLASSES, tmp_path / "d", "site-02", seed=9)
    uids = {
        k: [r["sop_instance_uid"] for r in read_rows(s)]
        for k, s in zip("abcd", (a, b, c, d), strict=True)
    }
    assert uids["a"] == uids["b"]
    assert not set(uids["a"]) & set(uids["c"]) and not set(uids["a"]) & set(uids["d"])
    for row in read_rows(a):
        assert (a / row["path"]).read_bytes() == (b / row["path"]).read_bytes()


def test_bad_inputs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        export_site_dicoms(
            np.zeros((1, 1, 4, 4), np.float32), np.array([0]), CLASSES, tmp_path, "s", 0
        )
    with pytest.raises(ValueError, match="labels"):
        export_site_dicoms(
            np.zeros((2, 1, 4, 4), np.uint8), np.array([0]), CLASSES, tmp_path, "s", 0
        )
    with pytest.raises(ValueError, match="class_names"):
        export_site_dicoms(
            np.zeros((1, 1, 4, 4), np.uint8), np.array([2]), CLASSES, tmp_path, "s", 0
        )


def test_export_partition(tmp_path: Path, rng: np.random.Generator) -> None:
    partition = tmp_path / "partition"
    expected = {}
    for site_id, (n_train, n_val) in enumerate([(5, 2), (3, 1)]):
        train = ImageData(
            rng.integers(0, 256, size=(n_train, 1, 8, 8), dtype=np.uint8),
            rng.integers(0, 2, size=n_train),
        )
        val = ImageData(
            rng.integers(0, 256, size=(n_val, 1, 8, 8), dtype=np.uint8),
            rng.integers(0, 2, size=n_val),
        )
        save_site_npz(partition / "sites" / f"site-{site_id:02d}.npz", train, val, CLASSES)
        expected[f"site-{site_id:02d}"] = (train, val)
    (partition / "partition.json").write_text(json.dumps({"seed": 123}), encoding="utf-8")

    site_dirs = export_partition_to_dicom(partition, tmp_path / "dicom")
    assert [s.name for s in site_dirs] == ["site-00", "site-01"]
    for site_dir in site_dirs:
        train, val = expected[site_dir.name]
        rows = read_rows(site_dir)
        assert [r["split"] for r in rows] == ["train"] * len(train) + ["val"] * len(val)
        cfg = DicomSourceConfig(root=site_dir, labels_csv=Path("labels.csv"))
        data, report = load_site_data(cfg, CLASSES, 1, 8, tmp_path / "cache")
        assert report.n_problems == 0
        np.testing.assert_array_equal(data.images, np.concatenate([train.images, val.images]))
        np.testing.assert_array_equal(data.labels, np.concatenate([train.labels, val.labels]))
        assert [m["csv"]["split"] for m in data.meta] == [r["split"] for r in rows]
    again = export_partition_to_dicom(partition / "sites", tmp_path / "again")  # sites dir works
    assert read_rows(again[0]) != read_rows(site_dirs[0])  # no partition.json there: seed 0

    with pytest.raises(FileNotFoundError, match="site-"):
        export_partition_to_dicom(tmp_path / "empty", tmp_path / "x")
