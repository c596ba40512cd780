"""CPU seconds used by each process of a local federation, by role (Linux ``/proc``).

The deployment benchmark runs the coordinator and three sites on the same cores as the
training it measures; this tells how much CPU the coordinator's and sites' helper processes
(SuperLink, ServerApp, SuperNodes, supervisors) take from the sites' ClientApps. A background
thread reads ``/proc/<pid>/stat`` of every descendant of the given root processes once per
``interval_s`` (no subprocess; a few dozen small file reads), keeping each process's last
seen CPU time, so processes that start and exit during the measurement are counted too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["ProcessCpuSampler", "classify_deploy_process", "classify_simulation_process"]

_PROC = Path("/proc")


def _ticks_per_second() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return 100.0


def _read_stat(pid: int) -> tuple[int, float] | None:
    """Return ``(ppid, user+system ticks)`` of ``pid``, or None when it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces; fields after the last ')' are fixed
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), float(fields[11]) + float(fields[12])


def _read_cmdline(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def classify_deploy_process(cmdline: str) -> str:
    """Name the role of one federation process from its command line."""
    rules = [
        ("flower-superlink", "SuperLink"),
        ("flwr-serverapp", "ServerApp"),
        ("consilia.server", "fl-server"),
        ("flower-supernode", "SuperNodes"),
        ("supernode_launch", "SuperNodes"),
        ("client.site.worker", "site ClientApps"),
        ("flwr-clientapp", "site ClientApps"),
        ("consilia.client", "fl-client supervisors"),
        ("bin/flwr ", "flwr CLI (run status)"),
        ("bench_deploy", "benchmark driver"),
    ]
    for needle, role in rules:
        if needle in cmdline:
            return role
    return "other"


def classify_simulation_process(cmdline: str) -> str:
    """Name the role of one process of a Flower simulation (Ray) started in this process."""
    if "Agent" not in cmdline and (cmdline.startswith("ray::")
                                   or "ray/_private/workers/default_worker.py" in cmdline):
        return "Ray workers (ClientApps)"
    if "ray" in cmdline:
        return "Ray services"
    return "driver (ServerApp)"


class ProcessCpuSampler:
    """Sample the CPU time of every descendant of ``roots`` until :meth:`stop`.

    Parameters
    ----------
    roots : callable returning pids
        Called at every sample: the pids whose process trees are measured (the coordinator's
        and sites' top processes; sites may be restarted between samples).
    classify : callable
        Maps a command line to a role name.
    interval_s : float
        Seconds between samples.

    """

    def __init__(self, roots: Callable[[], Iterable[int]],
                 classify: Callable[[str], str] = classify_deploy_process,
                 interval_s: float = 1.0) -> None:
        self._roots = roots
        self._classify = classify
        self._interval_s = interval_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._role: dict[int, str] = {}
        self._cmdline: dict[int, str] = {}
        self._sampled = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def _descendants(self) -> dict[int, float]:
        stats: dict[int, tuple[int, float]] = {}
        for entry in _PROC.iterdir():
            if entry.name.isdigit():
                stat = _read_stat(int(entry.name))
                if stat is not None:
                    stats[int(entry.name)] = stat
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        found: dict[int, float] = {}
        todo = [pid for pid in self._roots() if pid in stats]
        while todo:
            pid = todo.pop()
            if pid in found:
                continue
            found[pid] = stats[pid][1]
            todo.extend(children.get(pid, []))
        return found

    def sample(self) -> None:
        """Take one sample now (also called by the background thread)."""
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        baseline = not self._sampled
        for pid, ticks in self._descendants().items():
            if pid not in self._first:
                # a process first seen after the baseline started after it: count it all
                self._first[pid] = ticks if baseline else 0.0
            # classified again each time: a process may rename itself after it starts (Ray
            # workers become ``ray::...``; a fork runs the parent's command line first)
            cmdline = _read_cmdline(pid)
            if cmdline or pid not in self._cmdline:
                self._cmdline[pid] = cmdline
                self._role[pid] = self._classify(cmdline)
            self._last[pid] = ticks
        self._sampled = True

    def totals(self) -> dict[str, float]:
        """Take a sample now; return CPU seconds used per role since the baseline."""
        self.sample()
        used: dict[str, float] = {}
        for role, _cmdline, seconds in self.by_process():
            used[role] = used.get(role, 0.0) + seconds
        return dict(sorted(used.items()))

    def by_process(self) -> list[tuple[str, str, float]]:
        """``(role, command line, CPU seconds since the baseline)`` of every process seen."""
        per_tick = 1.0 / _ticks_per_second()
        with self._lock:
            return sorted(((self._role[pid], self._cmdline[pid],
                            (last - self._first[pid]) * per_tick)
                           for pid, last in self._last.items()), key=lambda row: -row[2])

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def start(self) -> ProcessCpuSampler:
        """Take the baseline sample and start sampling in the background."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """Stop sampling (after a last sample); return CPU seconds used per role."""
        self._stop.set()
        self._thread.join()
        return self.totals()
