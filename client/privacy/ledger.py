"""The site's persistent privacy ledger: what each dataset has spent, across rounds, runs, restarts.

:class:`PrivacyLedger` is the accounting API over one JSON file in the site's state directory
(e.g. ``<state-dir>/privacy-ledger.json``; records in
:mod:`~consilia.client.privacy.ledger_records`, reading, atomic writing and the lock in
:mod:`~consilia.client.privacy.ledger_file`).

Rules this module enforces:

- Every change is a read-modify-write under the ledger's lock: the file is re-read first, so
  two processes training on the same data never overwrite each other's spend.
- **Reserve, then train.** :meth:`PrivacyLedger.reserve` composes a round's planned steps
  with everything already spent *and everything other processes have reserved*, under the
  lock, and either refuses the round (``PrivacyBudgetExceeded``) or records the reservation;
  :meth:`PrivacyLedger.record_round` then composes the steps actually taken and drops the
  reservation, and :meth:`PrivacyLedger.release` drops one that took no step. Two processes
  that check "at the same time" therefore cannot both take the last of the budget. A
  reservation whose process died is released by the next reader
  (:mod:`~consilia.client.privacy.reservations`).
- The ledger itself composes a round into the accountant state (Opacus ``accountant.step``),
  so the stored history is always the whole history.
- A dataset keeps the accountant it was first accounted with: opening it under another one
  is refused (its spend cannot be re-composed under a different accountant).

No Flower imports: the site trainer and the ClientApp adapter call this through
:mod:`consilia.client.privacy.controller`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from consilia.client.privacy.accountants import (
    UPPER_BOUND_ACCOUNTANTS,
    AccountantName,
    not_an_upper_bound_reason,
)
from consilia.client.privacy.budget import (
    EPSILON_SLACK,
    PrivacyBudgetExceeded,
    PrivacyConfigError,
)
from consilia.client.privacy.ledger_file import (
    ledger_lock,
    read_ledger_file,
    write_ledger_file,
)
from consilia.client.privacy.ledger_records import (
    AccountantState,
    LedgerEntry,
    LedgerFile,
    RoundRecord,
    RunCalibration,
    accountant_from_state,
    epsilon_of,
    format_delta,
    utc_now,
)
from consilia.client.privacy.reservations import Reservation, is_stale, new_reservation

__all__ = ["PrivacyLedger"]

log = logging.getLogger(__name__)

_EXPLAINER = (
    "Epsilon (ε) bounds how much any single patient's record can change what the models "
    "trained here reveal: smaller is more private. δ is the small probability that the bound "
    "does not hold. Every training round spends some ε; the accountant composes the spends "
    "exactly (they grow more slowly than a plain sum) across rounds, federated runs and "
    "restarts, and once a "
    "dataset's budget is spent this site refuses to train on it."
)

RecordKind = Literal["train", "feature-statistics"]


def _what(kind: RecordKind, steps: int, noise_multiplier: float) -> str:
    if kind == "feature-statistics":
        return f"sending noised feature statistics (noise multiplier {noise_multiplier:g})"
    return f"one more round ({steps} DP-SGD steps)"


def _refusal(kind: RecordKind) -> str:
    if kind == "feature-statistics":
        return "this site does not send them"
    return "this site refuses to train"


class PrivacyLedger:
    """The site's privacy ledger, one JSON file.

    Parameters
    ----------
    path : Path
        The ledger file; created on the first :meth:`save`. Its folder must be the site's
        persistent state directory (not a temporary or per-run folder).

    Raises
    ------
    LedgerCorruptError
        If the file exists but is unreadable or inconsistent (never silently reset).

    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._data = LedgerFile()
        if self.path.exists():
            self.load()

    # -- persistence ----------------------------------------------------------------------

    def load(self) -> None:
        """Re-read the file (a missing file is an empty ledger).

        Raises
        ------
        LedgerCorruptError
            If the file cannot be parsed or fails validation.

        """
        self._data = read_ledger_file(self.path)

    def save(self) -> None:
        """Write the ledger atomically (temporary file in the same folder, fsync, rename)."""
        with ledger_lock(self.path):
            write_ledger_file(self.path, self._data)

    def _store(self, entry: LedgerEntry) -> LedgerEntry:
        """Validate ``entry`` as a whole, put it in the ledger and write the file (locked)."""
        entry = LedgerEntry.model_validate(entry.model_dump())
        self._data.entries[entry.dataset_key] = entry
        write_ledger_file(self.path, self._data)
        return entry

    # -- entries --------------------------------------------------------------------------

    def __contains__(self, dataset_key: object) -> bool:
        return dataset_key in self._data.entries

    def keys(self) -> list[str]:
        """Dataset keys with an entry."""
        return list(self._data.entries)

    def get(self, dataset_key: str) -> LedgerEntry | None:
        """Return the entry for ``dataset_key`` (``None`` if never trained on)."""
        return self._data.entries.get(dataset_key)

    def entry(self, dataset_key: str) -> LedgerEntry:
        """Return the entry for ``dataset_key``.

        Raises
        ------
        KeyError
            If the ledger has no entry for this key.

        """
        try:
            return self._data.entries[dataset_key]
        except KeyError:
            raise KeyError(
                f"privacy ledger {self.path} has no entry for dataset '{dataset_key}' "
                f"(known: {', '.join(self._data.entries) or 'none'})"
            ) from None

    def open_entry(
        self, dataset_key: str, *, accountant: AccountantName, delta: float, target_epsilon: float
    ) -> LedgerEntry:
        """Return the entry for ``dataset_key``, creating (and saving) it on first use.

        An existing entry keeps its spend. Its budget follows the site's current policy
        (``target_epsilon``); its delta only ever tightens (a smaller delta re-evaluates the
        spend from the stored history, a larger one is ignored).

        Raises
        ------
        PrivacyConfigError
            If the entry exists under another accountant than ``accountant``.

        """
        with ledger_lock(self.path):
            self._data = read_ledger_file(self.path)
            now = utc_now()
            entry = self._data.entries.get(dataset_key)
            if entry is None:
                entry = LedgerEntry(
                    dataset_key=dataset_key,
                    accountant=accountant,
                    delta=delta,
                    target_epsilon=target_epsilon,
                    accountant_state=AccountantState(mechanism=accountant),
                    created=now,
                    updated=now,
                )
                self._data.entries[dataset_key] = entry
            else:
                if entry.accountant != accountant:
                    raise PrivacyConfigError(self._accountant_mismatch(entry, accountant))
                if delta < entry.delta:
                    entry.delta = delta
                    entry.epsilon_spent = epsilon_of(entry.accountant_state, delta)
                entry.target_epsilon = target_epsilon
                entry.updated = now
            write_ledger_file(self.path, self._data)
            return entry

    def _accountant_mismatch(self, entry: LedgerEntry, accountant: str) -> str:
        if entry.accountant in UPPER_BOUND_ACCOUNTANTS:
            fix = (f"set policy.dp.accountant: {entry.accountant} in the site configuration "
                   "(a spend cannot be re-composed under another accountant)")
        else:
            fix = (f"{not_an_upper_bound_reason(entry.accountant)}; an operator must review "
                   "this dataset's recorded spend (e.g. recompute it with the RDP accountant "
                   "from its rounds) before it trains again")
        return (
            f"privacy ledger {self.path}: dataset '{entry.dataset_key}' is accounted with the "
            f"'{entry.accountant}' accountant but this site accounts with '{accountant}'; {fix}"
        )

    def record_calibration(self, dataset_key: str, calibration: RunCalibration) -> None:
        """Store the noise calibration of one run (first writer wins on a race)."""
        with ledger_lock(self.path):
            self._data = read_ledger_file(self.path)
            entry = self.entry(dataset_key)
            entry.calibrations.setdefault(calibration.run_id, calibration)
            entry.updated = utc_now()
            write_ledger_file(self.path, self._data)

    # -- reserve, then train --------------------------------------------------------------

    def live_reservations(self, dataset_key: str) -> list[Reservation]:
        """Reservations of ``dataset_key`` whose process still runs (as last read; no write)."""
        entry = self.get(dataset_key)
        return [] if entry is None else [r for r in entry.reservations if not is_stale(r)]

    def _drop_stale(self, entry: LedgerEntry) -> LedgerEntry:
        stale = [r for r in entry.reservations if is_stale(r)]
        for r in stale:
            log.warning(
                "privacy ledger %s: released the reservation of %d DP steps for run %s round "
                "%d made by process %d on %s at %s, which is gone", self.path, r.steps,
                r.run_id, r.server_round, r.pid, r.host, r.created,
            )
        if not stale:
            return entry
        return entry.model_copy(update={
            "reservations": [r for r in entry.reservations if r not in stale]})

    def reserve(
        self,
        dataset_key: str,
        *,
        run_id: str,
        server_round: int,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        kind: RecordKind = "train",
        run_epsilon_cap: float | None = None,
    ) -> Reservation:
        """Reserve a round's planned spend atomically, or refuse it (reserve, then train).

        Under the lock, the file is re-read, reservations of processes that are gone are
        released, and the planned ``steps`` are composed with the whole history and every
        live reservation. The round is refused if the dataset's lifetime epsilon would
        exceed its budget, or (``run_epsilon_cap``) the run's own epsilon its request.

        Parameters
        ----------
        dataset_key : str
            The dataset to train on.
        run_id, server_round
            The federated run and the coordinator's round number.
        steps : int
            Planned DP-SGD steps (accountant steps).
        sample_rate : float
            Poisson sampling rate of the round.
        noise_multiplier : float
            Noise multiplier of the round.
        kind : {"train", "feature-statistics"}
            A DP-SGD round, or a Gaussian release of feature statistics.
        run_epsilon_cap : float, optional
            The epsilon the run asked for (its rounds and reservations must stay within it).

        Returns
        -------
        Reservation
            Pass its ``reservation_id`` to :meth:`record_round` or :meth:`release`.

        Raises
        ------
        PrivacyBudgetExceeded
            If the round does not fit (nothing is reserved).

        """
        with ledger_lock(self.path):
            self._data = read_ledger_file(self.path)
            before = self.entry(dataset_key)
            entry = self._drop_stale(before)
            reservation = new_reservation(
                kind=kind, run_id=run_id, server_round=server_round, steps=steps,
                sample_rate=sample_rate, noise_multiplier=noise_multiplier, created=utc_now(),
            )
            try:
                self._refuse_over_budget(entry, reservation, run_epsilon_cap)
            except PrivacyBudgetExceeded:
                if entry is not before:
                    self._store(entry)  # keep the release of stale reservations
                raise
            return self._store(entry.model_copy(update={
                "reservations": [*entry.reservations, reservation], "updated": utc_now()})
            ).reservations[-1]

    def _refuse_over_budget(
        self, entry: LedgerEntry, reservation: Reservation, run_cap: float | None
    ) -> None:
        mechanism, delta = entry.accountant, entry.delta
        held = [r.history_entry for r in entry.reservations if r.steps]
        planned = [reservation.history_entry] if reservation.steps else []
        what = _what(reservation.kind, reservation.steps, reservation.noise_multiplier)
        with_held = epsilon_of(AccountantState(
            mechanism=mechanism, history=[*entry.accountant_state.history, *held]), delta)
        lifetime = epsilon_of(AccountantState(
            mechanism=mechanism, history=[*entry.accountant_state.history, *held, *planned]),
            delta)
        if lifetime > entry.target_epsilon + EPSILON_SLACK:
            others = (
                f" (ε={with_held:.3f} with the {len(held)} round(s) other processes have "
                "reserved)" if held else ""
            )
            raise PrivacyBudgetExceeded(
                f"dataset '{entry.dataset_key}': {what} would raise the spend from "
                f"ε={entry.epsilon_spent:.3f}{others} to ε={lifetime:.3f}, over the site's "
                f"budget ε={entry.target_epsilon:.3f} (δ={format_delta(delta)}, {mechanism}); "
                f"{_refusal(reservation.kind)}"
            )
        if run_cap is None:
            return
        run_held = [r.history_entry for r in entry.reservations
                    if r.run_id == reservation.run_id and r.steps]
        run_eps = epsilon_of(AccountantState(mechanism=mechanism, history=[
            *entry.run_history(reservation.run_id).history, *run_held, *planned]), delta)
        if run_eps > run_cap + EPSILON_SLACK:
            cal = entry.calibrations.get(reservation.run_id)
            plan = f" (it planned {cal.total_rounds} rounds)" if cal is not None else ""
            raise PrivacyBudgetExceeded(
                f"dataset '{entry.dataset_key}': {what} would bring run {reservation.run_id} "
                f"to ε={run_eps:.3f}, over the ε={run_cap:.3f} the run asked for{plan}; "
                f"{_refusal(reservation.kind)}"
            )

    def check(
        self,
        dataset_key: str,
        *,
        run_id: str,
        server_round: int,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        run_epsilon_cap: float | None = None,
    ) -> None:
        """Run the test of :meth:`reserve` on the file as last read, without reserving.

        Live reservations of other processes count; only :meth:`reserve` protects against a
        process that reserves after this check.

        Raises
        ------
        PrivacyBudgetExceeded
            If the round would not fit (see :meth:`reserve`).

        """
        entry = self.entry(dataset_key)
        entry = entry.model_copy(update={"reservations": self.live_reservations(dataset_key)})
        planned = new_reservation(
            kind="train", run_id=run_id, server_round=server_round, steps=steps,
            sample_rate=sample_rate, noise_multiplier=noise_multiplier, created=utc_now(),
        )
        self._refuse_over_budget(entry, planned, run_epsilon_cap)

    def release(self, dataset_key: str, reservation_id: str) -> None:
        """Drop a reservation that took no step (training failed before it started)."""
        with ledger_lock(self.path):
            self._data = read_ledger_file(self.path)
            entry = self.entry(dataset_key)
            kept = [r for r in entry.reservations if r.reservation_id != reservation_id]
            if len(kept) != len(entry.reservations):
                self._store(entry.model_copy(update={"reservations": kept,
                                                     "updated": utc_now()}))

    def record_round(
        self,
        dataset_key: str,
        *,
        run_id: str,
        server_round: int,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        kind: RecordKind = "train",
        reservation_id: str | None = None,
    ) -> LedgerEntry:
        """Compose one trained round into the ledger and save it (before weights leave the site).

        The file is re-read under the lock first, so a concurrent writer's rounds are kept;
        the round's ``steps`` are then composed with Opacus' own ``accountant.step``, and the
        round's reservation, if any, is dropped.

        Parameters
        ----------
        dataset_key : str
            The dataset trained on.
        run_id : str
            The federated run.
        server_round : int
            The coordinator's round number.
        steps : int
            DP-SGD optimizer steps actually taken (accountant steps).
        sample_rate : float
            Poisson sampling rate the accountant used.
        noise_multiplier : float
            Noise multiplier of the round.
        kind : {"train", "feature-statistics"}
            A DP-SGD round, or a Gaussian release of feature statistics (``steps=1``,
            ``sample_rate=1``).
        reservation_id : str, optional
            The round's reservation (:meth:`reserve`), committed by this call.

        Returns
        -------
        LedgerEntry
            The updated entry (``epsilon_spent`` is the new lifetime total).

        """
        with ledger_lock(self.path):
            self._data = read_ledger_file(self.path)
            entry = self.entry(dataset_key)
            accountant = accountant_from_state(entry.accountant_state)
            for _ in range(int(steps)):
                accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            state, spent = entry.accountant_state, entry.epsilon_spent
            if steps:
                state = AccountantState.from_opacus(accountant.state_dict())
                spent = float(accountant.get_epsilon(delta=entry.delta))
            now = utc_now()
            record = RoundRecord(
                kind=kind,
                timestamp=now,
                run_id=str(run_id),
                server_round=int(server_round),
                steps=int(steps),
                sample_rate=float(sample_rate),
                noise_multiplier=float(noise_multiplier),
                epsilon_after=spent,
            )
            return self._store(entry.model_copy(update={
                "accountant_state": state,
                "epsilon_spent": spent,
                "rounds": [*entry.rounds, record],
                "reservations": [r for r in entry.reservations
                                 if r.reservation_id != reservation_id],
                "updated": now,
            }))

    # -- reporting ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the whole ledger as JSON-safe data (what the file holds)."""
        return self._data.model_dump(mode="json")

    def to_text(self) -> str:
        """Plain-language explanation of every dataset's spend, for hospital IT."""
        if not self._data.entries:
            return (
                f"Privacy ledger {self.path}: no differentially private training has happened "
                f"at this site yet.\n\n{_EXPLAINER}"
            )
        lines = [f"Privacy ledger {self.path}:"]
        lines += [f"- {entry.to_text()}" for entry in self._data.entries.values()]
        return "\n".join(lines) + f"\n\n{_EXPLAINER}"
