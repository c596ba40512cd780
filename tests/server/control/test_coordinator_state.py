"""Coordinator start-up and state: a taken port, owner-only state files, run dirs kept private."""

from __future__ import annotations

import http.server
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir
from site_testkit import free_port, make_node_key

from consilia.common.config import RunConfig
from consilia.server.app import load_run
from consilia.server.control.run_dirs import (
    RUN_DIR_TOKEN_KEY,
    RunDirLookupError,
    run_dir_from_run_config,
)
from consilia.server.control.run_launcher import prepare_run_dir
from consilia.server.control.site_registry import SiteRegistry
from consilia.server.control.state_dir import STATE_ENV, secure_state_dir
from consilia.server.control.superlink import SuperLinkError, check_port_free, wait_until_ready

REPO = Path(__file__).resolve().parents[3]
TASK = {"class_names": ["normal", "pneumonia"], "in_channels": 1, "image_size": 16}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fl_server(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consilia.server.control.cli", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


# -- a port another process holds ----------------------------------------------------------
def test_start_on_a_taken_port_exits_2_naming_it_and_never_says_ready(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(4)
        port = holder.getsockname()[1]
        res = _fl_server("--state-dir", str(tmp_path / "state"), "start", "--insecure",
                         "--host", "127.0.0.1", "--port", str(port), "--ready-timeout", "20")
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"port {port} on 127.0.0.1 is not available" in res.stderr
    assert "choose another --port" in res.stderr
    assert not re.search(r"\bready\b", res.stdout + res.stderr)  # ("already" is fine)
    assert not (tmp_path / "state" / "superlink.log").exists()  # nothing was started


def test_check_port_free_passes_on_a_free_port():
    port = free_port()
    assert check_port_free("127.0.0.1", port) is None
    with socket.socket() as again:  # the check released the port it probed
        again.bind(("127.0.0.1", port))
        assert again.getsockname()[1] == port


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_ready_is_not_claimed_when_another_process_answers_the_health_check(tmp_path):
    """Our SuperLink could not bind (it logs so and exits) while another one answers."""
    other = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = other.server_address[1]
    threading.Thread(target=other.serve_forever, daemon=True).start()
    log = tmp_path / "superlink.log"
    log.write_text("Uvicorn running on http://127.0.0.1:1 (an earlier start)\n")
    offset = log.stat().st_size
    script = ("import sys, time; time.sleep(1.5); "
              f"open({str(log)!r}, 'a').write('ERROR [Errno 98] error while attempting to "
              "bind: address already in use\\n'); sys.exit(1)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        with pytest.raises(SuperLinkError, match=f"port {port} on 127.0.0.1 is not available"):
            wait_until_ready(f"127.0.0.1:{port}", None, 20, proc, log, offset)
    finally:
        proc.kill()
        proc.wait()
        other.shutdown()
        other.server_close()


# -- owner-only state ------------------------------------------------------------------------
def test_site_registry_writes_sites_json_owner_only_in_an_owner_only_dir(tmp_path):
    state = tmp_path / "state"
    registry = SiteRegistry(state / "sites.json")
    registry.add("site-a", 1, "SHA256:x", "ecdsa-sha2-nistp384 AAAA")
    assert _mode(state) == 0o700
    assert _mode(state / "sites.json") == 0o600
    registry.set_node_id("site-a", 2)
    assert _mode(state / "sites.json") == 0o600
    assert registry.load()[0].node_id == 2


def test_secure_state_dir_tightens_what_an_older_version_left_readable(tmp_path):
    state = tmp_path / "state"
    (state / "flwr").mkdir(parents=True)
    for path, mode in ((state, 0o755), (state / "flwr", 0o755)):
        path.chmod(mode)
    (state / "sites.json").write_text("{}")
    (state / "sites.json").chmod(0o644)
    (state / "flwr" / "config.toml").write_text("")
    (state / "flwr" / "config.toml").chmod(0o640)
    (state / "superlink.log").write_text("")
    (state / "superlink.log").chmod(0o600)
    fixed = secure_state_dir(state)
    assert set(fixed) == {state, state / "flwr", state / "sites.json",
                          state / "flwr" / "config.toml"}
    assert _mode(state) == _mode(state / "flwr") == 0o700
    for name in ("sites.json", "flwr/config.toml", "superlink.log"):
        assert _mode(state / name) == 0o600
    assert secure_state_dir(state) == []


@pytest.mark.slow
def test_started_coordinator_keeps_its_state_owner_only(tmp_path):
    """A real ``fl-server start`` (TLS) and ``register-site``: every state file is 0600."""
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "deploy" / "gen-certs.sh"), "-o", str(certs)],
                   check=True, capture_output=True)
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    (state / "sites.json").write_text('{"sites": []}')
    (state / "sites.json").chmod(0o644)
    port = free_port()
    start = subprocess.Popen(
        [sys.executable, "-m", "consilia.server.control.cli", "--state-dir", str(state), "start",
         "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        assert start.stdout is not None
        while time.monotonic() < deadline:
            line = start.stdout.readline()
            if not line or "coordinator ready" in line:
                break
        assert "coordinator ready" in line, start.stderr.read() if start.poll() else line
        key = make_node_key(tmp_path / "site-a" / "supernode.key")
        res = _fl_server("--state-dir", str(state), "register-site",
                         str(key.with_name("supernode.key.pub")), "--name", "site-a",
                         timeout=120)
        assert res.returncode == 0, res.stderr
        assert _mode(state) == 0o700
        files = [p for p in state.rglob("*") if p.is_file()]
        assert {"sites.json", "superlink.log", "config.toml"} <= {p.name for p in files}
        loose = {str(p): oct(_mode(p)) for p in files if _mode(p) & 0o077}
        assert loose == {}
        assert all(_mode(p) == 0o700 for p in state.rglob("*") if p.is_dir())
    finally:
        start.terminate()
        _, err = start.communicate(timeout=30)
    assert "were readable by other users; now owner-only" in err
    assert str(state / "sites.json") in err


# -- the run directory stays on the coordinator ----------------------------------------------
def test_sites_never_receive_the_coordinators_run_directory(tmp_path, monkeypatch):
    """What a ClientApp's ``context.run_config`` holds in a deployed run: the app bundle's
    config, fused by Flower as the SuperNode does; it carries a token, never the path."""
    run = RunConfig.model_validate({"name": "t", "task": TASK})
    run_dir = tmp_path / "coordinator-only" / "run"
    state = tmp_path / "state"
    app_dir = prepare_run_dir(run, run_dir, ["fl-server", "run"], state_dir=state)
    client_run_config = get_fused_config_from_dir(app_dir, {})
    assert str(run_dir.resolve()) not in repr(client_run_config)
    assert "coordinator-only" not in repr(client_run_config)
    for path in app_dir.rglob("*"):  # the bundle every site downloads
        if path.is_file():
            assert "coordinator-only" not in path.read_text(errors="replace"), path
    token_file = state / "run-dirs" / str(client_run_config[RUN_DIR_TOKEN_KEY])
    assert _mode(token_file) == 0o600 and _mode(token_file.parent) == 0o700

    # the ServerApp (under the SuperLink, whose environment names the state dir) finds it
    monkeypatch.setenv(STATE_ENV, str(state))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=client_run_config)
    loaded, found = load_run(context)
    assert found == run_dir.resolve() and loaded == run


def test_unknown_run_token_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    with pytest.raises(RunDirLookupError, match="same --state-dir"):
        run_dir_from_run_config({RUN_DIR_TOKEN_KEY: "0" * 32})
    with pytest.raises(RunDirLookupError, match="not a run token"):
        run_dir_from_run_config({RUN_DIR_TOKEN_KEY: "../../etc/passwd"})
    assert run_dir_from_run_config({"consilia-run-dir": str(tmp_path)}) == tmp_path


def test_superlink_environment_names_the_state_dir(tmp_path, monkeypatch):
    """The ServerApp inherits the SuperLink's environment: it must name the state dir."""
    from consilia.server.control import superlink

    seen: dict[str, str] = {}

    class FakePopen:
        def __init__(self, cmd: list[str], env: dict[str, str], **_: object) -> None:
            seen.update(env)

    monkeypatch.setattr(superlink.subprocess, "Popen", FakePopen)
    settings = superlink.SuperLinkSettings(state_dir=tmp_path / "s", certs=None, insecure=True)
    superlink.start_superlink(settings)
    assert seen[STATE_ENV] == str((tmp_path / "s").resolve())
    assert _mode(tmp_path / "s") == 0o700 and _mode(settings.log_file) == 0o600
