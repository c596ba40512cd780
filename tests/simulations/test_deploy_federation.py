"""End to end on 127.0.0.1: ``fl-server`` (TLS + site keys) and three ``fl-client`` sites.

Each site reads its own exported DICOM folder (a small MedNIST subset). The tests run in file
order on one federation: refusals of an unregistered key and of a client without TLS, a
3-round FedProx run during which one site is killed mid-round, then the killed site rejoins
and every site refuses a disallowed model, which the coordinator reports readably.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from consilia.common.child_env import child_env
from consilia.common.rundir.round_records import read_round_records
from consilia.simulations.local_federation import LocalFederation, mednist_sites, wait_for

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b", "site-c"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def federation(shared_data_dir, tmp_path_factory):
    from consilia.simulations.export_sites import export_site_dicoms

    root = tmp_path_factory.mktemp("federation")
    classes, sites, test = mednist_sites(shared_data_dir, len(SITES), per_site=150,
                                         test_size=120, seed=0)
    fed = LocalFederation(root, SITES, env={"OMP_NUM_THREADS": "1"})
    fed.generate_certs(extra_sites=["rogue"])
    for name, (images, labels) in zip(SITES, sites, strict=True):
        folder = export_site_dicoms(images, labels, classes, root / "data", name, seed=1)
        fed.write_site_config(name, folder, policy={"allowed_models": ["cnn"]})
    np.savez(root / "test_set.npz", images=test[0], labels=test[1])
    try:
        fed.start_coordinator()
        fed.register_sites()
        for name in SITES:
            fed.start_site(name)
        fed.wait_online(SITES, timeout_s=240)
        yield fed, classes
    finally:
        fed.stop()


def _write_run(fed: LocalFederation, classes: list[str], name: str, **sections) -> Path:
    run = {
        "name": name, "seed": 0,
        "task": {"class_names": classes, "in_channels": 1, "image_size": 64},
        "model": {"name": "cnn", "kwargs": {"width": 16}},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.002},
        "strategy": {"name": "fedprox", "proximal_mu": 0.01, "rounds": 3,
                     "min_train_sites": 2, "min_evaluate_sites": 2, "min_available_sites": 2,
                     "round_timeout_s": 60},
    }
    for key, value in sections.items():
        run[key] = {**run.get(key, {}), **value}
    path = fed.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def _rounds(run_dir: Path) -> list[dict]:
    return read_round_records(run_dir)


def _supernode(fed: LocalFederation, *args: str, log: Path) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "flower-supernode"), "--superlink", fed.address, "--port",
           str(_port()), "--max-retries", "1", "--max-wait-time", "10", *args]
    env = child_env(FLWR_TELEMETRY_ENABLED="0")
    with log.open("w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120,
                              check=False)


def _port() -> int:
    from consilia.simulations.local_federation import free_port

    return free_port()


def test_site_with_unregistered_key_is_refused(federation):
    fed, _ = federation
    key = fed.certs / "sites" / "rogue" / "supernode.key"
    log = fed.root / "rogue.log"
    res = _supernode(fed, "--root-certificates", str(fed.certs / "ca.crt"),
                     "--auth-supernode-private-key", str(key), log=log)
    text = log.read_text()
    assert res.returncode != 0
    assert "Exit Code: 305" in text and "Failed to activate SuperNode" in text
    assert "No SuperNode found with the given public key" in (
        fed.state_dir / "superlink.log").read_text()
    assert set(fed.site_status()) == set(SITES)  # the rogue key never became a site


def test_client_without_tls_is_refused(federation):
    fed, _ = federation
    log = fed.root / "plaintext.log"
    res = _supernode(fed, "--insecure", log=log)
    assert res.returncode != 0
    assert "could not establish a connection" in log.read_text()
    with pytest.raises(OSError):  # plain HTTP to the TLS port: connection dropped
        urllib.request.urlopen(f"http://{fed.address}/health", timeout=5)
    assert set(fed.site_status()) == set(SITES)


def test_fedprox_three_rounds_survive_a_site_killed_mid_round(federation):
    fed, classes = federation
    run_dir = fed.root / "runs" / "fedprox"
    config = _write_run(fed, classes, "fedprox",
                        strategy={"calibration": {"enabled": True, "epochs": 10}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "consilia.server.control.cli", "--state-dir", str(fed.state_dir),
         "run", str(config), "--out", str(run_dir), "--test-set", str(fed.root / "test_set.npz"),
         "--timeout", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=fed._env())
    # kill site-c (supervisor, SuperNode and ClientApp process) as soon as it has received
    # round 2's training message, i.e. in the middle of that round
    supernode_log = fed.site_dir("site-c") / "state" / "logs" / "supernode.log"
    wait_for(lambda: supernode_log.is_file()
             and supernode_log.read_text().count("Receiving: train message") >= 2,
             300, "site-c to receive round 2's training task", poll_s=0.2)
    fed.kill_site("site-c", signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out

    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for rnd in rounds[1:]:  # every round was aggregated from at least min_train_sites
        assert "train" in rnd and "incomplete" not in rnd
        trained = [s for s, m in rnd["sites"].items() if "train-loss" in m]
        assert len(trained) >= 2
    # per-site training metrics reported by all three sites before the kill
    assert set(rounds[1]["sites"]) == set(SITES)
    for metrics in rounds[1]["sites"].values():
        assert {"train-loss", "num-examples"} <= set(metrics)
        assert metrics["num-examples"] > 0
    # every round's global model was scored on the validation splits of the sites that
    # trained with it next (site_evaluation: with-next-round; the last round in evaluate
    # messages); site-c died holding round 2's message, so round 1 has no score from it
    for rnd in rounds[1:]:
        assert {"accuracy", "auc"} <= set(rnd["federated_eval"]), rnd
        for name in ("site-a", "site-b"):
            assert {"accuracy", "auc"} <= set(rnd["sites"][name]), (rnd["round"], name)
    # the killed site is missing from round 3 and the run did not wait for the 1 h default
    assert "site-c" not in rounds[3]["sites"]
    assert time.monotonic() - killed_at < 400
    # nothing lost: a checkpoint per round, the final model, the run directory files
    for rnd in (1, 2, 3):
        assert (run_dir / "checkpoints" / f"round-{rnd:03d}.safetensors").is_file()
    for name in ("global_model.safetensors", "config.yaml", "task.json", "environment.json",
                 "metrics/rounds.csv", "federated_metrics.json", "deployment.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "deployment.json").read_text())["status"] == (
        "finished:completed")
    # the global model is clearly better than chance (6 classes: 1/6)
    final = rounds[-1]["server_eval"]
    assert final["accuracy"] > 0.35 and final["auc"] > 0.75, final
    from consilia.common.model_files import load_model_file

    model, run, _meta = load_model_file(run_dir / "global_model.safetensors")
    assert run.task.class_names == classes and run.strategy.name == "fedprox"
    # classifier calibration ran through the sites' long-lived ClientApp processes (query
    # messages) with the two surviving sites; site-c's node did not answer
    calibration = json.loads((run_dir / "federated_metrics.json").read_text())["calibration"]
    assert calibration["applied"], calibration
    assert calibration["sites"] == ["site-a", "site-b"]
    assert "calibration: classifier head re-fitted" in out
    # progress was streamed round by round
    for rnd in (1, 2, 3):
        assert f"[round {rnd}/3]" in out
    assert "finished:completed" in out


def test_site_rejoins_and_policy_refusal_reaches_the_coordinator(federation):
    fed, classes = federation
    if "site-c" not in fed.sites:  # killed by the previous test: restart it, same key
        fed.start_site("site-c")
    fed.wait_online(SITES, timeout_s=240)
    run_dir = fed.root / "runs" / "refused"
    config = _write_run(fed, classes, "refused", model={"name": "lenet5", "kwargs": {}},
                        strategy={"rounds": 1})
    res = fed.fl_server("run", str(config), "--out", str(run_dir), "--timeout", "300",
                        timeout_s=400, check=False)
    assert res.returncode == 1  # nobody trained: the operator must not think it worked
    assert "global model is still the initial one" in res.stderr
    for site in SITES:  # one readable line per site, naming the site and the reason
        assert re.search(rf"! {site} train failed: .*{site}.*model 'lenet5' is not allowed "
                         r"by this site's policy \(allowed: cnn\)", res.stdout), res.stdout
    record = _rounds(run_dir)[1]
    assert record["incomplete"] == {"phase": "train", "answered": 0, "required": 2}
    reasons = [e["reason"] for e in record["errors"] if e["phase"] == "train"]
    assert len(reasons) == 3 and all("not allowed" in r for r in reasons)
