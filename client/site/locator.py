"""Where a ClientApp finds its site: simulated (partition file) or deployed (site config).

The ClientApp is the same object in simulation and deployment; only the environment differs:
- simulation: ``node_config`` has ``partition-id`` and the run config names the directory of
  per-site ``.npz`` files written by ``fl-sim``;
- deployment: ``node_config`` has ``site-config``, the hospital's own YAML file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consilia.client.trainer import ImageData, SiteTrainer
from consilia.common.constants import NodeConfigKey, RunConfigKey
from consilia.common.instructions import RoundInstruction

__all__ = [
    "SiteRuntime",
    "StatisticsRule",
    "forget_runs",
    "register_deployed_site_loader",
    "resolve_site",
]


@dataclass(frozen=True)
class StatisticsRule:
    """Whether (and how) the site answers a classifier-calibration statistics request.

    Attributes
    ----------
    share : bool
        Send per-class feature sums at all.
    min_class_count : int
        Withhold every class with fewer images than this at the site (exact statistics).
    reason : str
        Why the site declines (shown at the coordinator) when ``share`` is false.
    dp_noise_multiplier : float or None
        When the site trains the run with local DP: send the statistics through the Gaussian
        mechanism with this noise multiplier, accounted in the privacy ledger (None: decline).
    """

    share: bool = True
    min_class_count: int = 20
    reason: str = ""
    dp_noise_multiplier: float | None = 5.0


@dataclass
class SiteRuntime:
    """A loaded site: its trainer, an optional policy check and its statistics rule."""

    name: str
    trainer: SiteTrainer
    check_policy: Callable[[RoundInstruction], None] | None = None
    statistics_rule: Callable[[], StatisticsRule] = StatisticsRule

    def enforce_policy(self, instr: RoundInstruction) -> None:
        """Raise if the coordinator's instruction violates this site's policy."""
        if self.check_policy is not None:
            self.check_policy(instr)


_CACHE: dict[tuple, SiteRuntime] = {}
_DEPLOYED_LOADER: list[Callable[[Path, RoundInstruction, int], SiteRuntime]] = []


def register_deployed_site_loader(
    loader: Callable[[Path, RoundInstruction, int], SiteRuntime],
) -> None:
    """Install the loader ``f(site_yaml, instruction, run_id)`` used in deployment."""
    _DEPLOYED_LOADER[:] = [loader]


def forget_runs(keep: set[int]) -> None:
    """Drop cached sites of every run not in ``keep`` (long-lived site processes)."""
    for key in [k for k in _CACHE if k[-1] not in keep]:
        del _CACHE[key]


def _simulated_site(
    sites_dir: Path,
    partition_id: int,
    threads: int | None,
    run_dir: Path | None = None,
    run_id: int | str = 0,
) -> SiteRuntime:
    """Load simulated site ``site-XX.npz`` number ``partition_id`` (sorted order).

    Local DP, when a round asks for it, is accounted in
    ``<run_dir>/site-state/site-XX/privacy-ledger.json`` with the run's target epsilon as the
    site's budget (:mod:`consilia.client.privacy.simulated_sites`; opacus is imported only then).
    """
    from consilia.client.privacy.simulated_sites import simulated_privacy_factory

    files = sorted(sites_dir.glob("site-*.npz"))
    if partition_id >= len(files):
        raise ValueError(
            f"partition-id {partition_id} but only {len(files)} site files in {sites_dir}"
        )
    with np.load(files[partition_id]) as z:
        train = ImageData(z["train_images"], z["train_labels"].astype(np.int64))
        val = ImageData(z["val_images"], z["val_labels"].astype(np.int64))
    name = files[partition_id].stem
    privacy_factory = simulated_privacy_factory(run_dir, name, partition_id, run_id)
    trainer = SiteTrainer(name, train, val, site_index=partition_id, threads=threads,
                          privacy_factory=privacy_factory)
    return SiteRuntime(name=name, trainer=trainer)


def resolve_site(
    node_config: dict, run_config: dict, instr: RoundInstruction, run_id: int
) -> SiteRuntime:
    """Return the (cached) site for this node and run."""
    if NodeConfigKey.SITE_CONFIG.value in node_config:
        path = Path(str(node_config[NodeConfigKey.SITE_CONFIG.value]))
        key: tuple = ("deployed", str(path), instr.task.model_dump_json(), run_id)
        if key not in _CACHE:
            if not _DEPLOYED_LOADER:
                from consilia.client.site.config import register_loader

                register_loader()
            _CACHE[key] = _DEPLOYED_LOADER[0](path, instr, run_id)
        return _CACHE[key]
    sites_dir = run_config.get(RunConfigKey.SIM_SITES_DIR.value)
    if not sites_dir:
        raise ValueError(
            "this node has neither a 'site-config' (deployment) nor a simulation sites "
            "directory in the run config; start it with fl-client --site site.yaml"
        )
    pid = int(node_config[NodeConfigKey.PARTITION_ID.value])
    threads = int(run_config.get("consilia-sim-threads", 1))
    key = ("sim", str(sites_dir), pid, run_id)
    if key not in _CACHE:
        _CACHE.clear()  # one run at a time per simulation worker
        run_dir = run_config.get(RunConfigKey.RUN_DIR.value)
        _CACHE[key] = _simulated_site(Path(str(sites_dir)), pid, threads,
                                      Path(str(run_dir)) if run_dir else None, run_id)
    return _CACHE[key]
