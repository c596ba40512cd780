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
    Noise is chosen once per run for *all* planned rounds
    (``steps = total_rounds * local_epochs * steps_per_epoch``) with
    ``opacus.accountants.utils.get_noise_multiplier``, never with
    ``make_private_with_epsilon`` (it calibrates one round and ignores the loaded history).
    When the ledger already holds history (an earlier run), the same doubling + bisection
    search (tolerance 0.01) runs on the *composed* accountant (history + planned run): epsilons
    do not add under RDP/PRV composition, so "remaining = budget − spent" fed to a fresh
    calibration would be wrong. The calibration is cached in the ledger per run id, so a
    restarted site keeps the same noise. Sampling rate and steps per epoch are what Opacus'
    Poisson loader uses: ``q = 1 / len(loader) = 1 / ceil(n / batch_size)`` (equal to
    ``batch_size / n`` when the batch divides n), so the plan and the accountant agree.
Delta.
    The smallest of the site's ``budget_delta``, the request's ``dp.target_delta`` and, when
    neither is set, ``min(1e-5, 1 / (10 n))``; it must stay below ``1 / n``. Once a dataset
    has a ledger entry its delta only ever tightens.
Accountant.
    Fixed per dataset by its ledger entry (first run's ``dp.accountant``; ``rdp`` default).
    ``gdp`` cannot compose different noise levels: a later run must reuse the recorded noise.
Guard (:meth:`PrivacyController.check_budget`).
    Before each round the ledger's accountant state is loaded into a fresh accountant,
    stepped with the round's steps, and the round is refused (:class:`PrivacyBudgetExceeded`)
    if the lifetime or this run's epsilon would exceed its cap (numerical slack 1e-9).
Accounting (:meth:`PrivacyController.make_private` / :meth:`PrivacyController.commit_round`).
    The persisted accountant state is loaded into ``engine.accountant`` before training, so ε
    composes exactly across rounds and restarts; after the round the steps actually taken are
    composed into the ledger file (atomically, before any weights leave the site). If
    training fails half-way, the steps already taken are still recorded (conservative).
Grad-sample mode (:func:`choose_grad_sample_mode`).
    ``dp.grad_sample_mode="auto"`` picks, per registered model, the fastest mode that worked
    and gave the same update as ``hooks`` in our CPU measurement (1 thread, noise 0,
    ``docs/benchmarks.md``; :data:`MEASURED_GRAD_SAMPLE_MODE`): ``hooks`` for cnn (with the
    speed-ups below), ``ew`` for lenet5, ``ghost`` for alexnet, ``hooks`` for the rest
    (efficientnet_b0 too, since the grouped-conv per-sample gradients: 2.3x vs 4.0x).
    Models registered later fall back to ``"hooks"`` (works for every Opacus-valid model).
    ``"ghost"`` (fast gradient clipping) returns a wrapped criterion whose
    ``loss.backward()`` runs the two backward passes; :class:`PrivateTraining` always
    carries the criterion to use, so the trainer needs no special case. Ghost needs a
    criterion with a ``reduction`` attribute honouring ``"none"``; otherwise ``auto`` falls
    back to ``"hooks"``.
Step cost (:func:`enable_fast_dp_step`, called by :meth:`PrivacyController.make_private`).
    Same per-sample gradients, clipping, noise and accounting as stock Opacus, computed with
    less work: faster ``Conv2d``/``GroupNorm`` grad samplers registered through
    ``opacus.grad_sample.register_grad_sampler`` (:mod:`consilia.client.privacy.grad_samplers`); in
    hooks mode, the ordinary convolution gradients that ``DPOptimizer`` overwrites are not
    computed (:mod:`consilia.client.privacy.discarded_grads`); freed heap memory is kept for the
    next step instead of being page-faulted back in (:mod:`consilia.common.training.allocator`).
    For the default cnn a DP-SGD step went from 1.7-2.2× to 1.3-1.5× a plain step
    (``docs/benchmarks.md``).
FedProx under DP (:func:`apply_proximal_gradient`).
    Adding ``mu/2·Σ‖w−g‖²`` to the loss does not work with Opacus: in hooks/functorch/ew mode
    ``DPOptimizer`` replaces ``p.grad`` by the clipped, noised sum of *per-sample* gradients,
    so the proximal gradient is silently dropped (measured: identical update); in ghost mode
    the term would be scaled by the data-dependent clipping coefficients (a leak). Instead the
    controller adds ``mu·(w − g)`` to the privatised gradient in a step pre-hook of the inner
    optimizer (after clipping + noise, before the update, only on real logical steps). This
    is post-processing: it depends only on the current weights (already DP outputs) and the
    global weights (public to this site), so it consumes no privacy budget and needs no
    clipping. For SGD it equals FedProx's gradient exactly; adaptive optimizers see it too.
Central DP.
    ``dp.mode="central"`` is the coordinator's job (client-level clipping + noise); this
    controller refuses it.
Empty batches.
    Poisson sampling yields empty batches now and then; the round still takes a noise-only
    step for them (hooks and ghost handle zero-length batches; ew and functorch crash on
    them, so they get Opacus' ``rand_on_empty`` filler: one random, data-independent sample).
    ``consilia.common.training.engine.train_epochs`` skips empty batches, hence
    :func:`train_private_epochs`.
Randomness.
    The trainer seeds torch from the run's seed, which the coordinator knows; noise and
    Poisson sampling drawn from that stream could be replayed and the noise subtracted,
    voiding the guarantee. :meth:`PrivacyController.make_private` therefore gives Opacus its
    own generators seeded from ``secrets`` (OS entropy) — for the noise
    (``noise_generator``) and for the sampler (``opacus.data_loader.switch_generator``,
    which replaces the generator of the loader passed in). ``noise_seed`` makes them
    reproducible for simulations and tests only. Opacus' ``secure_mode`` (CSPRNG plus
    floating-point attack mitigation) needs ``torchcsprng``, which is not installed.
Memory.
    :meth:`PrivateTraining.memory_bounded` wraps the loader in Opacus'
    ``BatchMemoryManager(max_physical_batch_size)``: logical (Poisson) batches are split into
    physical ones and the optimizer steps once per logical batch (accounting unchanged).

No Flower imports: the site trainer and the ClientApp adapter call this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier
from opacus.data_loader import switch_generator
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader

from consilia.client.privacy.discarded_grads import skip_discarded_conv_grads
from consilia.client.privacy.grad_samplers import register_fast_grad_samplers
from consilia.client.privacy.ledger import (
    AccountantState,
    LedgerEntry,
    PrivacyLedger,
    RunCalibration,
    accountant_from_state,
    utc_now,
)
from consilia.common.training.allocator import retain_freed_memory
from consilia.common.config import DPConfig
from consilia.common.serde import clean_state_dict

__all__ = [
    "GRAD_SAMPLE_MODES",
    "MEASURED_GRAD_SAMPLE_MODE",
    "PrivacyBudgetExceeded",
    "PrivacyConfigError",
    "PrivacyController",
    "PrivateTraining",
    "apply_proximal_gradient",
    "choose_grad_sample_mode",
    "default_delta",
    "enable_fast_dp_step",
    "noise_for_composed_target",
    "train_private_epochs",
]

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")

#: Fastest grad-sample mode per registered model among those that worked and gave the same
#: update as ``hooks`` (noise 0), measured on CPU with 1 thread (batch 16 at 32 px; the cnn
#: also at batch 64, 28 and 64 px; see docs/benchmarks.md). Where two modes were within
#: measurement noise, ``hooks`` is kept (it handles empty batches natively). Models not
#: listed fall back to ``"hooks"``. The cnn row was re-measured with
#: :func:`enable_fast_dp_step` (interleaved A/B, width 16), the others before it existed.
MEASURED_GRAD_SAMPLE_MODE: dict[str, str] = {
    "cnn": "hooks",  # hooks 1.3-1.5x plain vs ew 1.6-1.8x (28-64 px, batch 32-64)
    "lenet5": "ew",  # ew 1.6x vs ghost 1.7x vs hooks 2.8x (median)
    "alexnet": "ghost",  # ghost 2.0x vs hooks 4.9x
    "efficientnet_b0": "hooks",  # hooks 2.3x vs functorch 4.0x with the fast grouped convs
    "densenet121": "hooks",  # hooks 2.6x vs ghost 4.1x; ew fails (view of non-contiguous)
    "inception": "hooks",  # hooks 2.7x vs ghost 4.1x
    "resnet18": "hooks",  # hooks ~ ghost ~10x; functorch/ew slower
    "vgg11": "hooks",  # hooks ~ ghost within noise
    "vit": "hooks",  # hooks 1.9x vs functorch/ghost 2.4x; ew fails (unsupported add)
}

#: Modes that crash on an empty Poisson batch; they get one random (data-independent) filler
#: sample instead (Opacus ``rand_on_empty``), so the noise-only step still happens.
_NO_EMPTY_BATCH_MODES = ("ew", "functorch")

#: Slack when comparing a would-be epsilon with its cap (float noise of the accountant only).
EPSILON_SLACK = 1e-9


#: A calibration release is planned into a run only when, on its own, it costs at most this
#: share of the run's epsilon (otherwise DP-SGD would keep too little; the site declines it).
RELEASE_SHARE_LIMIT = 0.5


class PrivacyBudgetExceeded(RuntimeError):  # noqa: N818 (name fixed by the design brief)
    """Training one more round would exceed a privacy budget; the site refuses to train.

    Attributes
    ----------
    reason : str
        Plain-language reason (also the exception message).

    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PrivacyConfigError(ValueError):
    """The DP request or the site's privacy policy cannot be honoured as given."""


def default_delta(n_samples: int) -> float:
    """Return the default delta ``min(1e-5, 1 / (10 n))`` (always well below ``1 / n``)."""
    if n_samples < 1:
        raise PrivacyConfigError(f"cannot train with DP on {n_samples} samples")
    return min(1e-5, 1.0 / (10.0 * n_samples))


def choose_grad_sample_mode(model_name: str | None) -> str:
    """Return the fastest grad-sample mode measured for a registered model (``"hooks"`` if none).

    Parameters
    ----------
    model_name : str or None
        Registered model name (``consilia.common.models.MODELS``).

    Returns
    -------
    str
        One of ``"hooks"``, ``"functorch"``, ``"ew"``, ``"ghost"``.

    """
    return MEASURED_GRAD_SAMPLE_MODE.get(model_name or "", "hooks")


def enable_fast_dp_step(module: nn.Module, grad_sample_mode: str) -> list[Any]:
    """Install the DP-SGD speed-ups for one Opacus-wrapped model; return handles to remove.

    Nothing here changes the per-sample gradients, the clipping, the noise or the
    accounting (``tests/client/privacy/test_grad_samplers.py``); :meth:`PrivacyController.make_private`
    calls it, :meth:`PrivateTraining.close` removes the handles.

    Parameters
    ----------
    module : nn.Module
        The model after ``PrivacyEngine.make_private``.
    grad_sample_mode : str
        The mode it was wrapped with.

    Returns
    -------
    list
        Hook handles; in hooks mode those of
        :func:`~consilia.client.privacy.discarded_grads.skip_discarded_conv_grads`, else none.

    Notes
    -----
    Process-wide and idempotent: the faster ``Conv2d``/``GroupNorm`` grad samplers
    (:func:`~consilia.client.privacy.grad_samplers.register_fast_grad_samplers`, used by the hooks
    and ghost modes) and the heap kept for reuse
    (:func:`~consilia.common.training.allocator.retain_freed_memory`). Per model, hooks mode only:
    the ordinary convolution gradients that ``DPOptimizer`` would overwrite are not computed.

    """
    register_fast_grad_samplers()
    retain_freed_memory()
    if grad_sample_mode == "hooks":
        return skip_discarded_conv_grads(module)
    return []


def apply_proximal_gradient(
    model: nn.Module, global_params: Sequence[torch.Tensor], mu: float
) -> None:
    """Add the FedProx gradient ``mu · (w − g)`` to every trainable parameter's ``.grad``.

    Call it on the *privatised* gradient (after Opacus' clipping and noise, before the
    update); :meth:`PrivateTraining.add_proximal_term` installs it as a step pre-hook. It is
    post-processing of DP outputs and public weights, so it costs no privacy budget.

    Parameters
    ----------
    model : nn.Module
        The (possibly Opacus-wrapped) model; its trainable parameters, in order, must match
        ``global_params`` (as produced by ``consilia.common.training.engine.snapshot_params``).
    global_params : sequence of Tensor
        Detached global weights received this round.
    mu : float
        Proximal coefficient (``>= 0``; 0 does nothing).

    Raises
    ------
    ValueError
        If ``mu < 0`` or the parameter lists differ in length or shapes.

    """
    if mu < 0:
        raise ValueError(f"proximal mu must be >= 0, got {mu}")
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(global_params):
        raise ValueError(
            f"proximal gradient: {len(params)} trainable parameters vs "
            f"{len(global_params)} global tensors"
        )
    if mu == 0:
        return
    with torch.no_grad():
        for p, g in zip(params, global_params, strict=True):
            if p.shape != g.shape:
                raise ValueError(f"proximal gradient: shape {tuple(p.shape)} vs {tuple(g.shape)}")
            if p.grad is None:
                continue  # parameter not used this step: no update, no proximal pull either
            p.grad.add_(p.detach() - g.to(p.device, p.dtype), alpha=mu)


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


@dataclass
class PrivateTraining:
    """The private training objects of one round (use these, not the originals).

    Attributes
    ----------
    model : nn.Module
        Opacus ``GradSampleModule`` (state_dict keys carry ``_module.``; see
        :meth:`PrivacyController.unwrap_state_dict`). It trains the original module in place.
    optimizer : opacus.optimizers.DPOptimizer
        Clips per-sample gradients, adds noise, steps the accountant.
    loader : DataLoader
        Poisson-sampling loader (variable batch sizes, possibly empty batches).
    criterion : callable
        The loss to call: the original one, or in ghost mode Opacus' wrapper whose
        ``loss.backward()`` performs both backward passes.
    grad_sample_mode : str
        The mode in use.
    noise_multiplier, sample_rate : float
        As calibrated for the run.
    max_physical_batch_size : int
        Memory bound used by :meth:`memory_bounded`.

    """

    model: nn.Module
    optimizer: Any
    loader: DataLoader
    criterion: Any
    grad_sample_mode: str
    noise_multiplier: float
    sample_rate: float
    max_physical_batch_size: int
    _handles: list[Any] = field(default_factory=list, repr=False)

    @contextlib.contextmanager
    def memory_bounded(self) -> Iterator[DataLoader]:
        """Yield the loader split into physical batches of at most ``max_physical_batch_size``.

        The optimizer steps (and the accountant counts) once per *logical* batch.
        """
        with BatchMemoryManager(
            data_loader=self.loader,
            max_physical_batch_size=self.max_physical_batch_size,
            optimizer=self.optimizer,
        ) as loader:
            yield loader

    def add_proximal_term(self, global_params: Sequence[torch.Tensor], mu: float) -> None:
        """Apply FedProx as post-processing: ``mu·(w − g)`` joins each privatised gradient.

        Do not also add the proximal term to the loss (see the module docstring).
        """
        if mu <= 0:
            return
        anchors = [g.detach().clone() for g in global_params]
        apply_proximal_gradient(self.model, anchors, 0.0)  # validates lengths now, not mid-round
        model = self.model

        def _hook(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            apply_proximal_gradient(model, anchors, mu)

        inner = self.optimizer.original_optimizer
        self._handles.append(inner.register_step_pre_hook(_hook))

    def close(self) -> None:
        """Remove the proximal hook and Opacus' hooks/attributes from the original module."""
        while self._handles:
            self._handles.pop().remove()
        cleanup = getattr(self.model, "cleanup", None)
        if callable(cleanup):
            cleanup()


def train_private_epochs(private: PrivateTraining, epochs: int) -> float:
    """Train ``epochs`` epochs with the private objects; return the mean per-sample task loss.

    Unlike ``consilia.common.training.engine.train_epochs`` this loop does *not* skip empty Poisson
    batches: DP-SGD's accounting assumes a (noise-only) step for every sampled batch, and
    skipping would make the release depend on whether the batch was empty. Batches are split
    by :meth:`PrivateTraining.memory_bounded`; the optimizer steps once per logical batch.
    """
    model, optimizer, criterion = private.model, private.optimizer, private.criterion
    model.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        with private.memory_bounded() as batches:
            for images, labels in batches:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), labels)
                loss.backward()
                optimizer.step()
                batch = int(labels.shape[0])
                if batch:
                    total += float(loss.detach()) * batch
                    seen += batch
    optimizer.zero_grad(set_to_none=True)
    return total / max(seen, 1)


