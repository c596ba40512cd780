"""Environment and lifetime of the child processes Consilia starts (SuperLink, SuperNode, ...).

- :func:`child_env`: the environment (this interpreter's ``bin`` first on PATH, Flower's
  transfer settings);
- :func:`die_with_parent` / :func:`parent_death_preexec`: on Linux a child gets SIGTERM from
  the kernel when the process that started it ends, even by ``kill -9`` (``prctl``'s
  ``PR_SET_PDEATHSIG``), so it cannot linger holding its port and the coordinator's tasks;
- :func:`stop_process_group`: SIGTERM to a child's own process group (the child and what it
  started), SIGKILL after a grace period.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "FLOWER_TRANSFER_DEFAULTS",
    "PARENT_DEATH_SIGNAL_SUPPORTED",
    "child_env",
    "die_with_parent",
    "parent_death_preexec",
    "stop_process_group",
]

#: Flower moves a message's arrays as separate objects, two requests at a time by default;
#: eight in flight cut the per-message transfer time of a small model on loopback (see
#: docs/deployment.md). Set in the environment to override.
FLOWER_TRANSFER_DEFAULTS = {
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8",
}

_PR_SET_PDEATHSIG = 1
#: Exit status of a child whose parent was already gone when it started (as if SIGTERMed).
_ORPHAN_EXIT_STATUS = 128 + int(signal.SIGTERM)


def _load_prctl() -> Callable[..., int] | None:
    """Return libc's ``prctl`` (looked up before any fork), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None
    return prctl


_PRCTL = _load_prctl()
#: Whether this platform can end a child when its parent dies (Linux ``PR_SET_PDEATHSIG``).
PARENT_DEATH_SIGNAL_SUPPORTED = _PRCTL is not None


def child_env(**extra: str) -> dict[str, str]:
    """Return ``os.environ`` plus ``extra``, with this interpreter's ``bin`` first on PATH.

    Also :data:`FLOWER_TRANSFER_DEFAULTS` where the environment does not set them.

    Flower's SuperLink and SuperNode start helper executables (``flower-superexec``,
    ``flwr-serverapp``, ``flwr-clientapp``) by name; running ``.venv/bin/fl-server`` without
    activating the virtual environment must still find the ones installed beside it.
    """
    env = {**FLOWER_TRANSFER_DEFAULTS, **os.environ}
    bin_dir = str(Path(sys.executable).parent)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *parts])
    env.update(extra)
    return env


def die_with_parent(parent_pid: int) -> None:
    """Make the kernel send SIGTERM to this process when its parent ends (Linux; else no-op).

    Call it in the child, before anything else (``preexec_fn``, see
    :func:`parent_death_preexec`). If the parent is already gone (it died between the fork
    and this call), the process exits at once with status 143. The signal is tied to the
    parent's *thread* that started the child: start children from a thread that lives as
    long as the parent (the main thread).

    Parameters
    ----------
    parent_pid : int
        The pid of the process that started this one.

    """
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(_ORPHAN_EXIT_STATUS)


def parent_death_preexec() -> Callable[[], None]:
    """Return a ``preexec_fn`` that binds the child's life to this process (see above)."""
    return functools.partial(die_with_parent, os.getpid())


def stop_process_group(process: subprocess.Popen[Any], grace_s: float,
                       sweep_s: float = 5.0) -> bool:
    """Stop a child started with ``process_group=0`` and everything it started.

    SIGTERM goes to the child's whole process group; a child that has not ended within
    ``grace_s`` is killed (SIGKILL), as is any member of its group still alive ``sweep_s``
    after the child itself ended.

    Parameters
    ----------
    process : subprocess.Popen
        The child, leader of its own process group.
    grace_s : float
        Seconds the child has to end after SIGTERM.
    sweep_s : float
        Seconds the rest of the group has to end after the child.

    Returns
    -------
    bool
        True if the child ended within the grace period, False if it had to be killed.

    """
    if process.poll() is not None:
        return True
    group = process.pid
    _signal_group(group, signal.SIGTERM)
    clean = True
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        clean = False
        _signal_group(group, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + sweep_s
    while _signal_group(group, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(group, signal.SIGKILL)
    return clean


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to process group ``group``; False if no member is left."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member changed user: not ours to stop
        return False
    return True
