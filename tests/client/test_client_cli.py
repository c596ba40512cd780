"""fl-client: --check on good and broken setups, --privacy, and the supervisor's behaviour."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from site_testkit import TLSServer, free_port, make_certs, write_site

from consilia.client.cli import main
from consilia.client.site.check import probe_tls, run_site_check
from consilia.client.site.config import load_site_config
from consilia.client.site.supervisor import Backoff, SiteSupervisor, explain_supernode_exit
from consilia.common.flower import supernode_launch


@pytest.fixture(autouse=True)
def _clean_consilia_logger():
    """fl-client installs console handlers; keep them from leaking between tests."""
    logger = logging.getLogger("consilia")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logger.handlers.clear()
    yield
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A TLS server standing in for the coordinator, with its CA."""
    certs = make_certs(tmp_path_factory.mktemp("coordinator"))
    with TLSServer(certs["cert"], certs["key"]) as server:
        yield server, certs


@pytest.fixture()
def good_site(tmp_path, coordinator) -> Path:
    server, certs = coordinator
    path = write_site(tmp_path / "site", coordinator=f"localhost:{server.port}")
    shutil.copy(certs["ca"], path.parent / "certs" / "ca.crt")
    return path


def _set(path: Path, section: str, key: str, value) -> None:
    data = yaml.safe_load(path.read_text())
    data.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(data))


# -- --check -------------------------------------------------------------------------------


def test_check_good_setup_is_ready(good_site, coordinator, capsys):
    server, _ = coordinator
    before = server.handshakes
    assert main(["--site", str(good_site), "--check"]) == 0
    out = capsys.readouterr().out
    assert "READY (0 warning(s))." in out
    assert "[OK  ] coordinator: TLS handshake with localhost:" in out
    assert "[OK  ] data: 12 usable images (normal: 6, pneumonia: 6)" in out
    assert "[OK  ] authentication key:" in out and "mode 0600" in out
    assert "Usable images: 12 of 12 files found" in out  # the data scan's own report
    assert ("calibration feature statistics: shared once per run when asked, classes under 20 "
            "images withheld; in runs trained with local DP: Gaussian-noised (noise "
            "multiplier 5, in the privacy ledger)") in out
    deadline = time.monotonic() + 5
    while server.handshakes == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.handshakes > before


