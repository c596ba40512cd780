"""Opacus wrapping of one private round: its engine, secret generators, the wrap and unwrap.

:func:`open_private_round` makes a round private (:class:`PrivateRound`): an engine whose
accountant continues the dataset's ledger history, secret generators, and the wrapped
objects; :func:`unwrap_state_dict` gives the weights back without Opacus' prefixes.

Randomness (:func:`secret_generators`).
    The trainer seeds torch from the run's seed, which the coordinator knows; noise and
    Poisson sampling drawn from that stream could be replayed and the noise subtracted,
    voiding the guarantee. Opacus therefore gets its own generators seeded from ``secrets``
    (OS entropy) — for the noise (``noise_generator``) and for the sampler
    (``opacus.data_loader.switch_generator``, which replaces the generator of the loader
    passed in). A ``noise_seed`` makes them reproducible for simulations and tests only.
    Opacus' ``secure_mode`` (CSPRNG plus floating-point attack mitigation) needs
    ``torchcsprng``, which is not installed.

The DP-SGD mechanics the wrapped objects run with (grad-sample modes, the fast DP step,
FedProx, the private loop) are in :mod:`consilia.client.privacy.dpsgd`.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import switch_generator
from torch import nn
from torch.utils.data import DataLoader

from consilia.client.privacy.budget import PrivacyConfigError
from consilia.client.privacy.dpsgd import (
    NO_EMPTY_BATCH_MODES,
    PrivateTraining,
    enable_fast_dp_step,
)
from consilia.client.privacy.ledger_records import AccountantState
from consilia.common.serde import clean_state_dict

__all__ = [
    "PrivateRound",
    "engine_with_history",
    "open_private_round",
    "secret_generators",
    "unwrap_state_dict",
    "wrap_private",
]


def secret_generators(
    model: nn.Module, noise_seed: int | None
) -> tuple[torch.Generator, torch.Generator]:
    """Secret generators for Poisson sampling (CPU) and noise (the model's device).

    Seeded from OS entropy, or from ``noise_seed`` and ``noise_seed + 1`` (simulations and
    tests only; see the module docstring).
    """
    if noise_seed is None:
        seeds = (secrets.randbits(63), secrets.randbits(63))
    else:
        seeds = (int(noise_seed), int(noise_seed) + 1)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    sampling = torch.Generator().manual_seed(seeds[0])
    noise = torch.Generator(device=device).manual_seed(seeds[1])
    return sampling, noise


def engine_with_history(accountant: str, history: AccountantState) -> PrivacyEngine:
    """Return a ``PrivacyEngine`` whose accountant continues ``history`` (the ledger's)."""
    engine = PrivacyEngine(accountant=accountant)
    if history.history:
        engine.accountant.load_state_dict(history.to_opacus())
    return engine


def unwrap_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Return the weights without Opacus' ``_module.`` prefixes (CPU, detached)."""
    return clean_state_dict(model.state_dict())


def wrap_private(
    engine: PrivacyEngine,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    criterion: Any,
    *,
    grad_sample_mode: str,
    noise_multiplier: float,
    sample_rate: float,
    max_grad_norm: float,
    max_physical_batch_size: int,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> PrivateTraining:
    """Wrap one round's training objects with ``engine`` (Poisson sampling, secret generators).

    Parameters
    ----------
    engine : PrivacyEngine
        The round's engine, its accountant already holding the dataset's history.
    model, optimizer, loader
        Plain torch objects.
    criterion : callable or None
        The loss; ghost mode wraps it (default ``nn.CrossEntropyLoss()``).
    grad_sample_mode : str
        One of :data:`GRAD_SAMPLE_MODES`.
    noise_multiplier, sample_rate : float
        As calibrated for the run.
    max_grad_norm : float
        Per-sample clipping bound.
    max_physical_batch_size : int
        Memory bound of :meth:`PrivateTraining.memory_bounded`.
    sampling_generator, noise_generator : torch.Generator
        Generators for the Poisson sampler and the noise (never the run's torch seed).

    Returns
    -------
    PrivateTraining
        The private objects, with the fast DP step enabled.

    Raises
    ------
    PrivacyConfigError
        If Opacus samples at another rate than the calibration's.

    """
    mode = grad_sample_mode
    loader = switch_generator(data_loader=loader, generator=sampling_generator)
    kwargs: dict[str, Any] = {"noise_generator": noise_generator}
    if mode == "ghost":
        kwargs["criterion"] = criterion if criterion is not None else nn.CrossEntropyLoss()
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=mode,
        rand_on_empty=mode in NO_EMPTY_BATCH_MODES,
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
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        max_physical_batch_size=max_physical_batch_size,
    )
    training.hook_handles.extend(enable_fast_dp_step(private_model, mode))
    actual_q = 1.0 / len(private_loader)
    if not math.isclose(actual_q, sample_rate, rel_tol=1e-12):
        training.close()
        raise PrivacyConfigError(
            f"Opacus samples at q={actual_q:.6g} but the run was calibrated for "
            f"q={sample_rate:.6g}"
        )
    return training


@dataclass
class PrivateRound:
    """One round made private: the engine (its accountant continues the ledger) and objects."""

    engine: PrivacyEngine
    training: PrivateTraining
    steps_before: int

    def accountant_state(self) -> AccountantState:
        """Return the engine's accountant now: the ledger's history plus this round's steps."""
        return AccountantState.from_opacus(self.engine.accountant.state_dict())

    def steps_taken(self) -> int:
        """DP-SGD steps taken in this round (accountant steps)."""
        return self.accountant_state().total_steps - self.steps_before


def open_private_round(
    history: AccountantState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    criterion: Any,
    *,
    accountant: str,
    noise_seed: int | None,
    grad_sample_mode: str,
    noise_multiplier: float,
    sample_rate: float,
    max_grad_norm: float,
    max_physical_batch_size: int,
) -> PrivateRound:
    """Make one round private, its accountant continuing ``history``.

    Parameters
    ----------
    history : AccountantState
        The dataset's accountant history from the ledger.
    model, optimizer, loader, criterion
        As for :func:`wrap_private`.
    accountant : str
        The dataset's accountant (``rdp`` or ``prv``).
    noise_seed : int or None
        Seed of :func:`secret_generators` (``None`` at a real site).
    grad_sample_mode, noise_multiplier, sample_rate, max_grad_norm, max_physical_batch_size
        As for :func:`wrap_private`.

    Returns
    -------
    PrivateRound
        The engine, the private objects and the accountant's steps before the round.

    """
    engine = engine_with_history(accountant, history)
    sampling_rng, noise_rng = secret_generators(model, noise_seed)
    training = wrap_private(
        engine, model, optimizer, loader, criterion,
        grad_sample_mode=grad_sample_mode, noise_multiplier=noise_multiplier,
        sample_rate=sample_rate, max_grad_norm=max_grad_norm,
        max_physical_batch_size=max_physical_batch_size,
        sampling_generator=sampling_rng, noise_generator=noise_rng,
    )
    steps_before = AccountantState.from_opacus(engine.accountant.state_dict()).total_steps
    return PrivateRound(engine=engine, training=training, steps_before=steps_before)
