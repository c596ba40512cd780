"""Start and stop the coordinator's Flower SuperLink (TLS, node authentication, no installs).

``fl-server start`` runs ``flower-superlink`` with the coordinator's certificates
(``deploy/gen-certs.sh`` layout: ``ca.crt``, ``coordinator.crt``, ``coordinator.key``),
``--enable-supernode-auth`` (only registered site keys may join) and
``--disable-runtime-dependency-installation`` (no ``uv sync`` per run), with its state database
in the coordinator's state directory (``0700``; its files ``0600``). ``fl-server start`` refuses
a port another process holds, and calls the SuperLink ready only once the process it started
answers (not whatever else listens there). Insecure mode exists only behind an explicit flag and
always prints :data:`INSECURE_WARNING`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from consilia.common.child_env import child_env
from consilia.server.control.state_dir import STATE_ENV, ensure_private_dir, open_private_append

__all__ = [
    "INSECURE_WARNING",
    "CoordinatorCerts",
    "SuperLinkError",
    "SuperLinkSettings",
    "check_port_free",
    "executable",
    "log_size",
    "start_superlink",
    "stop_process",
    "superlink_command",
    "wait_until_ready",
]

INSECURE_WARNING = (
    "\n"
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    "!!  INSECURE MODE: no TLS and NO site authentication.                              !!\n"
    "!!  Model weights and metrics travel in clear text and ANY machine that reaches    !!\n"
    "!!  this port can join as a site or submit runs. Use only on an isolated test      !!\n"
    "!!  network, never with real hospital data. Drop --insecure and pass --certs DIR.  !!\n"
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
)


class SuperLinkError(RuntimeError):
    """The SuperLink cannot be started or does not become ready."""


@dataclass(frozen=True)
class CoordinatorCerts:
    """The coordinator's TLS files (``deploy/gen-certs.sh`` writes them)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, certs_dir: Path) -> CoordinatorCerts:
        """Find ``ca.crt``, ``coordinator.crt`` and ``coordinator.key`` in ``certs_dir``.

        Raises
        ------
        SuperLinkError
            Naming every missing file and how to create it.

        """
        certs_dir = Path(certs_dir).expanduser().resolve()
        certs = cls(certs_dir / "ca.crt", certs_dir / "coordinator.crt",
                    certs_dir / "coordinator.key")
        missing = [str(p) for p in (certs.ca, certs.cert, certs.key) if not p.is_file()]
        if missing:
            raise SuperLinkError(
                f"certificate files missing: {', '.join(missing)}; create them with "
                f"deploy/gen-certs.sh -o {certs_dir} --dns <coordinator name> --ip <address>"
            )
        return certs


