"""Noise planning for local DP-SGD: delta, the composed-target noise search, release planning.

Calibration.
    Noise is chosen once per run for *all* planned rounds
    (``steps = total_rounds * local_epochs * steps_per_epoch``) with
    ``opacus.accountants.utils.get_noise_multiplier``, never with
    ``make_private_with_epsilon`` (it calibrates one round and ignores the loaded history).
    When the ledger already holds history (an earlier run), the same doubling + bisection
    search (tolerance 0.01) runs on the *composed* accountant (history + planned run):
    epsilons do not add under RDP/PRV composition, so "remaining = budget − spent" fed to a
    fresh calibration would be wrong (:func:`noise_for_composed_target`).
Delta.
    The smallest of the site's ``budget_delta``, the request's ``dp.target_delta`` and, when
    neither is set, ``min(1e-5, 1 / (10 n))`` (:func:`default_delta`); it must stay below
    ``1 / n``. Once a dataset has a ledger entry its delta only ever tightens.
Release planning.
    A run that will ask for feature statistics plans one Gaussian release (sampling rate 1,
    one step) into its budget (:func:`reserved_release`), unless that release alone would
    cost more than :data:`RELEASE_SHARE_LIMIT` of the run's epsilon.

The :class:`~consilia.client.privacy.controller.PrivacyController` runs these steps.
"""

from __future__ import annotations

import logging
import math

from opacus.accountants import create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from consilia.client.privacy.budget import PrivacyBudgetExceeded, PrivacyConfigError
from consilia.client.privacy.ledger_records import AccountantState, accountant_from_state

__all__ = [
    "RELEASE_SHARE_LIMIT",
    "default_delta",
    "epsilon_of",
    "noise_for_composed_target",
    "planned_release",
    "reserved_release",
    "run_noise_multiplier",
]

log = logging.getLogger(__name__)

#: A calibration release is planned into a run only when, on its own, it costs at most this
#: share of the run's epsilon (otherwise DP-SGD would keep too little; the site declines it).
RELEASE_SHARE_LIMIT = 0.5


def default_delta(n_samples: int) -> float:
    """Return the default delta ``min(1e-5, 1 / (10 n))`` (always well below ``1 / n``)."""
    if n_samples < 1:
        raise PrivacyConfigError(f"cannot train with DP on {n_samples} samples")
    return min(1e-5, 1.0 / (10.0 * n_samples))



def epsilon_of(state: AccountantState, delta: float) -> float:
    """Return the epsilon at ``delta`` of an accountant holding ``state``'s history."""
    return float(accountant_from_state(state).get_epsilon(delta=delta))


def reserved_release(
    release_noise_multiplier: float | None, mechanism: str
) -> list[tuple[float, float, int]]:
    """Return the feature-statistics release to plan for (one step at sampling rate 1).

    Parameters
    ----------
    release_noise_multiplier : float or None
        The site's Gaussian noise multiplier for the release (None: no release).
    mechanism : str
        The dataset's accountant (``"rdp"``, ``"prv"``, ``"gdp"``).

    Returns
    -------
    list of tuple
        ``[(noise, 1.0, 1)]``, or empty without a release or under GDP.

    """
    if release_noise_multiplier is None or mechanism == "gdp":
        return []  # GDP's CLT composition does not cover a full-batch release
    return [(float(release_noise_multiplier), 1.0, 1)]


def planned_release(
    release_noise_multiplier: float | None,
    mechanism: str,
    delta: float,
    run_epsilon: float,
    run_id: str,
) -> list[tuple[float, float, int]]:
    """Return the release to plan into a run, or none when it would cost too much on its own.

    Parameters
    ----------
    release_noise_multiplier : float or None
        The site's Gaussian noise multiplier for the release (None: no release).
    mechanism : str
        The dataset's accountant.
    delta : float
        The dataset's delta.
    run_epsilon : float
        The run's epsilon, ``min(request, budget)``.
    run_id : str
        The run (for the log line).

    Returns
    -------
    list of tuple
        :func:`reserved_release`, or empty when the release alone would cost more than
        :data:`RELEASE_SHARE_LIMIT` of ``run_epsilon`` (the site will decline it).

    """
    reserved = reserved_release(release_noise_multiplier, mechanism)
    if reserved and epsilon_of(AccountantState(mechanism=mechanism, history=reserved),
                               delta) > RELEASE_SHARE_LIMIT * run_epsilon:
        log.info("run %s: the feature-statistics release alone would cost more than half "
                 "of ε=%.3f; not planned (the site will decline it)", run_id, run_epsilon)
        reserved = []
    return reserved


