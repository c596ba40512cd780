"""Run a federation on Flower's simulation engine (Ray backend), in this process.

The ServerApp and ClientApp are the very objects the deployment uses
(``consilia.server.app:app`` / ``consilia.client.app:app``); the run configuration reaches
both through Flower's ``context.run_config``, exactly as with ``flwr run``.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from flwr.app import Context, RecordDict

from consilia.client.app import app as client_app
from consilia.common.config import RunConfig, SimulationConfig
from consilia.common.constants import RunConfigKey
from consilia.common.flower.app_project import write_flower_app
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
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_config: dict[str, str | int | float | bool] = {
        RunConfigKey.CONFIG_JSON.value: run.model_dump_json(),
        RunConfigKey.RUN_DIR.value: str(Path(run_dir).resolve()),
        RunConfigKey.SIM_SITES_DIR.value: str(Path(sites_dir).resolve()),
        "consilia-sim-threads": sim.threads_per_client,
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
    rng = random.Random(run.seed)
    run_obj = Run.create_empty(run_id=rng.randrange(1, 2**62))
    run_obj.primary_task_id = rng.randrange(1, 2**62)
    run_obj.federation_id = NOOP_FEDERATION_ID
    run_obj.fab_id = "consilia/consilia-run"
    run_obj.fab_version = "0.1.0"
    run_obj.override_config = dict(run_config)
    TaskIdentity.task_id = 1  # as Flower's own Python entry point does
    TaskIdentity.run_id = run_obj.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run_obj.run_id, node_id=0, node_config={}, state=RecordDict(),
        run_config=dict(run_config),
    )
    flwr_logger = logging.getLogger("flwr")
    quiet = _BelowWarning()
    if not verbose:
        flwr_logger.addFilter(quiet)
    try:
        _run_simulation(
            num_supernodes=num_sites,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config,
            server_app_context=context,
            app_dir=str(app_dir),
            run=run_obj,
            is_app=True,
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.removeFilter(quiet)
