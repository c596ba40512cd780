"""Run a ServerApp and ClientApp on Flower's simulation engine (Ray backend), in this process.

Flower 1.42's public ``flwr.simulation.run_simulation`` gives the apps an EMPTY
``context.run_config``; ``flwr run`` passes one but starts a separate process. This module
calls the engine behind both (the private ``_run_simulation``) the way Flower's own Python
entry point does, with a prepared :class:`Run` and a ServerApp ``Context`` that carry the run
configuration, so the apps see it exactly as under ``flwr run``.
"""

from __future__ import annotations

import random
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.telemetry import EventType

from consilia.common.flower.compat import require_supported_flower
from consilia.common.flower.task_identity import set_coordinator_task

require_supported_flower()

__all__ = ["run_ray_simulation"]


def run_ray_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    run_config: dict[str, str | int | float | bool],
    app_dir: str,
    backend_config: dict[str, Any],
    seed: int,
    verbose: bool = False,
) -> None:
    """Simulate ``num_supernodes`` nodes running ``client_app`` under ``server_app``.

    Parameters
    ----------
    server_app, client_app
        The apps (the very objects a deployment uses).
    num_supernodes : int
        Number of simulated nodes.
    run_config : dict
        Flower ``run_config`` both apps receive.
    app_dir : str
        The Flower app project folder (its ``pyproject.toml``).
    backend_config : dict
        Ray backend settings (``client_resources``, ``init_args``).
    seed : int
        Seeds the run id and the primary task id.
    verbose : bool
        Flower's verbose logging.
    """
    rng = random.Random(seed)
    run = Run.create_empty(run_id=rng.randrange(1, 2**62))
    run.primary_task_id = rng.randrange(1, 2**62)
    run.federation_id = NOOP_FEDERATION_ID
    run.fab_id = "consilia/consilia-run"
    run.fab_version = "0.1.0"
    run.override_config = dict(run_config)
    set_coordinator_task(run.run_id)  # as Flower's own Python entry point does
    context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
        run_config=dict(run_config),
    )
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=app_dir,
        run=run,
        is_app=True,
        verbose_logging=verbose,
    )