def test_check_broken_setup_lists_every_problem(tmp_path, capsys):
    path = write_site(tmp_path / "site", coordinator=f"127.0.0.1:{free_port()}",
                      class_names=["normal", "pneumonia"])
    os.chmod(path.parent / "keys" / "site.key", 0o644)
    shutil.rmtree(path.parent / "images" / "pneumonia")
    assert main(["--site", str(path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "[WARN] data: 6 usable images (normal: 6, pneumonia: 0); no image for pneumonia" in out
    assert "[FAIL] authentication key:" in out and "chmod 600" in out
    assert "[FAIL] coordinator:" in out and "refused the connection" in out
    assert "NOT READY: 2 problem(s)" in out


def test_check_missing_certificate_and_key(tmp_path):
    path = write_site(tmp_path / "site")
    (path.parent / "certs" / "ca.crt").unlink()
    (path.parent / "keys" / "site.key").unlink()
    report = run_site_check(path)
    by_name = {r.name: r for r in report.results}
    assert by_name["CA certificate"].status == "FAIL"
    assert "ca.crt not found" in by_name["CA certificate"].detail
    assert by_name["authentication key"].status == "FAIL"
    assert "ssh-keygen -t ecdsa" in by_name["authentication key"].detail
    assert by_name["coordinator"].detail == "not tested (no usable CA certificate)"
    assert report.exit_code == 1


def test_check_wrong_ca_is_explained(tmp_path, coordinator):
    server, _ = coordinator
    path = write_site(tmp_path / "site", coordinator=f"127.0.0.1:{server.port}")  # own CA
    report = run_site_check(path)
    coord = next(r for r in report.results if r.name == "coordinator")
    assert coord.status == "FAIL"
    assert "not signed by the CA in" in coord.detail


def _signed_server_cert(folder: Path, valid_from_days: float, valid_to_days: float,
                        names: list[str]) -> dict[str, Path]:
    """A CA and a server certificate valid between the given offsets from now (in days)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=400))
          .not_valid_after(now + dt.timedelta(days=400))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for entry in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            sans.append(x509.DNSName(entry))
    cert = (x509.CertificateBuilder().subject_name(name("coordinator")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=valid_from_days))
            .not_valid_after(now + dt.timedelta(days=valid_to_days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


@pytest.mark.parametrize(("valid_from", "valid_to", "names", "connect_to", "says", "not_says"), [
    (-60, -1, ["127.0.0.1", "localhost"], "127.0.0.1", "has expired", "not signed"),
    (2, 60, ["127.0.0.1", "localhost"], "127.0.0.1", "not valid yet", "not signed"),
    (-1, 60, ["127.0.0.1"], "localhost", "does not name 'localhost'", "not signed"),
    (-1, 60, ["localhost"], "127.0.0.1", "does not name '127.0.0.1'", "not signed"),
])
def test_tls_probe_names_the_real_certificate_problem(tmp_path, valid_from, valid_to, names,
                                                      connect_to, says, not_says):
    from consilia.client.site.check import TLSProbeError

    certs = _signed_server_cert(tmp_path, valid_from, valid_to, names)
    with TLSServer(certs["cert"], certs["key"]) as server:
        with pytest.raises(TLSProbeError) as err:
            probe_tls(connect_to, server.port, certs["ca"], timeout_s=5)
    assert says in str(err.value)
    assert not_says not in str(err.value)


def test_tls_probe_with_another_ca_says_not_signed_by_it(tmp_path):
    from consilia.client.site.check import TLSProbeError

    served = _signed_server_cert(tmp_path / "served", -1, 60, ["127.0.0.1"])
    other = _signed_server_cert(tmp_path / "other", -1, 60, ["127.0.0.1"])
    with TLSServer(served["cert"], served["key"]) as server:
        with pytest.raises(TLSProbeError) as err:
            probe_tls("127.0.0.1", server.port, other["ca"], timeout_s=5)
    assert f"not signed by the CA in {other['ca']}" in str(err.value)
    assert "expired" not in str(err.value)


def test_check_invalid_config_and_empty_data(tmp_path, capsys):
    path = write_site(tmp_path / "site")
    _set(path, "policy", "max_rounds", -1)
    assert main(["--site", str(path), "--check"]) == 1
    assert "[FAIL] config:" in capsys.readouterr().out
    path = write_site(tmp_path / "site2")
    for sub in (path.parent / "images").iterdir():
        for f in sub.iterdir():
            f.unlink()
    report = run_site_check(path)
    data = next(r for r in report.results if r.name == "data")
    assert data.status == "FAIL" and "no usable image" in data.detail


def test_check_warns_about_subprocess_isolation_and_unknown_models(good_site):
    _set(good_site, "runtime", "isolation", "subprocess")
    _set(good_site, "policy", "allowed_models", ["cnn", "densnet121"])
    report = run_site_check(good_site)
    warnings = {r.name: r.detail for r in report.results if r.status == "WARN"}
    assert "NOT checked" in warnings["app approval"]
    assert "densnet121" in warnings["policy"]
    assert report.exit_code == 0


def test_probe_tls_names_unresolvable_host(tmp_path):
    certs = make_certs(tmp_path)
    with pytest.raises(Exception, match="cannot resolve 'no-such-host.invalid'"):
        probe_tls("no-such-host.invalid", 443, certs["ca"], timeout_s=2)


# -- --privacy -----------------------------------------------------------------------------


def test_privacy_without_and_with_history(tmp_path, capsys):
    path = write_site(tmp_path / "site", policy={"dp": {"required": True, "budget_epsilon": 6}})
    assert main(["--site", str(path), "--privacy"]) == 0
    out = capsys.readouterr().out
    assert "Site 'hospital-a' privacy policy: this site trains only with local differential " \
           "privacy, at most ε=8 per run" in out
    assert "Lifetime budget per dataset: ε=6" in out and "cannot raise it" in out
    assert "no differentially private training has happened at this site yet" in out

    from consilia.client.privacy.ledger import PrivacyLedger

    cfg = load_site_config(path)
    ledger = PrivacyLedger(cfg.ledger_path)
    ledger.open_entry("hospital-a", accountant="rdp", delta=1e-5, target_epsilon=6.0)
    ledger.record_round("hospital-a", run_id="42", server_round=1, steps=20, sample_rate=0.1,
                        noise_multiplier=1.1)
    assert main(["--site", str(path), "--privacy"]) == 0
    out = capsys.readouterr().out
    assert "Dataset 'hospital-a': this site has spent ε=" in out
    assert "over 1 round in 1 run" in out and "run 42, round 1" in out
    assert main(["--site", str(path), "--privacy", "--json"]) == 0
    assert '"consilia-privacy-ledger-v1"' in capsys.readouterr().out


def test_privacy_with_corrupt_ledger_fails_clearly(tmp_path, capsys):
    path = write_site(tmp_path / "site")
    ledger = path.parent / "state" / "privacy-ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("{ truncated")
    assert main(["--site", str(path), "--privacy"]) == 1
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "restore the file" in err


def test_invalid_config_exits_2(tmp_path, capsys):
    path = write_site(tmp_path / "site")
    _set(path, "coordinator", "address", "nowhere")
    assert main(["--site", str(path), "--privacy"]) == 2
    assert "coordinator.address" in capsys.readouterr().err


# -- running: supervisor -------------------------------------------------------------------


def test_supervisor_commands_are_outbound_only_with_tls_and_key(good_site):
    cfg = load_site_config(good_site)
    sup = SiteSupervisor(cfg, good_site)
    node = sup.supernode_command()
    joined = " ".join(node)
    assert "consilia.common.flower.supernode_launch" in joined
    assert node[node.index("--superlink") + 1] == cfg.coordinator.address
    assert node[node.index("--root-certificates") + 1] == str(cfg.coordinator.ca_certificate)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(cfg.coordinator.auth_key)
    assert node[node.index("--host") + 1] == "127.0.0.1"
    assert node[node.index("--isolation") + 1] == "process"
    assert node[node.index("--node-config") + 1] == f'site-config="{good_site.resolve()}"'
    assert "--superexec-auth-secret-file" in node and "--insecure" not in node
    worker = sup.worker_command()
    runtime_api = worker[worker.index("--runtime-api-address") + 1]
    assert runtime_api == f"127.0.0.1:{cfg.runtime.runtime_port}"
    env = sup.child_env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_HOME"] == str(cfg.state_dir / "flwr")
    _set(good_site, "runtime", "isolation", "subprocess")
    sub = SiteSupervisor(load_site_config(good_site), good_site)
    assert [c.name for c in sub._children()] == ["supernode"]
    assert "--superexec-auth-secret-file" not in sub.supernode_command()


def test_supervisor_refuses_to_start_with_a_readable_key(tmp_path, capsys):
    path = write_site(tmp_path / "site")
    os.chmod(path.parent / "keys" / "site.key", 0o640)
    assert main(["--site", str(path)]) == 2
    assert "chmod 600" in capsys.readouterr().out


def test_supervisor_backs_off_while_the_coordinator_is_unreachable(tmp_path, caplog):
    path = write_site(tmp_path / "site", coordinator=f"127.0.0.1:{free_port()}")
    cfg = load_site_config(path)
    sup = SiteSupervisor(cfg, path)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    timer = threading.Timer(3.6, sup.stop_event.set)
    caplog.set_level(logging.INFO, logger="consilia")
    logging.getLogger("consilia").propagate = True
    try:
        timer.start()
        start = time.monotonic()
        assert sup.run() == 0
        assert time.monotonic() - start < 15
    finally:
        timer.cancel()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    waits = [r.getMessage() for r in caplog.records if "coordinator unreachable" in r.message]
    assert len(waits) >= 2
    assert "refused the connection" in waits[0] and waits[0].endswith("retrying in 1 s")
    assert waits[1].endswith("retrying in 2 s")
    assert not any("starting supernode" in r.message for r in caplog.records)
    secret = cfg.state_dir / "runtime-secret"
    assert secret.is_file() and (secret.stat().st_mode & 0o077) == 0


def test_backoff_doubles_caps_and_resets():
    backoff = Backoff(max_s=5)
    assert [backoff.next() for _ in range(5)] == [1, 2, 4, 5, 5]
    backoff.reset()
    assert backoff.next() == 1


def test_supernode_exit_codes_are_explained():
    assert "register" in explain_supernode_exit(305)
    assert explain_supernode_exit(-9) == "killed by signal 9"


@pytest.mark.parametrize(("status", "flower_code", "says"), [
    (46, 302, "OpenSSH ECDSA"), (47, 303, "needs TLS"), (48, 304, "trusted entities"),
    (49, 305, "register"), (88, 600, "address cannot be parsed"),
    (90, 602, "--insecure"), (91, 603, "--insecure"), (92, 604, "path is invalid"),
    (93, 605, "certificate"), (94, 606, "Upgrade"), (95, 607, "import"),
    (96, 608, "dependencies"), (32, 800, "task process"), (244, 500, "public key"),
])
def test_truncated_flower_exit_codes_are_mapped_back(status, flower_code, says):
    from consilia.common.flower.exit_codes import untruncated_exit_code

    assert flower_code % 256 == status  # what the OS leaves of Flower's code
    assert untruncated_exit_code(status) == flower_code
    text = explain_supernode_exit(status)
    assert says in text and f"Flower exit code {flower_code}, seen as {status}" in text


def test_only_unambiguous_statuses_are_mapped_back():
    from consilia.common.flower.exit_codes import (
        TRUNCATED_EXIT_CODES,
        flower_exit_codes,
        untruncated_exit_code,
    )

    assert len(TRUNCATED_EXIT_CODES) == 14
    codes = set(flower_exit_codes().values())
    for status in (0, 1, 2, 3, 137, 250):  # a status of its own, or 128 + a signal
        assert untruncated_exit_code(status) is None
    for status in (144, 145, 146, 188, 189):  # 400-402, 700, 701: also 128 + a signal
        assert any(status + k * 256 in codes for k in (1, 2))
        assert untruncated_exit_code(status) is None
        assert "probably killed by signal" in explain_supernode_exit(status)
    assert "SIGKILL" in explain_supernode_exit(137)
    assert explain_supernode_exit(None) and explain_supernode_exit(10**6) == "see supernode.log"


FAKE_SUPERNODE = """
import sys
from pathlib import Path

plan = Path(sys.argv[1])
codes = plan.read_text().split()
plan.write_text(" ".join(codes[1:]))
print("fake SuperNode: exiting with", codes[0], flush=True)
sys.exit(int(codes[0]))
"""


def test_no_supernode_exit_status_stops_the_supervisor(tmp_path, monkeypatch, caplog):
    """A fake SuperNode exits with each status in turn: each is explained, with back-off."""
    import sys

    statuses = [0, 1, 2, 46, 47, 49, 88, 92, 137, 305]  # 305: the OS hands us 49
    script, plan = tmp_path / "fake_supernode.py", tmp_path / "plan.txt"
    script.write_text(FAKE_SUPERNODE)
    plan.write_text(" ".join(map(str, statuses)))
    path = write_site(tmp_path / "site")
    _set(path, "runtime", "isolation", "subprocess")
    _set(path, "runtime", "max_backoff_s", 4)
    sup = SiteSupervisor(load_site_config(path), path)
    monkeypatch.setattr(sup, "supernode_command", lambda: [sys.executable, str(script),
                                                          str(plan)])
    monkeypatch.setattr(sup, "wait_for_coordinator", lambda backoff: True)
    (child,) = sup._children()
    caplog.set_level(logging.INFO, logger="consilia")
    logging.getLogger("consilia").propagate = True
    now = time.monotonic()
    for _ in statuses:
        sup._tend(child, now)  # (re)start
        assert child.process is not None
        child.process.wait(timeout=30)
        sup._tend(child, now)  # notices the exit: explains it, schedules the restart
        assert child.process is None
        now = child.restart_at
    exits = [r.getMessage() for r in caplog.records if "SuperNode exited" in r.getMessage()]
    assert [int(m.split("code ")[1].split(":")[0]) for m in exits] == [
        0, 1, 2, 46, 47, 49, 88, 92, 137, 49]
    waits = [m.rsplit("restarting in ", 1)[1] for m in exits]
    assert waits == ["1 s", "2 s", "4 s"] + ["4 s"] * 7  # backs off as before, capped
    assert "without an error" in exits[0]
    assert "Flower exit code 302, seen as 46" in exits[3]
    assert "Flower exit code 600, seen as 88" in exits[6]
    assert "SIGKILL" in exits[8]
    assert "register" in exits[9] and "Flower exit code 305, seen as 49" in exits[9]
    assert plan.read_text() == ""


def test_supernode_poll_tuning_only_touches_flowers_loop(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)
    assert supernode_launch.tune_supernode_poll(0.01, 0.01, 60)
    start = time.monotonic()
    loop.time.sleep(3)  # Flower's idle wait, now shortened
    assert time.monotonic() - start < 1
    assert loop.time.time() == pytest.approx(time.time(), abs=1)
    assert time.sleep is not loop.time.sleep  # the real module is untouched


def test_supernode_polls_fast_during_a_run_and_slowly_when_idle():
    now = [1000.0]
    slept: list[float] = []
    poll = supernode_launch.AdaptivePollTime(1.0, 0.1, 60.0, clock=lambda: now[0],
                                             sleeper=slept.append)
    poll.sleep(3)  # idle: Flower's 3 s becomes the idle interval
    assert slept[-1] == 1.0 and not poll.active
    poll.sleep(0.5)  # waiting for the ClientApp's reply: a run is active
    assert slept[-1] == 0.1 and poll.active
    now[0] += 30
    poll.sleep(3)  # within the window: next message picked up quickly
    assert slept[-1] == 0.1
    now[0] += 31
    poll.sleep(3)  # 61 s after the last reply: back to the idle pace
    assert slept[-1] == 1.0 and not poll.active


def test_supervisor_passes_the_poll_settings_to_the_supernode(tmp_path):
    path = write_site(tmp_path / "site")
    config = load_site_config(path)
    config.runtime.superlink_poll_interval_s = 2.0
    config.runtime.active_poll_interval_s = 0.05
    config.runtime.active_window_s = 30
    cmd = SiteSupervisor(config, path).supernode_command()
    cut = cmd.index("--")
    assert cmd[cut - 6:cut] == ["--poll-interval", "2.0", "--active-poll-interval", "0.05",
                                "--active-window", "30.0"]


def test_supervisor_restarts_a_child_that_exits_with_back_off(tmp_path, caplog):
    import sys

    from consilia.client.site.supervisor import _Child

    path = write_site(tmp_path / "site")
    sup = SiteSupervisor(load_site_config(path), path)
    child = _Child("clientapp", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                   backoff=Backoff(max_s=60))
    caplog.set_level(logging.INFO, logger="consilia")
    logging.getLogger("consilia").propagate = True
    sup._tend(child, time.monotonic())  # first start
    assert child.process is not None
    child.process.wait(timeout=30)
    sup._tend(child, time.monotonic())  # notices the exit, schedules a restart in 1 s
    assert child.process is None
    assert any("exited with code 3; restarting in 1 s" in r.getMessage() for r in caplog.records)
    sup._tend(child, time.monotonic())  # too early: not restarted yet
    assert child.process is None
    sup._tend(child, time.monotonic() + 1.1)
    assert child.process is not None
    child.process.wait(timeout=30)
    sup._tend(child, time.monotonic())
    assert any("restarting in 2 s" in r.getMessage() for r in caplog.records)


def test_object_pulls_retry_after_50_ms_in_the_patched_module_only():
    import types

    from flwr.supercore.inflatable import inflatable_utils

    from consilia.common.flower.object_pulls import quicker_object_pulls

    module = types.ModuleType("fake_flower_loop")
    module.pull_objects = inflatable_utils.pull_objects
    assert quicker_object_pulls(module) and quicker_object_pulls(module)  # idempotent
    assert module.pull_objects.func is inflatable_utils.pull_objects
    assert module.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0}
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 1  # untouched
    calls = {"n": 0}

    def flaky(object_id: str) -> bytes:  # unavailable twice, as while an upload runs
        from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

        calls["n"] += 1
        if calls["n"] < 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    start = time.monotonic()
    assert module.pull_objects(["a"], pull_object_fn=flaky) == {"a": b"content"}
    assert time.monotonic() - start < 0.6  # Flower's default would wait 1 s + 2 s
    assert not quicker_object_pulls(types.ModuleType("no_pulls"))


def test_child_processes_move_flower_objects_eight_at_a_time_unless_told(monkeypatch):
    from consilia.common.child_env import child_env

    monkeypatch.delenv("FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS", raising=False)
    monkeypatch.setenv("FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES", "3")
    env = child_env()
    assert env["FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS"] == "8"
    assert env["FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES"] == "3"  # the operator's value wins
