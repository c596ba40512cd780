"""The deployment benchmark's per-process CPU sampler (Linux ``/proc``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.proc_cpu import (
    ProcessCpuSampler,
    classify_deploy_process,
    classify_simulation_process,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@pytest.mark.parametrize(("cmdline", "role"), [
    ("/v/bin/python /v/bin/flower-superlink --ssl-ca-certfile c", "SuperLink"),
    ("/v/bin/python /v/bin/flwr-serverapp --serverappio-api-address x", "ServerApp"),
    ("python -m consilia.common.flower.supernode_launch --poll-interval 1 -- --superlink x",
     "SuperNodes"),
    ("python -m consilia.client.site.worker --site s.yaml", "site ClientApps"),
    ("python -m consilia.client.cli --site s.yaml", "fl-client supervisors"),
    ("/v/bin/python /v/bin/flwr ls --run-id 5 consilia --format json", "flwr CLI (run status)"),
    ("bash -c true", "other"),
])
def test_deployment_processes_are_named_by_role(cmdline, role):
    assert classify_deploy_process(cmdline) == role


def test_simulation_processes_are_named_by_role():
    worker = "/v/bin/python /v/lib/python3.11/site-packages/ray/_private/workers/default_worker.py"
    assert classify_simulation_process(worker) == "Ray workers (ClientApps)"
    assert classify_simulation_process("ray::ClientAppActor.run") == "Ray workers (ClientApps)"
    assert classify_simulation_process("ray::DashboardAgent") == "Ray services"
    assert classify_simulation_process("/v/ray/core/src/ray/raylet/raylet --x") == "Ray services"
    assert classify_simulation_process("python -m consilia.simulations.cli run") == (
        "driver (ServerApp)")


def test_sampler_counts_a_child_that_starts_after_the_baseline_and_exits_before_the_end():
    sampler = ProcessCpuSampler(lambda: [os.getpid()],
                                classify=lambda cmd: "burner" if "burn" in cmd else "me",
                                interval_s=0.05).start()
    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn, "burn"], check=True)
    time.sleep(0.1)
    used = sampler.stop()
    # the child burnt ~0.6 s of CPU; it was sampled while alive (it exited before stop())
    assert 0.3 <= used.get("burner", 0.0) <= 1.5, used
    rows = sampler.by_process()
    assert any(role == "burner" and "burn" in cmd for role, cmd, _ in rows)

