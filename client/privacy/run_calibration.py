"""A run's noise calibration: chosen once for all planned rounds, cached in the site's ledger.

Budget.
    The site's policy owns the budget: ``budget_epsilon`` is a *lifetime* cap for the dataset,
    kept in the :class:`~consilia.client.privacy.ledger.PrivacyLedger`. The coordinator's
    ``dp.target_epsilon`` is a *per-run* request (the run's model alone must be
    (ε_req, δ)-DP). Both are enforced, so the request can never raise the site's budget:
    on a fresh ledger the noise is exactly ``get_noise_multiplier(min(request, budget))``.
Noise cap (:func:`refuse_over_noise_cap`).
    The site's policy names the least useful privacy level it trains at,
    ``policy.dp.max_noise_multiplier``: a run whose noise (for the budget left, or for its own
    request) would exceed it is refused with one line, before anything is recorded, instead
    of training a run of pure-noise updates.
Calibration (:func:`calibrate_run`).
    Noise is chosen once per run for all planned rounds (the search is
    :func:`consilia.client.privacy.planning.run_noise_multiplier`) and cached in the ledger per
    run id, so a restarted site keeps the same noise. Sampling rate and steps per epoch are
    what Opacus' Poisson loader uses: ``q = 1 / len(loader) = 1 / ceil(n / batch_size)``
    (equal to ``batch_size / n`` when the batch divides n), so the plan and the accountant
    agree (:class:`RunPlan`).
Delta (:func:`effective_delta`).
    The smallest of the site's ``budget_delta``, the request's ``dp.target_delta`` and, when
    neither is set, ``min(1e-5, 1 / (10 n))``; it must stay below ``1 / n``. Once a dataset
    has a ledger entry its delta only ever tightens.

The :class:`~consilia.client.privacy.controller.PrivacyController` calls these before training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NoReturn

from consilia.client.privacy.budget import PrivacyBudgetExceeded, PrivacyConfigError
from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.ledger_records import (
    AccountantState,
    LedgerEntry,
    RunCalibration,
    utc_now,
)
from consilia.client.privacy.planning import (
    default_delta,
    epsilon_of,
    planned_release,
    run_noise_multiplier,
)

__all__ = ["RunPlan", "calibrate_run", "effective_delta", "refuse_over_noise_cap"]

log = logging.getLogger(__name__)


def effective_delta(
    budget_delta: float | None, target_delta: float | None, n_samples: int
) -> float:
    """Return the delta for ``n_samples``: the smallest given, else :func:`default_delta`.

    Parameters
    ----------
    budget_delta : float or None
        The site's delta.
    target_delta : float or None
        The run's requested delta (``dp.target_delta``).
    n_samples : int
        Training samples at this site.

    Raises
    ------
    PrivacyConfigError
        If the chosen delta is not below ``1 / n_samples``.

    """
    given = [d for d in (budget_delta, target_delta) if d is not None]
    delta = min(given) if given else default_delta(n_samples)
    if delta >= 1.0 / n_samples:
        raise PrivacyConfigError(
            f"delta={delta:g} is not below 1/n = 1/{n_samples}: with so large a delta a "
            "record may leak outright; set the site's privacy delta (or dp.target_delta) "
            f"below {1.0 / n_samples:g}, e.g. {default_delta(n_samples):g}"
        )
    return delta


@dataclass(frozen=True)
class RunPlan:
    """What a run plans at this site: data size, batch, rounds and local epochs (all >= 1).

    Raises
    ------
    PrivacyConfigError
        If any field is below 1.

    """

    n_samples: int
    batch_size: int
    total_rounds: int
    local_epochs: int

    def __post_init__(self) -> None:
        for name, value in (("n_samples", self.n_samples), ("batch_size", self.batch_size),
                            ("total_rounds", self.total_rounds),
                            ("local_epochs", self.local_epochs)):
            if int(value) < 1:
                raise PrivacyConfigError(f"calibrate: {name} must be >= 1, got {value}")

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: ``len(DataLoader)`` with ``drop_last=False``."""
        return math.ceil(self.n_samples / self.batch_size)

    @property
    def sample_rate(self) -> float:
        """What Opacus' Poisson loader and accountant use: ``1 / steps_per_epoch``."""
        return 1.0 / self.steps_per_epoch

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(n_samples, batch_size, total_rounds, local_epochs)``."""
        return (self.n_samples, self.batch_size, self.total_rounds, self.local_epochs)


def calibrate_run(
    ledger: PrivacyLedger,
    entry: LedgerEntry,
    plan: RunPlan,
    *,
    dataset_key: str,
    run_id: str,
    requested_epsilon: float,
    release_noise_multiplier: float | None,
    max_noise_multiplier: float | None = None,
) -> RunCalibration:
    """Return the run's cached calibration, or choose the noise and record it in the ledger.

    Parameters
    ----------
    ledger : PrivacyLedger
        The site's ledger (the new calibration is recorded there).
    entry : LedgerEntry
        The dataset's opened entry (accountant, delta, budget, history).
    plan : RunPlan
        What the run plans.
    dataset_key : str
        The dataset's name in the ledger.
    run_id : str
        The federated run; a restarted site gets the cached value for the same run.
    requested_epsilon : float
        The coordinator's per-run request (``dp.target_epsilon``).
    release_noise_multiplier : float or None
        Noise of the run's one feature-statistics release, planned into its budget.
    max_noise_multiplier : float or None, optional
        The site's ``policy.dp.max_noise_multiplier``: a new run needing more noise is
        refused (:func:`refuse_over_noise_cap`); None: no cap (simulated sites).

    Returns
    -------
    RunCalibration
        As stored in the ledger.

    Raises
    ------
    PrivacyBudgetExceeded
        If the budget is already spent or too small for the run, or the run's noise would
        exceed ``max_noise_multiplier`` (nothing is recorded).
    PrivacyConfigError
        If the run was calibrated before with a different plan.

    """
    n_samples, batch_size, total_rounds, local_epochs = plan.as_tuple()
    steps_per_epoch, sample_rate = plan.steps_per_epoch, plan.sample_rate
    cached = entry.calibrations.get(run_id)
    if cached is not None:
        before = (cached.n_samples, cached.batch_size, cached.total_rounds, cached.local_epochs)
        if before != plan.as_tuple():
            raise PrivacyConfigError(
                f"run {run_id} was calibrated for (n, batch, rounds, epochs)={before} but now "
                f"asks for {plan.as_tuple()}; the noise cannot change within a run: restart "
                "the run under a new id"
            )
        return cached

    planned_steps = total_rounds * local_epochs * steps_per_epoch
    delta, mechanism, budget = entry.delta, entry.accountant, entry.target_epsilon
    request = float(requested_epsilon)
    if entry.epsilon_spent >= budget:
        raise PrivacyBudgetExceeded(
            f"dataset '{dataset_key}' has spent ε={entry.epsilon_spent:.3f} of its "
            f"ε={entry.target_epsilon:.3f} budget (δ={entry.delta:g}, {entry.accountant}); "
            "this site refuses further DP training on it"
        )
    history = entry.accountant_state
    # the run's one feature-statistics release (Gaussian, sampling rate 1), planned in
    reserved = planned_release(
        release_noise_multiplier, mechanism, delta, min(request, budget), run_id
    )
    sigma = run_noise_multiplier(
        history, reserved, request=request, budget=budget, delta=delta,
        sample_rate=sample_rate, steps=planned_steps, dataset_key=dataset_key,
    )
    if max_noise_multiplier is not None and sigma > max_noise_multiplier:
        refuse_over_noise_cap(entry, plan, sigma, max_noise_multiplier, reserved,
                              request=request, dataset_key=dataset_key)
    planned = AccountantState(mechanism=mechanism, history=[
        *history.history, (sigma, sample_rate, planned_steps), *reserved])
    run_only = AccountantState(
        mechanism=mechanism, history=[(sigma, sample_rate, planned_steps), *reserved]
    )
    calibration = RunCalibration(
        run_id=run_id, noise_multiplier=sigma, sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch, local_epochs=local_epochs,
        total_rounds=total_rounds, n_samples=n_samples, batch_size=batch_size,
        requested_epsilon=request, budget_epsilon=budget, delta=delta, accountant=mechanism,
        spent_before_run=entry.epsilon_spent,
        planned_epsilon=epsilon_of(planned, delta),
        planned_run_epsilon=epsilon_of(run_only, delta),
        reserved_release_noise=reserved[0][0] if reserved else None,
        created=utc_now(),
    )
    ledger.record_calibration(dataset_key, calibration)
    recorded = ledger.entry(dataset_key).calibrations[run_id]
    log.info(
        "DP calibration for run %s on '%s': noise %.4f, q=%.4g, %d steps planned, "
        "lifetime ε %.3f → %.3f of %.3f (δ=%g, %s)", run_id, dataset_key, sigma,
        sample_rate, planned_steps, entry.epsilon_spent, calibration.planned_epsilon,
        budget, delta, mechanism,
    )
    return recorded


def refuse_over_noise_cap(
    entry: LedgerEntry,
    plan: RunPlan,
    sigma: float,
    max_noise_multiplier: float,
    reserved: list[tuple[float, float, int]],
    *,
    request: float,
    dataset_key: str,
) -> NoReturn:
    """Refuse a run whose noise ``sigma`` exceeds the site's ``max_noise_multiplier``.

    The reason names the cause in one line: the lifetime budget already spent (a fresh
    dataset would train the run below the cap), or else the run's own request (too strict
    for the planned steps even on a fresh dataset).

    Parameters
    ----------
    entry : LedgerEntry
        The dataset's entry (spent epsilon, budget, delta, accountant).
    plan : RunPlan
        What the run plans.
    sigma : float
        The noise the run would need.
    max_noise_multiplier : float
        The site's ``policy.dp.max_noise_multiplier``.
    reserved : list of tuple
        The run's planned feature-statistics release, if any.
    request : float
        The run's requested epsilon.
    dataset_key : str
        The dataset (for messages).

    Raises
    ------
    PrivacyBudgetExceeded
        Always.

    """
    cap, budget = max_noise_multiplier, entry.target_epsilon
    steps = plan.total_rounds * plan.local_epochs * plan.steps_per_epoch
    fresh = sigma
    if entry.accountant_state.history:
        try:  # what the run alone would need on a dataset with no history
            fresh = run_noise_multiplier(
                AccountantState(mechanism=entry.accountant, history=[]), reserved,
                request=request, budget=budget, delta=entry.delta,
                sample_rate=plan.sample_rate, steps=steps, dataset_key=dataset_key,
            )
        except PrivacyBudgetExceeded:
            fresh = sigma
    if fresh > cap:
        reason = (
            f"privacy request too strict for this site: ε {min(request, budget):g} over "
            f"{steps} DP-SGD steps needs σ {sigma:.4g} > policy.dp.max_noise_multiplier "
            f"{cap:g}; ask for a larger dp.target_epsilon or fewer rounds"
        )
    else:
        reason = (
            f"privacy budget spent: ε {entry.epsilon_spent:.2f} of {budget:g} left too little "
            f"for this run (needs σ {sigma:.4g} > policy.dp.max_noise_multiplier {cap:g})"
        )
    log.warning("run refused on '%s': %s", dataset_key, reason)
    raise PrivacyBudgetExceeded(reason)
