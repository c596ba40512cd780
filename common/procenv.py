"""Environment for the child processes Consilia starts (SuperLink, SuperNode, ClientApp)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["child_env"]


def child_env(**extra: str) -> dict[str, str]:
    """Return ``os.environ`` plus ``extra``, with this interpreter's ``bin`` first on PATH.

    Flower's SuperLink and SuperNode start helper executables (``flower-superexec``,
    ``flwr-serverapp``, ``flwr-clientapp``) by name; running ``.venv/bin/fl-server`` without
    activating the virtual environment must still find the ones installed beside it.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *parts])
    env.update(extra)
    return env
