"""A Flower ``Grid`` whose nodes are ClientApp calls in this process (no Ray, no network).

:class:`InProcessGrid` hands each instruction to the ClientApp of the addressed node
directly, one node after the other. Messages still go through Flower's wire format both
ways (:func:`~consilia.common.flower.wire_format.over_the_wire`), so the ClientApp receives
— and the ServerApp gets back — exactly what Flower would transmit; a ClientApp exception
becomes an error reply, as in Flower's simulation engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from consilia.common.constants import NodeConfigKey
from consilia.common.flower.compat import require_supported_flower
from consilia.common.flower.wire_format import over_the_wire, set_message_id

require_supported_flower()

__all__ = ["CLIENT_APP_RAISED_EXCEPTION", "InProcessGrid"]

#: Flower's error code for "the ClientApp raised an exception".
CLIENT_APP_RAISED_EXCEPTION = 1


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
        run_config: dict[str, Any],
        num_nodes: int,
        seed: int = 0,
        on_reply: Callable[[Message], None] | None = None,
    ) -> None:
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

    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in."""
        self._run = run

    @property
    def run(self) -> Run:
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
            set_message_id(msg, str(uuid4()))
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
        received = over_the_wire(msg)
        try:
            reply = self._app(received, context)
        except Exception as exc:  # noqa: BLE001 - as Flower's engine: an error reply
            reply = Message(
                Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                reply_to=received,
            )
        set_message_id(reply, str(uuid4()))
        if self._on_reply is not None:
            self._on_reply(reply)
        return over_the_wire(reply)
