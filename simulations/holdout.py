"""Leave-one-site-out external validation: one hospital never trains and is scored at the end.

With ``partition.holdout_site = K`` (``fl-sim run --holdout-site K``) the partition is built
for all ``num_sites`` sites as usual (so the other sites get exactly the data they would get
anyway), then site ``K`` is taken out: its file moves from ``sites/`` to ``holdout/``, so the
simulation starts ``num_sites - 1`` SuperNodes and neither the federation nor the baselines
see its images. At the end the global model (and every baseline) is evaluated on *all* of
site K's images (its train and validation splits) — the "external validation" section of
``final_metrics.json``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from consilia.common.data.images import ImageData
from consilia.common.evaluation.formatting import format_number as _fmt
from consilia.common.evaluation.metrics import compute_metrics
from consilia.common.model_files import load_model_file
from consilia.common.rundir.layout import RunDir
from consilia.common.training.inference import evaluate_on
from consilia.simulations.partition import FederatedPartition, SiteData
from consilia.simulations.partition_schemes import site_name

__all__ = ["HOLDOUT_DIR", "external_validation", "split_holdout"]

logger = logging.getLogger("consilia")

#: Folder of the run directory that holds the held-out site's file.
HOLDOUT_DIR = RunDir(".").holdout_dir.name


def split_holdout(
    partition: FederatedPartition, site_id: int, run_dir: Path
) -> tuple[FederatedPartition, SiteData]:
    """Take site ``site_id`` out of the federation.

    Parameters
    ----------
    partition : FederatedPartition
        The full partition, already saved with :func:`~consilia.simulations.partition.
        save_partition` into ``run_dir``.
    site_id : int
        Index of the site to hold out.
    run_dir : Path
        The run directory; ``sites/site-KK.npz`` moves to ``holdout/site-KK.npz``.

    Returns
    -------
    tuple
        ``(partition without the site, the held-out SiteData)``. The remaining sites keep
        their names (e.g. ``site-00``, ``site-02``).

    Raises
    ------
    ValueError
        If ``site_id`` is not a site of the partition or fewer than one site would remain.

    """
    if not 0 <= site_id < partition.num_sites:
        raise ValueError(
            f"partition.holdout_site={site_id}: sites are 0..{partition.num_sites - 1}"
        )
    if partition.num_sites < 2:
        raise ValueError("partition.holdout_site needs at least 2 sites (one must still train)")
    held = partition.sites[site_id]
    layout = RunDir(run_dir)
    src, dst = layout.site_path(held.name), layout.holdout_path(held.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        src.replace(dst)
    remaining = [s for s in partition.sites if s.site_id != site_id]
    logger.info("leave-one-site-out: %s (%d images) never trains; the federation has %d sites",
                held.name, len(held.train) + len(held.val), len(remaining))
    return replace(partition, sites=remaining), held


def external_validation(run_dir: Path, site: SiteData) -> dict[str, Any]:
    """Evaluate the run's models on every image of the held-out site.

    Parameters
    ----------
    run_dir : Path
        Run directory with ``global_model.safetensors`` and optionally ``models/*.safetensors``.
    site : SiteData
        The held-out site (from :func:`split_holdout`).

    Returns
    -------
    dict
        ``{"site": "site-KK", "n": N, "class_counts": [...], "federated": M,
        "centralized": M, "local_only": {"site-00": M, ..., "mean": {...}}}`` where ``M`` is
        ``ClassificationMetrics.to_dict()`` (the same format as the test-split metrics).
        Predictions go to ``predictions/external-<model>.npz``.

    """
    layout = RunDir(run_dir)
    images = np.concatenate([site.train.images, site.val.images])
    labels = np.concatenate([site.train.labels, site.val.labels]).astype(np.int64)
    data = ImageData(images, labels)
    paths = {"federated": layout.global_model_path, "centralized": layout.centralized_model_path}
    paths.update({p.stem: p for p in layout.local_model_files()})
    out: dict[str, Any] = {"site": site.name if site.name else site_name(site.site_id),
                           "n": len(labels)}
    local: dict[str, Any] = {}
    layout.predictions_dir.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        if not path.is_file():
            continue
        model, run, _ = load_model_file(path)
        res = evaluate_on(model, data, run.train, run.task)
        metrics = compute_metrics(res.y_true, res.y_prob, run.task.class_names)
        np.savez_compressed(layout.prediction_path(f"external-{name}"),
                            y_true=res.y_true, y_prob=res.y_prob)
        if "class_counts" not in out:
            out["class_counts"] = np.bincount(labels, minlength=run.task.num_classes).tolist()
        if name.startswith("local-"):
            local[name.removeprefix("local-")] = metrics.to_dict()
        else:
            out[name] = metrics.to_dict()
    if local:
        keys = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity")
        mean = {}
        for key in keys:
            found = (m.get(key, m.get(f"macro_{key}")) for m in local.values())
            values = [v for v in found if isinstance(v, int | float) and np.isfinite(v)]
            if values:
                mean[key] = float(np.mean(values))
        out["local_only"] = {**local, "mean": mean}
    fed = out.get("federated", {})
    logger.info("external validation on held-out %s (%d images): global model AUC %s, "
                "accuracy %s", out["site"], out["n"], _fmt(fed.get("auc")),
                _fmt(fed.get("accuracy")))
    return out
