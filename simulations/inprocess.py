"""Run the real ServerApp and ClientApp in one process, without Ray (benchmarks, audits).

:class:`InProcessGrid` is a Flower ``Grid`` that hands each instruction to the ClientApp of
the addressed node directly, one node after the other. Messages still go through Flower's
wire format both ways (``message_to_proto`` / ``message_from_proto``), so the ClientApp
receives — and the ServerApp gets back — exactly what Flower would transmit; a ClientApp
exception becomes an error reply, as in Flower's simulation engine.

What it saves is Ray's start-up and actor overhead (about 30 s per run on a loaded 2-core
machine), which matters when a benchmark runs a dozen short federations.
:func:`run_inprocess_simulation` takes the same arguments as
:func:`consilia.simulations.flower_sim.run_flower_simulation`; the run directory it writes is
the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp

from consilia.common.config import RunConfig, SimulationConfig
from consilia.common.constants import NodeConfigKey, RunConfigKey

__all__ = ["InProcessGrid", "run_inprocess_simulation"]

#: Flower's error code for "the ClientApp raised an exception".
CLIENT_APP_RAISED_EXCEPTION = 1


def _over_the_wire(msg: Message) -> Message:
    """Return the message as the receiver sees it (serialised and parsed back)."""
    return message_from_proto(message_to_proto(msg))


class InProcessGrid(Grid):
    """A Flower Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    run_id : int
        Flower run id (``context.run_id`` of every node).
    run_config : dict
        Flower ``run_config`` given to every node.
    num_nodes : int
        Number of nodes; node ``i`` gets ``node_config = {"partition-id": i,
        "num-partitions": num_nodes}``.
    seed : int
        Seeds the node ids.
    on_reply : callable, optional
        ``f(reply)`` for every reply as it left the node (e.g. a message audit).

    """

    def __init__(
        self,
        client_app: ClientApp,
        run_id: int,
        run_config: dict,
        num_nodes: int,
        seed: int = 0,
        on_reply: Callable[[Message], None] | None = None,
    ) -> None:
        from flwr.supercore.run import Run

        rng = random.Random(seed)
        self._app = client_app
        self._on_reply = on_reply
        self._run = Run.create_empty(run_id=run_id)
        self._contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            node_id = rng.randrange(1, 2**63)
            self._contexts[node_id] = Context(
                run_id=run_id, node_id=node_id,
                node_config={NodeConfigKey.PARTITION_ID.value: pid,
                             NodeConfigKey.NUM_PARTITIONS.value: num_nodes},
                state=RecordDict(), run_config=dict(run_config),
            )
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run
        """Set the run this grid operates in."""
        self._run = run

    @property
    def run(self):  # noqa: ANN201 - Flower's Run
        """The run."""
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction message (Flower's deprecated helper, kept for the ABC)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Return the node ids."""
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now; return the message ids."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            self._replies[msg.metadata.message_id] = self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return (once) the replies to ``message_ids``."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver ``messages`` and return every reply (``timeout`` is not needed here)."""
        del timeout
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message:
        context = self._contexts[msg.metadata.dst_node_id]
        received = _over_the_wire(msg)
        try:
            reply = self._app(received, context)
        except Exception as exc:  # noqa: BLE001 - as Flower's engine: an error reply
            reply = Message(
                Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                reply_to=received,
            )
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        if self._on_reply is not None:
            self._on_reply(reply)
        return _over_the_wire(reply)


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
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    if client_app is None:
        from consilia.client.app import app as client_app
    if server_app is None:
        from consilia.server.app import app as server_app
    sim = sim or SimulationConfig()
    run_config: dict[str, str | int | float | bool] = {
        RunConfigKey.CONFIG_JSON.value: run.model_dump_json(),
        RunConfigKey.RUN_DIR.value: str(Path(run_dir).resolve()),
        RunConfigKey.SIM_SITES_DIR.value: str(Path(sites_dir).resolve()),
        "consilia-sim-threads": sim.threads_per_client,
    }
    run_id = random.Random(run.seed).randrange(1, 2**62)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    grid = InProcessGrid(client_app, run_id, run_config, num_sites, seed=run.seed,
                         on_reply=on_reply)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    server_app(grid, context)
