"""A calibrated run's rounds against one dataset's budget: check, reserve, release, commit.

Reserve, then train (:meth:`RoundBudget.reserve`).
    Before each round its planned steps are reserved in the ledger atomically, under the
    ledger's lock: composed with the whole history *and every other process's live
    reservation*, and refused (:class:`~consilia.client.privacy.budget.PrivacyBudgetExceeded`)
    if the lifetime or this run's epsilon would exceed its cap (numerical slack 1e-9). Two
    processes on the same ledger therefore never both take the last of the budget. The
    reservation is committed with the steps actually taken (:meth:`RoundBudget.commit`),
    released if training fails before its first step (:meth:`RoundBudget.release`), and
    released by the next reader if the process dies
    (:mod:`~consilia.client.privacy.reservations`). :meth:`RoundBudget.check` is the same test
    without reserving (read-only).

The :class:`~consilia.client.privacy.controller.PrivacyController` holds one per dataset.
"""

from __future__ import annotations

from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.ledger_records import LedgerEntry, RunCalibration
from consilia.client.privacy.reservations import Reservation

__all__ = ["RoundBudget"]


class RoundBudget:
    """The rounds of one dataset in the site's ledger, and the round reserved now (if any).

    Parameters
    ----------
    ledger : PrivacyLedger
        The site's persistent ledger.
    dataset_key : str
        Stable name of the training data in the ledger.

    """

    def __init__(self, ledger: PrivacyLedger, dataset_key: str) -> None:
        self.ledger = ledger
        self.dataset_key = dataset_key
        self.reservation: Reservation | None = None

    def check(self, cal: RunCalibration, next_round_steps: int) -> None:
        """Refuse a round that would push the spend over the site's budget or the run's request.

        The read-only form of :meth:`reserve` (:meth:`PrivacyLedger.check`): composes the
        ledger's history, every live reservation and ``next_round_steps`` steps at the run's
        noise and sampling rate, and compares. Nothing is reserved, so only :meth:`reserve`
        protects against a concurrent process.

        Raises
        ------
        PrivacyBudgetExceeded
            If the lifetime epsilon would exceed the site's budget, or this run's own epsilon
            the coordinator's request.

        """
        self.ledger.load()
        if self.ledger.get(self.dataset_key) is None:
            raise RuntimeError(f"ledger has no entry for '{self.dataset_key}' after calibrate")
        self.ledger.check(
            self.dataset_key, run_id=cal.run_id, server_round=0, steps=int(next_round_steps),
            sample_rate=cal.sample_rate, noise_multiplier=cal.noise_multiplier,
            run_epsilon_cap=cal.requested_epsilon,
        )

    def reserve(
        self, cal: RunCalibration, server_round: int, steps: int | None = None
    ) -> Reservation:
        """Reserve the coming round's epsilon in the ledger, atomically, or refuse the round.

        Parameters
        ----------
        cal : RunCalibration
            The run's calibration (noise, sampling rate, request).
        server_round : int
            The coordinator's round number.
        steps : int, optional
            Planned DP-SGD steps (default: one full round, ``cal.steps_per_round``).

        Returns
        -------
        Reservation
            Held until :meth:`commit` (or :meth:`release`).

        Raises
        ------
        PrivacyBudgetExceeded
            If the round, composed with the history and every live reservation, would exceed
            the site's budget or the run's request (nothing is reserved).

        """
        if self.reservation is not None:
            raise RuntimeError("a round is already reserved: commit or release it first")
        self.reservation = self.ledger.reserve(
            self.dataset_key, run_id=cal.run_id, server_round=int(server_round),
            steps=cal.steps_per_round if steps is None else int(steps),
            sample_rate=cal.sample_rate, noise_multiplier=cal.noise_multiplier,
            run_epsilon_cap=cal.requested_epsilon,
        )
        return self.reservation

    def release(self) -> None:
        """Give back the reserved round (training failed before its first DP-SGD step)."""
        if self.reservation is not None:
            reservation, self.reservation = self.reservation, None
            self.ledger.release(self.dataset_key, reservation.reservation_id)

    def commit(
        self, cal: RunCalibration, run_id: str | int, server_round: int, steps: int
    ) -> LedgerEntry:
        """Compose the round's ``steps`` into the ledger (atomically), committing the reservation.

        Returns
        -------
        LedgerEntry
            The dataset's entry after the round.

        """
        reservation, self.reservation = self.reservation, None
        return self.ledger.record_round(
            self.dataset_key,
            run_id=str(run_id),
            server_round=int(server_round),
            steps=steps,
            sample_rate=cal.sample_rate,
            noise_multiplier=cal.noise_multiplier,
            reservation_id=reservation.reservation_id if reservation is not None else None,
        )
