"""Privacy-utility runs (local DP-SGD at every site) with the membership-inference audit."""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.privacy.recipe import COMMON, DATASETS
from consilia.common.rundir.layout import RunDir
from consilia.common.rundir.round_records import read_round_records

__all__ = ["run_utility", "site_train_seconds"]

log = logging.getLogger("consilia.privacy_bench")


def _eps_name(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _dp_overrides(eps: float) -> list[str]:
    if math.isinf(eps):
        return ["dp.enabled=false"]
    return ["dp.enabled=true", "dp.mode=local", f"dp.target_epsilon={eps}"]



def run_utility(
    out: Path, datasets: Sequence[str], epsilons: Sequence[float], mia_epsilons: Sequence[float],
    shadows: int, per_group: int, extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run one federation per (dataset, ε); audit the ``mia_epsilons`` ones. Return rows."""
    from consilia.common.config import load_experiment_config
    from consilia.simulations import run as run_module
    from consilia.simulations.audits.membership_inference import audit_run
    from consilia.simulations.inprocess import run_inprocess_simulation

    rows = []
    for dataset in datasets:
        for eps in epsilons:
            overrides = [*COMMON, *DATASETS[dataset], *_dp_overrides(eps), *extra,
                         f"name=dp-{dataset}-eps-{_eps_name(eps)}"]
            cfg = load_experiment_config(None, overrides)
            run_dir = out / "runs" / f"{dataset}-eps-{_eps_name(eps)}"
            start = time.perf_counter()
            with mock.patch.object(run_module, "run_flower_simulation",
                                   run_inprocess_simulation):
                result = run_module.run_experiment(cfg, run_dir)
            seconds = time.perf_counter() - start
            rounds = read_round_records(run_dir)
            spent = [v.get("epsilon") for r in rounds for v in (r.get("sites") or {}).values()
                     if isinstance(v, dict) and v.get("epsilon") is not None]
            fed = result.final["federated"]
            row: dict[str, Any] = {
                "dataset": dataset, "epsilon": _eps_name(eps),
                "auc": fed.get("auc"), "accuracy": fed.get("accuracy"),
                "balanced_accuracy": fed.get("balanced_accuracy"),
                "max_epsilon_spent": max(spent) if spent else None,
                "noise_multiplier": _noise_multiplier(run_dir),
                "site_train_seconds": site_train_seconds(run_dir),
                "seconds": round(seconds, 1), "run_dir": str(run_dir),
                "n_train_per_site": _site_sizes(run_dir),
                "n_test": fed.get("num_samples"),
            }
            if eps in mia_epsilons:
                audit = audit_run(run_dir, shadows=shadows, per_group=per_group, seed=0)
                row["mia"] = audit.to_dict()
            log.info("%s ε=%s: AUC %.4f acc %.4f (ε spent %s) in %.0f s%s", dataset,
                     _eps_name(eps), row["auc"], row["accuracy"], row["max_epsilon_spent"],
                     seconds, f"; MIA loss AUC {row['mia']['loss_auc']:.3f}, LiRA AUC "
                     f"{row['mia']['lira_auc']:.3f}" if "mia" in row else "")
            rows.append(row)
    return rows


def site_train_seconds(run_dir: Path) -> float | None:
    """Median local-training time of one site in one round (``train-seconds``) of a run."""
    values = [v["train-seconds"] for record in read_round_records(Path(run_dir))
              for v in (record.get("sites") or {}).values()
              if isinstance(v, dict) and v.get("train-seconds") is not None]
    return statistics.median(values) if values else None


def _noise_multiplier(run_dir: Path) -> float | None:
    ledgers = RunDir(run_dir).privacy_ledger_paths()
    for path in ledgers:
        data = json.loads(path.read_text())
        for entry in data.get("entries", {}).values():
            for cal in entry.get("calibrations", {}).values():
                return float(cal["noise_multiplier"])
    return None


def _site_sizes(run_dir: Path) -> list[int]:
    run = RunDir(run_dir)
    return [int(run.read_site(path.stem)[0].labels.shape[0]) for path in run.site_files()]
