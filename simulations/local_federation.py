"""A real federation on one machine: coordinator (``fl-server``) and sites (``fl-client``).

Every process is the real one a hospital deployment runs — SuperLink with TLS and site-key
authentication, one ``fl-client`` per site reading its own exported DICOM folder — only all on
127.0.0.1 with free ports. Used by the deployment tests and the deployment benchmark, and handy
for a rehearsal before installing anything at a hospital.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from consilia.common.child_env import child_env
from consilia.common.data.datasets.mednist import find_mednist, read_mednist_images

__all__ = [
    "GEN_CERTS",
    "LocalFederation",
    "free_port",
    "mednist_sites",
    "wait_for",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_CERTS = REPO_ROOT / "deploy" / "gen-certs.sh"


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    """Poll ``predicate()`` until it returns something truthy; raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def mednist_sites(
    data_root: Path, num_sites: int, per_site: int, test_size: int, seed: int = 0
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Split a small MedNIST subset into disjoint sites plus a coordinator test split.

    Returns
    -------
    tuple
        ``(class_names, [(images, labels) per site], (test_images, test_labels))`` with
        images ``uint8`` ``(N, 1, 64, 64)``; each part is stratified over the six classes.

    """
    images_dir, entries = find_mednist(Path(data_root))
    class_names = sorted({label for _, label in entries})
    rng = np.random.default_rng(seed)
    by_class = {c: [rel for rel, lab in entries if lab == c] for c in class_names}
    need = num_sites * per_site + test_size
    per_class = -(-need // len(class_names))
    picked: list[tuple[str, int]] = []
    for k, c in enumerate(class_names):
        files = by_class[c]
        chosen = rng.choice(len(files), size=min(per_class, len(files)), replace=False)
        picked += [(files[i], k) for i in chosen]
    order = rng.permutation(len(picked))
    picked = [picked[i] for i in order]
    images = read_mednist_images(images_dir, [rel for rel, _ in picked])
    labels = np.array([k for _, k in picked], dtype=np.int64)
    # interleave the classes, then cut consecutive slices: every part is stratified
    per_label = [list(np.flatnonzero(labels == k)) for k in range(len(class_names))]
    interleaved = [int(idx[i]) for i in range(max(map(len, per_label)))
                   for idx in per_label if i < len(idx)]
    bounds = np.cumsum([0] + [per_site] * num_sites + [test_size])
    parts = [interleaved[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    sites = [(images[p], labels[p]) for p in parts[:num_sites]]
    test = (images[parts[-1]], labels[parts[-1]])
    return class_names, sites, test


@dataclass
class LocalFederation:
    """Coordinator and sites as real processes on 127.0.0.1.

    Parameters
    ----------
    root : Path
        Working folder: ``certs/``, ``coordinator/`` (state), ``sites/<name>/``.
    site_names : sequence of str
        Sites to create keys for (``gen-certs.sh --site``).
    env : dict
        Extra environment for every process (e.g. ``OMP_NUM_THREADS``).

    """

    root: Path
    site_names: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    coordinator: subprocess.Popen | None = None
    sites: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------
    @property
    def certs(self) -> Path:
        """Certificates and keys (``deploy/gen-certs.sh`` layout)."""
        return self.root / "certs"

    @property
    def state_dir(self) -> Path:
        """The coordinator's state directory."""
        return self.root / "coordinator"

    @property
    def address(self) -> str:
        """The SuperLink's address."""
        return f"127.0.0.1:{self.port}"

    def site_dir(self, name: str) -> Path:
        """Folder of one site (config, state, logs)."""
        return self.root / "sites" / name

    def _env(self) -> dict[str, str]:
        return child_env(FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1", **self.env)

    # -- certificates --------------------------------------------------------------------
    def generate_certs(self, extra_sites: Sequence[str] = ()) -> None:
        """Create the CA, the coordinator certificate and every site's key pair."""
        args = ["bash", str(GEN_CERTS), "-o", str(self.certs)]
        for name in [*self.site_names, *extra_sites]:
            args += ["--site", name]
        subprocess.run(args, check=True, capture_output=True, text=True)

    # -- coordinator ---------------------------------------------------------------------
    def fl_server(self, *args: str, timeout_s: float = 120,
                  check: bool = True) -> subprocess.CompletedProcess:
        """Run ``fl-server --state-dir <state> ARGS`` and return its result."""
        cmd = [sys.executable, "-m", "consilia.server.control.cli",
               "--state-dir", str(self.state_dir), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self._env(),
                             timeout=timeout_s, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"fl-server {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout}\n{res.stderr}")
        return res

    def start_coordinator(self, *extra_args: str, timeout_s: float = 90) -> None:
        """``fl-server start --certs [EXTRA_ARGS]`` on a free loopback port; wait for it."""
        log = (self.root / "fl-server-start.log").open("w")
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "consilia.server.control.cli",
             "--state-dir", str(self.state_dir), "start", "--certs", str(self.certs),
             "--host", "127.0.0.1", "--port", str(self.port), *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        log.close()
        wait_for(lambda: self.coordinator.poll() is not None
                 or "coordinator ready" in (self.root / "fl-server-start.log").read_text(),
                 timeout_s, "the coordinator to start")
        if self.coordinator.poll() is not None:
            raise RuntimeError("fl-server start exited:\n"
                               + (self.root / "fl-server-start.log").read_text())

    def register_sites(self, names: Sequence[str] | None = None) -> None:
        """``fl-server register-site`` for each site's public key."""
        for name in names or self.site_names:
            self.fl_server("register-site", str(self.certs / "sites" / name /
                                                "supernode.key.pub"), "--name", name)

    def site_status(self) -> dict[str, str]:
        """``{site name: status}`` from ``fl-server sites --json``."""
        rows = json.loads(self.fl_server("sites", "--json").stdout)
        return {r["name"]: r["status"] for r in rows}

    def wait_online(self, names: Sequence[str], timeout_s: float = 180) -> None:
        """Wait until every named site shows ``online`` at the coordinator."""
        wait_for(lambda: all(self.site_status().get(n) == "online" for n in names),
                 timeout_s, f"sites {', '.join(names)} to come online", poll_s=2.0)

    # -- sites ---------------------------------------------------------------------------
    def write_site_config(self, name: str, data_root: Path, labels_csv: str = "labels.csv",
                          policy: dict | None = None, runtime: dict | None = None,
                          key_site: str | None = None, address: str | None = None,
                          **extra: Any) -> Path:
        """Write ``sites/<name>/site.yaml`` for an exported DICOM folder.

        ``key_site`` uses another site's key (e.g. an unregistered one); ``address`` dials
        somewhere else than the SuperLink (e.g. the reverse proxy).
        """
        folder = self.site_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        keys = self.certs / "sites" / (key_site or name)
        config: dict[str, Any] = {
            "name": name,
            "coordinator": {"address": address or self.address,
                            "ca_certificate": str(keys / "ca.crt"),
                            "auth_key": str(keys / "supernode.key")},
            "data": {"kind": "dicom", "root": str(Path(data_root).resolve()),
                     "labels_csv": labels_csv},
            "state_dir": str(folder / "state"),
            "policy": policy or {},
            "runtime": {"runtime_port": free_port(), **(runtime or {})},
            **extra,
        }
        path = folder / "site.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start_site(self, name: str) -> subprocess.Popen:
        """``fl-client --site sites/<name>/site.yaml`` in its own process group."""
        folder = self.site_dir(name)
        log = (folder / "fl-client.out").open("a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "consilia.client.cli", "--site", str(folder / "site.yaml")],
            stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        log.close()
        self.sites[name] = proc
        return proc

    def kill_site(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the site's whole process group (supervisor, SuperNode, worker)."""
        proc = self.sites.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    # -- shutdown ------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every site, then the coordinator (SIGTERM, then SIGKILL)."""
        for name in list(self.sites):
            self.kill_site(name, signal.SIGTERM)
        if self.coordinator is not None and self.coordinator.poll() is None:
            from consilia.server.control.superlink import stop_process

            stop_process(self.coordinator, timeout_s=20)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
