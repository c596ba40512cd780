"""Run the real ServerApp and ClientApp in one process, without Ray (benchmarks, audits).

The sites are ClientApp calls in this process
(:class:`~consilia.common.flower.inprocess_grid.InProcessGrid`); messages still go through
Flower's wire format both ways, so the ClientApp receives — and the ServerApp gets back —
exactly what Flower would transmit.

What it saves is Ray's start-up and actor overhead (about 30 s per run on a loaded 2-core
machine), which matters when a benchmark runs a dozen short federations.
:func:`run_inprocess_simulation` takes the same arguments as
:func:`consilia.simulations.flower_sim.run_flower_simulation`; the run directory it writes is
the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from consilia.common.config import RunConfig, SimulationConfig
from consilia.common.constants import RunConfigKey
from consilia.common.flower.inprocess_grid import InProcessGrid
from consilia.common.flower.task_identity import set_coordinator_task

__all__ = ["run_inprocess_simulation"]


def run_inprocess_simulation(
    run: RunConfig,
    run_dir: Path,
    sites_dir: Path,
    num_sites: int,
    sim: SimulationConfig | None = None,
    verbose: bool = False,
    client_app: ClientApp | None = None,
    server_app: ServerApp | None = None,
    on_reply: Callable[[Message], None] | None = None,
) -> None:
    """Simulate ``num_sites`` sites running ``run`` in this process; results land in ``run_dir``.

    Parameters
    ----------
    run, run_dir, sites_dir, num_sites, sim, verbose
        As :func:`consilia.simulations.flower_sim.run_flower_simulation` (``verbose`` unused;
        ``sim.threads_per_client`` sets the sites' torch threads).
    client_app, server_app : optional
        Default: Consilia's own (``consilia.client.app:app``, ``consilia.server.app:app``).
    on_reply : callable, optional
        Called with every reply a site sends.

    """
    del verbose
    if client_app is None:
        from consilia.client.app import app as client_app
    if server_app is None:
        from consilia.server.app import app as server_app
    sim = sim or SimulationConfig()
    run_config: dict[str, str | int | float | bool] = {
        RunConfigKey.CONFIG_JSON.value: run.model_dump_json(),
        RunConfigKey.RUN_DIR.value: str(Path(run_dir).resolve()),
        RunConfigKey.SIM_SITES_DIR.value: str(Path(sites_dir).resolve()),
        RunConfigKey.SIM_THREADS.value: sim.threads_per_client,
    }
    run_id = random.Random(run.seed).randrange(1, 2**62)
    set_coordinator_task(run_id)
    grid = InProcessGrid(client_app, run_id, run_config, num_sites, seed=run.seed,
                         on_reply=on_reply)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    server_app(grid, context)
