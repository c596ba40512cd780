"""Assembling a deployed site: its data, the local validation split, its trainer and privacy.

:func:`load_deployed_site` is the deployed loader a
:class:`~consilia.client.site.locator.SiteLocator` is built with (the site worker passes it,
and so does the ClientApp module for Flower's own process modes). It checks the policy first
(a refused run never touches the data), loads the data through the state directory's cache,
splits the local validation fraction (:func:`stratified_split`, seeded, per class) and builds
a :class:`CappedSiteTrainer` with the site's thread and batch-size limits and a privacy factory
that accounts in the site's ledger.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from consilia.client.site.config import SiteConfig, load_site_config
from consilia.client.site.data_sources.loading import load_site_data
from consilia.client.site.policy import (
    StatisticsRule,
    check_policy,
    site_dp_request,
    statistics_rule_for,
)
from consilia.client.site.runtime import SiteRuntime
from consilia.client.trainer import SiteTrainer
from consilia.common.data.images import ImageData
from consilia.common.flower.task_identity import current_run_id
from consilia.common.instructions import RoundInstruction

if TYPE_CHECKING:  # opacus is imported only when a round asks for local DP
    from consilia.client.privacy.controller import PrivacyController

__all__ = [
    "CappedSiteTrainer",
    "SiteConfigSource",
    "cap_batch",
    "load_deployed_site",
    "stratified_split",
]

log = logging.getLogger("consilia.site")

#: Where a deployed site reads its current configuration (called at every use).
SiteConfigSource = Callable[[], SiteConfig]


def stratified_split(
    labels: ArrayLike, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of indices into (train, validation).

    Each class with at least two images gives ``round(fraction * n)`` of them (at least one,
    at most ``n - 1``) to validation; a class with a single image stays in training.

    Returns
    -------
    tuple of numpy arrays
        Sorted train and validation indices.

    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    if fraction > 0:
        for cls in np.unique(labels):
            idx = np.flatnonzero(labels == cls)
            if idx.size < 2:
                continue
            k = min(max(int(round(fraction * idx.size)), 1), idx.size - 1)
            val.extend(rng.permutation(idx)[:k].tolist())
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(labels.size), val_idx)
    return train_idx, val_idx


def _site_index(name: str) -> int:
    """Return a stable per-site integer for seeds (CRC32 of the name)."""
    return zlib.crc32(name.encode()) % 100_000


def _current_run_id(default: str) -> str:
    """Flower's run id of the task being executed (set when a ClientApp pulls its task)."""
    run_id = current_run_id()
    return str(run_id) if run_id else default


def cap_batch(instr: RoundInstruction, limit: int) -> RoundInstruction:
    """Return ``instr`` with its batch size (and DP's physical batch) capped at ``limit``."""
    train, dp = instr.train, instr.dp
    if train.batch_size > limit:
        log.info("batch size %d capped to the site's limit %d", train.batch_size, limit)
        train = train.model_copy(update={"batch_size": limit})
    if dp.max_physical_batch_size > limit:
        dp = dp.model_copy(update={"max_physical_batch_size": limit})
    if train is instr.train and dp is instr.dp:
        return instr
    return replace(instr, train=train, dp=dp)


@dataclass
class CappedSiteTrainer(SiteTrainer):
    """SiteTrainer honouring ``resources.max_batch_size`` (and DP's physical batch).

    Parameters
    ----------
    max_batch_size : int
        The site's ``resources.max_batch_size`` (keyword only); the other parameters are
        those of :class:`~consilia.client.trainer.SiteTrainer`.

    """

    max_batch_size: int = field(kw_only=True)

    def fit(self, state, instr):  # noqa: D102 - documented on SiteTrainer
        return super().fit(state, cap_batch(instr, self.max_batch_size))

    def evaluate(self, state, instr):  # noqa: D102
        return super().evaluate(state, cap_batch(instr, self.max_batch_size))


