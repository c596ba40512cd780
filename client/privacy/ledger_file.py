"""The privacy ledger on disk: strict reading, atomic writing and the cross-process lock.

Rules this module enforces:

- A missing file is a fresh ledger; an unreadable, truncated or inconsistent file raises
  :class:`LedgerCorruptError` and is never reset: resetting it would silently reset the privacy
  budget, so the site refuses to train until an operator restores the file
  (:func:`read_ledger_file`).
- The file is written atomically: temporary file in the same folder, ``fsync``,
  ``os.replace``, then ``fsync`` of the folder (:func:`write_ledger_file`).
- Every read-modify-write holds an advisory ``flock`` on ``<ledger>.lock``
  (:func:`ledger_lock`), so two processes on the same ledger never overwrite each other.

No torch import; the records themselves are :mod:`consilia.client.privacy.ledger_records`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from consilia.client.privacy.ledger_records import LEDGER_FORMAT, LedgerFile
from consilia.common.config import format_validation_error

try:  # advisory locking is POSIX-only; sites run Linux (Docker/systemd)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX fallback: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["LedgerCorruptError", "ledger_lock", "read_ledger_file", "write_ledger_file"]

_REFUSE = (
    "training is refused because starting a new ledger would silently reset the "
    "privacy budget; restore the file from a backup (or, if this data has never "
    "been used for training, move the file away deliberately)"
)


class LedgerCorruptError(RuntimeError):
    """The ledger file exists but cannot be trusted; training must stop until it is restored."""


def read_ledger_file(path: Path) -> LedgerFile:
    """Read and validate the ledger at ``path`` (a missing file is an empty ledger).

    Raises
    ------
    LedgerCorruptError
        If the file is unreadable, not JSON, of another format, or fails validation.

    """
    if not path.exists():
        return LedgerFile()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerCorruptError(f"privacy ledger {path}: unreadable ({exc}); {_REFUSE}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LedgerCorruptError(
            f"privacy ledger {path}: not valid JSON ({exc.msg} at line {exc.lineno}); {_REFUSE}"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != LEDGER_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise LedgerCorruptError(
            f"privacy ledger {path}: expected format '{LEDGER_FORMAT}', found {found!r}; "
            f"{_REFUSE}"
        )
    try:
        return LedgerFile.model_validate(raw)
    except ValidationError as exc:
        detail = format_validation_error(exc, f"privacy ledger {path}")
        raise LedgerCorruptError(f"{detail}\n{_REFUSE}") from None


def write_ledger_file(path: Path, data: LedgerFile) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(data.model_dump(mode="json"), indent=2, ensure_ascii=False)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(payload + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def ledger_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive advisory lock of the ledger at ``path`` (``<path>.lock``)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
