"""Where a ClientApp finds its site: simulated (partition file) or deployed (site config).

The ClientApp is the same object in simulation and deployment; only the environment differs:
- simulation: ``node_config`` has ``partition-id`` and the run config names the directory of
  per-site ``.npz`` files written by ``fl-sim``;
- deployment: ``node_config`` has ``site-config``, the hospital's own YAML file, and the
  :class:`SiteLocator` was built with the deployed loader
  (:func:`consilia.client.site.assembly.load_deployed_site`, or the site worker's variant that
  shares the configuration it has already read).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from consilia.client.privacy.simulated_sites import simulated_privacy_factory
from consilia.client.site.runtime import SiteRuntime
from consilia.client.trainer import SiteTrainer
from consilia.common.constants import NodeConfigKey, RunConfigKey
from consilia.common.data.sitefile import load_site_npz
from consilia.common.instructions import RoundInstruction

__all__ = ["DeployedSiteLoader", "SiteLocator", "load_simulated_site"]

#: ``f(site_yaml, first_instruction, run_id) -> SiteRuntime``: how a deployed site is built.
DeployedSiteLoader = Callable[[Path, RoundInstruction, int], SiteRuntime]


def load_simulated_site(
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
    files = sorted(sites_dir.glob("site-*.npz"))
    if partition_id >= len(files):
        raise ValueError(
            f"partition-id {partition_id} but only {len(files)} site files in {sites_dir}"
        )
    train, val, _class_names = load_site_npz(files[partition_id])
    name = files[partition_id].stem
    privacy_factory = simulated_privacy_factory(run_dir, name, partition_id, run_id)
    trainer = SiteTrainer(name, train, val, site_index=partition_id, threads=threads,
                          privacy_factory=privacy_factory)
    return SiteRuntime(name=name, trainer=trainer)


class SiteLocator:
    """Find (and cache) the site a ClientApp serves, per node and run.

    Parameters
    ----------
    deployed_loader : callable, optional
        ``f(site_yaml, first_instruction, run_id) -> SiteRuntime`` for nodes started with a
        ``site-config``; without it such a node is refused (simulation only).

    """

    def __init__(self, deployed_loader: DeployedSiteLoader | None = None) -> None:
        self.deployed_loader = deployed_loader
        self._cache: dict[tuple, SiteRuntime] = {}

    def forget_runs(self, keep: set[int]) -> None:
        """Drop cached sites of every run not in ``keep`` (long-lived site processes)."""
        for key in [k for k in self._cache if k[-1] not in keep]:
            del self._cache[key]

    def resolve(
        self, node_config: dict, run_config: dict, instr: RoundInstruction, run_id: int
    ) -> SiteRuntime:
        """Return the (cached) site for this node and run."""
        if NodeConfigKey.SITE_CONFIG.value in node_config:
            if self.deployed_loader is None:
                raise ValueError(
                    "this node has a 'site-config' but the ClientApp was built without a "
                    "deployed-site loader; start the site with fl-client --site site.yaml"
                )
            path = Path(str(node_config[NodeConfigKey.SITE_CONFIG.value]))
            key: tuple = ("deployed", str(path), instr.task.model_dump_json(), run_id)
            if key not in self._cache:
                self._cache[key] = self.deployed_loader(path, instr, run_id)
            return self._cache[key]
        sites_dir = run_config.get(RunConfigKey.SIM_SITES_DIR.value)
        if not sites_dir:
            raise ValueError(
                "this node has neither a 'site-config' (deployment) nor a simulation sites "
                "directory in the run config; start it with fl-client --site site.yaml"
            )
        pid = int(node_config[NodeConfigKey.PARTITION_ID.value])
        threads = int(run_config.get(RunConfigKey.SIM_THREADS.value, 1))
        key = ("sim", str(sites_dir), pid, run_id)
        if key not in self._cache:
            self._cache.clear()  # one run at a time per simulation worker
            run_dir = run_config.get(RunConfigKey.RUN_DIR.value)
            self._cache[key] = load_simulated_site(
                Path(str(sites_dir)), pid, threads, Path(str(run_dir)) if run_dir else None,
                run_id,
            )
        return self._cache[key]
