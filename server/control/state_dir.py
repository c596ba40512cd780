"""The coordinator's state directory: where it is, and that only its owner can read it.

It holds the registered sites' keys (``sites.json``), the SuperLink's log and database, the
operator's Flower connection (``flwr/``) and where each run's directory is (``run-dirs/``).
The directory is created ``0700`` and every file in it ``0600``; ``fl-server start`` fixes
looser modes left by an older version and says so.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "STATE_ENV",
    "default_state_dir",
    "ensure_private_dir",
    "open_private_append",
    "secure_state_dir",
    "write_private_text",
]

#: Environment variable naming the state directory; ``fl-server start`` also sets it for the
#: SuperLink, so that the ServerApp it spawns finds the run directories registered there.
STATE_ENV = "CONSILIA_COORDINATOR_HOME"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def default_state_dir() -> Path:
    """``$CONSILIA_COORDINATOR_HOME``, else ``~/.consilia/coordinator``."""
    env = os.environ.get(STATE_ENV)
    return Path(env) if env else Path.home() / ".consilia" / "coordinator"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it ``0700``; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)
    return path


def write_private_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (``0600``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.chmod(PRIVATE_FILE_MODE)  # an older .tmp may have had a looser mode
    tmp.replace(path)


def open_private_append(path: Path) -> int:
    """Open ``path`` for appending (created ``0600``); return the file descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
    os.fchmod(fd, PRIVATE_FILE_MODE)
    return fd


def secure_state_dir(state_dir: Path) -> list[Path]:
    """Make ``state_dir`` ``0700`` and everything in it owner-only; return what was loosened.

    Directories become ``0700``; files lose every group and other permission bit.

    Returns
    -------
    list of Path
        The directories and files whose mode was changed (empty when all were private).

    """
    state_dir = Path(state_dir)
    fixed: list[Path] = []
    existed = state_dir.is_dir()
    if existed and stat.S_IMODE(state_dir.stat().st_mode) & 0o077:
        fixed.append(state_dir)
    ensure_private_dir(state_dir)
    for root, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                path.chmod(PRIVATE_DIR_MODE if path.is_dir() else mode & 0o700)
                fixed.append(path)
    return fixed
