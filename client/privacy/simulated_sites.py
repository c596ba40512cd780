"""Local DP for *simulated* sites: a privacy factory with one ledger per site in the run dir.

A deployed site takes its budget, delta and ledger from its own site configuration
(:func:`consilia.client.site.assembly.load_deployed_site`). A simulated site has no such file,
so :func:`simulated_privacy_factory` gives it the simulation's stand-ins:

- budget: the run's ``dp.target_epsilon`` (lifetime cap = per-run request), delta: the run's
  ``dp.target_delta`` or ``min(1e-5, 1/(10 n))``;
- accountant: the default site policy's (``rdp``), whatever the run asks — as at a deployed
  site, the site decides the accounting (:func:`simulated_site_dp`);
- ledger: ``<run_dir>/site-state/<site>/privacy-ledger.json`` (:func:`sim_ledger_path`),
  dataset key = the site name — the same layout as a deployed site's state directory, so a
  test or an operator can inspect or pre-fill it;
- noise: *seeded* per (run seed, site, round) so simulations are reproducible. A deployed
  site never does this (its noise comes from OS entropy, see
  :class:`~consilia.client.privacy.controller.PrivacyController`); each round still gets its
  own seed, because re-using one noise stream in every round would correlate the noise
  across rounds.

Only ``dp.enabled`` with ``dp.mode == "local"`` creates a controller; central DP is the
coordinator's (client-level clipping and noise on the aggregate) and needs nothing here.
No Flower imports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from consilia.client.site.config import DPPolicy
from consilia.client.site.policy import StatisticsRule
from consilia.common.config import DPConfig
from consilia.common.instructions import RoundInstruction

if TYPE_CHECKING:  # opacus is imported only when a round asks for local DP
    from consilia.client.privacy.controller import PrivacyController

__all__ = [
    "SITE_STATE_DIR",
    "round_noise_seed",
    "sim_ledger_path",
    "simulated_privacy_factory",
    "simulated_site_dp",
]

#: Folder of the run directory holding each simulated site's state (its privacy ledger).
SITE_STATE_DIR = "site-state"


def sim_ledger_path(run_dir: Path, site_name: str) -> Path:
    """Return ``<run_dir>/site-state/<site_name>/privacy-ledger.json``."""
    return Path(run_dir) / SITE_STATE_DIR / site_name / "privacy-ledger.json"


def simulated_site_dp(dp: DPConfig) -> DPConfig:
    """Return the run's local DP as a simulated site applies it: the default policy's accountant.

    A simulated site follows the default site policy
    (:class:`~consilia.client.site.config.DPPolicy`), so a run asking for another accountant
    (e.g. ``gdp``) is accounted with ``rdp``.
    """
    return dp.model_copy(update={"accountant": DPPolicy().accountant})


def round_noise_seed(seed: int, site_index: int, server_round: int) -> int:
    """Return a distinct, reproducible noise seed for one site's round of a simulation."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(site_index), int(server_round),
                                    0xD1FF]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def simulated_privacy_factory(
    run_dir: Path | None, site_name: str, site_index: int, run_id: int | str
) -> Callable[[RoundInstruction, int], PrivacyController | None]:
    """Build the ``privacy_factory`` of a simulated site's :class:`SiteTrainer`.

    Parameters
    ----------
    run_dir : Path or None
        The run directory (run config ``consilia-run-dir``); needed only when a round asks
        for local DP.
    site_name : str
        The site (``site-00``, ...): ledger folder and dataset key.
    site_index : int
        The site's partition id (noise seed).
    run_id : int or str
        Flower's run id (key of the run's noise calibration in the ledger).

    Returns
    -------
    callable
        ``f(instruction, n_train) -> PrivacyController | None``: a controller bound to the
        instruction's round when it asks for local DP, else ``None``.

    Raises
    ------
    ValueError
        (from the returned callable) if local DP is requested but ``run_dir`` is None.

    """

    def factory(instr: RoundInstruction, n_train: int) -> PrivacyController | None:
        del n_train  # the controller reads the dataset size from the loader
        if not (instr.dp.enabled and instr.dp.mode == "local"):
            return None
        if run_dir is None:
            raise ValueError(
                "the run asks for local DP but the run config has no 'consilia-run-dir' for "
                "the simulated sites' privacy ledgers; launch simulations with fl-sim"
            )
        # imported here so that a simulation without local DP never loads opacus
        from consilia.client.privacy.controller import PrivacyController
        from consilia.client.privacy.ledger import PrivacyLedger

        ledger = PrivacyLedger(sim_ledger_path(Path(run_dir), site_name))
        controller = PrivacyController(
            simulated_site_dp(instr.dp),
            budget_epsilon=instr.dp.target_epsilon,
            budget_delta=None,
            ledger=ledger,
            dataset_key=site_name,
            model_name=instr.model.name,
            noise_seed=round_noise_seed(instr.seed, site_index, instr.server_round),
            # simulated sites follow the default site policy for calibration statistics
            release_noise_multiplier=StatisticsRule().dp_noise_multiplier
            if instr.calibration else None,
        )
        return controller.bind_round(run_id, instr.server_round, instr.total_rounds)

    return factory
