"""``follow_run``: round lines as they land, SuperLink status queries only when needed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from consilia.server.control.run_launcher import RunTimeoutError, follow_run


class FakeOperator:
    """Answers ``run_info`` like the SuperLink; counts the (costly) status queries."""

    def __init__(self, finished: threading.Event, done_marker: Path | None = None) -> None:
        self.finished = finished
        self.done_marker = done_marker
        self.queries: list[bool] = []  # per query: had the ServerApp written its final file?

    def run_info(self, run_id: int) -> dict:
        self.queries.append(bool(self.done_marker and self.done_marker.exists()))
        status = "finished:completed" if self.finished.is_set() else "running"
        return {"run-id": run_id, "status": status, "network-traffic": {"total-bytes": 7}}


def _append_round(run_dir: Path, rnd: int) -> None:
    jsonl = run_dir / "metrics" / "rounds.jsonl"
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with jsonl.open("a") as fh:
        fh.write(json.dumps({"round": rnd, "sites": {}, "elapsed_s": float(rnd)}) + "\n")


def test_rounds_are_printed_and_status_is_not_queried_while_rounds_land(tmp_path: Path):
    finished = threading.Event()
    operator = FakeOperator(finished, tmp_path / "federated_metrics.json")

    def federation() -> None:
        for rnd in range(8):  # a round every 0.1 s, far quicker than the status interval
            _append_round(tmp_path, rnd)
            time.sleep(0.1)
        (tmp_path / "federated_metrics.json").write_text(json.dumps({}))
        finished.set()

    lines: list[str] = []
    worker = threading.Thread(target=federation)
    worker.start()
    info = follow_run(operator, 5, tmp_path, total_rounds=7, emit=lines.append, poll_s=0.02,
                      status_every_s=0.3, timeout_s=30)
    worker.join()
    assert [line.split("]")[0] for line in lines if line.startswith("[round")] == [
        f"[round {r}/7" for r in range(8)]
    assert info["status"] == "finished:completed"
    # one query at the start, none while rounds keep landing, then until it reports finished
    assert operator.queries.count(False) == 1, operator.queries
    assert operator.queries[-1] is True
    saved = json.loads((tmp_path / "deployment.json").read_text())
    assert saved["run_id"] == 5 and saved["network-traffic"]["total-bytes"] == 7


def test_a_quiet_run_is_still_checked_every_status_interval(tmp_path: Path):
    finished = threading.Event()
    operator = FakeOperator(finished)
    timer = threading.Timer(1.0, finished.set)  # the run ends (e.g. fails) without a round line
    timer.start()
    try:
        info = follow_run(operator, 9, tmp_path, total_rounds=3, emit=lambda _l: None,
                          poll_s=0.02, status_every_s=0.2, timeout_s=30)
    finally:
        timer.cancel()
    assert info["status"] == "finished:completed"
    assert 3 <= len(operator.queries) <= 8, len(operator.queries)


def test_timeout_is_raised_for_a_run_that_never_ends(tmp_path: Path):
    operator = FakeOperator(threading.Event())
    with pytest.raises(RunTimeoutError, match="run 3 still running"):
        follow_run(operator, 3, tmp_path, total_rounds=1, emit=lambda _l: None, poll_s=0.02,
                   status_every_s=0.1, timeout_s=0.3)


def test_long_rounds_stretch_the_quiet_interval_but_a_stopped_run_is_still_noticed(tmp_path):
    finished = threading.Event()
    operator = FakeOperator(finished, tmp_path / "federated_metrics.json")

    def federation() -> None:
        for rnd in range(6):  # a round every 0.4 s: longer than status_every_s (0.15 s)
            _append_round(tmp_path, rnd)
            time.sleep(0.4)
        finished.set()  # the run stops (say the ServerApp died): no final metrics file

    worker = threading.Thread(target=federation)
    worker.start()
    begun = time.monotonic()
    info = follow_run(operator, 2, tmp_path, total_rounds=5, emit=lambda _l: None, poll_s=0.02,
                      status_every_s=0.15, timeout_s=30, max_quiet_s=5.0)
    worker.join()
    assert info["status"] == "finished:completed"
    # with 0.15 s between queries there would be ~16; once two rounds have landed the quiet
    # interval is 1.5 x 0.4 s, so only the first gap and the final quiet spell are queried
    assert len(operator.queries) <= 6, len(operator.queries)
    assert time.monotonic() - begun < 2.4 + 1.5  # noticed within about a round of stopping
