"""The DP release of per-class feature statistics (classifier calibration), accounted in the ledger.

A site that trains a run with local DP may send its feature statistics once per run through
the Gaussian mechanism (sensitivity-normalised, see
:meth:`consilia.common.ccvr.FeatureStats.with_gaussian_noise`). The accountant composes the
release as one step at sampling rate 1; it is refused when it would take the dataset over the
site's lifetime budget, or the run over the epsilon it asked for (a run planned with the
release, see :func:`consilia.client.privacy.planning.reserved_release`, has room for it).
The noise comes from OS entropy at a real site (:func:`release_rng`).
"""

from __future__ import annotations

import logging
import secrets

import numpy as np

from consilia.client.privacy.budget import PrivacyConfigError
from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.ledger_records import LedgerEntry

__all__ = ["account_statistics_release", "release_rng"]

log = logging.getLogger(__name__)


def account_statistics_release(
    ledger: PrivacyLedger,
    dataset_key: str,
    entry: LedgerEntry,
    noise_multiplier: float,
    fallback_requested_epsilon: float,
    run_id: str,
    server_round: int,
) -> float:
    """Account one Gaussian release of feature statistics; return the lifetime epsilon.

    Parameters
    ----------
    ledger : PrivacyLedger
        The site's ledger (the release is recorded in it atomically).
    dataset_key : str
        The dataset the statistics are computed on.
    entry : LedgerEntry
        The dataset's current ledger entry.
    noise_multiplier : float
        The release's Gaussian noise multiplier.
    fallback_requested_epsilon : float
        The run's requested epsilon when the run has no calibration in the ledger.
    run_id : str
        The federated run.
    server_round : int
        The round the release belongs to.

    Returns
    -------
    float
        The dataset's lifetime epsilon after the release.

    Raises
    ------
    PrivacyConfigError
        Under the GDP accountant.
    PrivacyBudgetExceeded
        When the release does not fit the budget or the run's request (checked and recorded
        atomically, with every live reservation, see
        :meth:`~consilia.client.privacy.ledger.PrivacyLedger.reserve`).

    """
    sigma = noise_multiplier
    if entry.accountant == "gdp":
        raise PrivacyConfigError(
            f"dataset '{dataset_key}' is accounted with the GDP accountant, which "
            "cannot compose a full-batch Gaussian release; use policy.dp.accountant: rdp"
        )
    cal = entry.calibrations.get(run_id)
    requested = cal.requested_epsilon if cal is not None else float(fallback_requested_epsilon)
    # reserved and committed under the ledger's lock: a concurrent round cannot take its room
    reservation = ledger.reserve(
        dataset_key, run_id=run_id, server_round=server_round, steps=1, sample_rate=1.0,
        noise_multiplier=float(sigma), kind="feature-statistics", run_epsilon_cap=requested,
    )
    updated = ledger.record_round(
        dataset_key, run_id=run_id, server_round=server_round, steps=1,
        sample_rate=1.0, noise_multiplier=float(sigma), kind="feature-statistics",
        reservation_id=reservation.reservation_id,
    )
    log.info("DP release of feature statistics for run %s on '%s': noise %.3f, lifetime "
             "ε %.3f -> %.3f", run_id, dataset_key, sigma, entry.epsilon_spent,
             updated.epsilon_spent)
    return float(updated.epsilon_spent)


def release_rng(noise_seed: int | None) -> np.random.Generator:
    """Noise source for a release: OS entropy at a real site, ``noise_seed`` in simulation."""
    if noise_seed is None:
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng([int(noise_seed), 0xCA11B])
