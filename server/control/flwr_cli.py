"""The operator's calls to the SuperLink's Control API, through Flower's own ``flwr`` CLI.

The operator's connection lives where Flower expects it: ``$FLWR_HOME/config.toml``
(``[superlink.consilia] address = ..., root-certificates = ...``). ``fl-server`` keeps that
file inside the coordinator state directory (``<state>/flwr``) so that it never touches the
operator's personal Flower configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from consilia.server.control.state_dir import ensure_private_dir, write_private_text
from consilia.server.control.superlink import executable

__all__ = ["CONNECTION_NAME", "Connection", "FlowerOperator", "OperatorError", "write_connection"]

CONNECTION_NAME = "consilia"


class OperatorError(RuntimeError):
    """A Control API call failed; the message says what the SuperLink answered."""


@dataclass(frozen=True)
class Connection:
    """How the operator reaches the SuperLink's Control API.

    Parameters
    ----------
    address : str
        ``host:port`` (the SuperLink itself, or the reverse proxy from an operator address).
    root_certificates : Path or None
        CA certificate that signed the coordinator certificate; ``None`` means insecure.

    """

    address: str
    root_certificates: Path | None

    @property
    def insecure(self) -> bool:
        """No TLS (isolated tests only)."""
        return self.root_certificates is None


def write_connection(flwr_home: Path, connection: Connection, name: str = CONNECTION_NAME) -> Path:
    """Write (or update) the ``[superlink.<name>]`` entry of ``flwr_home/config.toml``.

    Other entries of an existing file are kept; ``name`` becomes the default connection.
    """
    flwr_home = ensure_private_dir(Path(flwr_home))
    path = flwr_home / "config.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.is_file() else {}
    superlink = data.setdefault("superlink", {})
    superlink["default"] = name
    entry: dict[str, Any] = {"address": connection.address}
    if connection.root_certificates is None:  # insecure
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(connection.root_certificates).resolve())
    superlink[name] = entry
    write_private_text(path, tomli_w.dumps(data))
    return path


class FlowerOperator:
    """Run ``flwr`` commands against one named connection.

    Parameters
    ----------
    flwr_home : Path
        Directory holding ``config.toml`` (see :func:`write_connection`).
    name : str
        Connection name inside it.
    timeout_s : float
        Per-command time limit.

    """

    def __init__(self, flwr_home: Path, name: str = CONNECTION_NAME, timeout_s: float = 120.0):
        self.flwr_home = Path(flwr_home)
        self.name = name
        self.timeout_s = timeout_s
        if not (self.flwr_home / "config.toml").is_file():
            raise OperatorError(
                f"no operator connection in {self.flwr_home}/config.toml; start the "
                "coordinator with 'fl-server start' or point at one with --superlink/--ca"
            )

    # -- plumbing ------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return {**os.environ, "FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "COLUMNS": "200", "NO_COLOR": "1"}

    def call(self, *args: str, json_output: bool = True) -> dict[str, Any]:
        """Run ``flwr ARGS... <connection> [--format json]`` and return the parsed answer.

        Raises
        ------
        OperatorError
            On a non-zero exit, ``"success": false`` or unparsable output.

        """
        cmd = [executable("flwr"), *args, self.name]
        if json_output:
            cmd += ["--format", "json"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self._env(),
                                  timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise OperatorError(f"'flwr {' '.join(args)}' timed out after "
                                f"{self.timeout_s:.0f}s; is the SuperLink reachable?") from None
        answer: dict[str, Any] = {}
        if json_output:
            answer = _parse_json(proc.stdout)
        if proc.returncode != 0 or answer.get("success") is False:
            message = (answer.get("error-message") or answer.get("error")
                       or (proc.stderr or proc.stdout).strip()[-2000:])
            raise OperatorError(f"'flwr {' '.join(args)}' failed: {message}")
        if json_output and not answer:
            raise OperatorError(f"'flwr {' '.join(args)}' gave no JSON answer: "
                                f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
        return answer

    # -- sites ---------------------------------------------------------------------------
    def register_node(self, public_key: Path, name: str) -> int:
        """Register a site's OpenSSH public key; return its node id."""
        answer = self.call("supernode", "register", str(public_key), "--name", name)
        return int(answer["node-id"])

    def unregister_node(self, node_id: int) -> None:
        """Remove a site; its key can no longer join."""
        self.call("supernode", "unregister", str(node_id))

    def list_nodes(self) -> list[dict[str, Any]]:
        """List registered nodes with their status (``registered``/``online``/``offline``)."""
        return list(self.call("supernode", "list").get("nodes", []))

    # -- runs ----------------------------------------------------------------------------
    def start_run(self, app_dir: Path) -> int:
        """Submit the Flower app in ``app_dir``; return the run id."""
        answer = self.call("run", str(app_dir))
        return int(answer["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """Status, timings and network traffic of one run."""
        runs = self.call("ls", "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise OperatorError(f"run {run_id} not found on the SuperLink")
        return dict(runs[0])

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run."""
        self.call("stop", str(run_id))

    def logs(self, run_id: int) -> str:
        """Return the run's ServerApp log so far."""
        cmd = [executable("flwr"), "log", str(run_id), self.name, "--show"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self._env(),
                              timeout=self.timeout_s, check=False)
        return proc.stdout + proc.stderr


def _parse_json(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        return {}
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
