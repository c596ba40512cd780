"""The ``fl-sim`` experiment: partition, federate on Flower's simulation engine, compare.

One call of :func:`run_experiment` produces the run directory described in
``docs/run-directory.md``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from consilia.common.config import ExperimentConfig, TaskSpec
from consilia.common.data.datasets import DatasetBundle, load_dataset
from consilia.common.data.images import ImageData
from consilia.common.evaluation.plots import plot_learning_curves
from consilia.common.library_versions import library_versions
from consilia.common.rundir.layout import RunDir
from consilia.common.training.engine import seed_everything
from consilia.simulations.baselines import run_centralized, run_local_only
from consilia.simulations.cross_site import cross_site_validation
from consilia.simulations.flower_sim import run_flower_simulation
from consilia.simulations.holdout import external_validation, split_holdout
from consilia.simulations.partition import (
    build_partition,
    format_partition_table,
    partition_table,
    save_partition,
)

__all__ = ["ExperimentResult", "comparison_table", "library_versions", "run_experiment"]

logger = logging.getLogger("consilia")



@dataclass
class ExperimentResult:
    """Where the run went and its headline numbers."""

    run_dir: Path
    final: dict[str, Any]
    seconds: dict[str, float]




def _resolve_run_dir(cfg: ExperimentConfig, out_dir: Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output_dir) / f"{cfg.name}-{stamp}"


def _write_metadata(run_dir: Path, cfg: ExperimentConfig, argv: list[str] | None) -> None:
    layout = RunDir(run_dir)
    layout.config_path.write_text(
        yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
    )
    layout.task_path.write_text(cfg.task.model_dump_json(indent=2) if cfg.task else "{}")
    env = {
        "versions": library_versions(),
        "seed": cfg.seed,
        "command": argv if argv is not None else sys.argv,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if cfg.init_from is not None:
        env["init_from"] = str(cfg.init_from)
    layout.environment_path.write_text(json.dumps(env, indent=2))


def _metric(metrics: dict, name: str) -> float | None:
    """Look a headline metric up in ``ClassificationMetrics.to_dict()`` output."""
    value = metrics.get(name, metrics.get(f"macro_{name}"))
    return value if isinstance(value, int | float) else None


def comparison_table(final: dict[str, Any]) -> str:
    """Side-by-side table of federated vs centralized vs local-only test metrics."""
    columns = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity")
    rows: list[tuple[str, dict]] = []
    if "federated" in final:
        calibrated = (final.get("calibration") or {}).get("applied")
        rows.append(("federated (calibrated)" if calibrated else "federated",
                     final["federated"]))
    if "federated_before_calibration" in final:
        rows.append(("  before calibration", final["federated_before_calibration"]))
    if "centralized" in final:
        rows.append(("centralized", final["centralized"]))
    local = final.get("local_only") or {}
    if "mean" in local:
        rows.append(("local-only (mean of sites)", local["mean"]))
    for name, metrics in local.items():
        if name != "mean":
            rows.append((f"  local-only {name}", metrics))
    header = f"{'model (test split)':<30}" + "".join(f"{c:>19}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, metrics in rows:
        cells = []
        for c in columns:
            value = _metric(metrics, c)
            cells.append(f"{value:>19.4f}" if isinstance(value, int | float) else f"{'n/a':>19}")
        lines.append(f"{name:<30}" + "".join(cells))
    return "\n".join(lines)


def _mean_metrics(results: list[dict]) -> dict[str, float]:
    keys = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity")
    out = {}
    for key in keys:
        values = [_metric(r, key) for r in results if isinstance(_metric(r, key), int | float)]
        if values:
            out[key] = float(np.mean(values))
    return out


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: Path | None = None,
    verbose: bool = False,
    argv: list[str] | None = None,
    bundle: DatasetBundle | None = None,
) -> ExperimentResult:
    """Run one simulation experiment end to end.

    Parameters
    ----------
    cfg : ExperimentConfig
        The validated configuration.
    out_dir : Path, optional
        Run directory (default: ``cfg.output_dir/<name>-<UTC timestamp>``).
    verbose : bool
        Show Flower's and Ray's own logs.
    argv : list of str, optional
        The command line, recorded in ``environment.json``.
    bundle : DatasetBundle, optional
        Use these splits instead of loading ``cfg.data`` (k-fold cross-validation).
    """
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    run_dir = _resolve_run_dir(cfg, out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("run directory: %s", run_dir)

    bundle = load_dataset(cfg.data, cfg.seed) if bundle is None else bundle
    logger.info(
        "dataset %s: %d train / %d val / %d test images, %d classes, %dx%d px, %d channel(s)",
        bundle.name, len(bundle.train.labels), len(bundle.val.labels) if bundle.val else 0,
        len(bundle.test.labels), len(bundle.class_names), bundle.image_size, bundle.image_size,
        bundle.in_channels,
    )
    logger.info("split: %s", bundle.split_note)
    cfg = cfg.model_copy(update={"task": TaskSpec(
        class_names=list(bundle.class_names), in_channels=bundle.in_channels,
        image_size=bundle.image_size,
    )})

    if cfg.init_from is not None:  # fail before any training: the file must fit this task
        from consilia.server.app import load_initial_model

        cfg = cfg.model_copy(update={"init_from": Path(cfg.init_from).resolve()})
        load_initial_model(cfg.run_config())
    partition = build_partition(bundle.train, bundle.class_names, cfg.partition, cfg.seed)
    save_partition(partition, run_dir)
    table = partition_table(partition, bundle.class_names)
    logger.info("partition (%s, %d sites):\n%s", cfg.partition.scheme, cfg.partition.num_sites,
                format_partition_table(table))
    held_out = None
    if cfg.partition.holdout_site is not None:
        partition, held_out = split_holdout(partition, cfg.partition.holdout_site, run_dir)
    layout = RunDir(run_dir)
    layout.write_test_set(bundle.test, bundle.class_names)
    _write_metadata(run_dir, cfg, argv)
    seconds: dict[str, float] = {"prepare": time.perf_counter() - t0}

    run = cfg.run_config()
    logger.info("federated training: %s, %d rounds, %d sites, model %s (Flower simulation "
                "engine, Ray backend)", cfg.strategy.name, cfg.strategy.rounds,
                partition.num_sites, cfg.model.name)
    t_fl = time.perf_counter()
    run_flower_simulation(run, run_dir, layout.sites_dir, partition.num_sites,
                          cfg.simulation, verbose=verbose)
    seconds["federated"] = time.perf_counter() - t_fl
    fed_path = layout.federated_metrics_path
    if not fed_path.is_file():
        raise RuntimeError(f"the federated run wrote no results to {fed_path}; see the log")
    final: dict[str, Any] = json.loads(fed_path.read_text())

    test = ImageData(bundle.test.images, bundle.test.labels)
    site_data = [(s.name, ImageData(s.train.images, s.train.labels)) for s in partition.sites]
    if cfg.baselines.centralized:
        logger.info("baseline: centralized training on the pooled site data (%d epochs)",
                    cfg.strategy.rounds * cfg.train.local_epochs)
        t_c = time.perf_counter()
        central = run_centralized([d for _, d in site_data], test, run, run_dir)
        seconds["centralized"] = time.perf_counter() - t_c
        final["centralized"] = central.metrics
    if cfg.baselines.local_only:
        logger.info("baseline: local-only training at each of %d sites", len(site_data))
        t_l = time.perf_counter()
        local = run_local_only(site_data, test, run, run_dir)
        seconds["local_only"] = time.perf_counter() - t_l
        final["local_only"] = {r.name.removeprefix("local-"): r.metrics for r in local}
        final["local_only"]["mean"] = _mean_metrics([r.metrics for r in local])
    final.update(cross_site_validation(run_dir))
    if held_out is not None:
        final["external_validation"] = external_validation(run_dir, held_out)
    seconds["total"] = time.perf_counter() - t0
    final["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    layout.final_metrics_path.write_text(json.dumps(final, indent=2))

    rounds = layout.read_rounds()
    refs = {}
    if "centralized" in final:
        refs["centralized"] = final["centralized"]["accuracy"]
    if "local_only" in final and "accuracy" in final["local_only"].get("mean", {}):
        refs["local-only (mean)"] = final["local_only"]["mean"]["accuracy"]
    plot_learning_curves(rounds, layout.plots_dir / "learning_curves.png", refs)
    return ExperimentResult(run_dir=run_dir, final=final, seconds=seconds)
