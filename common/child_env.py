"""Environment for the child processes Consilia starts (SuperLink, SuperNode, ClientApp)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["FLOWER_TRANSFER_DEFAULTS", "child_env"]

#: Flower moves a message's arrays as separate objects, two requests at a time by default;
#: eight in flight cut the per-message transfer time of a small model on loopback (see
#: docs/deployment.md). Set in the environment to override.
FLOWER_TRANSFER_DEFAULTS = {
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8",
}


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
