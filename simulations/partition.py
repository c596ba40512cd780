"""Split a pooled training set into virtual hospitals: the simulated federation's sites.

:func:`build_partition` assigns the pooled training samples to sites with the configured
scheme (label or quantity skew, :mod:`consilia.simulations.partition_schemes`), splits each
site's share into its own train and validation data, and applies each site's scanner shift
when feature skew is on (:mod:`consilia.simulations.scanner_shift`). :func:`save_partition`
writes ``partition.csv``, ``partition.json`` and ``sites/site-XX.npz`` into a run directory.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from consilia.common.config import PartitionConfig
from consilia.common.data.images import ImageData
from consilia.common.data.sitefile import save_site_npz
from consilia.common.rundir.layout import RunDir
from consilia.simulations.partition_schemes import PartitionError, partition_indices, site_name
from consilia.simulations.scanner_shift import (
    ScannerShift,
    apply_scanner_shift,
    draw_scanner_shift,
)
from consilia.simulations.seeds import derive_seed

__all__ = [
    "FederatedPartition",
    "SiteData",
    "build_partition",
    "format_partition_table",
    "partition_table",
    "save_partition",
]


@dataclass
class SiteData:
    """One virtual hospital's data.

    Parameters
    ----------
    site_id : int
        Index of the site (0-based).
    name : str
        Display name, e.g. ``site-00``.
    train, val : ImageData
        The site's training data and its own held-out validation data.
    shift : ScannerShift, optional
        The site's scanner shift (``None`` when feature skew is off).
    train_indices, val_indices : np.ndarray
        Which samples of the pooled training set the site holds.

    """

    site_id: int
    name: str
    train: ImageData
    val: ImageData
    shift: ScannerShift | None = None
    train_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    val_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_examples(self) -> int:
        """Number of training examples (what FedAvg weights by)."""
        return len(self.train)


@dataclass
class FederatedPartition:
    """All sites of a simulated federation plus how they were made.

    Parameters
    ----------
    sites : list of SiteData
        One entry per site, in site order.
    class_names : list of str
        The shared label space.
    config : PartitionConfig
        The configuration that produced it.
    seed : int
        The seed that produced it.
    unassigned : np.ndarray
        Indices of the pooled set that no site received (empty except for
        ``pathological`` with fewer sites than classes).

    """

    sites: list[SiteData]
    class_names: list[str]
    config: PartitionConfig
    seed: int
    unassigned: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_sites(self) -> int:
        """Number of sites."""
        return len(self.sites)


def _split_site(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one site's indices into train/val, stratified when every class allows it."""
    if fraction <= 0 or len(indices) < 2:
        return indices, np.zeros(0, np.int64)
    try:
        train, val = train_test_split(
            indices, test_size=fraction, stratify=labels[indices], random_state=seed
        )
    except ValueError:  # a class with one sample, or fewer val slots than classes
        train, val = train_test_split(indices, test_size=fraction, random_state=seed)
    return np.sort(train), np.sort(val)


def build_partition(
    train: ImageData, class_names: list[str], cfg: PartitionConfig, seed: int
) -> FederatedPartition:
    """Split the pooled training set into sites, each with its own train/val split.

    Parameters
    ----------
    train : ImageData
        The pooled training set (e.g. ``DatasetBundle.train``).
    class_names : list of str
        The label space.
    cfg : PartitionConfig
        Scheme, number of sites, per-site validation fraction and feature skew.
    seed : int
        Seed of the assignment, the per-site splits, the scanner shifts and their noise.

    Returns
    -------
    FederatedPartition
        Deterministic for ``seed``; with feature skew on, both the site's train and val
        images carry the site's scanner shift.

    Raises
    ------
    PartitionError
        If the configuration cannot be met.

    """
    if len(train) and train.labels.max() >= len(class_names):
        raise PartitionError(
            f"label {int(train.labels.max())} found but only {len(class_names)} class names given"
        )
    parts = partition_indices(train.labels, cfg, seed)
    assigned = np.concatenate(parts)
    unassigned = np.setdiff1d(np.arange(len(train)), assigned)
    if len(unassigned):
        missing = sorted(set(train.labels[unassigned].tolist()))
        warnings.warn(
            f"{len(unassigned)} samples of classes {[class_names[c] for c in missing]} were "
            f"assigned to no site ({cfg.scheme}, {cfg.num_sites} sites < classes); raise "
            "partition.num_sites or partition.classes_per_site to use them",
            stacklevel=2,
        )
    skew = cfg.feature_skew
    sites = []
    for site_id, indices in enumerate(parts):
        tr_idx, va_idx = _split_site(
            indices, train.labels, cfg.site_val_fraction, derive_seed(seed, site_id, 11)
        )
        site_train, site_val = train.subset(tr_idx), train.subset(va_idx)
        shift = draw_scanner_shift(site_id, seed, skew.strength) if skew.enabled else None
        if shift is not None:
            site_train = ImageData(
                apply_scanner_shift(site_train.images, shift, derive_seed(seed, site_id, 1)),
                site_train.labels,
                site_train.meta,
            )
            site_val = ImageData(
                apply_scanner_shift(site_val.images, shift, derive_seed(seed, site_id, 2)),
                site_val.labels,
                site_val.meta,
            )
        sites.append(
            SiteData(site_id, site_name(site_id), site_train, site_val, shift, tr_idx, va_idx)
        )
    return FederatedPartition(sites, list(class_names), cfg, seed, unassigned)


