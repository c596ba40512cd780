"""Classifier calibration with virtual features (CCVR, Luo et al., NeurIPS 2021).

Under label skew the federated feature extractor learns good features (high AUC) while the
averaged classifier head is biased towards whichever sites dominated the last rounds, so
accuracy swings from round to round. CCVR fixes the head after training:

1. every site passes its training images through the global model once and returns, per
   class, the number of images and the sum and outer-product sum of the head's input
   features (:func:`collect_feature_stats`; a class with fewer images than the site's
   minimum is withheld);
2. the coordinator adds the sites' sums (:meth:`FeatureStats.merge`), which gives the
   exact pooled per-class mean and covariance, draws virtual features from those Gaussians
   and re-fits only the classifier head on them (:func:`fit_head_on_virtual_features`).

Only class-level aggregates leave a site, never a per-image value. A site training with
local DP sends them only through the Gaussian mechanism (:meth:`FeatureStats.with_gaussian_noise`
on features clipped to the coordinator's norm bound), accounted in its privacy ledger like a
DP-SGD step; the coordinator then keeps only the classes whose noisy count clearly exceeds
the noise (``min_count`` of :meth:`FeatureStats.gaussians`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from consilia.common.constants import CalibrationKey

__all__ = [
    "CalibrationError",
    "FeatureStats",
    "HeadFitResult",
    "classifier_head",
    "collect_feature_stats",
    "feature_norms",
    "fit_head_on_virtual_features",
]

#: Noisy counts must exceed this many standard deviations of their noise to count a class.
NOISY_COUNT_SDS = 3.0


class CalibrationError(ValueError):
    """The model or the statistics do not allow classifier calibration."""


@dataclass
class FeatureStats:
    """Per-class sufficient statistics of the classifier head's input features.

    Attributes
    ----------
    counts : np.ndarray
        ``(C,)`` number of images per class.
    sums : np.ndarray
        ``(C, D)`` sum of the feature vectors per class.
    outer_sums : np.ndarray
        ``(C, D, D)`` sum of ``f f^T`` per class.
    """

    counts: np.ndarray
    sums: np.ndarray
    outer_sums: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int, dim: int) -> FeatureStats:
        """Return empty statistics for ``num_classes`` classes of ``dim``-dim features."""
        return cls(
            np.zeros(num_classes, np.float64),
            np.zeros((num_classes, dim), np.float64),
            np.zeros((num_classes, dim, dim), np.float64),
        )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return int(self.counts.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self.sums.shape[1])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the statistics as named arrays (the wire format of a site's reply)."""
        return {CalibrationKey.COUNTS.value: self.counts, CalibrationKey.SUMS.value: self.sums,
                CalibrationKey.OUTER_SUMS.value: self.outer_sums}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureStats:
        """Parse :meth:`to_arrays` output; raises :class:`CalibrationError` on bad shapes."""
        try:
            counts = np.asarray(arrays[CalibrationKey.COUNTS.value], np.float64)
            sums = np.asarray(arrays[CalibrationKey.SUMS.value], np.float64)
            outer = np.asarray(arrays[CalibrationKey.OUTER_SUMS.value], np.float64)
        except KeyError as exc:
            raise CalibrationError(f"feature statistics lack the array {exc}") from None
        c, d = sums.shape if sums.ndim == 2 else (-1, -1)
        if counts.shape != (c,) or outer.shape != (c, d, d):
            raise CalibrationError(
                f"inconsistent feature statistics: counts {counts.shape}, sums {sums.shape}, "
                f"outer-sums {outer.shape}"
            )
        return cls(counts, sums, outer)

    @classmethod
    def merge(cls, parts: Sequence[FeatureStats]) -> FeatureStats:
        """Add the statistics of several sites (exactly the pooled statistics)."""
        if not parts:
            raise CalibrationError("no feature statistics to merge")
        shapes = {(p.num_classes, p.dim) for p in parts}
        if len(shapes) != 1:
            raise CalibrationError(f"sites sent feature statistics of different shapes {shapes}")
        return cls(
            np.sum([p.counts for p in parts], axis=0),
            np.sum([p.sums for p in parts], axis=0),
            np.sum([p.outer_sums for p in parts], axis=0),
        )

    def withhold_small_classes(self, min_count: int) -> FeatureStats:
        """Zero every class with fewer than ``min_count`` images (a site's disclosure rule)."""
        keep = self.counts >= max(int(min_count), 1)
        return FeatureStats(
            np.where(keep, self.counts, 0.0),
            self.sums * keep[:, None],
            self.outer_sums * keep[:, None, None],
        )

    def with_gaussian_noise(
        self, noise_multiplier: float, clip_norm: float, rng: np.random.Generator
    ) -> FeatureStats:
        """Release these statistics through the Gaussian mechanism (differential privacy).

        The statistics must come from features clipped to ``clip_norm``
        (:func:`collect_feature_stats` with ``clip_norm``). One image changes the counts by
        a one-hot vector (norm 1), the sums by ``f`` (norm <= C) and the outer sums by
        ``f f^T`` (Frobenius norm ``|f|^2 <= C^2``). Scaling the three parts by 1, 1/C and
        1/C^2 gives an L2 sensitivity of sqrt(3), so Gaussian noise of standard deviation
        ``noise_multiplier * sqrt(3)`` times (1, C, C^2) on every entry is one Gaussian
        mechanism with that noise multiplier: to the accountant, one DP-SGD step at sampling
        rate 1.

        Parameters
        ----------
        noise_multiplier : float
            Noise standard deviation over sensitivity (sigma).
        clip_norm : float
            The bound C the features were clipped to.
        rng : numpy.random.Generator
            Noise source (seeded from the OS at a real site).
        """
        if not noise_multiplier > 0 or not clip_norm > 0:
            raise CalibrationError("the Gaussian mechanism needs a positive noise multiplier "
                                   "and clip norm")
        scale = float(noise_multiplier) * np.sqrt(3.0)
        return FeatureStats(
            self.counts + rng.normal(0.0, scale, self.counts.shape),
            self.sums + rng.normal(0.0, scale * clip_norm, self.sums.shape),
            self.outer_sums + rng.normal(0.0, scale * clip_norm**2, self.outer_sums.shape),
        )

    def gaussians(
        self, ridge: float = 1e-3, min_count: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(present classes, means (K,D), covariances (K,D,D))``.

        ``ridge`` times the mean feature variance (plus 1e-6) is added to each diagonal so
        that a class seen a few times still gives a valid (positive definite) covariance.
        A class counts as present when its count is above 0 and at least ``min_count``
        (noisy statistics: a few standard deviations of the count noise). Covariances are
        made symmetric; negative eigenvalues (noise) are clipped when virtual features are
        drawn.
        """
        present = np.flatnonzero((self.counts > 0) & (self.counts >= min_count))
        if present.size == 0:
            raise CalibrationError("no class has any image in the feature statistics")
        n = self.counts[present]
        means = self.sums[present] / n[:, None]
        covs = self.outer_sums[present] / n[:, None, None] - means[:, :, None] * means[:, None, :]
        covs = 0.5 * (covs + np.transpose(covs, (0, 2, 1)))
        scale = float(np.mean([np.trace(c) for c in covs])) / self.dim
        eye = np.eye(self.dim)
        covs = covs + (ridge * max(scale, 0.0) + 1e-6) * eye
        return present, means, covs


def classifier_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Return the model's classifier head: its last ``nn.Linear`` with ``num_classes`` outputs.

    Raises
    ------
    CalibrationError
        If the model has no such layer.
    """
    inner = getattr(model, "_module", model)  # an Opacus GradSampleModule wraps the model
    heads = [m for m in inner.modules() if isinstance(m, nn.Linear)
             and m.out_features == num_classes]
    if not heads:
        raise CalibrationError(
            f"{type(inner).__name__} has no nn.Linear layer with {num_classes} outputs to "
            "calibrate; turn strategy.calibration off for this model"
        )
    return heads[-1]


@torch.no_grad()
def collect_feature_stats(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    min_count: int = 1,
    clip_norm: float | None = None,
) -> FeatureStats:
    """Pass ``loader`` through ``model`` and sum the head's input features per class.

    Parameters
    ----------
    model : nn.Module
        The global model (put in eval mode here).
    loader : DataLoader
        The site's images with evaluation preprocessing, yielding ``(images, labels)``.
    num_classes : int
        Size of the label space.
    min_count : int
        Classes with fewer images at this site are withheld (sent as zeros).
    clip_norm : float, optional
        Scale every feature vector down to at most this L2 norm first (the bound the
        Gaussian mechanism's sensitivity rests on).

    Returns
    -------
    FeatureStats
        Per-class count, feature sum and outer-product sum (float64).

    Raises
    ------
    CalibrationError
        If the head found by :func:`classifier_head` does not produce the model's output
        (then its input is not the feature the logits are a linear function of).
    """
    stats: FeatureStats | None = None
    for feats, labels in _head_inputs(model, loader, num_classes):
        if clip_norm is not None:
            norms = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
            feats = feats * (float(clip_norm) / norms).clamp(max=1.0)
        if stats is None:
            stats = FeatureStats.zeros(num_classes, feats.shape[1])
        y = labels.long().cpu()
        onehot = F.one_hot(y, num_classes).double()  # (B, C)
        stats.counts += onehot.sum(0).numpy()
        stats.sums += (onehot.T @ feats).numpy()
        stats.outer_sums += torch.einsum("bc,bi,bj->cij", onehot, feats, feats).numpy()
    if stats is None:
        raise CalibrationError("the site has no images to compute feature statistics on")
    return stats.withhold_small_classes(min_count)


def _head_inputs(
    model: nn.Module, loader: DataLoader, num_classes: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(head input features (B, D) float64, labels)`` per batch of ``loader``.

    Checks on every batch that the head found by :func:`classifier_head` produces the
    model's output (else its input is not the feature the logits are linear in).
    """
    head = classifier_head(model, num_classes)
    captured: dict[str, torch.Tensor] = {}

    def _hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured["features"] = inputs[0].detach()
        captured["logits"] = output.detach()

    handle = head.register_forward_hook(_hook)
    model.eval()
    try:
        for images, labels in loader:
            with torch.no_grad():
                logits = model(images)
            if captured["logits"].shape != logits.shape or not torch.equal(
                captured["logits"], logits
            ):
                raise CalibrationError(
                    f"the last {num_classes}-output Linear of {type(model).__name__} is not "
                    "the model's output layer; classifier calibration does not apply"
                )
            yield captured["features"].flatten(1).double().cpu(), labels
    finally:
        handle.remove()


def feature_norms(model: nn.Module, loader: DataLoader, num_classes: int) -> np.ndarray:
    """L2 norms of the classifier head's input features over ``loader`` (labels unused).

    The coordinator takes its clip bound for DP sites' statistics from its own test images.
    """
    norms = [feats.norm(dim=1).numpy() for feats, _ in _head_inputs(model, loader, num_classes)]
    if not norms:
        raise CalibrationError("no images to measure feature norms on")
    return np.concatenate(norms)


def _covariance_root(cov: np.ndarray) -> np.ndarray:
    """Return ``R`` with ``R R^T = cov``, negative eigenvalues (round-off) clipped to 0."""
    eigval, eigvec = np.linalg.eigh(cov)
    return eigvec * np.sqrt(np.clip(eigval, 0.0, None))[None, :]


@dataclass
class HeadFitResult:
    """What :func:`fit_head_on_virtual_features` did."""

    classes: list[int]
    virtual_per_class: int
    epochs: int
    final_loss: float


def fit_head_on_virtual_features(
    head: nn.Linear,
    stats: FeatureStats,
    virtual_per_class: int = 2000,
    epochs: int = 100,
    lr: float = 0.04,
    momentum: float = 0.9,
    batch_size: int = 256,
    seed: int = 0,
    min_count: float = 0.0,
) -> HeadFitResult:
    """Re-fit ``head`` in place on features drawn from the pooled per-class Gaussians.

    Parameters
    ----------
    head : nn.Linear
        The global model's classifier head (start point of the fit).
    stats : FeatureStats
        The merged statistics of all answering sites.
    virtual_per_class : int
        Virtual features drawn per class present in ``stats``.
    epochs, lr, momentum, batch_size
        SGD with momentum on the cross-entropy of the virtual features (CCVR's recipe;
        batch 256 at lr 0.04 gave the same accuracy as CCVR's 64 at 0.01 on MedNIST in a
        quarter of the steps).
    seed : int
        Seed of the draws and the shuffling (same seed, same head).
    min_count : float
        Classes with a smaller (noisy) count are left out (see :meth:`FeatureStats.gaussians`).

    Returns
    -------
    HeadFitResult
        The classes fitted and the last epoch's mean loss.
    """
    if stats.dim != head.in_features or stats.num_classes != head.out_features:
        raise CalibrationError(
            f"feature statistics are {stats.num_classes} classes x {stats.dim} features but "
            f"the head maps {head.in_features} -> {head.out_features}"
        )
    present, means, covs = stats.gaussians(min_count=min_count)
    gen = torch.Generator().manual_seed(int(seed))
    feats, labels = [], []
    for cls, mean, cov in zip(present, means, covs, strict=True):
        root = torch.as_tensor(_covariance_root(cov))
        z = torch.randn(virtual_per_class, stats.dim, generator=gen, dtype=torch.float64)
        feats.append(z @ root.T + torch.as_tensor(mean))
        labels.append(torch.full((virtual_per_class,), int(cls), dtype=torch.long))
    x = torch.cat(feats).to(head.weight.dtype)
    y = torch.cat(labels)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    head.train()
    epoch_loss = float("nan")
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            total = 0.0
            for start in range(0, len(y), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(head(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            epoch_loss = total / len(y)
    head.eval()
    for p in head.parameters():
        p.grad = None
    return HeadFitResult([int(c) for c in present], virtual_per_class, epochs, epoch_loss)
