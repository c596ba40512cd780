"""Where a deployed run's directory is, told to the ServerApp without telling the sites.

Flower gives a run's config (``context.run_config``) and its app bundle to the ServerApp and
to every site's ClientApp alike, so a deployed run must not carry the coordinator's
run-directory path there. ``fl-server run`` records the path in the coordinator's state
directory under a random token (``<state>/run-dirs/<token>``, owner-only) and puts only the
token in the run config (:data:`RUN_DIR_TOKEN_KEY`). The ServerApp runs under the SuperLink,
whose environment names the state directory (``$CONSILIA_COORDINATOR_HOME``, set by
``fl-server start``), and reads the path back (:func:`run_dir_from_run_config`).
Simulations keep the plain path (``RunConfigKey.RUN_DIR``): their sites are this machine.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from consilia.common.constants import RunConfigKey
from consilia.server.control.state_dir import (
    STATE_ENV,
    default_state_dir,
    ensure_private_dir,
    write_private_text,
)

__all__ = [
    "RUN_DIR_TOKEN_KEY",
    "RunDirLookupError",
    "register_run_dir",
    "run_dir_from_run_config",
]

#: Run-config key of a deployed run: an opaque token, not a path.
RUN_DIR_TOKEN_KEY = RunConfigKey.RUN_DIR_TOKEN.value
_TOKEN = re.compile(r"^[0-9a-f]{32}$")


class RunDirLookupError(RuntimeError):
    """The ServerApp cannot find the run directory registered for its token."""


def _run_dirs(state_dir: Path) -> Path:
    return Path(state_dir) / "run-dirs"


def register_run_dir(state_dir: Path, run_dir: Path) -> str:
    """Record ``run_dir`` in the coordinator's state directory; return its token."""
    token = secrets.token_hex(16)
    folder = ensure_private_dir(_run_dirs(state_dir))
    ensure_private_dir(Path(state_dir))
    write_private_text(folder / token, str(Path(run_dir).resolve()))
    return token


def run_dir_from_run_config(run_config: Mapping[str, object]) -> Path:
    """Return the run directory of the run whose config is ``run_config`` (ServerApp side).

    A deployed run's token is looked up in ``$CONSILIA_COORDINATOR_HOME`` (else
    ``~/.consilia/coordinator``); a simulated run names its directory; otherwise
    ``runs/latest``.

    Raises
    ------
    RunDirLookupError
        If the token is malformed or not registered in the state directory.

    """
    token = run_config.get(RUN_DIR_TOKEN_KEY)
    if token:
        token = str(token)
        state = default_state_dir()
        if not _TOKEN.match(token):
            raise RunDirLookupError(f"run config '{RUN_DIR_TOKEN_KEY}' is not a run token; "
                                    "launch deployed runs with fl-server run")
        path = _run_dirs(state) / token
        if not path.is_file():
            where = os.environ.get(STATE_ENV, "not set")
            raise RunDirLookupError(
                f"{path} not found (${STATE_ENV}: {where}): start the coordinator and launch "
                "the run with the same --state-dir"
            )
        return Path(path.read_text().strip())
    return Path(str(run_config.get(RunConfigKey.RUN_DIR.value) or "runs/latest"))