# ---------------------------------------------------------------------------------------
# Reporting and persistence
# ---------------------------------------------------------------------------------------


def partition_table(partition: FederatedPartition, class_names: list[str]) -> pd.DataFrame:
    """Return one row per site: ``site, n_train, n_val``, per-class counts, ``shift``.

    Class counts cover the site's whole share (train + val).
    """
    rows = []
    k = len(class_names)
    for site in partition.sites:
        counts = site.train.class_counts(k) + site.val.class_counts(k)
        row: dict[str, object] = {
            "site": site.name,
            "n_train": len(site.train),
            "n_val": len(site.val),
        }
        row.update({name: int(c) for name, c in zip(class_names, counts, strict=True)})
        row["shift"] = site.shift.describe() if site.shift is not None else "none"
        rows.append(row)
    return pd.DataFrame(rows, columns=["site", "n_train", "n_val", *class_names, "shift"])


def format_partition_table(df: pd.DataFrame) -> str:
    """Render :func:`partition_table` as text, with a ``total`` row for the counts."""
    numeric = [c for c in df.columns if c not in ("site", "shift")]
    total = {c: int(df[c].sum()) for c in numeric}
    total.update({"site": "total", "shift": ""})
    shown = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
    return shown.to_string(index=False)


def save_partition(partition: FederatedPartition, out_dir: Path) -> list[Path]:
    """Write ``partition.csv``, ``partition.json`` and ``sites/site-XX.npz`` under ``out_dir``.

    Parameters
    ----------
    partition : FederatedPartition
        The federation to save.
    out_dir : Path
        Output folder (created).

    Returns
    -------
    list of Path
        The per-site files, in site order (what each ClientApp loads with
        :func:`~consilia.common.data.sitefile.load_site_npz`).

    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = RunDir(out_dir)
    table = partition_table(partition, partition.class_names)
    table.to_csv(layout.partition_csv_path, index=False)
    site_files = []
    site_meta = []
    for site, row in zip(partition.sites, table.to_dict("records"), strict=True):
        rel = layout.site_path(site.name).relative_to(out_dir)
        site_files.append(
            save_site_npz(
                out_dir / rel,
                site.train,
                site.val,
                partition.class_names,
                train_indices=site.train_indices,
                val_indices=site.val_indices,
            )
        )
        site_meta.append(
            {
                "site_id": site.site_id,
                "name": site.name,
                "file": rel.as_posix(),
                "n_train": len(site.train),
                "n_val": len(site.val),
                "class_counts": {c: row[c] for c in partition.class_names},
                "shift": asdict(site.shift) if site.shift is not None else None,
                "shift_description": row["shift"],
            }
        )
    summary = {
        "scheme": partition.config.scheme,
        "seed": partition.seed,
        "num_sites": partition.num_sites,
        "class_names": partition.class_names,
        "config": partition.config.model_dump(mode="json"),
        "num_unassigned": int(len(partition.unassigned)),
        "sites": site_meta,
    }
    layout.partition_json_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return site_files
