"""The site's persistent privacy ledger: what each dataset has spent, across rounds, runs, restarts.

One JSON file in the site's state directory (e.g. ``<state-dir>/privacy-ledger.json``) holds,
per *dataset key* (a stable name of the training data, see :func:`fingerprint_arrays`):

- the accountant (``rdp``/``prv``/``gdp``) and the delta the epsilon is reported at;
- the Opacus accountant state (``accountant.state_dict()``: a list of
  ``(noise_multiplier, sample_rate, steps)`` plus the mechanism name) — the exact history that
  lets the next round, run or process continue the composition instead of starting over;
- epsilon spent so far and the site's budget (target epsilon);
- one record per trained round (UTC time, run id, server round, DP-SGD steps, sample rate,
  noise multiplier, epsilon after the round) and the noise calibration of each run.

Rules this module enforces:

- The file is written atomically (temporary file, ``fsync``, ``os.replace``) after every round,
  under an advisory lock, and :meth:`PrivacyLedger.record_round` re-reads the file before it
  composes, so two processes training on the same data never overwrite each other's spend.
- The ledger itself composes a round into the accountant state (Opacus ``accountant.step``),
  so the stored history is always the whole history.
- A missing file is a fresh ledger; an unreadable, truncated or inconsistent file raises
  :class:`LedgerCorruptError` and is never reset: resetting it would silently reset the privacy
  budget, so the site refuses to train until an operator restores the file.

No Flower imports: the site trainer and the ClientApp adapter call this through
:mod:`consilia.client.privacy.controller`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from consilia.common.config import format_validation_error

try:  # advisory locking is POSIX-only; sites run Linux (Docker/systemd)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX fallback: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LEDGER_FORMAT",
    "AccountantName",
    "AccountantState",
    "LedgerCorruptError",
    "LedgerEntry",
    "PrivacyLedger",
    "RoundRecord",
    "RunCalibration",
    "accountant_from_state",
    "epsilon_of",
    "fingerprint_arrays",
    "format_delta",
    "utc_now",
]

LEDGER_FORMAT = "consilia-privacy-ledger-v1"
AccountantName = Literal["rdp", "prv", "gdp"]

_ACCOUNTANT_WORDS = {
    "rdp": "RDP (Rényi DP) accountant",
    "prv": "PRV accountant",
    "gdp": "GDP (Gaussian DP) accountant",
}


class LedgerCorruptError(RuntimeError):
    """The ledger file exists but cannot be trusted; training must stop until it is restored."""


def utc_now() -> str:
    """Return the current time as a UTC ISO-8601 string (``2025-01-31T12:00:00+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def fingerprint_arrays(*arrays: Any) -> str:
    """Return a short SHA-256 fingerprint of numpy arrays (a dataset key for simulations).

    Prefer a stable, operator-chosen name (e.g. ``"chest-xray-2024"``) for real sites: a
    fingerprint changes when a single image is added, which would open a *fresh* budget for
    the patients already in the data.
    """
    digest = hashlib.sha256()
    for arr in arrays:
        digest.update(str(getattr(arr, "dtype", "")).encode())
        digest.update(str(getattr(arr, "shape", "")).encode())
        digest.update(memoryview(arr.tobytes() if hasattr(arr, "tobytes") else bytes(arr)))
    return "sha256:" + digest.hexdigest()[:16]


def format_delta(delta: float) -> str:
    """Short scientific form of a delta, e.g. ``1e-5`` or ``2.5e-6``."""
    text = f"{delta:.2g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AccountantState(_Strict):
    """Opacus accountant state in JSON form (``history`` entries become lists in JSON)."""

    mechanism: AccountantName
    history: list[tuple[float, float, int]] = Field(default_factory=list)

    @property
    def total_steps(self) -> int:
        """DP-SGD steps composed so far."""
        return sum(steps for _, _, steps in self.history)

    def to_opacus(self) -> OrderedDict[str, Any]:
        """Return the ``state_dict`` Opacus' ``IAccountant.load_state_dict`` expects (tuples)."""
        return OrderedDict(
            history=[(float(s), float(q), int(n)) for s, q, n in self.history],
            mechanism=self.mechanism,
        )

    @classmethod
    def from_opacus(cls, state: Any) -> AccountantState:
        """Convert ``accountant.state_dict()`` (tuples, OrderedDict) to the JSON-safe form."""
        return cls(
            mechanism=state["mechanism"],
            history=[(float(s), float(q), int(n)) for s, q, n in state["history"]],
        )


def accountant_from_state(state: AccountantState) -> IAccountant:
    """Create an Opacus accountant and load ``state`` into it (an empty state stays empty)."""
    accountant = create_accountant(mechanism=state.mechanism)
    if state.history:
        accountant.load_state_dict(state.to_opacus())
    return accountant


def epsilon_of(state: AccountantState, delta: float) -> float:
    """Epsilon of an accountant state at ``delta`` (0 for an empty history)."""
    if not state.history:
        return 0.0
    return float(accountant_from_state(state).get_epsilon(delta=delta))


class RoundRecord(_Strict):
    """One trained round (or one DP release of feature statistics) composed into the ledger."""

    kind: Literal["train", "feature-statistics"] = Field(
        "train", description="a DP-SGD round, or a Gaussian release of per-class feature "
        "statistics for classifier calibration (one step at sampling rate 1)"
    )
    timestamp: str
    run_id: str
    server_round: int
    steps: int = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(ge=0)
    epsilon_after: float = Field(ge=0)


class RunCalibration(_Strict):
    """The noise chosen once for a whole run (cached so a restarted site keeps the same noise)."""

    run_id: str
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps_per_epoch: int = Field(ge=1)
    local_epochs: int = Field(ge=1)
    total_rounds: int = Field(ge=1)
    n_samples: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    requested_epsilon: float = Field(gt=0, description="the coordinator's per-run request")
    budget_epsilon: float = Field(gt=0, description="the site's lifetime budget at calibration")
    delta: float = Field(gt=0, lt=1)
    accountant: AccountantName
    spent_before_run: float = Field(ge=0)
    planned_epsilon: float = Field(ge=0, description="projected lifetime epsilon at run end")
    planned_run_epsilon: float = Field(ge=0, description="projected epsilon of this run alone")
    reserved_release_noise: float | None = Field(
        None, gt=0, description="noise multiplier of the feature-statistics release the run's "
        "budget was planned to include (classifier calibration), if any"
    )
    created: str

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps one full round takes."""
        return self.steps_per_epoch * self.local_epochs


class LedgerEntry(_Strict):
    """Everything the site knows about the privacy spent on one dataset."""

    dataset_key: str
    accountant: AccountantName
    delta: float = Field(gt=0, lt=1)
    target_epsilon: float = Field(gt=0, description="the site's budget")
    epsilon_spent: float = Field(0.0, ge=0)
    accountant_state: AccountantState
    rounds: list[RoundRecord] = Field(default_factory=list)
    calibrations: dict[str, RunCalibration] = Field(default_factory=dict)
    created: str
    updated: str

    @model_validator(mode="after")
    def _consistent(self) -> LedgerEntry:
        if self.accountant_state.mechanism != self.accountant:
            raise ValueError(
                f"accountant '{self.accountant}' but the stored state is of "
                f"'{self.accountant_state.mechanism}'"
            )
        recorded = sum(r.steps for r in self.rounds)
        if recorded != self.accountant_state.total_steps:
            raise ValueError(
                f"round records sum to {recorded} steps but the accountant history holds "
                f"{self.accountant_state.total_steps}"
            )
        return self

    @property
    def rounds_taken(self) -> int:
        """Number of trained rounds recorded."""
        return sum(1 for r in self.rounds if r.kind == "train")

    @property
    def statistics_releases(self) -> int:
        """Number of DP releases of feature statistics recorded."""
        return sum(1 for r in self.rounds if r.kind == "feature-statistics")

    @property
    def runs(self) -> list[str]:
        """Distinct run ids that trained on this dataset, in order of first appearance."""
        return list(dict.fromkeys(r.run_id for r in self.rounds))

    @property
    def remaining_epsilon(self) -> float:
        """Budget left (never negative)."""
        return max(self.target_epsilon - self.epsilon_spent, 0.0)

    def run_history(self, run_id: str) -> AccountantState:
        """Return the accountant history of one run alone (not the lifetime total)."""
        state = AccountantState(mechanism=self.accountant)
        accountant = create_accountant(mechanism=self.accountant)
        for record in self.rounds:
            if record.run_id == run_id:
                for _ in range(record.steps):
                    accountant.step(
                        noise_multiplier=record.noise_multiplier, sample_rate=record.sample_rate
                    )
        if len(accountant.history):
            state = AccountantState.from_opacus(accountant.state_dict())
        return state

    def to_text(self) -> str:
        """Plain-language summary of this dataset's spend, for hospital IT."""
        runs = self.runs
        words = _ACCOUNTANT_WORDS[self.accountant]
        text = (
            f"Dataset '{self.dataset_key}': this site has spent ε={self.epsilon_spent:.2f} of its "
            f"ε={self.target_epsilon:.2f} budget (δ={format_delta(self.delta)}, {words}) over "
            f"{self.rounds_taken} round{'s' if self.rounds_taken != 1 else ''} in {len(runs)} "
            f"run{'s' if len(runs) != 1 else ''}; ε={self.remaining_epsilon:.2f} remains."
        )
        if self.statistics_releases:
            text += (
                f" It includes {self.statistics_releases} noised release"
                f"{'s' if self.statistics_releases != 1 else ''} of per-class feature "
                "statistics (classifier calibration)."
            )
        trained = [r for r in self.rounds if r.kind == "train"]
        if trained:
            last = trained[-1]
            text += (
                f" Last round: run {last.run_id}, round {last.server_round} at {last.timestamp}, "
                f"{last.steps} DP-SGD steps with noise multiplier {last.noise_multiplier:.3f} "
                f"and sampling rate {last.sample_rate:.4g}."
            )
        if self.epsilon_spent >= self.target_epsilon:
            text += " The budget is used up: this site refuses further training on this dataset."
        return text


class _LedgerFile(_Strict):
    format: Literal["consilia-privacy-ledger-v1"] = LEDGER_FORMAT
    entries: dict[str, LedgerEntry] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys_match(self) -> _LedgerFile:
        for key, entry in self.entries.items():
            if entry.dataset_key != key:
                raise ValueError(f"entry '{key}' carries dataset_key '{entry.dataset_key}'")
        return self


_EXPLAINER = (
    "Epsilon (ε) bounds how much any single patient's record can change what the models "
    "trained here reveal: smaller is more private. δ is the small probability that the bound "
    "does not hold. Every training round spends some ε; the accountant composes the spends "
    "exactly (they grow more slowly than a plain sum) across rounds, federated runs and "
    "restarts, and once a "
    "dataset's budget is spent this site refuses to train on it."
)


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
        self._data = _LedgerFile()
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
        if not self.path.exists():
            self._data = _LedgerFile()
            return
        self._data = self._read()

    def _read(self) -> _LedgerFile:
        refuse = (
            "training is refused because starting a new ledger would silently reset the "
            "privacy budget; restore the file from a backup (or, if this data has never "
            "been used for training, move the file away deliberately)"
        )
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerCorruptError(
                f"privacy ledger {self.path}: unreadable ({exc}); {refuse}"
            ) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerCorruptError(
                f"privacy ledger {self.path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                f"{refuse}"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != LEDGER_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise LedgerCorruptError(
                f"privacy ledger {self.path}: expected format '{LEDGER_FORMAT}', found "
                f"{found!r}; {refuse}"
            )
        try:
            return _LedgerFile.model_validate(raw)
        except ValidationError as exc:
            detail = format_validation_error(exc, f"privacy ledger {self.path}")
            raise LedgerCorruptError(f"{detail}\n{refuse}") from None

    def save(self) -> None:
        """Write the ledger atomically (temporary file in the same folder, fsync, rename)."""
        with self._lock():
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self._data.model_dump(mode="json"), indent=2, ensure_ascii=False)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

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

        An existing entry keeps its accountant and its spend. Its budget follows the site's
        current policy (``target_epsilon``); its delta only ever tightens (a smaller delta
        re-evaluates the spend from the stored history, a larger one is ignored).
        """
        with self._lock():
            if self.path.exists():
                self._data = self._read()
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
                if delta < entry.delta:
                    entry.delta = delta
                    entry.epsilon_spent = epsilon_of(entry.accountant_state, delta)
                entry.target_epsilon = target_epsilon
                entry.updated = now
            self._write()
            return entry

    def record_calibration(self, dataset_key: str, calibration: RunCalibration) -> None:
        """Store the noise calibration of one run (first writer wins on a race)."""
        with self._lock():
            if self.path.exists():
                self._data = self._read()
            entry = self.entry(dataset_key)
            entry.calibrations.setdefault(calibration.run_id, calibration)
            entry.updated = utc_now()
            self._write()

    def record_round(
        self,
        dataset_key: str,
        *,
        run_id: str,
        server_round: int,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        kind: Literal["train", "feature-statistics"] = "train",
    ) -> LedgerEntry:
        """Compose one trained round into the ledger and save it (before weights leave the site).

        The file is re-read under the lock first, so a concurrent writer's rounds are kept;
        the round's ``steps`` are then composed with Opacus' own ``accountant.step``.

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

        Returns
        -------
        LedgerEntry
            The updated entry (``epsilon_spent`` is the new lifetime total).

        """
        with self._lock():
            if self.path.exists():
                self._data = self._read()
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
            entry = LedgerEntry.model_validate(
                {
                    **entry.model_dump(),
                    "accountant_state": state,
                    "epsilon_spent": spent,
                    "rounds": [*entry.rounds, record],
                    "updated": now,
                }
            )
            self._data.entries[dataset_key] = entry
            self._write()
            return entry

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
