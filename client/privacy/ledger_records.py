"""The privacy ledger's records: the JSON format of one ledger file, validated with pydantic.

One JSON file (format ``consilia-privacy-ledger-v1``, :class:`LedgerFile`) holds, per
*dataset key* (a stable name of the training data, see :func:`fingerprint_arrays`), one
:class:`LedgerEntry`:

- the accountant (``rdp``/``prv``; ``gdp`` only in files written before sites were limited to
  upper-bound accountants) and the delta the epsilon is reported at;
- the Opacus accountant state (:class:`AccountantState`: ``accountant.state_dict()``, a list of
  ``(noise_multiplier, sample_rate, steps)`` plus the mechanism name) — the exact history that
  lets the next round, run or process continue the composition instead of starting over;
- epsilon spent so far and the site's budget (target epsilon);
- one :class:`RoundRecord` per trained round (UTC time, run id, server round, DP-SGD steps,
  sample rate, noise multiplier, epsilon after the round), the noise calibration of each run
  (:class:`RunCalibration`) and the rounds reserved but not yet committed
  (:class:`~consilia.client.privacy.reservations.Reservation`; an empty list in a quiet
  ledger, absent in files written before reservations existed).

An entry validates its own consistency (the round records and the accountant history hold
the same number of steps), so a hand-edited "reset" is detected when the file is read.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Literal

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from pydantic import BaseModel, ConfigDict, Field, model_validator

from consilia.client.privacy.accountants import ACCOUNTANT_WORDS, AccountantName
from consilia.client.privacy.reservations import Reservation

__all__ = [
    "LEDGER_FORMAT",
    "AccountantState",
    "LedgerEntry",
    "LedgerFile",
    "RoundRecord",
    "RunCalibration",
    "accountant_from_state",
    "epsilon_of",
    "fingerprint_arrays",
    "format_delta",
    "utc_now",
]

LEDGER_FORMAT = "consilia-privacy-ledger-v1"


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
    reservations: list[Reservation] = Field(
        default_factory=list, description="rounds reserved and not yet committed (reserve, "
        "then train)"
    )
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
        words = ACCOUNTANT_WORDS[self.accountant]
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


class LedgerFile(_Strict):
    """The whole ledger file: its format tag and one entry per dataset key."""

    format: Literal["consilia-privacy-ledger-v1"] = LEDGER_FORMAT
    entries: dict[str, LedgerEntry] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys_match(self) -> LedgerFile:
        for key, entry in self.entries.items():
            if entry.dataset_key != key:
                raise ValueError(f"entry '{key}' carries dataset_key '{entry.dataset_key}'")
        return self
