"""Central-DP (client-level) comparison runs: one federation per dataset."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.privacy.recipe import COMMON, DATASETS
from consilia.common.rundir.round_records import read_round_records

__all__ = ["run_central"]

log = logging.getLogger("consilia.privacy_bench")


def run_central(out: Path, datasets: Sequence[str], noise: float, clip: float,
                extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One central-DP (client-level) federation per dataset, same recipe as the ε = ∞ run."""
    from consilia.common.config import load_experiment_config
    from consilia.simulations import run as run_module
    from consilia.simulations.inprocess import run_inprocess_simulation

    rows = []
    for dataset in datasets:
        overrides = [*COMMON, *DATASETS[dataset], "dp.enabled=true", "dp.mode=central",
                     f"dp.central_noise_multiplier={noise}", f"dp.central_clipping_norm={clip}",
                     *extra, f"name=dp-{dataset}-central"]
        cfg = load_experiment_config(None, overrides)
        run_dir = out / "runs" / f"{dataset}-central"
        start = time.perf_counter()
        with mock.patch.object(run_module, "run_flower_simulation", run_inprocess_simulation):
            result = run_module.run_experiment(cfg, run_dir)
        rounds = read_round_records(run_dir)
        last = next((r["central_dp"] for r in reversed(rounds) if "central_dp" in r), {})
        fed = result.final["federated"]
        rows.append({"dataset": dataset, "noise_multiplier": noise, "clipping_norm": clip,
                     "client_level_epsilon": last.get("client-level-epsilon"),
                     "delta": last.get("delta"), "auc": fed.get("auc"),
                     "accuracy": fed.get("accuracy"),
                     "seconds": round(time.perf_counter() - start, 1), "run_dir": str(run_dir)})
        log.info("%s central DP σ=%g C=%g: AUC %.4f acc %.4f, client-level ε %s", dataset,
                 noise, clip, fed.get("auc"), fed.get("accuracy"),
                 last.get("client-level-epsilon"))
    return rows
