"""fl-client's children cannot outlive it: real supervisors, real child processes, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from site_testkit import free_port, write_site

from consilia.common.child_env import PARENT_DEATH_SIGNAL_SUPPORTED

pytestmark = pytest.mark.skipif(not PARENT_DEATH_SIGNAL_SUPPORTED,
                                reason="needs Linux's parent-death signal")

#: A fake child: optionally starts a plain grandchild (no parent-death signal of its own),
#: then sleeps.
FAKE_CHILD = """
import subprocess, sys, time
if len(sys.argv) > 1 and sys.argv[1] == "with-grandchild":
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
time.sleep(600)
"""

#: The real SiteSupervisor.run(), with the coordinator probe skipped and (in "fake" mode)
#: sleeping scripts in place of the SuperNode and the ClientApp process.
STAND_IN = """
import sys
from pathlib import Path
from consilia.client.site.config import load_site_config
from consilia.client.site.supervisor import SiteSupervisor

site, mode, fake = Path(sys.argv[1]), sys.argv[2], [sys.executable, sys.argv[3]]
sup = SiteSupervisor(load_site_config(site), site)
sup.wait_for_coordinator = lambda backoff: True
if mode != "real-supernode":
    sup.supernode_command = lambda: [*fake, "with-grandchild"]
sup.worker_command = lambda: fake
sys.exit(sup.run())
"""


def _children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _start_site(tmp_path: Path, mode: str, isolation: str) -> tuple[subprocess.Popen, Path]:
    coordinator = f"127.0.0.1:{free_port()}"  # nothing listens: the SuperNode keeps retrying
    site = write_site(tmp_path / "site", coordinator=coordinator)
    data = yaml.safe_load(site.read_text())
    data.setdefault("runtime", {})["isolation"] = isolation
    site.write_text(yaml.safe_dump(data))
    fake, stand_in = tmp_path / "fake_child.py", tmp_path / "stand_in.py"
    fake.write_text(FAKE_CHILD)
    stand_in.write_text(STAND_IN)
    proc = subprocess.Popen([sys.executable, str(stand_in), str(site), mode, str(fake)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, site


def _descendants(children: list[int]) -> list[int]:
    return [grandchild for child in children for grandchild in _children_of(child)]


def _kill_leftovers(pids: list[int]) -> None:
    """Clean up after a failed test: only the processes this test started."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_kill_9_of_the_supervisor_ends_its_children_and_theirs(tmp_path):
    supervisor, _site = _start_site(tmp_path, "fake", "process")
    started: list[int] = [supervisor.pid]
    try:
        children = _wait_for(lambda: len(_children_of(supervisor.pid)) == 2
                             and _children_of(supervisor.pid), 60, "SuperNode and worker")
        started += children
        grandchildren = _wait_for(lambda: _descendants(children), 30, "the grandchild")
        started += grandchildren
        for child in children:  # each child leads its own process group
            assert os.getpgid(child) == child != os.getpgid(supervisor.pid)
        assert os.getpgid(grandchildren[0]) in children

        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=10)
        _wait_for(lambda: not any(_alive(pid) for pid in children), 5, "the children to end")
        # (this fake grandchild watches nothing and is cleaned up below; Flower's own
        # grandchildren watch their parent: see the real-SuperNode test)
    finally:
        _kill_leftovers(started)


def test_clean_stop_ends_the_children_process_groups(tmp_path):
    supervisor, _site = _start_site(tmp_path, "fake", "process")
    started: list[int] = [supervisor.pid]
    try:
        children = _wait_for(lambda: len(_children_of(supervisor.pid)) == 2
                             and _children_of(supervisor.pid), 60, "SuperNode and worker")
        started += children
        grandchildren = _wait_for(lambda: _descendants(children), 30, "the grandchild")
        started += grandchildren

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        # the supervisor's SIGTERM went to each child's whole group: the grandchild too
        assert not any(_alive(pid) for pid in children + grandchildren)
    finally:
        _kill_leftovers(started)


def test_kill_9_of_the_supervisor_ends_the_real_supernode_and_its_superexec(tmp_path):
    """The real launcher runs Flower's SuperNode, which starts ``flower-superexec``."""
    supervisor, _site = _start_site(tmp_path, "real-supernode", "subprocess")
    started: list[int] = [supervisor.pid]
    try:
        (supernode,) = _wait_for(lambda: _children_of(supervisor.pid), 60, "the SuperNode")
        started.append(supernode)
        superexec = _wait_for(lambda: _children_of(supernode), 120, "flower-superexec")
        started += superexec
        assert "superexec" in Path(f"/proc/{superexec[0]}/cmdline").read_text()

        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=10)
        _wait_for(lambda: not any(_alive(pid) for pid in [supernode, *superexec]), 15,
                  "the SuperNode and flower-superexec to end")
    finally:
        _kill_leftovers(started)
