"""Tests for consilia.common.data.datasets: the shared contract, MedNIST, MedMNIST, synthetic."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consilia.common.config import DataConfig
from consilia.common.data.datasets import (
    DATASETS,
    MEDMNIST_FLAGS,
    DatasetBundle,
    DatasetNotFoundError,
    load_dataset,
    load_site_npz,
    make_synthetic,
    save_site_npz,
    stratified_split,
    stratified_subsample,
)
from consilia.common.data.datasets import mednist as mednist_module
from consilia.common.data.datasets.medmnist import MEDMNIST_INFO, find_medmnist_file, medmnist_url
from consilia.common.data.images import ImageData
from consilia.common.registry import UnknownNameError

MEDNIST_TOTAL = 11_791
MEDNIST_CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the decoded-image/MD5 caches at a fresh folder for this module."""
    home = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def mednist_timed(cache_home: Path, shared_data_dir: Path) -> dict[str, object]:
    """Load MedNIST twice (cold, then from the cache); keep the bundles and timings."""
    cfg = DataConfig(dataset="mednist", root=shared_data_dir)
    t0 = time.perf_counter()
    first = load_dataset(cfg, seed=42)
    t1 = time.perf_counter()
    second = load_dataset(cfg, seed=42)
    t2 = time.perf_counter()
    return {"first": first, "second": second, "cold_s": t1 - t0, "cached_s": t2 - t1}


def assert_bundle_contract(bundle: DatasetBundle) -> None:
    """What every registered dataset must satisfy."""
    assert bundle.num_classes == len(bundle.class_names) >= 2
    assert len(set(bundle.class_names)) == bundle.num_classes
    assert bundle.split_note
    assert len(bundle.train) > 0 and len(bundle.test) > 0
    for name, split in bundle.splits().items():
        assert split.images.dtype == np.uint8, name
        assert split.images.ndim == 4, name
        n, c, h, w = split.images.shape
        assert (c, h, w) == (bundle.in_channels, bundle.image_size, bundle.image_size), name
        assert split.labels.dtype == np.int64 and split.labels.shape == (n,), name
        assert split.labels.min() >= 0 and split.labels.max() < bundle.num_classes, name
    spec = bundle.task_spec()
    assert spec.num_classes == bundle.num_classes and spec.in_channels == bundle.in_channels


# ---------------------------------------------------------------------------------------
# Registry and shared helpers
# ---------------------------------------------------------------------------------------


def test_registry_lists_every_dataset() -> None:
    names = set(DATASETS.names())
    assert {"mednist", "synthetic", *MEDMNIST_FLAGS} <= names
    assert len(MEDMNIST_FLAGS) == 12


def test_unknown_dataset_lists_allowed_names() -> None:
    with pytest.raises(UnknownNameError, match="allowed: .*mednist"):
        load_dataset(DataConfig(dataset="nosuchset"), seed=0)


def test_image_split_validates_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageData(np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ImageData(np.zeros((2, 1, 4, 4), np.uint8), np.zeros(3, np.int64))
    split = ImageData(np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1], np.uint8))
    assert split.labels.dtype == np.int64
    assert split.subset([1]).labels.tolist() == [1]


def test_stratified_split_is_seeded_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(3), [100, 50, 150])
    tr, va, te = stratified_split(labels, 0.1, 0.2, seed=1)
    assert len(np.intersect1d(tr, te)) == 0 and len(np.intersect1d(tr, va)) == 0
    assert len(tr) + len(va) + len(te) == 300
    assert np.abs(np.bincount(labels[te]) - np.array([20, 10, 30])).max() <= 1
    again = stratified_split(labels, 0.1, 0.2, seed=1)
    other = stratified_split(labels, 0.1, 0.2, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again, strict=True))
    assert not np.array_equal(te, other[2])


def test_stratified_split_falls_back_when_a_class_is_tiny() -> None:
    labels = np.array([0] * 20 + [1])
    tr, va, te = stratified_split(labels, 0.1, 0.2, seed=0)
    assert sorted(np.r_[tr, va, te].tolist()) == list(range(21))


def test_stratified_subsample_keeps_class_proportions() -> None:
    labels = np.repeat(np.arange(2), [300, 100])
    keep = stratified_subsample(labels, 40, seed=0)
    assert len(keep) == 40 and len(np.unique(keep)) == 40
    assert np.bincount(labels[keep]).tolist() == [30, 10]
    assert len(stratified_subsample(labels, 1000, seed=0)) == 400