class PrivacyController:
    """Local DP-SGD for one dataset of one site, accounted in the site's ledger.

    Parameters
    ----------
    dp : DPConfig
        The coordinator's DP request (``mode`` must be ``"local"``).
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
        For ``dp.mode == "central"`` or a non-positive budget.

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
        reserved = self._reserved_release(mechanism)
        if reserved and self._eps(AccountantState(mechanism=mechanism, history=reserved),
                                  delta) > RELEASE_SHARE_LIMIT * min(request, budget):
            log.info("run %s: the feature-statistics release alone would cost more than half "
                     "of ε=%.3f; not planned (the site will decline it)", run_id,
                     min(request, budget))
            reserved = []
        with_release = AccountantState(mechanism=mechanism,
                                       history=[*history.history, *reserved])
        release_only = AccountantState(mechanism=mechanism, history=list(reserved))
        try:
            if mechanism == "gdp" and history.history:
                sigma = self._gdp_continuation(history, sample_rate)
            elif not history.history and not reserved:
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
                    f"dataset '{self.dataset_key}': no noise level fits {planned_steps} DP-SGD "
                    f"steps into the budget ({exc})"
                ) from None
            raise PrivacyConfigError(  # e.g. the GDP accountant's root finder fails
                f"the {mechanism} accountant cannot calibrate {planned_steps} steps at sampling "
                f"rate {sample_rate:.4g} ({exc}); use dp.accountant='rdp'"
            ) from None
        planned = AccountantState(mechanism=mechanism, history=[
            *history.history, (sigma, sample_rate, planned_steps), *reserved])
        if mechanism == "gdp" and history.history:  # GDP keeps one merged entry
            planned.history = [(sigma, sample_rate, history.total_steps + planned_steps)]
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

    def _reserved_release(self, mechanism: str) -> list[tuple[float, float, int]]:
        """Return the feature-statistics release to plan for (one step at sampling rate 1)."""
        if self.release_noise_multiplier is None or mechanism == "gdp":
            return []  # GDP's CLT composition does not cover a full-batch release
        return [(float(self.release_noise_multiplier), 1.0, 1)]

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
        if entry.accountant == "gdp":
            raise PrivacyConfigError(
                f"dataset '{self.dataset_key}' is accounted with the GDP accountant, which "
                "cannot compose a full-batch Gaussian release; use dp.accountant='rdp'"
            )
        release = (float(sigma), 1.0, 1)
        lifetime = self._eps(AccountantState(mechanism=entry.accountant, history=[
            *entry.accountant_state.history, release]), entry.delta)
        if lifetime > entry.target_epsilon + EPSILON_SLACK:
            raise PrivacyBudgetExceeded(
                f"dataset '{self.dataset_key}': sending noised feature statistics (noise "
                f"multiplier {sigma:g}) would raise the spend from ε={entry.epsilon_spent:.3f} "
                f"to ε={lifetime:.3f}, over the site's budget ε={entry.target_epsilon:.3f}"
            )
        run_id = str(run_id)
        cal = entry.calibrations.get(run_id)
        requested = cal.requested_epsilon if cal is not None else float(self.dp.target_epsilon)
        run_state = entry.run_history(run_id)
        run_eps = self._eps(AccountantState(mechanism=entry.accountant, history=[
            *run_state.history, release]), entry.delta)
        if run_eps > requested + EPSILON_SLACK:
            raise PrivacyBudgetExceeded(
                f"dataset '{self.dataset_key}': sending noised feature statistics would bring "
                f"run {run_id} to ε={run_eps:.3f}, over the ε={requested:.3f} it asked for "
                "(the run's budget was not planned with a calibration release)"
            )
        updated = self.ledger.record_round(
            self.dataset_key, run_id=run_id, server_round=server_round, steps=1,
            sample_rate=1.0, noise_multiplier=float(sigma), kind="feature-statistics",
        )
        log.info("DP release of feature statistics for run %s on '%s': noise %.3f, lifetime "
                 "ε %.3f -> %.3f", run_id, self.dataset_key, sigma, entry.epsilon_spent,
                 updated.epsilon_spent)
        return float(updated.epsilon_spent)

    def release_rng(self) -> np.random.Generator:
        """Noise source for a release: OS entropy at a real site, ``noise_seed`` in simulation."""
        if self.noise_seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([int(self.noise_seed), 0xCA11B])

    def _open_entry(self, n_samples: int) -> LedgerEntry:
        existing = self._entry()
        accountant = existing.accountant if existing is not None else self.dp.accountant
        if accountant != self.dp.accountant:
            log.warning(
                "dataset '%s' is accounted with the %s accountant (its ledger); the request's "
                "'%s' is ignored", self.dataset_key, accountant, self.dp.accountant,
            )
        return self.ledger.open_entry(
            self.dataset_key,
            accountant=accountant,
            delta=self.effective_delta(n_samples),
            target_epsilon=self.budget_epsilon,
        )

    def _gdp_continuation(self, history: AccountantState, sample_rate: float) -> float:
        sigma, q, _ = history.history[-1]
        if not math.isclose(q, sample_rate, rel_tol=0, abs_tol=1e-15):
            raise PrivacyConfigError(
                f"dataset '{self.dataset_key}' is accounted with the GDP accountant, which "
                f"cannot compose a new sampling rate ({sample_rate:.4g} vs recorded {q:.4g}); "
                "keep the batch size, or account a new dataset key with 'rdp'"
            )
        return float(sigma)

    @staticmethod
    def _eps(state: AccountantState, delta: float) -> float:
        return float(accountant_from_state(state).get_epsilon(delta=delta))

    def _exhausted_text(self, entry: LedgerEntry) -> str:
        return (
            f"dataset '{self.dataset_key}' has spent ε={entry.epsilon_spent:.3f} of its "
            f"ε={entry.target_epsilon:.3f} budget (δ={entry.delta:g}, {entry.accountant}); "
            "this site refuses further DP training on it"
        )

    def check_budget(self, next_round_steps: int) -> None:
        """Refuse a round that would push the spend over the site's budget or the run's request.

        Loads the ledger's accountant state into a fresh Opacus accountant, steps it
        ``next_round_steps`` times with the run's noise and sampling rate, and compares.

        Raises
        ------
        PrivacyBudgetExceeded
            If the lifetime epsilon would exceed the site's budget, or this run's own epsilon
            the coordinator's request.

        """
        cal = self._require_calibration()
        entry = self._entry()
        if entry is None:
            raise RuntimeError(f"ledger has no entry for '{self.dataset_key}' after calibrate")

        def would_be(state: AccountantState) -> float:
            accountant = accountant_from_state(state)
            for _ in range(int(next_round_steps)):
                accountant.step(noise_multiplier=cal.noise_multiplier, sample_rate=cal.sample_rate)
            return float(accountant.get_epsilon(delta=entry.delta))

        lifetime = would_be(entry.accountant_state)
        if lifetime > entry.target_epsilon + EPSILON_SLACK:
            raise PrivacyBudgetExceeded(
                f"dataset '{self.dataset_key}': one more round ({next_round_steps} DP-SGD steps) "
                f"would raise the spend from ε={entry.epsilon_spent:.3f} to ε={lifetime:.3f}, "
                f"over the site's budget ε={entry.target_epsilon:.3f} (δ={entry.delta:g}, "
                f"{entry.accountant}); this site refuses to train"
            )
        run_eps = would_be(entry.run_history(cal.run_id))
        if run_eps > cal.requested_epsilon + EPSILON_SLACK:
            raise PrivacyBudgetExceeded(
                f"dataset '{self.dataset_key}': one more round would bring run {cal.run_id} to "
                f"ε={run_eps:.3f}, over the ε={cal.requested_epsilon:.3f} the run asked for "
                f"(it planned {cal.total_rounds} rounds); this site refuses to train"
            )

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
        loader = switch_generator(data_loader=loader, generator=sampling_rng)
        kwargs: dict[str, Any] = {"noise_generator": noise_rng}
        if mode == "ghost":
            kwargs["criterion"] = criterion if criterion is not None else nn.CrossEntropyLoss()
        out = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=cal.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            rand_on_empty=mode in _NO_EMPTY_BATCH_MODES,
            **kwargs,
        )
        if mode == "ghost":
            private_model, private_opt, private_criterion, private_loader = out
        else:
            (private_model, private_opt, private_loader), private_criterion = out, criterion
        training = PrivateTraining(
            model=private_model,
            optimizer=private_opt,
            loader=private_loader,
            criterion=private_criterion,
            grad_sample_mode=mode,
            noise_multiplier=cal.noise_multiplier,
            sample_rate=cal.sample_rate,
            max_physical_batch_size=self.dp.max_physical_batch_size,
        )
        training._handles.extend(enable_fast_dp_step(private_model, mode))
        actual_q = 1.0 / len(private_loader)
        if not math.isclose(actual_q, cal.sample_rate, rel_tol=1e-12):
            training.close()
            raise PrivacyConfigError(
                f"Opacus samples at q={actual_q:.6g} but the run was calibrated for "
                f"q={cal.sample_rate:.6g}"
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

        Call it before the round's weights leave the site.
        """
        cal = self._require_calibration()
        if not self._uncommitted or self._engine is None:
            raise RuntimeError("commit_round() without a private round (call make_private first)")
        steps = self.steps_taken()
        entry = self.ledger.record_round(
            self.dataset_key,
            run_id=str(run_id),
            server_round=int(server_round),
            steps=steps,
            sample_rate=cal.sample_rate,
            noise_multiplier=cal.noise_multiplier,
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

        Calibrates (cached per run), checks the budget, makes the objects private, trains
        ``epochs`` epochs with ``consilia.common.training.engine.train_epochs`` inside the memory
        manager (:func:`train_private_epochs`), applies FedProx as post-processing, and commits
        the spend to the ledger —
        also when training fails half-way. Needs :meth:`bind_round` first.

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
        self.check_budget(self.steps_per_round)
        private = self.make_private(model, optimizer, loader, loss_fn)
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
