"""``fl-client --site site.yaml``: run and watch the site's Flower SuperNode and ClientApp process.

Two child processes, both started here and restarted with exponential back-off when they end:

- the Flower SuperNode (``flower-supernode`` through
  :mod:`consilia.common.flower.supernode_launch`), which connects **outbound** to the
  coordinator over TLS with the site's key; its runtime API listens on 127.0.0.1 only, so
  nothing at the hospital accepts connections from outside;
- with ``runtime.isolation: process`` (default), the site's long-lived ClientApp process
  (:mod:`consilia.client.site.worker`), which runs only the installed Consilia code for
  approved app bundles. A shared secret in the state directory lets only it take tasks.

Before each (re)start of the SuperNode the coordinator is probed with a TLS handshake; while it
is unreachable the site waits (1 s, 2 s, 4 s, ... up to ``runtime.max_backoff_s``) and says
why, instead of exiting. SIGTERM / SIGINT stop both children cleanly.

Neither child can outlive this supervisor: each runs in its own process group (a clean stop
sends SIGTERM to the group, so whatever the child started goes too), and on Linux the kernel
sends it SIGTERM when the supervisor dies, even by ``kill -9``
(:func:`consilia.common.child_env.die_with_parent`). The SuperNode runs inside its launcher's
process, so it gets that signal itself; Flower's SuperExec and ClientApp processes under it
end with it (they watch their parent's pid). The site's ClientApp process stops after the task
it is running, if any.

Logs go to ``<state_dir>/logs``: ``fl-client.log`` (this supervisor), ``supernode.log``
(Flower), ``site.log`` and ``rounds.jsonl`` (the ClientApp process: one line per task).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from consilia.client.site.check import TLSProbeError, check_auth_key, probe_tls
from consilia.client.site.config import SiteConfig
from consilia.common.child_env import child_env as process_env
from consilia.common.child_env import parent_death_preexec, stop_process_group
from consilia.common.constants import NodeConfigKey

__all__ = ["Backoff", "SiteSupervisor", "explain_supernode_exit"]

log = logging.getLogger("consilia.site")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ECHO = re.compile(r"ERROR|WARNING|SuperNode ID|Exit Code")
#: With Flower's subprocess isolation no site process logs the rounds: echo Flower's lines.
_ECHO_ROUNDS = re.compile(r"ERROR|WARNING|SuperNode ID|Exit Code|\[RUN \d+(, ROUND \S+)?\]")
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 30.0

_EXIT_HELP = {
    302: "the authentication key could not be used (coordinator.auth_key must be an "
    "OpenSSH ECDSA private key)",
    303: "node authentication needs TLS (coordinator.ca_certificate)",
    305: "could not connect to / authenticate with the coordinator (if the SuperNode log says "
    "the node is unknown or not registered, send the public key <auth_key>.pub to the "
    "coordinator to register this site)",
    600: "the coordinator address cannot be parsed",
    604: "a certificate or key path is invalid",
}
#: Small statuses that mean more than one thing (Python's and Flower's conventions).
_STATUS_HELP = {
    0: "it stopped without an error",
    1: "an error (or Flower's graceful exit on SIGINT); see supernode.log",
    2: "invalid command-line arguments (or Flower's graceful exit on SIGQUIT); see supernode.log",
    3: "Flower's graceful exit on SIGTERM",
}


def explain_supernode_exit(code: int | None) -> str:
    """Return a plain explanation of a SuperNode exit status (never raises).

    A status above 255 reaches us truncated to one byte (Flower's 305 arrives as 49); where
    that is unambiguous the explanation is Flower's code's, and says so
    (:func:`consilia.common.flower.exit_codes.untruncated_exit_code`).
    """
    try:
        return _explain(code)
    except Exception as exc:  # noqa: BLE001 - an explanation must never stop the supervisor
        return f"see supernode.log (no explanation: {exc!r})"


def _explain(code: int | None) -> str:
    from consilia.common.flower.exit_codes import (
        SIGNAL_STATUSES,
        flower_exit_code_help,
        untruncated_exit_code,
    )

    if code is None:
        return "exit status unknown; see supernode.log"
    code = int(code)
    if code < 0:
        return f"killed by signal {-code}"
    original = untruncated_exit_code(code)
    if original is not None:
        text = _EXIT_HELP.get(original) or flower_exit_code_help(original) or "see supernode.log"
        return f"{text} (Flower exit code {original}, seen as {code})"
    if code in _EXIT_HELP or code in _STATUS_HELP:
        return _EXIT_HELP.get(code) or _STATUS_HELP[code]
    text = flower_exit_code_help(code)
    if text:
        return text
    if code in SIGNAL_STATUSES:
        signal_name = _signal_name(code - 128)
        truncated = [c for c in range(code + 256, 1024, 256) if flower_exit_code_help(c)]
        also = f", or Flower exit code {truncated[0]} truncated" if truncated else ""
        return f"probably killed by signal {code - 128}{signal_name}{also}; see supernode.log"
    return "see supernode.log"


def _signal_name(number: int) -> str:
    try:
        return f" ({signal.Signals(number).name})"
    except ValueError:
        return ""


class Backoff:
    """Exponential back-off: 1, 2, 4, ... seconds up to ``max_s``."""

    def __init__(self, max_s: float, initial_s: float = 1.0) -> None:
        self.max_s = max_s
        self.initial_s = initial_s
        self._next = initial_s

    def next(self) -> float:
        """Return the wait before the next attempt (and double it)."""
        wait = self._next
        self._next = min(self._next * 2, self.max_s)
        return wait

    def reset(self) -> None:
        """Start again from the initial wait."""
        self._next = self.initial_s


@dataclass
class _Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path | None = None
    echo: re.Pattern[str] = _ECHO
    process: subprocess.Popen | None = None
    started: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(300.0))
    restart_at: float = 0.0
    _pump: threading.Thread | None = None

    def start(self) -> None:
        stdout: int | None = subprocess.PIPE if self.log_path else None
        # its own process group (stopped as a whole), and SIGTERM when this process dies
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv built here
            self.argv, env=self.env, stdout=stdout,
            stderr=subprocess.STDOUT if self.log_path else None, text=True, bufsize=1,
            process_group=0, preexec_fn=parent_death_preexec(),
        )
        self.started = time.monotonic()
        if self.log_path is not None and self.process.stdout is not None:
            args = (self.process.stdout, self.log_path, self.name, self.echo)
            self._pump = threading.Thread(target=_pump_output, args=args, daemon=True)
            self._pump.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if not stop_process_group(self.process, grace_s):
            log.warning("%s did not stop within %.0f s; killed it", self.name, grace_s)
        if self._pump is not None:
            self._pump.join(timeout=2)


def _pump_output(stream: IO[str], path: Path, name: str, echo: re.Pattern[str]) -> None:
    """Copy a child's output to its log file; echo warnings, errors and rounds to stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for line in stream:
            handle.write(line)
            handle.flush()
            plain = _ANSI.sub("", line).rstrip()
            if plain and echo.search(plain):
                print(f"[{name}] {plain}", flush=True)


class SiteSupervisor:
    """Start, watch and stop the site's SuperNode and ClientApp process.

    Parameters
    ----------
    config : SiteConfig
        The validated site config.
    config_path : Path
        Its file (passed to the SuperNode as ``node_config["site-config"]``).
    verbose : bool
        Debug logging in the children.

    """

    def __init__(self, config: SiteConfig, config_path: Path, verbose: bool = False) -> None:
        self.config = config
        self.config_path = Path(config_path).resolve()
        self.verbose = verbose
        self.stop_event = threading.Event()
        self.secret_file = config.state_dir / "runtime-secret"

    # -- commands -------------------------------------------------------------------------

    @property
    def runtime_address(self) -> str:
        """The SuperNode's local runtime API (127.0.0.1 only)."""
        return f"127.0.0.1:{self.config.runtime.runtime_port}"

    def child_env(self) -> dict[str, str]:
        """Environment of both children: no telemetry, Flower's files in the state dir."""
        env = process_env()
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_HOME"] = str(self.config.state_dir / "flwr")
        env.setdefault("PYTHONUNBUFFERED", "1")
        threads = self.config.resources.threads
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        return env

    def supernode_command(self) -> list[str]:
        """Command line of the Flower SuperNode."""
        coord, runtime = self.config.coordinator, self.config.runtime
        node_config = f"{NodeConfigKey.SITE_CONFIG.value}={json.dumps(str(self.config_path))}"
        argv = [
            sys.executable, "-m", "consilia.common.flower.supernode_launch",
            "--poll-interval", str(runtime.superlink_poll_interval_s),
            "--active-poll-interval", str(runtime.active_poll_interval_s),
            "--active-window", str(runtime.active_window_s), "--",
            "--superlink", coord.address,
            "--root-certificates", str(coord.ca_certificate),
            "--auth-supernode-private-key", str(coord.auth_key),
            "--node-config", node_config,
            "--isolation", runtime.isolation,
            "--host", "127.0.0.1",
            "--port", str(runtime.runtime_port),
        ]
        if runtime.isolation == "process":
            argv += ["--superexec-auth-secret-file", str(self.secret_file)]
        return argv

    def worker_command(self) -> list[str]:
        """Command line of the site's long-lived ClientApp process."""
        argv = [
            sys.executable, "-m", "consilia.client.site.worker",
            "--site", str(self.config_path),
            "--runtime-api-address", self.runtime_address,
            "--secret-file", str(self.secret_file),
            "--parent-pid", str(os.getpid()),
        ]
        if self.verbose:
            argv.append("--verbose")
        return argv

    # -- preparation ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Check key and certificate, create the state folders and the runtime secret.

        Raises
        ------
        RuntimeError
            If the key or certificate cannot be used (the message says what to do).

        """
        status, detail = check_auth_key(self.config.coordinator.auth_key)
        if status == "FAIL":
            raise RuntimeError(f"authentication key: {detail}")
        if not self.config.coordinator.ca_certificate.is_file():
            raise RuntimeError(f"CA certificate {self.config.coordinator.ca_certificate} not found")
        for folder in (self.config.state_dir, self.config.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        if self.config.runtime.isolation == "process":
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
            os.chmod(self.secret_file, 0o600)

    def wait_for_coordinator(self, backoff: Backoff) -> bool:
        """Probe the coordinator until a TLS handshake succeeds; False if asked to stop."""
        coord = self.config.coordinator
        while not self.stop_event.is_set():
            try:
                detail = probe_tls(coord.host, coord.port, coord.ca_certificate,
                                   coord.connect_timeout_s)
            except TLSProbeError as exc:
                wait = backoff.next()
                log.warning("coordinator unreachable: %s; retrying in %.0f s", exc, wait)
                self.stop_event.wait(wait)
                continue
            log.info("coordinator reachable: %s", detail)
            return True
        return False

    # -- main loop ------------------------------------------------------------------------

    def _children(self) -> list[_Child]:
        env = self.child_env()
        max_backoff = self.config.runtime.max_backoff_s
        children = [
            _Child("supernode", self.supernode_command(), env,
                   log_path=self.config.log_dir / "supernode.log",
                   echo=_ECHO if self.config.runtime.isolation == "process" else _ECHO_ROUNDS,
                   backoff=Backoff(max_backoff)),
        ]
        if self.config.runtime.isolation == "process":
            children.append(_Child("clientapp", self.worker_command(), env,
                                   backoff=Backoff(max_backoff)))
        return children

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code (0 after a clean stop)."""
        self.prepare()
        if self.config.runtime.isolation == "subprocess":
            log.warning("runtime.isolation=subprocess: Flower starts a fresh ClientApp per task "
                        "and runs whatever ClientApp the bundle names (no approval check)")
        self._install_signal_handlers()
        children = self._children()
        log.info("site %s: connecting outbound to %s (no inbound port is opened)",
                 self.config.name, self.config.coordinator.address)
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                for child in children:
                    self._tend(child, now)
                self.stop_event.wait(0.5)
        finally:
            for child in reversed(children):
                child.stop(STOP_GRACE_S)
            log.info("site %s stopped", self.config.name)
        return 0

    def _tend(self, child: _Child, now: float) -> None:
        if child.running:
            if now - child.started > STABLE_AFTER_S:
                child.backoff.reset()
            return
        if child.process is not None:  # it ended: say why, schedule a restart
            code = child.process.returncode
            child.process = None
            if self.stop_event.is_set():
                return
            wait = child.backoff.next()
            child.restart_at = now + wait
            if child.name == "supernode":
                log.warning("SuperNode exited with code %s: %s; restarting in %.0f s",
                            code, explain_supernode_exit(code), wait)
            else:
                log.warning("site ClientApp process exited with code %s; restarting in %.0f s",
                            code, wait)
            return
        if now < child.restart_at:
            return
        if child.name == "supernode" and not self.wait_for_coordinator(child.backoff):
            return
        if self.stop_event.is_set():
            return
        log.info("starting %s", child.name)
        child.start()

    def _install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: object) -> None:
            if not self.stop_event.is_set():
                log.info("stopping (signal %d)", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
