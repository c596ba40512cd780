"""One differential-privacy controller for local DP-SGD at a site (Opacus, sample-level DP).

Lifecycle (Fed-BioMed's ``DPController``: calibrate, guard, make private, train, account,
unwrap), as :meth:`PrivacyController.train` runs it for the site trainer each round::

    ctrl = PrivacyController(dp, budget_epsilon, budget_delta, ledger, dataset_key,
                             model_name="cnn").bind_round(run_id, server_round, total_rounds)
    loss, n, steps = ctrl.train(model, optimizer, loader, loss_fn, epochs, mu, anchors)
    weights = ctrl.unwrap_state_dict(model)       # no ``_module.`` prefixes
    ctrl.spent_epsilon()                          # lifetime epsilon of this dataset

Design decisions
----------------
Budget.
    The site's policy owns the budget: ``budget_epsilon`` is a *lifetime* cap for the dataset,
    kept in the :class:`~consilia.client.privacy.ledger.PrivacyLedger`. The coordinator's
    ``dp.target_epsilon`` is a *per-run* request (the run's model alone must be
    (ε_req, δ)-DP). Both are enforced, so the request can never raise the site's budget:
    on a fresh ledger the noise is exactly ``get_noise_multiplier(min(request, budget))``.
Calibration (:meth:`PrivacyController.calibrate`).
    Noise is chosen once per run for all planned rounds (see
    :mod:`consilia.client.privacy.planning`) and cached in the ledger per run id, so a
    restarted site keeps the same noise. Sampling rate and steps per epoch are what Opacus'
    Poisson loader uses: ``q = 1 / len(loader) = 1 / ceil(n / batch_size)`` (equal to
    ``batch_size / n`` when the batch divides n), so the plan and the accountant agree.
Delta.
    The smallest of the site's ``budget_delta``, the request's ``dp.target_delta`` and, when
    neither is set, ``min(1e-5, 1 / (10 n))``; it must stay below ``1 / n``. Once a dataset
    has a ledger entry its delta only ever tightens.
Accountant.
    The site's, never the run's: ``dp.accountant`` is what the site's policy decided
    (:func:`consilia.client.site.policy.site_dp_request`; simulated sites use the default
    policy's ``rdp``), and only accountants whose epsilon is an upper bound are accepted
    (``rdp``, ``prv``; ``gdp`` is refused, see :mod:`~consilia.client.privacy.accountants`).
    A dataset whose ledger entry was created under another accountant is refused.
Reserve, then train (:meth:`PrivacyController.reserve_round`).
    Before each round its planned steps are reserved in the ledger atomically, under the
    ledger's lock: composed with the whole history *and every other process's live
    reservation*, and refused (:class:`PrivacyBudgetExceeded`) if the lifetime or this run's
    epsilon would exceed its cap (numerical slack 1e-9). Two processes on the same ledger
    therefore never both take the last of the budget. The reservation is committed with the
    steps actually taken, released if training fails before its first step, and released by
    the next reader if the process dies (:mod:`~consilia.client.privacy.reservations`).
    :meth:`PrivacyController.check_budget` is the same test without reserving (read-only).
Accounting (:meth:`PrivacyController.make_private` / :meth:`PrivacyController.commit_round`).
    The persisted accountant state is loaded into ``engine.accountant`` before training, so ε
    composes exactly across rounds and restarts; after the round the steps actually taken are
    composed into the ledger file (atomically, before any weights leave the site). If
    training fails half-way, the steps already taken are still recorded (conservative).
Central DP.
    ``dp.mode="central"`` is the coordinator's job (client-level clipping + noise); this
    controller refuses it.
Randomness.
    The trainer seeds torch from the run's seed, which the coordinator knows; noise and
    Poisson sampling drawn from that stream could be replayed and the noise subtracted,
    voiding the guarantee. :meth:`PrivacyController.make_private` therefore gives Opacus its
    own generators seeded from ``secrets`` (OS entropy) — for the noise
    (``noise_generator``) and for the sampler (``opacus.data_loader.switch_generator``,
    which replaces the generator of the loader passed in). ``noise_seed`` makes them
    reproducible for simulations and tests only. Opacus' ``secure_mode`` (CSPRNG plus
    floating-point attack mitigation) needs ``torchcsprng``, which is not installed.

The pieces it orchestrates live one concept per module: :mod:`~consilia.client.privacy.budget`
(the refusals), :mod:`~consilia.client.privacy.planning` (delta, noise search, release plan),
:mod:`~consilia.client.privacy.dpsgd` (Opacus wrapping, grad-sample mode, the private loop,
FedProx and the fast DP step), :mod:`~consilia.client.privacy.statistics_release` and
:mod:`~consilia.client.privacy.ledger`.

No Flower imports: the site trainer and the ClientApp adapter call this module.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from consilia.client.privacy.accountants import (
    UPPER_BOUND_ACCOUNTANTS,
    accountant_metric_key,
    not_an_upper_bound_reason,
)
from consilia.client.privacy.budget import (
    PrivacyBudgetExceeded,
    PrivacyConfigError,
)
from consilia.client.privacy.dpsgd import (
    PrivateTraining,
    choose_grad_sample_mode,
    train_private_epochs,
    wrap_private,
)
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
from consilia.client.privacy.reservations import Reservation
from consilia.client.privacy.statistics_release import account_statistics_release, release_rng
from consilia.common.config import DPConfig
from consilia.common.serde import clean_state_dict

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

    Raises
    ------
    PrivacyConfigError
        For ``dp.mode == "central"``, an accountant that is not an upper bound (``gdp``) or a
        non-positive budget.

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
        self._calibration: RunCalibration | None = None
        self._engine: PrivacyEngine | None = None
        self._steps_before = 0
        self._uncommitted = False
        self._round: tuple[str, int, int] | None = None
        self._reservation: Reservation | None = None

    # -- round binding (what the trainer's privacy factory provides) ----------------------

    def bind_round(
        self, run_id: str | int, server_round: int, total_rounds: int
    ) -> PrivacyController:
        """Remember the run and round :meth:`train` works for; returns ``self``."""
        self._round = (str(run_id), int(server_round), int(total_rounds))
        return self

    # -- budget ---------------------------------------------------------------------------

    def effective_delta(self, n_samples: int) -> float:
        """Delta for a dataset of ``n_samples`` (see the module docstring).

        Raises
        ------
        PrivacyConfigError
            If the chosen delta is not below ``1 / n_samples``.

        """
        given = [d for d in (self.budget_delta, self.dp.target_delta) if d is not None]
        delta = min(given) if given else default_delta(n_samples)
        if delta >= 1.0 / n_samples:
            raise PrivacyConfigError(
                f"delta={delta:g} is not below 1/n = 1/{n_samples}: with so large a delta a "
                "record may leak outright; set the site's privacy delta (or dp.target_delta) "
                f"below {1.0 / n_samples:g}, e.g. {default_delta(n_samples):g}"
            )
        return delta

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
        """Choose the noise multiplier once for the whole run and cache it in the ledger.

        Parameters
        ----------
        n_samples : int
            Training samples at this site (``len(dataset)``).
        batch_size : int
            Expected (logical) batch size.
        total_rounds : int
            Rounds the run plans (a site that skips rounds spends less than planned).
        local_epochs : int
            Local epochs per round.
        run_id : str or int
            The federated run; a restarted site gets the cached value for the same run.

        Returns
        -------
        float
            The noise multiplier.

        Raises
        ------
        PrivacyBudgetExceeded
            If the budget is already spent or too small for the run.
        PrivacyConfigError
            If the run was calibrated before with a different plan, or delta is too large.

        """
        for name, value in (("n_samples", n_samples), ("batch_size", batch_size),
                            ("total_rounds", total_rounds), ("local_epochs", local_epochs)):
            if int(value) < 1:
                raise PrivacyConfigError(f"calibrate: {name} must be >= 1, got {value}")
        run_id = str(run_id)
        steps_per_epoch = math.ceil(n_samples / batch_size)  # = len(DataLoader), drop_last=False
        sample_rate = 1.0 / steps_per_epoch  # what Opacus' Poisson loader and accountant use
        entry = self._open_entry(n_samples)
        cached = entry.calibrations.get(run_id)
        if cached is not None:
            plan = (cached.n_samples, cached.batch_size, cached.total_rounds, cached.local_epochs)
            if plan != (n_samples, batch_size, total_rounds, local_epochs):
                raise PrivacyConfigError(
                    f"run {run_id} was calibrated for (n, batch, rounds, epochs)={plan} but now "
                    f"asks for {(n_samples, batch_size, total_rounds, local_epochs)}; the noise "
                    "cannot change within a run: restart the run under a new id"
                )
            self._calibration = cached
            return cached.noise_multiplier

        planned_steps = total_rounds * local_epochs * steps_per_epoch
        delta, mechanism, budget = entry.delta, entry.accountant, entry.target_epsilon
        request = float(self.dp.target_epsilon)
        if entry.epsilon_spent >= budget:
            raise PrivacyBudgetExceeded(self._exhausted_text(entry))
        history = entry.accountant_state
        # the run's one feature-statistics release (Gaussian, sampling rate 1), planned in
        reserved = planned_release(
            self.release_noise_multiplier, mechanism, delta, min(request, budget), run_id
        )
        sigma = run_noise_multiplier(
            history, reserved, request=request, budget=budget, delta=delta,
            sample_rate=sample_rate, steps=planned_steps, dataset_key=self.dataset_key,
        )
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
            planned_epsilon=self._eps(planned, delta),
            planned_run_epsilon=self._eps(run_only, delta),
            reserved_release_noise=reserved[0][0] if reserved else None,
            created=utc_now(),
        )
        self.ledger.record_calibration(self.dataset_key, calibration)
        self._calibration = self.ledger.entry(self.dataset_key).calibrations[run_id]
        log.info(
            "DP calibration for run %s on '%s': noise %.4f, q=%.4g, %d steps planned, "
            "lifetime ε %.3f → %.3f of %.3f (δ=%g, %s)", run_id, self.dataset_key, sigma,
            sample_rate, planned_steps, entry.epsilon_spent, calibration.planned_epsilon,
            budget, delta, mechanism,
        )
        return self._calibration.noise_multiplier

    def release_feature_statistics(self, n_samples: int, run_id: str | int | None = None,
                                   server_round: int | None = None) -> float:
        """Account one Gaussian release of feature statistics; return the lifetime epsilon.

        Called before the statistics leave the site. The release is one Gaussian mechanism
        with ``release_noise_multiplier`` (sensitivity-normalised, see
        :meth:`consilia.common.ccvr.FeatureStats.with_gaussian_noise`), which the
        accountant composes as one step at sampling rate 1. It is refused when it would take
        the dataset over the site's lifetime budget, or the run over the epsilon it asked for
        (a run planned with the release, see :meth:`calibrate`, has room for it).

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

    @staticmethod
    def _eps(state: AccountantState, delta: float) -> float:
        return epsilon_of(state, delta)

    def _exhausted_text(self, entry: LedgerEntry) -> str:
        return (
            f"dataset '{self.dataset_key}' has spent ε={entry.epsilon_spent:.3f} of its "
            f"ε={entry.target_epsilon:.3f} budget (δ={entry.delta:g}, {entry.accountant}); "
            "this site refuses further DP training on it"
        )

    def check_budget(self, next_round_steps: int) -> None:
        """Refuse a round that would push the spend over the site's budget or the run's request.

        The read-only form of :meth:`reserve_round` (:meth:`PrivacyLedger.check`): composes the
        ledger's history, every live reservation and ``next_round_steps`` steps at the run's
        noise and sampling rate, and compares. Nothing is reserved, so only
        :meth:`reserve_round` protects against a concurrent process.

        Raises
        ------
        PrivacyBudgetExceeded
            If the lifetime epsilon would exceed the site's budget, or this run's own epsilon
            the coordinator's request.

        """
        cal = self._require_calibration()
        if self._entry() is None:
            raise RuntimeError(f"ledger has no entry for '{self.dataset_key}' after calibrate")
        self.ledger.check(
            self.dataset_key, run_id=cal.run_id, server_round=0, steps=int(next_round_steps),
            sample_rate=cal.sample_rate, noise_multiplier=cal.noise_multiplier,
            run_epsilon_cap=cal.requested_epsilon,
        )

    def reserve_round(self, server_round: int, steps: int | None = None) -> Reservation:
        """Reserve the coming round's epsilon in the ledger, atomically, or refuse the round.

        Parameters
        ----------
        server_round : int
            The coordinator's round number.
        steps : int, optional
            Planned DP-SGD steps (default: one full round, :attr:`steps_per_round`).

        Returns
        -------
        Reservation
            Held until :meth:`commit_round` (or :meth:`release_reservation`).

        Raises
        ------
        PrivacyBudgetExceeded
            If the round, composed with the history and every live reservation, would exceed
            the site's budget or the run's request (nothing is reserved).

        """
        cal = self._require_calibration()
        if self._reservation is not None:
            raise RuntimeError("a round is already reserved: commit or release it first")
        self._reservation = self.ledger.reserve(
            self.dataset_key, run_id=cal.run_id, server_round=int(server_round),
            steps=cal.steps_per_round if steps is None else int(steps),
            sample_rate=cal.sample_rate, noise_multiplier=cal.noise_multiplier,
            run_epsilon_cap=cal.requested_epsilon,
        )
        return self._reservation

    def release_reservation(self) -> None:
        """Give back the reserved round (training failed before its first DP-SGD step)."""
        if self._reservation is not None:
            reservation, self._reservation = self._reservation, None
            self.ledger.release(self.dataset_key, reservation.reservation_id)

    # -- training -------------------------------------------------------------------------

    def resolve_grad_sample_mode(self, criterion: Any = None) -> str:
        """Return the grad-sample mode to use (``dp.grad_sample_mode``, or measured for auto)."""
        mode = self.dp.grad_sample_mode
        explicit = mode != "auto"
        if not explicit:
            mode = choose_grad_sample_mode(self.model_name)
        if mode == "ghost" and criterion is not None and not hasattr(criterion, "reduction"):
            if explicit:
                raise PrivacyConfigError(
                    "grad_sample_mode='ghost' needs a loss with a 'reduction' attribute that "
                    f"honours 'none' (got {type(criterion).__name__}); use 'hooks'"
                )
            mode = "hooks"
        return mode

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
        if self._uncommitted:
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
        engine = PrivacyEngine(accountant=entry.accountant)
        if entry.accountant_state.history:
            engine.accountant.load_state_dict(entry.accountant_state.to_opacus())
        sampling_rng, noise_rng = self._generators(model)
        training = wrap_private(
            engine, model, optimizer, loader, criterion,
            grad_sample_mode=mode,
            noise_multiplier=cal.noise_multiplier,
            sample_rate=cal.sample_rate,
            max_grad_norm=self.dp.max_grad_norm,
            max_physical_batch_size=self.dp.max_physical_batch_size,
            sampling_generator=sampling_rng,
            noise_generator=noise_rng,
        )
        self._engine = engine
        self._steps_before = AccountantState.from_opacus(engine.accountant.state_dict()).total_steps
        self._uncommitted = True
        return training

    def _generators(self, model: nn.Module) -> tuple[torch.Generator, torch.Generator]:
        """Secret generators for Poisson sampling (CPU) and noise (the model's device)."""
        if self.noise_seed is None:
            seeds = (secrets.randbits(63), secrets.randbits(63))
        else:
            seeds = (int(self.noise_seed), int(self.noise_seed) + 1)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        sampling = torch.Generator().manual_seed(seeds[0])
        noise = torch.Generator(device=device).manual_seed(seeds[1])
        return sampling, noise

    def steps_taken(self) -> int:
        """DP-SGD steps taken since :meth:`make_private` (accountant steps)."""
        if self._engine is None:
            return 0
        state = AccountantState.from_opacus(self._engine.accountant.state_dict())
        return state.total_steps - self._steps_before

    def commit_round(self, run_id: str | int, server_round: int) -> float:
        """Compose this round's steps into the ledger (saved atomically); return lifetime ε.

        Commits the round's reservation (:meth:`reserve_round`), if any. Call it before the
        round's weights leave the site.
        """
        cal = self._require_calibration()
        if not self._uncommitted or self._engine is None:
            raise RuntimeError("commit_round() without a private round (call make_private first)")
        steps = self.steps_taken()
        reservation, self._reservation = self._reservation, None
        entry = self.ledger.record_round(
            self.dataset_key,
            run_id=str(run_id),
            server_round=int(server_round),
            steps=steps,
            sample_rate=cal.sample_rate,
            noise_multiplier=cal.noise_multiplier,
            reservation_id=reservation.reservation_id if reservation is not None else None,
        )
        engine_state = AccountantState.from_opacus(self._engine.accountant.state_dict())
        if engine_state != entry.accountant_state:
            log.warning(
                "privacy ledger for '%s' was updated concurrently by another process; "
                "its composed total (ε=%.3f) includes both", self.dataset_key, entry.epsilon_spent,
            )
        self._uncommitted = False
        self._engine = None
        return entry.epsilon_spent

    @staticmethod
    def unwrap_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
        """Return the weights without Opacus' ``_module.`` prefixes (CPU, detached)."""
        return clean_state_dict(model.state_dict())

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
            if self._uncommitted:
                self.commit_round(run_id, server_round)  # also after a failure: conservative
            private.close()
        return loss, n, steps
