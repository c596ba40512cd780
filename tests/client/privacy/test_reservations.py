"""Reserve, then train: two processes on one ledger never spend more than the budget."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consilia.client.privacy.budget import PrivacyBudgetExceeded
from consilia.client.privacy.controller import PrivacyController
from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.ledger_records import LEDGER_FORMAT
from consilia.client.privacy.reservations import is_stale, new_reservation
from consilia.common.config import DPConfig

KEY = "hospital-a"
BUDGET = 1.5  # the budget: two racing controllers reached 1.819 against it

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# One process of the race: calibrate its run for the whole budget, wait until the other
# process has calibrated too (both have "checked" before either trains), then train one round.
_RACER = textwrap.dedent(
    """
    import json, sys, time, warnings
    from pathlib import Path
    warnings.simplefilter("ignore")
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from consilia.client.privacy.budget import PrivacyBudgetExceeded
    from consilia.client.privacy.controller import PrivacyController
    from consilia.client.privacy.ledger import PrivacyLedger
    from consilia.common.config import DPConfig

    ledger_path, run, folder = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 2, (64,)))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    dp = DPConfig(enabled=True, target_epsilon=1.5, grad_sample_mode="hooks",
                  max_physical_batch_size=8)
    ctrl = PrivacyController(dp, 1.5, 1e-3, PrivacyLedger(ledger_path), "hospital-a",
                             noise_seed=1).bind_round(run, 1, 1)
    ctrl.calibrate(64, 8, 1, 1, run_id=run)
    (folder / f"{run}.calibrated").touch()
    deadline = time.monotonic() + 120
    while len(list(folder.glob("*.calibrated"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        ctrl.train(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                   nn.CrossEntropyLoss(), 1)
        print(json.dumps({"run": run, "trained": True}))
    except PrivacyBudgetExceeded as exc:
        print(json.dumps({"run": run, "trained": False, "reason": exc.reason}))
    """
)


def _rdp_epsilon(history: list, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return accountant.get_epsilon(delta=delta)


@pytest.mark.slow
def test_two_processes_racing_for_the_last_budget_never_exceed_it(tmp_path: Path) -> None:
    ledger_path = tmp_path / "state" / "privacy-ledger.json"
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    racers = [
        subprocess.Popen([sys.executable, str(script), str(ledger_path), run, str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for run in ("run-a", "run-b")
    ]
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err[-2000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1]))

    # both calibrated for the whole budget before either trained: only one may train
    assert sorted(o["trained"] for o in outcomes) == [False, True], outcomes
    refused = next(o for o in outcomes if not o["trained"])
    assert "over the site's budget ε=1.500" in refused["reason"]
    assert "refuses to train" in refused["reason"]

    entry = PrivacyLedger(ledger_path).entry(KEY)
    assert len(entry.calibrations) == 2 and entry.rounds_taken == 1
    assert entry.reservations == []
    assert entry.epsilon_spent <= BUDGET + 1e-9
    recomputed = _rdp_epsilon(entry.accountant_state.history, entry.delta)
    assert recomputed == pytest.approx(entry.epsilon_spent, abs=1e-9)
    assert recomputed <= BUDGET + 1e-9


def _ledger_with_budget(path: Path, budget: float = BUDGET) -> PrivacyLedger:
    ledger = PrivacyLedger(path)
    ledger.open_entry(KEY, accountant="rdp", delta=1e-5, target_epsilon=budget)
    return ledger


def _reserve(ledger: PrivacyLedger, run: str = "r", steps: int = 40, sigma: float = 2.5):
    return ledger.reserve(KEY, run_id=run, server_round=1, steps=steps, sample_rate=0.1,
                          noise_multiplier=sigma)


def test_a_live_reservation_holds_its_share_until_committed_or_released(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    first, second = _ledger_with_budget(path), PrivacyLedger(path)
    held = _reserve(first, "a")  # about 1.22 of the 1.5
    with pytest.raises(PrivacyBudgetExceeded, match="other processes have reserved.*over the "
                       "site's budget ε=1.500"):
        _reserve(second, "b")
    first.release(KEY, held.reservation_id)
    again = _reserve(second, "b")  # released: the budget is free again
    entry = second.record_round(KEY, run_id="b", server_round=1, steps=40, sample_rate=0.1,
                                noise_multiplier=2.5, reservation_id=again.reservation_id)
    assert entry.reservations == [] and entry.rounds_taken == 1
    assert entry.epsilon_spent <= BUDGET
    raw = json.loads(path.read_text())
    assert raw["format"] == LEDGER_FORMAT and raw["entries"][KEY]["reservations"] == []


def test_a_reservation_left_by_a_dead_process_is_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "l.json"
    _ledger_with_budget(path)
    crash = (
        "import os, sys\n"
        "from consilia.client.privacy.ledger import PrivacyLedger\n"
        f"PrivacyLedger(sys.argv[1]).reserve({KEY!r}, run_id='dead', server_round=1, "
        "steps=40, sample_rate=0.1, noise_multiplier=2.5)\n"
        "os._exit(9)  # crash between reserving and committing\n"
    )
    done = subprocess.run([sys.executable, "-c", crash, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 9, done.stderr[-2000:]
    ledger = PrivacyLedger(path)
    (left,) = ledger.entry(KEY).reservations
    assert left.run_id == "dead" and left.pid != os.getpid() and is_stale(left)
    assert ledger.live_reservations(KEY) == []

    with caplog.at_level("WARNING", logger="consilia.client.privacy.ledger"):
        mine = _reserve(ledger, "alive")  # would not fit next to the dead one
    assert "which is gone" in caplog.text
    assert [r.reservation_id for r in ledger.entry(KEY).reservations] == [mine.reservation_id]


def test_staleness_of_recycled_pids_and_foreign_hosts() -> None:
    now = datetime.now(UTC)
    mine = new_reservation(kind="train", run_id="r", server_round=1, steps=1, sample_rate=0.1,
                           noise_multiplier=1.0, created=now.isoformat(timespec="seconds"))
    assert not is_stale(mine)  # this process is alive
    if mine.process_start is not None:  # Linux: a recycled pid started at another time
        assert is_stale(mine.model_copy(update={"process_start": mine.process_start - 1}))
    foreign = mine.model_copy(update={"host": socket.gethostname() + "-elsewhere"})
    assert not is_stale(foreign, now=now + timedelta(hours=1))
    assert is_stale(foreign, now=now + timedelta(hours=25))


def test_a_round_that_fails_before_its_first_step_releases_its_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 2, (64,)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    dp = DPConfig(enabled=True, target_epsilon=BUDGET, grad_sample_mode="hooks")
    path = tmp_path / "l.json"
    ctrl = PrivacyController(dp, BUDGET, 1e-3, PrivacyLedger(path), KEY,
                             noise_seed=1).bind_round("r", 1, 1)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("GPU out of memory")

    monkeypatch.setattr(ctrl, "make_private", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        ctrl.train(model, torch.optim.SGD(model.parameters(), lr=0.1),
                   DataLoader(data, batch_size=8, shuffle=True), nn.CrossEntropyLoss(), 1)
    entry = PrivacyLedger(path).entry(KEY)
    assert entry.reservations == [] and entry.rounds == [] and entry.epsilon_spent == 0.0

    monkeypatch.undo()  # the same round trains once the failure is gone
    ctrl.train(model, torch.optim.SGD(model.parameters(), lr=0.1),
               DataLoader(data, batch_size=8, shuffle=True), nn.CrossEntropyLoss(), 1)
    entry = PrivacyLedger(path).entry(KEY)
    assert entry.reservations == [] and entry.rounds_taken == 1
    assert 0 < entry.epsilon_spent <= BUDGET + 1e-9


def test_a_ledger_written_before_reservations_existed_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    _ledger_with_budget(path).record_round(KEY, run_id="1", server_round=1, steps=5,
                                           sample_rate=0.1, noise_multiplier=1.0)
    raw = json.loads(path.read_text())
    del raw["entries"][KEY]["reservations"]
    path.write_text(json.dumps(raw))
    entry = PrivacyLedger(path).entry(KEY)
    assert entry.reservations == [] and entry.rounds_taken == 1
