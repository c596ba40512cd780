"""``fl-sim cv``: k-fold cross-validation of the whole federated pipeline.

The dataset's splits are pooled (train + val + test; capped to ``data.max_samples`` by a
seeded stratified subsample when set) and cut into ``K`` stratified folds
(:class:`sklearn.model_selection.StratifiedKFold`, shuffled with the experiment seed). Fold
``i`` is the common test split of run ``i``; the other folds are partitioned into sites and
federated exactly as in ``fl-sim run`` (baselines included when enabled), into
``OUT/fold-XX/``. Every run repeats the partition, Ray start-up and training, so the wall time
is about ``K`` times that of one run.

Outputs in ``OUT``: ``cv_folds.csv`` (one row per fold and model: test AUC, accuracy,
balanced accuracy), ``cv_summary.csv`` / ``cv_summary.json`` (mean ± sample std over folds).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from consilia.common.config import ConfigError, ExperimentConfig
from consilia.common.data.datasets import DatasetBundle, load_dataset, stratified_subsample
from consilia.common.data.images import ImageData

__all__ = ["CVResult", "format_summary", "kfold_bundles", "pool_splits", "run_cross_validation"]

logger = logging.getLogger("consilia")

#: Test-split metrics summarised per model.
CV_METRICS = ("auc", "accuracy", "balanced_accuracy")


def pool_splits(bundle: DatasetBundle, max_samples: int | None, seed: int) -> ImageData:
    """Concatenate a bundle's train, val and test splits (metadata dropped).

    Parameters
    ----------
    bundle : DatasetBundle
        The loaded dataset.
    max_samples : int, optional
        Keep a seeded stratified subsample of this many images.
    seed : int
        Seed of the subsample.

    Returns
    -------
    ImageData
        The pooled images and labels.

    """
    parts = [s for s in (bundle.train, bundle.val, bundle.test) if s is not None and len(s)]
    pool = ImageData(np.concatenate([p.images for p in parts]),
                      np.concatenate([p.labels for p in parts]))
    if max_samples is not None and max_samples < len(pool):
        pool = pool.subset(stratified_subsample(pool.labels, max_samples, seed))
    return pool


def kfold_bundles(
    bundle: DatasetBundle, pool: ImageData, folds: int, seed: int
) -> list[DatasetBundle]:
    """Cut ``pool`` into ``folds`` stratified folds; bundle ``i`` tests on fold ``i``.

    Parameters
    ----------
    bundle : DatasetBundle
        The source dataset (name, classes, geometry).
    pool : ImageData
        The pooled images (:func:`pool_splits`).
    folds : int
        Number of folds ``K >= 2``.
    seed : int
        Shuffle seed.

    Returns
    -------
    list of DatasetBundle
        ``K`` bundles with ``train`` = the other folds, ``val`` = ``None``, ``test`` = fold
        ``i``; the test folds are disjoint and cover the pool.

    Raises
    ------
    ConfigError
        If ``folds < 2`` or a class has fewer than ``folds`` images.

    """
    if folds < 2:
        raise ConfigError(f"--folds must be >= 2 (got {folds})")
    counts = np.bincount(pool.labels, minlength=len(bundle.class_names))
    present = counts[counts > 0]
    if present.size and present.min() < folds:
        small = [bundle.class_names[c] for c in np.flatnonzero((counts > 0) & (counts < folds))]
        raise ConfigError(
            f"--folds {folds}: classes {small} have fewer than {folds} images in the pool of "
            f"{len(pool)}; lower --folds or raise data.max_samples"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    out = []
    for i, (train_idx, test_idx) in enumerate(splitter.split(pool.labels, pool.labels)):
        out.append(DatasetBundle(
            name=bundle.name, class_names=list(bundle.class_names),
            train=pool.subset(np.sort(train_idx)), val=None, test=pool.subset(np.sort(test_idx)),
            in_channels=bundle.in_channels, image_size=bundle.image_size, official_split=False,
            split_note=f"cross-validation fold {i + 1}/{folds} (stratified, seed {seed}) of "
                       f"{len(pool)} pooled images",
            source=bundle.source, notes=list(bundle.notes),
        ))
    return out


@dataclass
class CVResult:
    """Outcome of :func:`run_cross_validation`."""

    out_dir: Path
    folds: pd.DataFrame
    summary: pd.DataFrame


def _metric(metrics: dict[str, Any], name: str) -> float:
    value = metrics.get(name, metrics.get(f"macro_{name}"))
    return float(value) if isinstance(value, int | float) else float("nan")


def _fold_rows(fold: int, final: dict[str, Any], n_test: int) -> list[dict[str, Any]]:
    models = {"federated": final.get("federated"), "centralized": final.get("centralized"),
              "local-only (mean)": (final.get("local_only") or {}).get("mean")}
    external = (final.get("external_validation") or {}).get("federated")
    if external:
        models["federated on held-out site"] = external
    rows = []
    for model, metrics in models.items():
        if metrics:
            rows.append({"fold": fold, "model": model, "n_test": n_test,
                         **{m: _metric(metrics, m) for m in CV_METRICS}})
    return rows


def _summarise(folds: pd.DataFrame) -> pd.DataFrame:
    grouped = folds.groupby("model", sort=False)[list(CV_METRICS)]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    out = pd.DataFrame(index=mean.index)
    out["folds"] = grouped.size()
    for metric in CV_METRICS:
        out[f"{metric}_mean"] = mean[metric]
        out[f"{metric}_std"] = std[metric]
    return out.reset_index()


def format_summary(summary: pd.DataFrame) -> str:
    """Render the summary as ``model | AUC mean ± std | accuracy mean ± std | ...``."""
    header = f"{'model (test folds)':<30}{'folds':>6}" + "".join(f"{m:>26}" for m in CV_METRICS)
    lines = [header, "-" * len(header)]
    for row in summary.to_dict("records"):
        cells = "".join(f"{row[f'{m}_mean']:>15.4f} ± {row[f'{m}_std']:<8.4f}" for m in CV_METRICS)
        lines.append(f"{row['model']:<30}{row['folds']:>6}{cells}")
    return "\n".join(lines)


def run_cross_validation(
    cfg: ExperimentConfig,
    folds: int,
    out_dir: Path | None = None,
    verbose: bool = False,
    argv: list[str] | None = None,
) -> CVResult:
    """Run the federated pipeline once per fold and summarise the test metrics.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (dataset, partition, strategy, baselines).
    folds : int
        Number of folds ``K >= 2``.
    out_dir : Path, optional
        Output folder (default ``cfg.output_dir/<name>-cv-<UTC time>``).
    verbose : bool
        Show Flower/Ray logs.
    argv : list of str, optional
        Command line, recorded in each fold's ``environment.json``.

    Returns
    -------
    CVResult
        Per-fold rows and the mean ± std summary (also written as CSV/JSON).

    """
    from consilia.simulations.run import run_experiment

    out = Path(out_dir) if out_dir is not None else (
        Path(cfg.output_dir) / f"{cfg.name}-cv-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_dataset(cfg.data, cfg.seed)
    pool = pool_splits(bundle, cfg.data.max_samples, cfg.seed)
    bundles = kfold_bundles(bundle, pool, folds, cfg.seed)
    logger.info("%d-fold cross-validation of the federated pipeline on %d pooled images "
                "(each fold is a full run)", folds, len(pool))
    rows: list[dict[str, Any]] = []
    for i, fold_bundle in enumerate(bundles):
        logger.info("fold %d/%d: %d train / %d test images", i + 1, folds,
                    len(fold_bundle.train), len(fold_bundle.test))
        result = run_experiment(cfg, out / f"fold-{i:02d}", verbose=verbose, argv=argv,
                                bundle=fold_bundle)
        rows += _fold_rows(i, result.final, len(fold_bundle.test))
        pd.DataFrame(rows).to_csv(out / "cv_folds.csv", index=False)
    table = pd.DataFrame(rows)
    summary = _summarise(table)
    summary.to_csv(out / "cv_summary.csv", index=False)
    (out / "cv_summary.json").write_text(json.dumps({
        "folds": folds, "pooled_images": len(pool), "seed": cfg.seed,
        "std": "sample standard deviation over folds (ddof=1)",
        "models": {r.pop("model"): r for r in json.loads(summary.to_json(orient="records"))},
    }, indent=2))
    return CVResult(out, table, summary)
