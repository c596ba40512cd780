"""DP-SGD with Opacus: the grad-sample mode, the private objects of a round and their loop.

Grad-sample mode (:func:`choose_grad_sample_mode`, :func:`resolve_grad_sample_mode`).
    ``dp.grad_sample_mode="auto"`` picks, per registered model, the fastest mode that worked
    and gave the same update as ``hooks`` in our CPU measurement (1 thread, noise 0,
    ``docs/benchmarks.md``): each model's spec carries it
    (:attr:`consilia.common.models.ModelSpec.dp_grad_sample_mode`): ``hooks`` for cnn (with
    the speed-ups below), ``ew`` for lenet5, ``ghost`` for alexnet, ``hooks`` for the rest
    (efficientnet_b0 too, since the grouped-conv per-sample gradients: 2.3x vs 4.0x).
    Unknown names fall back to ``"hooks"`` (works for every Opacus-valid model).
    ``"ghost"`` (fast gradient clipping) returns a wrapped criterion whose
    ``loss.backward()`` runs the two backward passes; :class:`PrivateTraining` always
    carries the criterion to use, so the trainer needs no special case. Ghost needs a
    criterion with a ``reduction`` attribute honouring ``"none"``; otherwise ``auto`` falls
    back to ``"hooks"``.
Step cost (:func:`enable_fast_dp_step`, called by ``opacus_wrapping.wrap_private``).
    Same per-sample gradients, clipping, noise and accounting as stock Opacus, computed with
    less work: faster ``Conv2d``/``GroupNorm`` grad samplers registered through
    ``opacus.grad_sample.register_grad_sampler`` (:mod:`consilia.client.privacy.grad_samplers`);
    in hooks mode, the ordinary convolution gradients that ``DPOptimizer`` overwrites are not
    computed (:mod:`consilia.client.privacy.discarded_grads`); freed heap memory is kept for
    the next step instead of being page-faulted back in
    (:mod:`consilia.common.training.allocator`). For the default cnn a DP-SGD step went from
    1.7-2.2× to 1.3-1.5× a plain step (``docs/benchmarks.md``).
FedProx under DP (:func:`apply_proximal_gradient`).
    Adding ``mu/2·Σ‖w−g‖²`` to the loss does not work with Opacus: in hooks/functorch/ew mode
    ``DPOptimizer`` replaces ``p.grad`` by the clipped, noised sum of *per-sample* gradients,
    so the proximal gradient is silently dropped (measured: identical update); in ghost mode
    the term would be scaled by the data-dependent clipping coefficients (a leak). Instead
    ``mu·(w − g)`` is added to the privatised gradient in a step pre-hook of the inner
    optimizer (after clipping + noise, before the update, only on real logical steps). This
    is post-processing: it depends only on the current weights (already DP outputs) and the
    global weights (public to this site), so it consumes no privacy budget and needs no
    clipping. For SGD it equals FedProx's gradient exactly; adaptive optimizers see it too.
Empty batches.
    Poisson sampling yields empty batches now and then; the round still takes a noise-only
    step for them (hooks and ghost handle zero-length batches; ew and functorch crash on
    them, so they get Opacus' ``rand_on_empty`` filler: one random, data-independent sample).
    ``consilia.common.training.engine.train_epochs`` skips empty batches, hence
    :func:`train_private_epochs`.
Memory.
    :meth:`PrivateTraining.memory_bounded` wraps the loader in Opacus'
    ``BatchMemoryManager(max_physical_batch_size)``: logical (Poisson) batches are split into
    physical ones and the optimizer steps once per logical batch (accounting unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader

from consilia.client.privacy.budget import PrivacyConfigError
from consilia.client.privacy.discarded_grads import skip_discarded_conv_grads
from consilia.client.privacy.grad_samplers import register_fast_grad_samplers
from consilia.common.models import DEFAULT_DP_GRAD_SAMPLE_MODE, MODELS
from consilia.common.training.allocator import retain_freed_memory

__all__ = [
    "GRAD_SAMPLE_MODES",
    "NO_EMPTY_BATCH_MODES",
    "PrivateTraining",
    "apply_proximal_gradient",
    "choose_grad_sample_mode",
    "enable_fast_dp_step",
    "resolve_grad_sample_mode",
    "train_private_epochs",
]

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")

#: Modes that crash on an empty Poisson batch; they get one random (data-independent) filler
#: sample instead (Opacus ``rand_on_empty``), so the noise-only step still happens.
NO_EMPTY_BATCH_MODES = ("ew", "functorch")


def choose_grad_sample_mode(model_name: str | None) -> str:
    """Return the fastest grad-sample mode measured for a registered model (``"hooks"`` if none).

    Parameters
    ----------
    model_name : str or None
        Registered model name (``consilia.common.models.MODELS``); its spec's
        ``dp_grad_sample_mode`` is the answer.

    Returns
    -------
    str
        One of ``"hooks"``, ``"functorch"``, ``"ew"``, ``"ghost"``.

    """
    if model_name is None or model_name not in MODELS:
        return DEFAULT_DP_GRAD_SAMPLE_MODE
    return MODELS.get(model_name).dp_grad_sample_mode


def resolve_grad_sample_mode(requested: str, model_name: str | None, criterion: Any) -> str:
    """Return the mode to use: ``requested``, or for ``"auto"`` the model's measured one.

    Ghost mode needs a loss with a ``reduction`` attribute; ``auto`` then falls back to
    ``"hooks"``, an explicit ``"ghost"`` is refused (:class:`PrivacyConfigError`).
    """
    mode = requested
    explicit = mode != "auto"
    if not explicit:
        mode = choose_grad_sample_mode(model_name)
    if mode == "ghost" and criterion is not None and not hasattr(criterion, "reduction"):
        if explicit:
            raise PrivacyConfigError(
                "grad_sample_mode='ghost' needs a loss with a 'reduction' attribute that "
                f"honours 'none' (got {type(criterion).__name__}); use 'hooks'"
            )
        mode = "hooks"
    return mode


def enable_fast_dp_step(module: nn.Module, grad_sample_mode: str) -> list[Any]:
    """Install the DP-SGD speed-ups for one Opacus-wrapped model; return handles to remove.

    Nothing here changes the per-sample gradients, the clipping, the noise or the
    accounting (``tests/client/privacy/test_grad_samplers.py``);
    :func:`~consilia.client.privacy.opacus_wrapping.wrap_private` calls it,
    :meth:`PrivateTraining.close` removes the handles.

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


@dataclass
class PrivateTraining:
    """The private training objects of one round (use these, not the originals).

    Attributes
    ----------
    model : nn.Module
        Opacus ``GradSampleModule`` (state_dict keys carry ``_module.``; see
        ``PrivacyController.unwrap_state_dict``). It trains the original module in place.
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
    hook_handles : list
        Hooks that :meth:`close` removes (the fast DP step's, the proximal term's).

    """

    model: nn.Module
    optimizer: Any
    loader: DataLoader
    criterion: Any
    grad_sample_mode: str
    noise_multiplier: float
    sample_rate: float
    max_physical_batch_size: int
    hook_handles: list[Any] = field(default_factory=list, repr=False)

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
        self.hook_handles.append(inner.register_step_pre_hook(_hook))

    def close(self) -> None:
        """Remove the proximal hook and Opacus' hooks/attributes from the original module."""
        while self.hook_handles:
            self.hook_handles.pop().remove()
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