def _deployed_privacy_factory(
    config: SiteConfig, fixed_run_id: str | None
) -> Callable[[RoundInstruction, int], PrivacyController | None]:
    """Return the trainer's privacy factory: the site's DP decision, accounted in its ledger."""

    def privacy_factory(round_instr: RoundInstruction, n_train: int) -> PrivacyController | None:
        dp = site_dp_request(config.policy.dp, round_instr)
        if dp is None:
            return None
        # imported here so that a site that never trains with DP never loads opacus
        from consilia.client.privacy.controller import PrivacyController
        from consilia.client.privacy.ledger import PrivacyLedger

        statistics = config.policy.feature_statistics
        controller = PrivacyController(
            dp,
            budget_epsilon=config.policy.dp.budget_epsilon,
            budget_delta=config.policy.dp.delta,
            ledger=PrivacyLedger(config.ledger_path),
            dataset_key=config.dataset_key,
            model_name=round_instr.model.name,
            release_noise_multiplier=statistics.dp_noise_multiplier
            if round_instr.calibration and statistics.share else None,
            max_noise_multiplier=config.policy.dp.max_noise_multiplier,
        )
        rid = fixed_run_id or _current_run_id(round_instr.run_name)
        return controller.bind_round(rid, round_instr.server_round, round_instr.total_rounds)

    return privacy_factory


def load_deployed_site(
    path: Path,
    instr: RoundInstruction,
    run_id: int | str | None = None,
    *,
    config_source: SiteConfigSource | None = None,
) -> SiteRuntime:
    """Build the :class:`~consilia.client.site.runtime.SiteRuntime` of a deployed site.

    Checks the policy first (a refused run never touches the data), loads the data through
    the state directory's cache, splits the local validation fraction (stratified, seeded),
    and builds a trainer with the site's thread and batch-size limits and a privacy factory
    that accounts in the site's ledger.

    Parameters
    ----------
    path : Path
        The site YAML (``node_config["site-config"]``).
    instr : RoundInstruction
        The first instruction of the run (task geometry and label space).
    run_id : int or str, optional
        Flower's run id (ledger key of the run's calibration); default: the run id of the task
        being executed, else the run name.
    config_source : callable, optional
        Returns the site's current configuration; the site worker passes the configuration it
        re-reads once per task. Default: read ``path`` at every use (a policy tightened in the
        file applies at the next round).

    Raises
    ------
    SitePolicyViolation
        If the run violates the site's policy.
    ValueError
        If the site has no usable image for this task.

    """
    source: SiteConfigSource = (
        config_source if config_source is not None else partial(load_site_config, path)
    )
    config = source()
    check_policy(config.policy, instr)
    task = instr.task
    dataset, report = load_site_data(
        config.data, list(task.class_names), task.in_channels, task.image_size,
        cache_dir=config.cache_dir, progress=False,
    )
    log.info("site %s: %s", config.name, report.to_text().replace("\n", "\n  "))
    if len(dataset) == 0:
        raise ValueError(
            f"site '{config.name}' has no usable image for classes {task.class_names} "
            f"({config.data.describe()}); run fl-client --check"
        )
    train_idx, val_idx = stratified_split(
        dataset.labels, config.validation.fraction, config.validation.seed
    )
    train = ImageData(dataset.images[train_idx], dataset.labels[train_idx])
    val = ImageData(dataset.images[val_idx], dataset.labels[val_idx]) if val_idx.size else None
    fixed_run_id = None if run_id is None else str(run_id)

    privacy_factory = _deployed_privacy_factory(config, fixed_run_id)
    trainer = CappedSiteTrainer(
        config.name, train, val, site_index=_site_index(config.name),
        threads=config.resources.threads, privacy_factory=privacy_factory,
        max_batch_size=config.resources.max_batch_size,
    )
    log.info(
        "site %s ready: %d training / %d validation images (classes %s)",
        config.name, len(train), 0 if val is None else len(val), ", ".join(task.class_names),
    )

    def current_policy(round_instr: RoundInstruction) -> None:
        # The current configuration: a hospital tightening its policy takes effect at the
        # next round.
        check_policy(source().policy, round_instr)

    def statistics_rule() -> StatisticsRule:
        return statistics_rule_for(source().policy)

    return SiteRuntime(name=config.name, trainer=trainer, check_policy=current_policy,
                       statistics_rule=statistics_rule)