@dataclass(frozen=True)
class SuperLinkSettings:
    """How to run the SuperLink.

    Parameters
    ----------
    state_dir : Path
        Coordinator state: the SuperLink database (registered sites, runs) and its log.
    certs : CoordinatorCerts or None
        TLS files; ``None`` only in insecure mode.
    host, port : str, int
        Listen address (``0.0.0.0`` for remote sites; ``127.0.0.1`` behind the reverse proxy).
    insecure : bool
        No TLS, no node authentication (tests on an isolated network only).
    isolation : str
        ``subprocess``: the SuperLink spawns the ServerApp process itself.
    memory_state : bool
        Keep the SuperLink's state (site keys, runs, messages, model objects) in memory
        instead of SQLite (the default: rounds are much faster, see docs/deployment.md).
        It is lost on restart; ``fl-server start`` then registers every site of
        ``sites.json`` again.
    extra_env : dict
        Environment added to the SuperLink's (e.g. ``OMP_NUM_THREADS``).

    """

    state_dir: Path
    certs: CoordinatorCerts | None
    host: str = "0.0.0.0"
    port: int = 9093
    insecure: bool = False
    isolation: str = "subprocess"
    memory_state: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.certs is None and not self.insecure:
            raise SuperLinkError(
                "no TLS certificates given: pass --certs DIR (see deploy/gen-certs.sh); "
                "--insecure exists for isolated tests only"
            )

    @property
    def database(self) -> str:
        """Return the SuperLink's ``--database``: SQLite in the state dir, or in memory.

        SQLite keeps site keys and runs across restarts; memory (the default) is faster and
        ``fl-server start`` registers the sites of ``sites.json`` again after a restart.
        """
        if self.memory_state:
            return ":flwr-in-memory:"
        return str(Path(self.state_dir) / "superlink.db")

    @property
    def log_file(self) -> Path:
        """Where the SuperLink's own log goes."""
        return Path(self.state_dir) / "superlink.log"

    @property
    def local_address(self) -> str:
        """``host:port`` to reach this SuperLink from the coordinator machine itself."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"{host}:{self.port}"


def executable(name: str) -> str:
    """Path of a console script installed next to this Python (the venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SuperLinkError(f"'{name}' not found; install Consilia (pip install -e .)")
    return found


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """Build the ``flower-superlink`` command line for ``settings``."""
    cmd = [
        executable("flower-superlink"),
        "--host", settings.host,
        "--port", str(settings.port),
        "--database", settings.database,
        "--isolation", settings.isolation,
        "--disable-runtime-dependency-installation",
    ]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        assert settings.certs is not None
        cmd += [
            "--ssl-ca-certfile", str(settings.certs.ca),
            "--ssl-certfile", str(settings.certs.cert),
            "--ssl-keyfile", str(settings.certs.key),
            "--enable-supernode-auth",
        ]
    return cmd


def check_port_free(host: str, port: int) -> None:
    """Raise unless ``host:port`` can be bound (nothing else listens there).

    Raises
    ------
    SuperLinkError
        Naming the port, when another process (e.g. another coordinator) holds it.

    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SuperLinkError(_port_taken(host, port, exc.strerror or str(exc))) from None


def _port_taken(host: str, port: int, why: str) -> str:
    return (f"port {port} on {host} is not available ({why}): another process (another "
            f"coordinator?) holds it; stop it or choose another --port")


def start_superlink(settings: SuperLinkSettings, foreground: bool = False) -> subprocess.Popen:
    """Start the SuperLink; its output goes to ``settings.log_file`` (or this terminal).

    The state directory is created owner-only and the log file ``0600``. The SuperLink's
    environment names the state directory (``$CONSILIA_COORDINATOR_HOME``) so that the
    ServerApp it spawns finds the run directories registered there.

    Parameters
    ----------
    settings : SuperLinkSettings
        What to run.
    foreground : bool
        Inherit this process's stdout/stderr instead of writing the log file.

    Returns
    -------
    subprocess.Popen
        The running SuperLink (in this process's group: it ends with ``fl-server``; the
        ServerApp executor it spawns watches its parent and ends with it).

    """
    ensure_private_dir(Path(settings.state_dir))
    if settings.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    env = child_env(**{"FLWR_TELEMETRY_ENABLED": "0",
                       STATE_ENV: str(Path(settings.state_dir).resolve()),
                       **settings.extra_env})
    out = None if foreground else open_private_append(settings.log_file)
    try:
        return subprocess.Popen(
            superlink_command(settings), stdout=out, stderr=subprocess.STDOUT if out else None,
            env=env,
        )
    finally:
        if out is not None:
            os.close(out)


#: uvicorn's line once the SuperLink's own socket listens
_LISTENING = "Uvicorn running on"
_BIND_FAILED = "address already in use"


def wait_until_ready(
    address: str,
    ca_file: Path | None,
    timeout_s: float = 60.0,
    process: subprocess.Popen | None = None,
    log_file: Path | None = None,
    log_offset: int = 0,
) -> None:
    """Poll ``https://address/health`` until the SuperLink that ``process`` runs answers.

    An answer counts only while ``process`` is alive and, with a ``log_file``, once the log
    (from byte ``log_offset``: what this start wrote) says it listens: another process on
    the same port answers too.

    Raises
    ------
    SuperLinkError
        If ``process`` exits first (naming the port when it could not bind it) or
        ``timeout_s`` passes (with the log's tail).

    """
    scheme = "http" if ca_file is None else "https"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log = _new_log(log_file, log_offset)
            if _BIND_FAILED in log.lower():
                host, _, port = address.rpartition(":")
                raise SuperLinkError(_port_taken(host, int(port), "address already in use"))
            raise SuperLinkError(
                f"flower-superlink exited with code {process.returncode}" + _tail(log_file)
            )
        try:
            with urllib.request.urlopen(f"{scheme}://{address}/health", context=context,
                                        timeout=2) as resp:
                if resp.status == 200 and (
                        log_file is None or _LISTENING in _new_log(log_file, log_offset)):
                    if process is None:
                        return
                    time.sleep(0.5)  # a SuperLink that failed to bind exits at once
                    if process.poll() is None:
                        return
                    continue
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.3)
    raise SuperLinkError(
        f"SuperLink at {address} not ready after {timeout_s:.0f}s ({last_error})"
        + _tail(log_file)
    )


def log_size(log_file: Path) -> int:
    """Return the size of ``log_file`` (0 when absent): where this start's lines begin."""
    return Path(log_file).stat().st_size if Path(log_file).is_file() else 0


def _new_log(log_file: Path | None, offset: int) -> str:
    if log_file is None or not Path(log_file).is_file():
        return ""
    with Path(log_file).open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def _tail(log_file: Path | None, lines: int = 15) -> str:
    if log_file is None or not Path(log_file).is_file():
        return ""
    text = Path(log_file).read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(log_file) + " (last lines) ---\n" + "\n".join(text)


def stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> int | None:
    """Stop a process: SIGTERM, then SIGKILL after ``timeout_s``; return its exit status."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=timeout_s)
