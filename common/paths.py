"""Where data lives: one resolution rule for every entry point.

Order: an explicit path (CLI option / config field) > ``$CONSILIA_DATA_ROOT`` >
``../shared/data`` next to the repository checkout (used by this repository's tests and CI) >
``~/.cache/consilia/data`` (where the real download code puts files).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ROOT_ENV", "resolve_data_root", "repo_shared_data_dir", "default_cache_dir"]

DATA_ROOT_ENV = "CONSILIA_DATA_ROOT"


def repo_shared_data_dir() -> Path:
    """Return ``<checkout>/../shared/data`` (the shared test/benchmark data of this repo)."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_cache_dir() -> Path:
    """Return the per-user cache directory used for downloads and decoded-image caches."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "consilia"


def resolve_data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data root directory.

    Parameters
    ----------
    explicit : path-like, optional
        A path given on the command line or in a config file; wins when set.

    Returns
    -------
    Path
        The first candidate that is set (explicit, env var) or exists (shared data dir);
        otherwise the download cache directory.
    """
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    shared = repo_shared_data_dir()
    if shared.is_dir():
        return shared
    return default_cache_dir() / "data"
