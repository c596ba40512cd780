"""Run a federation on Flower's simulation engine (Ray backend), in this process.

The ServerApp and ClientApp are the very objects the deployment uses
(``consilia.server.app:app`` / ``consilia.client.app:app``); the run configuration reaches
both through Flower's ``context.run_config``, exactly as with ``flwr run``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from consilia.client.app import app as client_app
from consilia.common.config import RunConfig, SimulationConfig
from consilia.common.constants import RunConfigKey
from consilia.common.flower.app_project import write_flower_app
from consilia.common.flower.simulation_engine import run_ray_simulation
from consilia.server.app import app as server_app

__all__ = ["RayAddressError", "run_flower_simulation", "validate_ray_address"]


class RayAddressError(ValueError):
    """The ``--ray-address`` cannot be reached (Ray would otherwise retry forever)."""


class _BelowWarning(logging.Filter):
    """Drop Flower's INFO chatter; Consilia prints its own per-round progress line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def validate_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Check that ``host:port`` of an existing Ray cluster accepts TCP connections."""
    import socket

    target = address.removeprefix("ray://")
    if target == "auto":
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"ray address '{address}': expected HOST:PORT (or 'auto')")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayAddressError(
            f"cannot reach the Ray cluster at {address}: {exc}; start it with "
            "'ray start --head' or drop --ray-address to use a local one"
        ) from None


def run_flower_simulation(
    run: RunConfig,
    run_dir: Path,
    sites_dir: Path,
    num_sites: int,
    sim: SimulationConfig,
    verbose: bool = False,
) -> None:
    """Simulate ``num_sites`` sites running ``run``; results land in ``run_dir``."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_config: dict[str, str | int | float | bool] = {
        RunConfigKey.CONFIG_JSON.value: run.model_dump_json(),
        RunConfigKey.RUN_DIR.value: str(Path(run_dir).resolve()),
        RunConfigKey.SIM_SITES_DIR.value: str(Path(sites_dir).resolve()),
        RunConfigKey.SIM_THREADS.value: sim.threads_per_client,
    }
    app_dir = Path(run_dir) / "flower-app"
    write_flower_app(app_dir, run_config)

    init_args: dict[str, object] = {
        "logging_level": "ERROR",
        "log_to_driver": verbose,
    }
    # Flower passes its own runtime_env to ray.init; local workers inherit this environment.
    os.environ.setdefault("OMP_NUM_THREADS", str(sim.threads_per_client))
    if sim.ray_address:
        validate_ray_address(sim.ray_address)
        init_args["address"] = sim.ray_address
    else:
        init_args["num_cpus"] = max(1, os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }
    flwr_logger = logging.getLogger("flwr")
    quiet = _BelowWarning()
    if not verbose:
        flwr_logger.addFilter(quiet)
    try:
        run_ray_simulation(
            server_app, client_app, num_sites, run_config, str(app_dir), backend_config,
            seed=run.seed, verbose=verbose,
        )
    finally:
        flwr_logger.removeFilter(quiet)
