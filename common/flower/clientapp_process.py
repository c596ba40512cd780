"""The Flower runtime calls of a long-lived ClientApp process (what ``flwr-clientapp`` does).

A SuperNode started with ``--isolation process`` offers its tasks on a local runtime API
and lets an outside process execute them. Flower 1.42 has no public API for that process:
``flwr-clientapp`` and ``flower-superexec`` use internal runtime clients, protobuf requests
and helpers. This module wraps exactly those calls for
:mod:`consilia.client.site.worker`, which keeps its own logic (app approval, logging,
outcomes) free of Flower internals:

- :class:`TaskAcquirer` asks the SuperNode for the next task (``AcquireTask``, protected by
  the shared secret);
- :class:`TaskChannel` is one task's connection: heartbeat, the task's input (message,
  context, run id, app bundle), the reply and the task's final status;
- :func:`refusal_reply` / :func:`failure_reply` build Flower's error replies;
- :func:`stop_with_parent` ends the process when the process that started it ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from consilia.common.flower.compat import require_supported_flower
from consilia.common.flower.task_identity import set_task_identity

require_supported_flower()

__all__ = [
    "TaskAcquirer",
    "TaskChannel",
    "TaskInput",
    "failure_reply",
    "refusal_reply",
    "stop_with_parent",
]

#: Runtime API methods the shared secret protects (as in ``flower-superexec``).
_AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})


def _runtime_client(address: str, interceptors: list[Any], retry: Any) -> Any:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=retry,
    )


class TaskAcquirer:
    """Ask a SuperNode's local runtime API for ClientApp tasks.

    Parameters
    ----------
    address : str
        The SuperNode's runtime API, ``127.0.0.1:PORT``.
    secret : bytes, optional
        Shared secret the SuperNode was started with (``--superexec-auth-secret-file``).

    """

    def __init__(self, address: str, secret: bytes | None = None) -> None:
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=_AUTH_METHODS)
            )
        # no retry: the caller's acquire loop backs off itself and stays responsive to stop
        self._client = _runtime_client(address, interceptors, None)
        self._request = AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[]
        )

    def acquire(self) -> str | None:
        """Return the token of the next task, or ``None`` when there is none.

        Raises
        ------
        httpx.HTTPError
            When the SuperNode's runtime API cannot be reached.
        """
        res = self._client.AcquireTask(self._request)
        if res.HasField("task") and res.token:
            return str(res.token)
        return None

    def close(self) -> None:
        """Close the connection."""
        self._client.close()


@dataclass
class TaskInput:
    """What a task brings: its message and context, its run, and the run's app bundle."""

    message: Message
    context: Context
    run_id: int
    fab_content: bytes
    fab_hash: str


class TaskChannel:
    """One task's connection to the SuperNode (``flwr-clientapp``'s runtime calls).

    Creating it opens the connection and starts the task's heartbeat; :meth:`close` stops
    both. A heartbeat the SuperNode rejects (run stopped or expired) sets :attr:`cancelled`
    instead of signalling the process, as ``flwr-clientapp`` would.

    Parameters
    ----------
    address : str
        The SuperNode's runtime API, ``127.0.0.1:PORT``.
    token : str
        The task's token (:meth:`TaskAcquirer.acquire`).

    """

    def __init__(self, address: str, token: str) -> None:
        interceptors: list[Any] = [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ]
        self._client = _runtime_client(address, interceptors, _task_retry_invoker())
        self._cancelled = threading.Event()
        self._heartbeat = HeartbeatSender(_heartbeat_fn(self._client, self._cancelled))
        self._heartbeat.start()

    @property
    def cancelled(self) -> bool:
        """Whether the SuperNode cancelled the task (run stopped or expired)."""
        return self._cancelled.is_set()

    def pull(self) -> TaskInput:
        """Fetch the task's input, retrying its objects after 50 ms instead of 1 s.

        The SuperNode offers a task before it has fetched the message's objects from the
        coordinator; Flower's default back-off then waits a full second for a small model.
        Also records the task as this process's Flower task identity.
        """
        client = self._client
        res = client.PullTaskInput(PullTaskInputRequest())
        set_task_identity(res.task_id, res.run.run_id, res.context.node_id)
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        pulled = client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("no message received from the SuperNode's runtime API")
        node = Node(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(
                client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
            initial_backoff=0.05,
            backoff_cap=0.2,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's own pull does
        return TaskInput(message, context, run.run_id, fab.content, fab.hash_str)

    def push_reply(self, reply: Message, context: Context) -> None:
        """Hand the reply (and the updated context) to the SuperNode."""
        push_message(self._client, reply, context)

    def finish(self, context: Context | None, completed: bool, details: str) -> None:
        """Report the task's end: completed, or failed with ``details``."""
        status = SubStatus.COMPLETED if completed else SubStatus.FAILED
        push_task_output(self._client, context, status, details)

    def close(self) -> None:
        """Stop the heartbeat and close the connection."""
        try:
            if self._heartbeat.is_running:
                self._heartbeat.stop()
        finally:
            self._client.close()


def refusal_reply(message: Message, reason: str) -> Message:
    """Return the error reply of a task refused because of its app bundle."""
    return Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message)


def failure_reply(message: Message, reason: str) -> Message:
    """Return the error reply of a ClientApp that raised (or refused) during the task."""
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
    )


def stop_with_parent(parent_pid: int) -> None:
    """Raise SIGINT in this process when process ``parent_pid`` ends (Flower's monitor)."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(parent_pid)


def _task_retry_invoker() -> RetryInvoker:
    """Retry transient Runtime API trouble for a minute (never signal the process)."""

    def giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in {502, 503, 504}
        return not isinstance(exc, httpx.TransportError)

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=10),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None, max_time=60.0, should_giveup=giveup,
    )


def _heartbeat_fn(client: Any, cancelled: threading.Event) -> Callable[[], bool]:
    """Task heartbeat that flags a cancelled task instead of signalling the process."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in {503, 504}:
                return False
            cancelled.set()
            return True
        if not res.success:
            cancelled.set()
        return True

    return beat