def noise_for_composed_target(
    state: AccountantState,
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Noise multiplier so that ``history + steps`` new steps compose to ``target_epsilon``.

    The same doubling + bisection search as ``opacus.accountants.utils.get_noise_multiplier``,
    but evaluated on the accountant that already holds ``state``'s history (a fresh history
    gives exactly ``get_noise_multiplier``'s answer).

    Raises
    ------
    PrivacyBudgetExceeded
        If the history alone already reaches ``target_epsilon`` or no finite noise does.

    """
    accountant = create_accountant(mechanism=state.mechanism)
    past = [(float(s), float(q), int(n)) for s, q, n in state.history]

    def eps(sigma: float) -> float:
        accountant.history = [*past, (sigma, sample_rate, steps)]
        return float(accountant.get_epsilon(delta=target_delta))

    if past:
        accountant.history = list(past)
        spent = float(accountant.get_epsilon(delta=target_delta))
        if spent >= target_epsilon:
            raise PrivacyBudgetExceeded(
                f"the budget ε={target_epsilon:.3f} is already spent (ε={spent:.3f})"
            )
    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > MAX_SIGMA:
            raise PrivacyBudgetExceeded(
                f"the remaining budget (ε target {target_epsilon:.3f}) is too small for "
                f"{steps} more DP-SGD steps at any noise level"
            )
        eps_high = eps(sigma_high)
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        value = eps(sigma)
        if value < target_epsilon:
            sigma_high, eps_high = sigma, value
        else:
            sigma_low = sigma
    return sigma_high


def run_noise_multiplier(
    history: AccountantState,
    reserved: list[tuple[float, float, int]],
    *,
    request: float,
    budget: float,
    delta: float,
    sample_rate: float,
    steps: int,
    dataset_key: str,
) -> float:
    """Noise multiplier of a whole run: its request and the site's remaining budget both hold.

    On a fresh history this is exactly ``get_noise_multiplier(min(request, budget))``; with a
    history (earlier runs) the lifetime budget is searched on the composed accountant
    (:func:`noise_for_composed_target`) and the larger of the two noises wins, so a run can
    never lower the noise below what the site's remaining budget allows.

    Parameters
    ----------
    history : AccountantState
        The dataset's accountant history (its mechanism is the site's accountant).
    reserved : list of tuple
        The run's planned feature-statistics release (:func:`planned_release`), if any.
    request : float
        The run's requested epsilon.
    budget : float
        The site's lifetime budget.
    delta : float
        The dataset's delta.
    sample_rate : float
        Poisson sampling rate of the run.
    steps : int
        DP-SGD steps the run plans.
    dataset_key : str
        The dataset (for messages).

    Raises
    ------
    PrivacyBudgetExceeded
        If no noise level fits the steps into the budget.
    PrivacyConfigError
        If the accountant cannot calibrate these steps.

    """
    mechanism, planned_steps = history.mechanism, steps
    with_release = AccountantState(mechanism=mechanism,
                                   history=[*history.history, *reserved])
    release_only = AccountantState(mechanism=mechanism, history=list(reserved))
    try:
        if not history.history and not reserved:
            sigma = get_noise_multiplier(
                target_epsilon=min(request, budget), target_delta=delta,
                sample_rate=sample_rate, steps=planned_steps, accountant=mechanism,
            )
        elif not history.history:
            sigma = noise_for_composed_target(
                release_only, target_epsilon=min(request, budget), target_delta=delta,
                sample_rate=sample_rate, steps=planned_steps,
            )
        else:
            sigma_lifetime = noise_for_composed_target(
                with_release, target_epsilon=budget, target_delta=delta,
                sample_rate=sample_rate, steps=planned_steps,
            )
            sigma_run = noise_for_composed_target(
                release_only, target_epsilon=request, target_delta=delta,
                sample_rate=sample_rate, steps=planned_steps,
            ) if reserved else get_noise_multiplier(
                target_epsilon=request, target_delta=delta, sample_rate=sample_rate,
                steps=planned_steps, accountant=mechanism,
            )
            sigma = max(sigma_lifetime, sigma_run)
    except ValueError as exc:
        if "budget is too low" in str(exc):  # get_noise_multiplier hit MAX_SIGMA
            raise PrivacyBudgetExceeded(
                f"dataset '{dataset_key}': no noise level fits {planned_steps} DP-SGD "
                f"steps into the budget ({exc})"
            ) from None
        raise PrivacyConfigError(  # e.g. an accountant's root finder fails
            f"the {mechanism} accountant cannot calibrate {planned_steps} steps at sampling "
            f"rate {sample_rate:.4g} ({exc}); use policy.dp.accountant: rdp"
        ) from None
    return sigma
