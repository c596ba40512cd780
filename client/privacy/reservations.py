"""Budget reservations: the epsilon a round holds in the ledger while it trains.

Before a round trains, the privacy controller reserves its planned DP-SGD steps in the ledger,
atomically under the ledger's lock (:meth:`consilia.client.privacy.ledger.PrivacyLedger.reserve`):
the reservation is composed with everything already spent *and everything other processes
have reserved*, and refused if that would exceed the budget. After the round, the steps
actually taken are committed and the reservation removed; on a failure before any step, the
reservation is released.

A process that dies between reserving and committing leaves its reservation behind. So that
it cannot block the budget forever, each reservation carries who made it (host name, process
id, the process's start time) and when; :func:`is_stale` says it no longer holds when its
process is gone (same host: the pid no longer exists, or now belongs to a process started at
another time), or, for a reservation made on another host (a ledger on shared storage),
when it is older than :data:`FOREIGN_RESERVATION_MAX_AGE_S`.

No torch or Opacus import.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "FOREIGN_RESERVATION_MAX_AGE_S",
    "Reservation",
    "is_stale",
    "new_reservation",
    "process_start_ticks",
]

#: A reservation made on another host cannot be checked for a live process; after this many
#: seconds (a day: longer than any round) it is released.
FOREIGN_RESERVATION_MAX_AGE_S = 24 * 3600.0


class Reservation(BaseModel):
    """One round's (or release's) planned spend, held in the ledger until committed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    reservation_id: str = Field(min_length=1)
    kind: Literal["train", "feature-statistics"] = "train"
    run_id: str
    server_round: int
    steps: int = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(ge=0)
    host: str
    pid: int = Field(ge=1)
    process_start: int | None = Field(
        None, description="start time of the process in clock ticks since boot "
        "(/proc/<pid>/stat), so a recycled pid is not mistaken for the reserving process"
    )
    created: str = Field(description="UTC ISO-8601 time of the reservation")

    @property
    def history_entry(self) -> tuple[float, float, int]:
        """The reservation as an Opacus accountant history entry."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (Linux), None where absent."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    return text[text.rfind(")") + 2:].split()


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of process ``pid`` (clock ticks since boot), None if unknown.

    Reads field 22 of ``/proc/<pid>/stat`` (Linux); None where ``/proc`` is absent or the
    process does not exist.
    """
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields is not None else None  # fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, exited but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    fields = _proc_stat(pid)
    return not (fields and fields[0] == "Z")


def new_reservation(
    *,
    kind: Literal["train", "feature-statistics"],
    run_id: str,
    server_round: int,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    created: str,
) -> Reservation:
    """Return a reservation made by this process (random id, host, pid, start time)."""
    pid = os.getpid()
    return Reservation(
        reservation_id=uuid.uuid4().hex,
        kind=kind,
        run_id=str(run_id),
        server_round=int(server_round),
        steps=int(steps),
        sample_rate=float(sample_rate),
        noise_multiplier=float(noise_multiplier),
        host=socket.gethostname(),
        pid=pid,
        process_start=process_start_ticks(pid),
        created=created,
    )


def is_stale(reservation: Reservation, *, now: datetime | None = None) -> bool:
    """Return whether ``reservation`` no longer holds (the process that made it is gone).

    Parameters
    ----------
    reservation : Reservation
        A reservation read from the ledger.
    now : datetime, optional
        The current UTC time (for the age of a reservation made on another host).

    Returns
    -------
    bool
        True when the reserving process has exited (same host), or when a reservation from
        another host is older than :data:`FOREIGN_RESERVATION_MAX_AGE_S`.

    """
    if reservation.host != socket.gethostname():
        created = datetime.fromisoformat(reservation.created)
        age = ((now or datetime.now(UTC)) - created).total_seconds()
        return age > FOREIGN_RESERVATION_MAX_AGE_S
    if not _process_alive(reservation.pid):
        return True
    if reservation.process_start is None:
        return False
    started = process_start_ticks(reservation.pid)
    return started is not None and started != reservation.process_start
