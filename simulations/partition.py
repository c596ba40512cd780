"""Split a pooled training set into virtual hospitals (label, quantity and feature skew).

Label/quantity skew reuses ``flwr_datasets.partitioner`` on an in-memory
``datasets.Dataset`` of ``{"label", "idx"}`` (no download, no image copies):

* ``iid``: seeded shuffle + :class:`~flwr_datasets.partitioner.IidPartitioner` (equal shares);
* ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` over the label with
  ``alpha`` (small alpha = few dominant classes per site), self-balancing, and every site at
  least ``min_samples_per_site``;
* ``pathological``: :class:`~flwr_datasets.partitioner.PathologicalPartitioner` with
  ``classes_per_site`` classes per site (``first-deterministic`` assignment, as in Li et al.
  2021). When there are fewer sites than classes some classes go to no site; their samples
  are left out and listed in :attr:`FederatedPartition.unassigned`;
* ``quantity``: site sizes drawn from ``Dirichlet(alpha)`` (plus the minimum per site), then a
  seeded shuffle + :class:`~flwr_datasets.partitioner.SizePartitioner`; labels stay IID.

Every scheme is deterministic for a seed and gives disjoint sites; all but ``pathological``
with fewer sites than classes are complete. Feature skew, which no partitioner offers, is a
per-site :class:`ScannerShift` (gamma, contrast, noise, blur, resolution loss) applied to the
site's images; site 0 is the reference scanner.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SizePartitioner,
)
from sklearn.model_selection import train_test_split

from consilia.common.config import PartitionConfig
from consilia.common.data.datasets.base import ImageSplit
from consilia.common.data.sitefile import load_site_npz, save_site_npz

__all__ = [
    "FederatedPartition",
    "PartitionError",
    "ScannerShift",
    "SiteData",
    "apply_scanner_shift",
    "build_partition",
    "draw_scanner_shift",
    "format_partition_table",
    "load_site_npz",
    "partition_indices",
    "partition_table",
    "save_partition",
    "site_name",
]

log = logging.getLogger(__name__)


class PartitionError(ValueError):
    """The requested partition cannot be built; the message names the fields to change."""


def site_name(site_id: int) -> str:
    """Return the display name of a site, e.g. ``site-03``."""
    return f"site-{site_id:02d}"


def _derive_seed(seed: int, *keys: int) -> int:
    """Return a 32-bit seed derived from ``seed`` and ``keys`` (independent streams)."""
    entropy = [seed % 2**63, *(k % 2**63 for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


# ---------------------------------------------------------------------------------------
# Label and quantity skew (flwr-datasets partitioners)
# ---------------------------------------------------------------------------------------


def _hf_dataset(labels: np.ndarray, order: np.ndarray) -> Dataset:

    return Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})


def _collect(partitioner: Partitioner, num_sites: int) -> list[np.ndarray]:
    return [
        np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64)
        for pid in range(num_sites)
    ]


def _quantity_sizes(n: int, cfg: PartitionConfig, rng: np.random.Generator) -> list[int]:
    spare = n - cfg.min_samples_per_site * cfg.num_sites
    shares = rng.dirichlet(np.full(cfg.num_sites, cfg.alpha))
    extra = rng.multinomial(spare, shares)
    return [int(cfg.min_samples_per_site + e) for e in extra]


def partition_indices(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Assign sample indices to ``cfg.num_sites`` sites.

    Parameters
    ----------
    labels : np.ndarray
        Class index of every sample of the pooled training set.
    cfg : PartitionConfig
        ``num_sites``, ``scheme``, ``alpha``, ``classes_per_site``, ``min_samples_per_site``.
    seed : int
        Seed; the same seed gives the same assignment.

    Returns
    -------
    list of np.ndarray
        Sorted, pairwise disjoint index arrays, one per site. Their union is every index
        except, for ``pathological`` with fewer sites than classes, the classes no site got.

    Raises
    ------
    PartitionError
        If the configuration cannot be met (too many sites, too many classes per site,
        sites smaller than ``min_samples_per_site``).

    """
    labels = np.asarray(labels, dtype=np.int64)
    n, k = labels.shape[0], cfg.num_sites
    if k * cfg.min_samples_per_site > n:
        raise PartitionError(
            f"{n} samples cannot give {k} sites at least partition.min_samples_per_site="
            f"{cfg.min_samples_per_site} each; lower partition.num_sites or "
            "min_samples_per_site, or use more data (data.max_samples)"
        )
    rng = np.random.default_rng(_derive_seed(seed, 1))
    shuffled = rng.permutation(n)
    num_classes = len(np.unique(labels))

    if cfg.scheme == "iid":
        parts = _collect(_attach(IidPartitioner(k), _hf_dataset(labels, shuffled)), k)
    elif cfg.scheme == "quantity":
        sizes = _quantity_sizes(n, cfg, rng)
        parts = _collect(_attach(SizePartitioner(sizes), _hf_dataset(labels, shuffled)), k)
    elif cfg.scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=k,
            partition_by="label",
            alpha=float(cfg.alpha),
            min_partition_size=cfg.min_samples_per_site,
            self_balancing=True,
            shuffle=False,
            seed=_derive_seed(seed, 2),
        )
        _attach(partitioner, _hf_dataset(labels, shuffled))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                parts = _collect(partitioner, k)
            except ValueError as exc:
                raise PartitionError(
                    f"no Dirichlet partition with every site >= partition.min_samples_per_site"
                    f"={cfg.min_samples_per_site} after 10 draws (alpha={cfg.alpha}, "
                    f"{k} sites, {n} samples); raise partition.alpha or lower num_sites / "
                    f"min_samples_per_site ({exc})"
                ) from exc
        redraws = sum("min_partition_size" in str(w.message) for w in caught)
        if redraws:
            log.info("Dirichlet partition needed %d redraws to meet the minimum size", redraws)
    elif cfg.scheme == "pathological":
        if cfg.classes_per_site > num_classes:
            raise PartitionError(
                f"partition.classes_per_site={cfg.classes_per_site} exceeds the {num_classes} "
                "classes present; lower it"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=k,
            partition_by="label",
            num_classes_per_partition=cfg.classes_per_site,
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=_derive_seed(seed, 3),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # unused classes: reported below
            try:
                parts = _collect(_attach(partitioner, _hf_dataset(labels, shuffled)), k)
            except ValueError as exc:
                raise PartitionError(f"pathological partition impossible: {exc}") from exc
    else:  # pragma: no cover - PartitionConfig validates the scheme
        raise PartitionError(f"unknown partition.scheme '{cfg.scheme}'")

    parts = [np.sort(p) for p in parts]
    _check_disjoint(parts)
    too_small = [i for i, p in enumerate(parts) if len(p) < cfg.min_samples_per_site]
    if too_small:
        sizes_text = ", ".join(f"{site_name(i)}: {len(parts[i])}" for i in too_small)
        raise PartitionError(
            f"{cfg.scheme} partition leaves sites below partition.min_samples_per_site="
            f"{cfg.min_samples_per_site} ({sizes_text}); lower num_sites or "
            "min_samples_per_site, or raise classes_per_site"
        )
    return parts


def _attach(partitioner: Partitioner, dataset: Dataset) -> Partitioner:
    partitioner.dataset = dataset
    return partitioner


def _check_disjoint(parts: list[np.ndarray]) -> None:
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(np.unique(joined)) != len(joined):
        raise AssertionError("internal error: partition assigns a sample to two sites")


# ---------------------------------------------------------------------------------------
# Feature skew: per-site scanner shifts
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScannerShift:
    """How one site's "scanner" distorts images relative to the reference.

    Parameters
    ----------
    gamma : float
        Intensity gamma (``x ** gamma`` on [0, 1]; 1 = none).
    contrast : float
        Contrast factor around each image's mean (1 = none).
    noise_std : float
        Std of additive Gaussian noise, as a fraction of the full intensity range.
    blur_sigma : float
        Gaussian blur sigma in pixels (0 = none).
    downsample : int
        Resolution loss: downsample by this factor and upsample back (1 = none).

    """

    gamma: float = 1.0
    contrast: float = 1.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0
    downsample: int = 1

    @property
    def is_identity(self) -> bool:
        """True when the shift changes nothing (the reference scanner)."""
        return (
            self.gamma == 1.0
            and self.contrast == 1.0
            and self.noise_std == 0.0
            and self.blur_sigma == 0.0
            and self.downsample == 1
        )

    def describe(self) -> str:
        """Return a short text, e.g. ``gamma 1.18, contrast 0.85, noise 0.030, blur 0.8px``."""
        if self.is_identity:
            return "reference scanner"
        text = (
            f"gamma {self.gamma:.2f}, contrast {self.contrast:.2f}, "
            f"noise {self.noise_std:.3f}, blur {self.blur_sigma:.1f}px"
        )
        if self.downsample > 1:
            text += f", {self.downsample}x downsample"
        return text


def draw_scanner_shift(site_id: int, seed: int, strength: float = 1.0) -> ScannerShift:
    """Draw the scanner shift of one site, deterministically from ``(seed, site_id)``.

    Site 0 is the reference scanner (no shift). Other sites draw five uniforms ``u`` and
    map them, at ``strength`` s, to gamma and contrast ``exp(±0.3 s)``, noise std
    ``0.01..0.05 × s``, blur sigma ``0..1.2 × s`` px, and a 2x downsample with probability
    ``min(1, 0.4 s)``; ``strength=0`` gives no shift at all.

    Parameters
    ----------
    site_id : int
        Site index (0 = reference).
    seed : int
        Experiment seed.
    strength : float
        Scales every deviation from the reference (``feature_skew.strength``).

    Returns
    -------
    ScannerShift
        The site's shift.

    """
    if site_id == 0 or strength <= 0:
        return ScannerShift()
    u = np.random.default_rng(_derive_seed(seed, site_id, 0x5CA)).uniform(size=5)
    return ScannerShift(
        gamma=round(float(np.exp(0.3 * strength * (2 * u[0] - 1))), 3),
        contrast=round(float(np.exp(0.3 * strength * (2 * u[1] - 1))), 3),
        noise_std=round(float(strength * (0.01 + 0.04 * u[2])), 4),
        blur_sigma=round(float(strength * 1.2 * u[3]), 2),
        downsample=2 if u[4] < min(1.0, 0.4 * strength) else 1,
    )


def apply_scanner_shift(
    images: np.ndarray, shift: ScannerShift, seed: int, chunk: int = 2048
) -> np.ndarray:
    """Apply a scanner shift to ``uint8`` images ``(N, C, H, W)``.

    Order: resolution loss (area downsample, bilinear upsample), Gaussian blur
    (``scipy.ndimage.gaussian_filter``, reflected borders), contrast
    around each image's mean, gamma, additive Gaussian noise; then clip and round back to
    ``uint8``. Vectorised with torch; deterministic for a given ``seed``.

    Parameters
    ----------
    images : np.ndarray
        ``uint8`` images ``(N, C, H, W)``.
    shift : ScannerShift
        The site's shift.
    seed : int
        Seed of the noise.
    chunk : int
        Images processed at once (bounds memory).

    Returns
    -------
    np.ndarray
        A new ``uint8`` array of the same shape.

    """
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"apply_scanner_shift needs uint8 (N, C, H, W) images; got {images.dtype} "
            f"{images.shape}"
        )
    if shift.is_identity or images.shape[0] == 0:
        return images.copy()
    h, w = images.shape[-2:]
    noise_rng = np.random.default_rng(_derive_seed(seed, 7))
    out = np.empty_like(images)
    for start in range(0, images.shape[0], chunk):
        x = torch.from_numpy(images[start : start + chunk].astype(np.float32) / 255.0)
        if shift.downsample > 1:
            small = (max(1, h // shift.downsample), max(1, w // shift.downsample))
            x = F.interpolate(x, size=small, mode="area")
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if shift.blur_sigma >= 0.05:  # separable, in C: ~10x faster than a 2-D conv kernel
            sigma = (0.0, 0.0, shift.blur_sigma, shift.blur_sigma)
            x = torch.from_numpy(gaussian_filter(x.numpy(), sigma, mode="reflect", truncate=3.0))
        if shift.contrast != 1.0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * shift.contrast + mean
        x = x.clamp(0.0, 1.0)
        if shift.gamma != 1.0:
            x = x.pow(shift.gamma)
        if shift.noise_std > 0:
            noise = noise_rng.standard_normal(tuple(x.shape), dtype=np.float32)
            x = x + shift.noise_std * torch.from_numpy(noise)
        out[start : start + chunk] = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return out


# ---------------------------------------------------------------------------------------
# The federation: per-site data
# ---------------------------------------------------------------------------------------


@dataclass
class SiteData:
    """One virtual hospital's data.

    Parameters
    ----------
    site_id : int
        Index of the site (0-based).
    name : str
        Display name, e.g. ``site-00``.
    train, val : ImageSplit
        The site's training data and its own held-out validation data.
    shift : ScannerShift, optional
        The site's scanner shift (``None`` when feature skew is off).
    train_indices, val_indices : np.ndarray
        Which samples of the pooled training set the site holds.

    """

    site_id: int
    name: str
    train: ImageSplit
    val: ImageSplit
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
    train: ImageSplit, class_names: list[str], cfg: PartitionConfig, seed: int
) -> FederatedPartition:
    """Split the pooled training set into sites, each with its own train/val split.

    Parameters
    ----------
    train : ImageSplit
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
            indices, train.labels, cfg.site_val_fraction, _derive_seed(seed, site_id, 11)
        )
        site_train, site_val = train.subset(tr_idx), train.subset(va_idx)
        shift = draw_scanner_shift(site_id, seed, skew.strength) if skew.enabled else None
        if shift is not None:
            site_train = ImageSplit(
                apply_scanner_shift(site_train.images, shift, _derive_seed(seed, site_id, 1)),
                site_train.labels,
                site_train.meta,
            )
            site_val = ImageSplit(
                apply_scanner_shift(site_val.images, shift, _derive_seed(seed, site_id, 2)),
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
        :func:`load_site_npz`).

    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = partition_table(partition, partition.class_names)
    table.to_csv(out_dir / "partition.csv", index=False)
    site_files = []
    site_meta = []
    for site, row in zip(partition.sites, table.to_dict("records"), strict=True):
        rel = Path("sites") / f"{site.name}.npz"
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
    (out_dir / "partition.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return site_files
