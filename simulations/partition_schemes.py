"""Label and quantity skew: the registered partition schemes (``partition.scheme``).

Each scheme assigns sample indices to sites by running a ``flwr_datasets.partitioner`` on an
in-memory ``datasets.Dataset`` of ``{"label", "idx"}`` (no download, no image copies):

* ``iid``: seeded shuffle + :class:`~flwr_datasets.partitioner.IidPartitioner` (equal shares);
* ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` over the label with
  ``alpha`` (small alpha = few dominant classes per site), self-balancing, and every site at
  least ``min_samples_per_site``;
* ``pathological``: :class:`~flwr_datasets.partitioner.PathologicalPartitioner` with
  ``classes_per_site`` classes per site (``first-deterministic`` assignment, as in Li et al.
  2021). When there are fewer sites than classes some classes go to no site;
* ``quantity``: site sizes drawn from ``Dirichlet(alpha)`` (plus the minimum per site), then a
  seeded shuffle + :class:`~flwr_datasets.partitioner.SizePartitioner`; labels stay IID.

Schemes live in :data:`PARTITION_SCHEMES` (a :class:`~consilia.common.registry.Registry`);
:func:`partition_indices` runs the configured one. Every scheme is deterministic for a seed
and gives disjoint sites.
"""

from __future__ import annotations

import logging
import warnings
from typing import Protocol

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SizePartitioner,
)

from consilia.common.config import PartitionConfig
from consilia.common.registry import Registry
from consilia.simulations.seeds import derive_seed

__all__ = [
    "PARTITION_SCHEMES",
    "PartitionError",
    "PartitionScheme",
    "partition_indices",
    "site_name",
]

log = logging.getLogger(__name__)


class PartitionError(ValueError):
    """The requested partition cannot be built; the message names the fields to change."""


def site_name(site_id: int) -> str:
    """Return the display name of a site, e.g. ``site-03``."""
    return f"site-{site_id:02d}"


class PartitionScheme(Protocol):
    """A partition scheme: assigns the shuffled sample order to ``cfg.num_sites`` sites."""

    def __call__(
        self,
        labels: np.ndarray,
        order: np.ndarray,
        cfg: PartitionConfig,
        seed: int,
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        """Return one (unsorted) index array per site.

        Parameters
        ----------
        labels : np.ndarray
            Class index of every sample (int64).
        order : np.ndarray
            The seeded permutation of the sample indices the scheme partitions.
        cfg : PartitionConfig
            The partition configuration.
        seed : int
            The experiment seed (for the scheme's own derived streams).
        rng : np.random.Generator
            The generator that drew ``order`` (a scheme that draws more continues it).

        """
        ...


#: The partition schemes, by ``partition.scheme`` name.
PARTITION_SCHEMES: Registry[PartitionScheme] = Registry("partition scheme")


def _hf_dataset(labels: np.ndarray, order: np.ndarray) -> Dataset:
    return Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})


def _attach(partitioner: Partitioner, dataset: Dataset) -> Partitioner:
    partitioner.dataset = dataset
    return partitioner


def _collect(partitioner: Partitioner, num_sites: int) -> list[np.ndarray]:
    return [
        np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64)
        for pid in range(num_sites)
    ]


def _iid(
    labels: np.ndarray, order: np.ndarray, cfg: PartitionConfig, seed: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    k = cfg.num_sites
    return _collect(_attach(IidPartitioner(k), _hf_dataset(labels, order)), k)


def _quantity_sizes(n: int, cfg: PartitionConfig, rng: np.random.Generator) -> list[int]:
    spare = n - cfg.min_samples_per_site * cfg.num_sites
    shares = rng.dirichlet(np.full(cfg.num_sites, cfg.alpha))
    extra = rng.multinomial(spare, shares)
    return [int(cfg.min_samples_per_site + e) for e in extra]


def _quantity(
    labels: np.ndarray, order: np.ndarray, cfg: PartitionConfig, seed: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    k = cfg.num_sites
    sizes = _quantity_sizes(labels.shape[0], cfg, rng)
    return _collect(_attach(SizePartitioner(sizes), _hf_dataset(labels, order)), k)


def _dirichlet(
    labels: np.ndarray, order: np.ndarray, cfg: PartitionConfig, seed: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    n, k = labels.shape[0], cfg.num_sites
    partitioner = DirichletPartitioner(
        num_partitions=k,
        partition_by="label",
        alpha=float(cfg.alpha),
        min_partition_size=cfg.min_samples_per_site,
        self_balancing=True,
        shuffle=False,
        seed=derive_seed(seed, 2),
    )
    _attach(partitioner, _hf_dataset(labels, order))
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
    return parts


def _pathological(
    labels: np.ndarray, order: np.ndarray, cfg: PartitionConfig, seed: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    k = cfg.num_sites
    num_classes = len(np.unique(labels))
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
        seed=derive_seed(seed, 3),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unused classes: reported by the caller
        try:
            return _collect(_attach(partitioner, _hf_dataset(labels, order)), k)
        except ValueError as exc:
            raise PartitionError(f"pathological partition impossible: {exc}") from exc


PARTITION_SCHEMES.register("iid", _iid)
PARTITION_SCHEMES.register("dirichlet", _dirichlet)
PARTITION_SCHEMES.register("pathological", _pathological)
PARTITION_SCHEMES.register("quantity", _quantity)


def _check_disjoint(parts: list[np.ndarray]) -> None:
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(np.unique(joined)) != len(joined):
        raise AssertionError("internal error: partition assigns a sample to two sites")


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
        sites smaller than ``min_samples_per_site``) or the scheme is unknown.

    """
    labels = np.asarray(labels, dtype=np.int64)
    n, k = labels.shape[0], cfg.num_sites
    if k * cfg.min_samples_per_site > n:
        raise PartitionError(
            f"{n} samples cannot give {k} sites at least partition.min_samples_per_site="
            f"{cfg.min_samples_per_site} each; lower partition.num_sites or "
            "min_samples_per_site, or use more data (data.max_samples)"
        )
    if cfg.scheme not in PARTITION_SCHEMES:  # pragma: no cover - PartitionConfig validates
        raise PartitionError(f"unknown partition.scheme '{cfg.scheme}'")
    rng = np.random.default_rng(derive_seed(seed, 1))
    shuffled = rng.permutation(n)
    parts = PARTITION_SCHEMES.get(cfg.scheme)(labels, shuffled, cfg, seed, rng)

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