# ---------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------


def test_synthetic_contract_and_defaults() -> None:
    bundle = load_dataset(DataConfig(dataset="synthetic"), seed=0)
    assert_bundle_contract(bundle)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 1, 28)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 600
    assert not bundle.official_split


def test_synthetic_is_seeded() -> None:
    a, la = make_synthetic(60, seed=3)
    b, lb = make_synthetic(60, seed=3)
    c, _ = make_synthetic(60, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_synthetic_honours_size_and_max_samples() -> None:
    cfg = DataConfig(dataset="synthetic", image_size=20, max_samples=100, val_fraction=0.0)
    bundle = load_dataset(cfg, seed=0)
    assert_bundle_contract(bundle)
    assert bundle.image_size == 20 and bundle.val is None
    assert len(bundle.train) + len(bundle.test) == 100


def test_synthetic_patterns_are_learnable() -> None:
    """A nearest-class-mean classifier must already separate the classes."""
    bundle = load_dataset(DataConfig(dataset="synthetic"), seed=0)
    x_tr = bundle.train.images.reshape(len(bundle.train), -1).astype(np.float32)
    x_te = bundle.test.images.reshape(len(bundle.test), -1).astype(np.float32)
    means = np.stack([x_tr[bundle.train.labels == k].mean(0) for k in range(3)])
    pred = np.argmin(((x_te[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == bundle.test.labels).mean() > 0.9


def test_synthetic_colour_images() -> None:
    images, labels = make_synthetic(30, num_classes=3, channels=3, size=16, seed=0)
    assert images.shape == (30, 3, 16, 16) and images.dtype == np.uint8
    assert set(labels.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------
# MedNIST (real shared data)
# ---------------------------------------------------------------------------------------


def test_mednist_contract_and_sizes(mednist_timed: dict[str, object], mednist_dir: Path) -> None:
    bundle = mednist_timed["first"]
    assert isinstance(bundle, DatasetBundle)
    assert_bundle_contract(bundle)
    assert bundle.class_names == MEDNIST_CLASSES
    assert (bundle.in_channels, bundle.image_size) == (1, 64)
    assert bundle.val is not None
    n_test = math.ceil(0.2 * MEDNIST_TOTAL)
    n_val = math.ceil(0.1 / 0.8 * (MEDNIST_TOTAL - n_test))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (
        MEDNIST_TOTAL - n_test - n_val,
        n_val,
        n_test,
    )
    # stratified: every class is ~20% of the test split (BreastMRI has 1,791 images)
    counts = bundle.test.class_counts(6)
    full = np.array([2000, 1791, 2000, 2000, 2000, 2000])
    assert np.abs(counts - 0.2 * full).max() <= 1.5
    assert not bundle.official_split
    assert "no official split" in bundle.split_note and "seed 42" in bundle.split_note
    assert bundle.train.meta is not None and bundle.train.meta[0]["file"].endswith(".jpeg")
    # the split is disjoint: no file on two sides
    files = [{m["file"] for m in s.meta} for s in (bundle.train, bundle.val, bundle.test)]
    assert sum(len(f) for f in files) == len(set().union(*files)) == MEDNIST_TOTAL
    # nothing was written into the data root
    assert not list(mednist_dir.rglob("*.npz"))


def test_mednist_second_load_uses_cache(
    mednist_timed: dict[str, object],
    cache_home: Path,
    shared_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = mednist_timed["first"], mednist_timed["second"]
    assert np.array_equal(first.train.images, second.train.images)
    assert np.array_equal(first.test.labels, second.test.labels)
    cached = list((cache_home / "consilia" / "datasets").glob("mednist-*.npz"))
    assert len(cached) == 1

    def _no_decode(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("JPEGs decoded although the cache exists")

    monkeypatch.setattr(mednist_module, "read_mednist_images", _no_decode)
    cfg = DataConfig(dataset="mednist", root=shared_data_dir)
    timings = []
    for _ in range(2):
        t0 = time.perf_counter()
        load_dataset(cfg, seed=42)
        timings.append(time.perf_counter() - t0)
    print(
        f"MedNIST load: cold {mednist_timed['cold_s']:.2f} s, "
        f"cached {mednist_timed['cached_s']:.2f} s, cached again {min(timings):.2f} s"
    )
    assert min(timings) < 1.0


def test_mednist_split_depends_on_seed(
    mednist_timed: dict[str, object], shared_data_dir: Path
) -> None:
    other = load_dataset(DataConfig(dataset="mednist", root=shared_data_dir), seed=7)
    first = mednist_timed["first"]
    assert len(other.test) == len(first.test)
    assert [m["file"] for m in other.test.meta] != [m["file"] for m in first.test.meta]
    assert "seed 7" in other.split_note


def test_mednist_max_samples_and_resize(
    mednist_timed: dict[str, object], shared_data_dir: Path
) -> None:
    cfg = DataConfig(dataset="mednist", root=shared_data_dir, max_samples=300, image_size=32)
    bundle = load_dataset(cfg, seed=42)
    assert_bundle_contract(bundle)
    assert len(bundle.train) == 300 and bundle.image_size == 32
    pool = mednist_timed["first"].train.class_counts(6)
    assert np.abs(bundle.train.class_counts(6) - 300 * pool / pool.sum()).max() <= 1
    assert len(bundle.test) == len(mednist_timed["first"].test)
    assert any("resized" in n for n in bundle.notes)


def test_mednist_monai_layout(tmp_path: Path, cache_home: Path) -> None:
    for cls, value in (("Hand", 40), ("CXR", 200)):
        folder = tmp_path / "MedNIST" / cls
        folder.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((16, 16), value + i, np.uint8)).save(folder / f"{i:06d}.jpeg")
    bundle = load_dataset(
        DataConfig(dataset="mednist", root=tmp_path, val_fraction=0.0, test_fraction=0.4),
        seed=0,
    )
    assert_bundle_contract(bundle)
    assert bundle.class_names == ["CXR", "Hand"]
    assert (len(bundle.train), len(bundle.test), bundle.image_size) == (6, 4, 16)
    assert bundle.train.images[bundle.train.labels == 1].mean() < 60  # Hand images are dark


def test_mednist_bad_labels_csv_names_file(tmp_path: Path) -> None:
    (tmp_path / "mednist").mkdir()
    bad = tmp_path / "mednist" / "labels.csv"
    bad.write_text("file,class\na.jpeg,Hand\n")
    with pytest.raises(ValueError, match=r"labels\.csv.*filename"):
        load_dataset(DataConfig(dataset="mednist", root=tmp_path), seed=0)


def test_mednist_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(DataConfig(dataset="mednist", root=tmp_path), seed=0)
    message = str(info.value)
    assert str(tmp_path / "mednist" / "labels.csv") in message
    assert "CONSILIA_DATA_ROOT" in message and "download_mednist" in message
    assert isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------
# MedMNIST (real derived files + tiny synthetic npz files)
# ---------------------------------------------------------------------------------------


def test_pneumoniamnist_from_derived_file(shared_data_dir: Path, cache_home: Path) -> None:
    bundle = load_dataset(DataConfig(dataset="pneumoniamnist", root=shared_data_dir), seed=0)
    assert_bundle_contract(bundle)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (3882, 524, 624)
    assert bundle.class_names == ["normal", "pneumonia"]
    assert bundle.test.class_counts(2).tolist() == [234, 390]
    assert (bundle.in_channels, bundle.image_size) == (1, 28)
    assert not bundle.official_split
    assert "derived" in bundle.split_note and "pneumoniamnist_trainsubset.npz" in bundle.split_note
    assert "826" in bundle.split_note


def test_breastmnist_flat_labels(shared_data_dir: Path, cache_home: Path) -> None:
    bundle = load_dataset(DataConfig(dataset="breastmnist", root=shared_data_dir), seed=0)
    assert_bundle_contract(bundle)
    assert bundle.train.labels.shape == (546,)
    assert bundle.train.class_counts(2).tolist() == [147, 399]
    assert (len(bundle.val), len(bundle.test)) == (78, 156)
    assert "breastmnist_resaved.npz" in bundle.split_note


def test_breastmnist_resize(shared_data_dir: Path, cache_home: Path) -> None:
    cfg = DataConfig(dataset="breastmnist", root=shared_data_dir, image_size=32)
    bundle = load_dataset(cfg, seed=0)
    assert bundle.train.images.shape == (546, 1, 32, 32) and bundle.image_size == 32


def test_medmnist_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(DataConfig(dataset="dermamnist", root=tmp_path), seed=0)
    message = str(info.value)
    assert str(tmp_path / "medmnist" / "dermamnist.npz") in message
    assert "medmnist-derived" in message and medmnist_url("dermamnist") in message


def _write_npz(path: Path, n: int, colour: bool, labels_2d: bool, num_classes: int) -> None:
    rng = np.random.default_rng(0)
    shape = (n, 28, 28, 3) if colour else (n, 28, 28)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = np.arange(n) % num_classes
        arrays[f"{split}_labels"] = labels[:, None] if labels_2d else labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def test_medmnist_colour_official_name_warns_on_md5(tmp_path: Path, cache_home: Path) -> None:
    _write_npz(tmp_path / "medmnist" / "bloodmnist.npz", 16, colour=True, labels_2d=True,
               num_classes=8)  # fmt: skip
    with pytest.warns(UserWarning, match="MD5"):
        bundle = load_dataset(DataConfig(dataset="bloodmnist", root=tmp_path), seed=0)
    assert_bundle_contract(bundle)
    assert bundle.train.images.shape == (16, 3, 28, 28)
    assert bundle.official_split and "official" in bundle.split_note
    assert bundle.class_names == list(MEDMNIST_INFO["bloodmnist"].labels)
    assert any("MD5" in n for n in bundle.notes)


def test_medmnist_prefers_file_of_requested_size(tmp_path: Path) -> None:
    for name in ("pathmnist.npz", "pathmnist_64.npz"):
        (tmp_path / "medmnist").mkdir(exist_ok=True)
        (tmp_path / "medmnist" / name).write_bytes(b"x")
    assert find_medmnist_file(tmp_path, "pathmnist", 64).name == "pathmnist_64.npz"
    assert find_medmnist_file(tmp_path, "pathmnist", None).name == "pathmnist.npz"


def test_chestmnist_is_binarised(tmp_path: Path, cache_home: Path) -> None:
    labels = np.zeros((6, 14), np.uint8)
    labels[[1, 4], [3, 13]] = 1
    images = np.zeros((6, 28, 28), np.uint8)
    arrays = {f"{s}_{k}": v for s in ("train", "val", "test")
              for k, v in (("images", images), ("labels", labels))}  # fmt: skip
    (tmp_path / "medmnist-derived").mkdir()
    np.savez(tmp_path / "medmnist-derived" / "chestmnist_small.npz", **arrays)
    bundle = load_dataset(DataConfig(dataset="chestmnist", root=tmp_path), seed=0)
    assert bundle.class_names == ["no finding", "finding"]
    assert bundle.train.labels.tolist() == [0, 1, 0, 0, 1, 0]
    assert any("binarised" in n for n in bundle.notes)
    assert "provenance unknown" in bundle.split_note


def test_medmnist_bad_files_name_the_file(tmp_path: Path, cache_home: Path) -> None:
    path = tmp_path / "medmnist-derived" / "octmnist_x.npz"
    path.parent.mkdir()
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"octmnist_x\.npz: missing key"):
        load_dataset(DataConfig(dataset="octmnist", root=tmp_path), seed=0)
    _write_npz(path, 8, colour=False, labels_2d=True, num_classes=9)  # octmnist has 4
    with pytest.raises(ValueError, match=r"octmnist_x\.npz: train_labels outside 0\.\.3"):
        load_dataset(DataConfig(dataset="octmnist", root=tmp_path), seed=0)


# ---------------------------------------------------------------------------------------
# Site files
# ---------------------------------------------------------------------------------------


def test_site_npz_round_trip(tmp_path: Path) -> None:
    images, labels = make_synthetic(12, size=8, seed=0)
    train, val = ImageData(images[:9], labels[:9]), ImageData(images[9:], labels[9:])
    path = save_site_npz(tmp_path / "sites" / "site-00.npz", train, val, ["a", "b", "c"])
    got_train, got_val, names = load_site_npz(path)
    assert np.array_equal(got_train.images, train.images)
    assert np.array_equal(got_val.labels, val.labels)
    assert names == ["a", "b", "c"]


def test_site_npz_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="site-07.npz"):
        load_site_npz(tmp_path / "site-07.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((1, 1, 2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"bad\.npz: missing key"):
        load_site_npz(bad)
