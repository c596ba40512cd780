"""Flower's process-wide task identity (``flwr.supercore.task_identity.TaskIdentity``).

Flower 1.42 keeps the task, run and node of the current process in class attributes that
its own entry points set before running an app; Consilia's own entry points (the site's
ClientApp process, the in-process and Ray simulations) set them the same way, and the site
reads the run id of the task it executes.
"""

from __future__ import annotations

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from consilia.common.flower.compat import require_supported_flower

require_supported_flower()

__all__ = ["current_run_id", "set_coordinator_task", "set_task_identity"]


def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """Record the task this process executes (as Flower's own entry points do).

    Parameters
    ----------
    task_id, run_id, node_id : int
        Flower's ids of the task, its run and the node executing it.
    """
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def set_coordinator_task(run_id: int) -> None:
    """Record a simulated coordinator's task (task 1 of ``run_id`` on the SuperLink node)."""
    set_task_identity(1, run_id, SUPERLINK_NODE_ID)


def current_run_id() -> int | None:
    """Return Flower's run id of the task being executed (``None`` when none is set)."""
    run_id = getattr(TaskIdentity, "run_id", None)
    return int(run_id) if run_id else None
