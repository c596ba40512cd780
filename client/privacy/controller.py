"""The lifecycle of local DP-SGD at a site (Opacus, sample-level DP), one dataset at a time.

Fed-BioMed's ``DPController`` lifecycle, as :meth:`PrivacyController.train` runs it for the
site trainer each round: bind the round → calibrate the run's noise → reserve the round's
epsilon → make the objects private → train → commit (or release) the round::

    ctrl = PrivacyController(dp, budget_epsilon, budget_delta, ledger, dataset_key,
                             model_name="cnn").bind_round(run_id, server_round, total_rounds)
    loss, n, steps = ctrl.train(model, optimizer, loader, loss_fn, epochs, mu, anchors)
    weights = ctrl.unwrap_state_dict(model)       # no ``_module.`` prefixes
    ctrl.spent_epsilon()                          # lifetime epsilon of this dataset

Each step lives in its own module: :mod:`~consilia.client.privacy.run_calibration` (the
site's lifetime budget and the run's request, delta, the noise chosen once per run and
cached in the ledger), :mod:`~consilia.client.privacy.round_budget` (reserve, then train:
check, reserve, release and commit a round atomically in the ledger),
:mod:`~consilia.client.privacy.opacus_wrapping` (the engine continuing the ledger's
accountant history, secret generators, wrap and unwrap), :mod:`~consilia.client.privacy.dpsgd`
(grad-sample mode, the private loop, FedProx, the fast DP step) and
:mod:`~consilia.client.privacy.statistics_release` (the feature-statistics release).

The controller's own decisions:

- The accountant is the site's, never the run's: ``dp.accountant`` is what the site's policy
  decided (:func:`consilia.client.site.policy.site_dp_request`; simulated sites use the
  default policy's ``rdp``), and only upper-bound accountants are accepted (``rdp``, ``prv``;
  ``gdp`` is refused, :mod:`~consilia.client.privacy.accountants`). A dataset whose ledger
  entry was created under another accountant is refused.
- The steps actually taken are committed to the ledger before any weights leave the site, also
  when training fails half-way (conservative); a failure before the first step releases the
  round's reservation.
- ``dp.mode="central"`` is the coordinator's job (client-level clipping + noise); refused.
- ``noise_seed`` makes noise and sampling reproducible for simulations and tests only.

No Flower imports: the site trainer and the ClientApp adapter call this module.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from consilia.client.privacy.accountants import (
    UPPER_BOUND_ACCOUNTANTS,
    accountant_metric_key,
    not_an_upper_bound_reason,
)
from consilia.client.privacy.budget import PrivacyConfigError
from consilia.client.privacy.dpsgd import (
    PrivateTraining,
    resolve_grad_sample_mode,
    train_private_epochs,
)
from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.ledger_records import LedgerEntry, RunCalibration
from consilia.client.privacy.opacus_wrapping import (
    PrivateRound,
    open_private_round,
    unwrap_state_dict,
)
from consilia.client.privacy.reservations import Reservation
from consilia.client.privacy.round_budget import RoundBudget
from consilia.client.privacy.run_calibration import RunPlan, calibrate_run, effective_delta
from consilia.client.privacy.statistics_release import account_statistics_release, release_rng
from consilia.common.config import DPConfig

__all__ = ["PrivacyController"]

log = logging.getLogger(__name__)


class PrivacyController:
    """Local DP-SGD for one dataset of one site, accounted in the site's ledger.

    Parameters
    ----------
    dp : DPConfig
        The DP the site applies (``mode`` must be ``"local"``; ``accountant`` is the site's,
        ``rdp`` or ``prv``).
    budget_epsilon : float
        The site's lifetime epsilon budget for this dataset (its own policy).
    budget_delta : float or None
        The site's delta (None: the request's, else ``min(1e-5, 1/(10 n))``).
    ledger : PrivacyLedger
        The site's persistent ledger.
    dataset_key : str
        Stable name of the training data in the ledger.
    model_name : str, optional
        Registered model name, used when ``dp.grad_sample_mode == "auto"``.
    noise_seed : int, optional
        Seeds the DP noise and Poisson sampling, for reproducible *simulations* and tests
        only. ``None`` (the default, and the only safe value at a real site) draws both seeds
        from the operating system's entropy, so nobody — the coordinator included — can
        replay the noise.
    release_noise_multiplier : float, optional
        The run will ask for per-class feature statistics (classifier calibration) and the
        site's policy answers with this Gaussian noise multiplier: :meth:`calibrate` plans the
        run's budget to include that one release, and
        :meth:`release_feature_statistics` accounts it.
    max_noise_multiplier : float, optional
        The least useful privacy level the site trains at (``policy.dp.max_noise_multiplier``):
        a new run whose noise would exceed it is refused in :meth:`calibrate`
        (:class:`~consilia.client.privacy.budget.PrivacyBudgetExceeded`, nothing recorded).
        ``None`` (simulated sites): no cap.

    Raises
    ------
    PrivacyConfigError
        For ``dp.mode == "central"``, an accountant that is not an upper bound (``gdp``), a
        non-positive budget or a non-positive noise cap.

    """

    def __init__(
        self,
        dp: DPConfig,
        budget_epsilon: float,
        budget_delta: float | None,
        ledger: PrivacyLedger,
        dataset_key: str,
        model_name: str | None = None,
        noise_seed: int | None = None,
        release_noise_multiplier: float | None = None,
        max_noise_multiplier: float | None = None,
    ) -> None:
        if dp.mode != "local":
            raise PrivacyConfigError(
                f"dp.mode='{dp.mode}' is applied by the coordinator (client-level clipping and "
                "noise on the aggregate); the site's privacy controller only runs local DP-SGD "
                "(dp.mode='local')"
            )
        if dp.accountant not in UPPER_BOUND_ACCOUNTANTS:
            raise PrivacyConfigError(not_an_upper_bound_reason(dp.accountant))
        if not budget_epsilon > 0:
            raise PrivacyConfigError(
                f"the site's privacy budget must be a positive epsilon, got {budget_epsilon}"
            )
        if budget_delta is not None and not 0 < budget_delta < 1:
            raise PrivacyConfigError(f"the site's delta must be in (0, 1), got {budget_delta}")
        self.dp = dp
        self.budget_epsilon = float(budget_epsilon)
        self.budget_delta = budget_delta
        self.ledger = ledger
        self.dataset_key = dataset_key
        self.model_name = model_name
        self.noise_seed = noise_seed
        if release_noise_multiplier is not None and not release_noise_multiplier > 0:
            raise PrivacyConfigError("the feature-statistics noise multiplier must be positive, "
                                     f"got {release_noise_multiplier}")
        self.release_noise_multiplier = release_noise_multiplier
        if max_noise_multiplier is not None and not max_noise_multiplier > 0:
            raise PrivacyConfigError("the site's max_noise_multiplier must be positive, "
                                     f"got {max_noise_multiplier}")
        self.max_noise_multiplier = max_noise_multiplier
        self._calibration: RunCalibration | None = None
        self._private: PrivateRound | None = None
        self._round: tuple[str, int, int] | None = None
        self._rounds = RoundBudget(ledger, dataset_key)

    # -- round binding (what the trainer's privacy factory provides) ----------------------

    def bind_round(
        self, run_id: str | int, server_round: int, total_rounds: int
    ) -> PrivacyController:
        """Remember the run and round :meth:`train` works for; returns ``self``."""
        self._round = (str(run_id), int(server_round), int(total_rounds))
        return self

    # -- budget ---------------------------------------------------------------------------

    def effective_delta(self, n_samples: int) -> float:
        """Delta for a dataset of ``n_samples`` (:func:`run_calibration.effective_delta`).

        Raises
        ------
        PrivacyConfigError
            If the chosen delta is not below ``1 / n_samples``.

        """
        return effective_delta(self.budget_delta, self.dp.target_delta, n_samples)

    def _entry(self) -> LedgerEntry | None:
        self.ledger.load()
        return self.ledger.get(self.dataset_key)

    def spent_epsilon(self) -> float:
        """Lifetime epsilon spent on this dataset (ledger's accountant and delta; 0 if none)."""
        entry = self._entry()
        return entry.epsilon_spent if entry is not None else 0.0

    def summary(self) -> dict[str, float]:
        """Scalars to report with the round (lifetime ε, δ, budget, noise, sampling rate)."""
        entry = self._entry()
        cal = self._calibration
        return {
            "epsilon": entry.epsilon_spent if entry is not None else 0.0,
            "delta": entry.delta if entry is not None else 0.0,
            "budget-epsilon": entry.target_epsilon if entry is not None else self.budget_epsilon,
            "noise-multiplier": cal.noise_multiplier if cal is not None else 0.0,
            "sample-rate": cal.sample_rate if cal is not None else 0.0,
        }

    @property
    def accountant(self) -> str:
        """The accountant this site accounts with (the site policy's ``rdp`` or ``prv``)."""
        return self.dp.accountant

    def reply_metrics(self) -> dict[str, float]:
        """Scalars the site adds to its train reply: which accountant it used."""
        return {accountant_metric_key(self.accountant): 1.0}

    @property
    def calibration(self) -> RunCalibration | None:
        """The run's calibration once :meth:`calibrate` ran."""
        return self._calibration

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps of one round (after :meth:`calibrate`)."""
        return self._require_calibration().steps_per_round

    def _require_calibration(self) -> RunCalibration:
        if self._calibration is None:
            raise RuntimeError("call PrivacyController.calibrate(...) before training")
        return self._calibration

    def calibrate(
        self,
        n_samples: int,
        batch_size: int,
        total_rounds: int,
        local_epochs: int,
        *,
        run_id: str | int,
    ) -> float:
        """Return the run's noise multiplier, chosen once and cached in the ledger per run id.

        ``n_samples`` (``len(dataset)``), the logical ``batch_size``, the ``total_rounds``
        planned and the ``local_epochs`` per round form the
        :class:`~consilia.client.privacy.run_calibration.RunPlan`;
        :func:`~consilia.client.privacy.run_calibration.calibrate_run` does the rest.

        Raises
        ------
        PrivacyBudgetExceeded
            If the budget is already spent or too small for the run, or the run would need
            more noise than ``max_noise_multiplier`` (refused with one line; nothing recorded).
        PrivacyConfigError
            If the run was calibrated before with a different plan, or delta is too large.

        """
        plan = RunPlan(n_samples, batch_size, total_rounds, local_epochs)
        self._calibration = calibrate_run(
            self.ledger, self._open_entry(n_samples), plan, dataset_key=self.dataset_key,
            run_id=str(run_id), requested_epsilon=self.dp.target_epsilon,
            release_noise_multiplier=self.release_noise_multiplier,
            max_noise_multiplier=self.max_noise_multiplier,
        )
        return self._calibration.noise_multiplier

    def release_feature_statistics(self, n_samples: int, run_id: str | int | None = None,
                                   server_round: int | None = None) -> float:
        """Account one Gaussian release of feature statistics; return the lifetime epsilon.

        Called before the statistics leave the site, for the bound round unless ``run_id``
        and ``server_round`` are given
        (:mod:`~consilia.client.privacy.statistics_release`).

        Raises
        ------
        PrivacyConfigError
            Without a release noise multiplier, or under the GDP accountant.
        PrivacyBudgetExceeded
            When the release does not fit the budget or the run's request.
        """
        if run_id is None or server_round is None:
            if self._round is None:
                raise RuntimeError("release_feature_statistics: no run bound (bind_round)")
            run_id, server_round = self._round[0], self._round[1]
        sigma = self.release_noise_multiplier
        if sigma is None:
            raise PrivacyConfigError("this site sends no DP-noised feature statistics "
                                     "(policy.feature_statistics.dp_noise_multiplier is off)")
        entry = self._open_entry(n_samples)
        return account_statistics_release(
            self.ledger, self.dataset_key, entry, float(sigma),
            fallback_requested_epsilon=float(self.dp.target_epsilon),
            run_id=str(run_id), server_round=server_round,
        )

    def release_rng(self) -> np.random.Generator:
        """Noise source for a release: OS entropy at a real site, ``noise_seed`` in simulation."""
        return release_rng(self.noise_seed)

    def _open_entry(self, n_samples: int) -> LedgerEntry:
        return self.ledger.open_entry(
            self.dataset_key,
            accountant=self.dp.accountant,
            delta=self.effective_delta(n_samples),
            target_epsilon=self.budget_epsilon,
        )

    def check_budget(self, next_round_steps: int) -> None:
        """Refuse a round over the site's budget or the run's request, reserving nothing.

        See :meth:`RoundBudget.check <consilia.client.privacy.round_budget.RoundBudget.check>`.

        Raises
        ------
        PrivacyBudgetExceeded
            If the round does not fit.

        """
        self._rounds.check(self._require_calibration(), next_round_steps)

    def reserve_round(self, server_round: int, steps: int | None = None) -> Reservation:
        """Reserve the coming round (default: :attr:`steps_per_round` steps), or refuse it.

        See :meth:`RoundBudget.reserve <consilia.client.privacy.round_budget.RoundBudget.reserve>`;
        held until :meth:`commit_round` (or :meth:`release_reservation`).

        Raises
        ------
        PrivacyBudgetExceeded
            If the round does not fit (nothing is reserved).

        """
        return self._rounds.reserve(self._require_calibration(), server_round, steps)

    def release_reservation(self) -> None:
        """Give back the reserved round (training failed before its first DP-SGD step)."""
        self._rounds.release()

    # -- training -------------------------------------------------------------------------

    def resolve_grad_sample_mode(self, criterion: Any = None) -> str:
        """Return the grad-sample mode to use (``dp.grad_sample_mode``, or measured for auto)."""
        return resolve_grad_sample_mode(self.dp.grad_sample_mode, self.model_name, criterion)

    def make_private(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        criterion: Any = None,
    ) -> PrivateTraining:
        """Wrap the round's training objects with Opacus, continuing the ledger's accounting.

        Parameters
        ----------
        model, optimizer, loader
            Plain torch objects (the loader's batch size and dataset length must match the
            calibration).
        criterion : callable, optional
            The loss; required for ghost mode (default ``nn.CrossEntropyLoss()``).

        Returns
        -------
        PrivateTraining
            Model, optimizer, Poisson loader and the criterion to use.

        Raises
        ------
        PrivacyConfigError
            If the loader does not match the calibration.

        """
        cal = self._require_calibration()
        if self._private is not None:
            raise RuntimeError("commit_round() the previous round before making a new one private")
        entry = self._entry()
        if entry is None:
            raise RuntimeError(f"ledger has no entry for '{self.dataset_key}' after calibrate")
        n = len(loader.dataset)  # type: ignore[arg-type]
        if n != cal.n_samples or len(loader) != cal.steps_per_epoch:
            raise PrivacyConfigError(
                f"loader has {n} samples in {len(loader)} batches but run {cal.run_id} was "
                f"calibrated for {cal.n_samples} samples in {cal.steps_per_epoch} batches"
            )
        mode = self.resolve_grad_sample_mode(criterion)
        model.train()  # Opacus refuses eval mode; a cached model may come from evaluate()
        self._private = open_private_round(
            entry.accountant_state, model, optimizer, loader, criterion,
            accountant=entry.accountant, noise_seed=self.noise_seed, grad_sample_mode=mode,
            noise_multiplier=cal.noise_multiplier, sample_rate=cal.sample_rate,
            max_grad_norm=self.dp.max_grad_norm,
            max_physical_batch_size=self.dp.max_physical_batch_size,
        )
        return self._private.training

    def steps_taken(self) -> int:
        """DP-SGD steps taken since :meth:`make_private` (accountant steps)."""
        return self._private.steps_taken() if self._private is not None else 0

    def commit_round(self, run_id: str | int, server_round: int) -> float:
        """Compose this round's steps into the ledger (saved atomically); return lifetime ε.

        Commits the round's reservation (:meth:`reserve_round`), if any. Call it before the
        round's weights leave the site.
        """
        cal = self._require_calibration()
        private = self._private
        if private is None:
            raise RuntimeError("commit_round() without a private round (call make_private first)")
        entry = self._rounds.commit(cal, run_id, server_round, private.steps_taken())
        if private.accountant_state() != entry.accountant_state:
            log.warning(
                "privacy ledger for '%s' was updated concurrently by another process; "
                "its composed total (ε=%.3f) includes both", self.dataset_key, entry.epsilon_spent,
            )
        self._private = None
        return entry.epsilon_spent

    @staticmethod
    def unwrap_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
        """Return the weights without Opacus' ``_module.`` prefixes (CPU, detached)."""
        return unwrap_state_dict(model)

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        loss_fn: Any,
        epochs: int,
        proximal_mu: float = 0.0,
        global_params: Sequence[torch.Tensor] | None = None,
    ) -> tuple[float, int, int]:
        """Run one private round end to end (the site trainer's entry point).

        Calibrates (cached per run), reserves the round's epsilon in the ledger (atomically;
        refused if it does not fit), makes the objects private, trains
        ``epochs`` epochs with ``consilia.common.training.engine.train_epochs`` inside the memory
        manager (:func:`train_private_epochs`), applies FedProx as post-processing, and commits
        the spend to the ledger —
        also when training fails half-way (a failure before the first step releases the
        reservation). Needs :meth:`bind_round` first.

        Returns
        -------
        tuple
            ``(mean training loss, num_examples = len(dataset), DP-SGD steps)``.

        Raises
        ------
        PrivacyBudgetExceeded
            If the round would exceed a budget (nothing is trained).

        """
        if self._round is None:
            raise RuntimeError("call PrivacyController.bind_round(run_id, round, total) first")
        run_id, server_round, total_rounds = self._round
        if proximal_mu > 0 and global_params is None:
            raise ValueError("proximal_mu > 0 needs global_params (use snapshot_params)")
        n = len(loader.dataset)  # type: ignore[arg-type]
        batch_size = int(loader.batch_size or 1)
        self.calibrate(n, batch_size, total_rounds, epochs, run_id=run_id)
        self.reserve_round(server_round)
        try:
            private = self.make_private(model, optimizer, loader, loss_fn)
        except BaseException:
            self.release_reservation()
            raise
        try:
            if proximal_mu > 0 and global_params is not None:
                private.add_proximal_term(global_params, proximal_mu)
            loss = train_private_epochs(private, epochs)
            steps = self.steps_taken()
        finally:
            if self._private is not None:
                self.commit_round(run_id, server_round)  # also after a failure: conservative
            private.close()
        return loss, n, steps
