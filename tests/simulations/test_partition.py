"""Tests for consilia.simulations.partition: label/quantity/feature skew, tables, site files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from consilia.common.config import PartitionConfig
from consilia.common.data.datasets import make_synthetic
from consilia.common.data.images import ImageData
from consilia.common.data.sitefile import load_site_npz
from consilia.simulations.partition import (
    FederatedPartition,
    build_partition,
    format_partition_table,
    partition_table,
    save_partition,
)
from consilia.simulations.partition_schemes import PartitionError, partition_indices
from consilia.simulations.scanner_shift import (
    ScannerShift,
    apply_scanner_shift,
    draw_scanner_shift,
)

NUM_CLASSES = 6
LABELS = np.repeat(np.arange(NUM_CLASSES), 200)  # 1,200 samples, balanced, sorted by class
CLASS_NAMES = [f"c{k}" for k in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def pool() -> ImageData:
    images, labels = make_synthetic(300, num_classes=3, size=16, seed=0)
    return ImageData(images, labels)


def _cfg(**kwargs: object) -> PartitionConfig:
    return PartitionConfig.model_validate(kwargs)


def _max_class_share(parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(LABELS[p], minlength=NUM_CLASSES).max() / len(p)
                          for p in parts]))  # fmt: skip


SCHEMES = [
    {"scheme": "iid"},
    {"scheme": "dirichlet", "alpha": 0.3},
    {"scheme": "pathological", "classes_per_site": 2},
    {"scheme": "quantity", "alpha": 0.5},
]


@pytest.mark.parametrize("kwargs", SCHEMES, ids=lambda k: k["scheme"])
def test_partition_is_disjoint_complete_and_deterministic(kwargs: dict[str, object]) -> None:
    cfg = _cfg(num_sites=8, **kwargs)  # 8 sites >= 6 classes: pathological uses every class
    parts = partition_indices(LABELS, cfg, seed=0)
    assert len(parts) == 8
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(LABELS)  # disjoint and complete
    assert all(len(p) >= cfg.min_samples_per_site for p in parts)
    again = partition_indices(LABELS, cfg, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, cfg, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_gives_equal_shares_of_every_class() -> None:
    parts = partition_indices(LABELS, _cfg(num_sites=4, scheme="iid"), seed=0)
    assert {len(p) for p in parts} == {300}
    for p in parts:
        counts = np.bincount(LABELS[p], minlength=NUM_CLASSES)
        assert counts.min() > 25  # ~50 each; no class missing or dominant


def test_dirichlet_alpha_controls_label_skew() -> None:
    skewed = partition_indices(LABELS, _cfg(num_sites=6, scheme="dirichlet", alpha=0.05), 0)
    uniform = partition_indices(LABELS, _cfg(num_sites=6, scheme="dirichlet", alpha=1000.0), 0)
    assert _max_class_share(skewed) > 0.6
    assert _max_class_share(uniform) < 0.25  # 1/6 = 0.167 when perfectly uniform
    assert all(len(np.unique(LABELS[p])) == NUM_CLASSES for p in uniform)


def test_pathological_limits_classes_per_site() -> None:
    for k in (1, 2, 3):
        parts = partition_indices(LABELS, _cfg(num_sites=7, scheme="pathological",
                                               classes_per_site=k), seed=3)  # fmt: skip
        assert all(len(np.unique(LABELS[p])) <= k for p in parts)


def test_pathological_with_few_sites_reports_unassigned(pool: ImageData) -> None:
    cfg = _cfg(num_sites=2, scheme="pathological", classes_per_site=1, min_samples_per_site=5)
    with pytest.warns(UserWarning, match="assigned to no site"):
        partition = build_partition(pool, ["a", "b", "c"], cfg, seed=0)
    held = np.concatenate([np.r_[s.train_indices, s.val_indices] for s in partition.sites])
    assert len(np.intersect1d(held, partition.unassigned)) == 0
    assert len(held) + len(partition.unassigned) == len(pool)
    used = set(pool.labels[held].tolist())
    assert len(used) == 2 and set(pool.labels[partition.unassigned].tolist()).isdisjoint(used)


def test_quantity_skew_gives_unequal_sizes_with_iid_labels() -> None:
    cfg = _cfg(num_sites=6, scheme="quantity", alpha=0.5, min_samples_per_site=20)
    parts = partition_indices(LABELS, cfg, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20 and sizes.max() > 3 * sizes.min()
    largest = parts[int(sizes.argmax())]
    assert len(np.unique(LABELS[largest])) == NUM_CLASSES


def test_impossible_configs_raise_clear_errors() -> None:
    with pytest.raises(PartitionError, match="min_samples_per_site"):
        partition_indices(LABELS, _cfg(num_sites=200, min_samples_per_site=10), seed=0)
    with pytest.raises(PartitionError, match="classes_per_site=7"):
        partition_indices(LABELS, _cfg(scheme="pathological", classes_per_site=7), seed=0)
    with pytest.raises(PartitionError, match="after 10 draws"):
        cfg = _cfg(num_sites=6, scheme="dirichlet", alpha=0.01, min_samples_per_site=150)
        partition_indices(LABELS, cfg, seed=0)


def test_build_partition_rejects_labels_without_names(pool: ImageData) -> None:
    with pytest.raises(PartitionError, match="only 2 class names"):
        build_partition(pool, ["a", "b"], _cfg(num_sites=2), seed=0)


# ---------------------------------------------------------------------------------------
# Feature skew
# ---------------------------------------------------------------------------------------


def test_scanner_shifts_are_deterministic_and_differ_per_site() -> None:
    assert draw_scanner_shift(0, seed=5).is_identity  # site 0: reference scanner
    shifts = [draw_scanner_shift(i, seed=5) for i in range(1, 6)]
    assert len(set(shifts)) == 5 and not any(s.is_identity for s in shifts)
    assert shifts == [draw_scanner_shift(i, seed=5) for i in range(1, 6)]
    assert shifts != [draw_scanner_shift(i, seed=6) for i in range(1, 6)]
    assert draw_scanner_shift(3, seed=5, strength=0.0).is_identity
    weak, strong = draw_scanner_shift(3, 5, 0.5), draw_scanner_shift(3, 5, 2.0)
    assert abs(np.log(strong.gamma)) > abs(np.log(weak.gamma))
    assert strong.noise_std > weak.noise_std


def test_describe() -> None:
    shift = ScannerShift(gamma=1.18, contrast=0.85, noise_std=0.03, blur_sigma=0.8, downsample=2)
    assert shift.describe() == "gamma 1.18, contrast 0.85, noise 0.030, blur 0.8px, 2x downsample"
    assert ScannerShift().describe() == "reference scanner"


def test_apply_scanner_shift_keeps_dtype_shape_and_is_seeded(pool: ImageData) -> None:
    images = pool.images[:40]
    shift = ScannerShift(gamma=1.3, contrast=0.8, noise_std=0.03, blur_sigma=1.0, downsample=2)
    out = apply_scanner_shift(images, shift, seed=1)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert not np.array_equal(out, images)
    assert 0 < out.mean() < 255 and out.std() > 0  # neither saturated nor flat
    assert np.array_equal(out, apply_scanner_shift(images, shift, seed=1))
    assert not np.array_equal(out, apply_scanner_shift(images, shift, seed=2))
    assert np.array_equal(apply_scanner_shift(images, ScannerShift(), seed=1), images)
    with pytest.raises(ValueError, match="uint8"):
        apply_scanner_shift(images.astype(np.float32), shift, seed=1)


def test_each_shift_component_acts(pool: ImageData) -> None:
    images = pool.images[:20]
    x = images.astype(np.float64)
    darker = apply_scanner_shift(images, ScannerShift(gamma=2.0), 0).astype(np.float64)
    assert darker.mean() < x.mean()
    flat = apply_scanner_shift(images, ScannerShift(contrast=0.5), 0).astype(np.float64)
    assert flat.std() < x.std()
    blurred = apply_scanner_shift(images, ScannerShift(blur_sigma=1.5), 0).astype(np.float64)
    assert np.abs(np.diff(blurred, axis=-1)).mean() < np.abs(np.diff(x, axis=-1)).mean()
    coarse = apply_scanner_shift(images, ScannerShift(downsample=2), 0)
    assert np.abs(coarse.astype(np.float64) - x).mean() > 0
    noisy = apply_scanner_shift(images, ScannerShift(noise_std=0.05), 0).astype(np.float64)
    assert 5 < np.abs(noisy - x).mean() < 20  # ~0.05 * 255 * 0.8


# ---------------------------------------------------------------------------------------
# build_partition, tables and files
# ---------------------------------------------------------------------------------------


def _skewed(pool: ImageData, seed: int = 0) -> FederatedPartition:
    cfg = _cfg(num_sites=4, scheme="dirichlet", alpha=0.5, site_val_fraction=0.25,
               feature_skew={"enabled": True, "strength": 1.0})  # fmt: skip
    return build_partition(pool, ["a", "b", "c"], cfg, seed)


def test_build_partition_sites_hold_their_share(pool: ImageData) -> None:
    partition = _skewed(pool)
    assert partition.num_sites == 4 and [s.name for s in partition.sites][0] == "site-00"
    held = np.concatenate([np.r_[s.train_indices, s.val_indices] for s in partition.sites])
    assert np.array_equal(np.sort(held), np.arange(len(pool)))
    for site in partition.sites:
        n = len(site.train_indices) + len(site.val_indices)
        assert len(site.val) == pytest.approx(0.25 * n, abs=1)
        assert np.array_equal(site.train.labels, pool.labels[site.train_indices])
        assert site.train.images.shape[1:] == pool.images.shape[1:]
    ref = partition.sites[0]
    assert ref.shift is not None and ref.shift.is_identity
    assert np.array_equal(ref.train.images, pool.images[ref.train_indices])
    shifted = partition.sites[1]
    assert not np.array_equal(shifted.train.images, pool.images[shifted.train_indices])
    assert not np.array_equal(shifted.val.images, pool.images[shifted.val_indices])


def test_build_partition_same_seed_same_images(pool: ImageData) -> None:
    a, b, c = _skewed(pool, 0), _skewed(pool, 0), _skewed(pool, 1)
    for sa, sb in zip(a.sites, b.sites, strict=True):
        assert sa.shift == sb.shift
        assert np.array_equal(sa.train.images, sb.train.images)
        assert np.array_equal(sa.val.images, sb.val.images)
    assert [s.shift for s in a.sites] != [s.shift for s in c.sites]
    assert any(not np.array_equal(x.train_indices, y.train_indices)
               for x, y in zip(a.sites, c.sites, strict=True))  # fmt: skip


def test_site_val_split_is_stratified_and_optional(pool: ImageData) -> None:
    cfg = _cfg(num_sites=2, scheme="iid", site_val_fraction=0.2)
    partition = build_partition(pool, ["a", "b", "c"], cfg, seed=0)
    for site in partition.sites:
        assert site.shift is None
        assert np.abs(site.val.class_counts(3) - len(site.val) / 3).max() <= 1
    none = build_partition(pool, ["a", "b", "c"], _cfg(num_sites=2, site_val_fraction=0.0), 0)
    assert all(len(s.val) == 0 and s.val.images.ndim == 4 for s in none.sites)


def test_partition_table_and_format(pool: ImageData) -> None:
    partition = _skewed(pool)
    df = partition_table(partition, ["a", "b", "c"])
    assert list(df.columns) == ["site", "n_train", "n_val", "a", "b", "c", "shift"]
    assert (df["n_train"] + df["n_val"]).sum() == len(pool)
    assert (df[["a", "b", "c"]].sum(axis=1) == df["n_train"] + df["n_val"]).all()
    assert df["shift"].iloc[0] == "reference scanner" and "gamma" in df["shift"].iloc[1]
    text = format_partition_table(df)
    assert "site-03" in text and "total" in text and str(len(pool)) not in df["site"].tolist()


def test_save_partition_writes_loadable_site_files(pool: ImageData, tmp_path: Path) -> None:
    partition = _skewed(pool)
    files = save_partition(partition, tmp_path)
    assert [f.name for f in files] == ["site-00.npz", "site-01.npz", "site-02.npz", "site-03.npz"]
    assert (tmp_path / "partition.csv").read_text().startswith("site,n_train,n_val,a,b,c,shift")
    summary = json.loads((tmp_path / "partition.json").read_text())
    assert summary["scheme"] == "dirichlet" and summary["num_sites"] == 4
    assert summary["sites"][1]["file"] == "sites/site-01.npz"
    assert summary["sites"][1]["shift"]["gamma"] == partition.sites[1].shift.gamma
    train, val, names = load_site_npz(files[2])
    site = partition.sites[2]
    assert names == ["a", "b", "c"]
    assert np.array_equal(train.images, site.train.images)
    assert np.array_equal(val.labels, site.val.labels)
