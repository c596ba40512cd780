"""The site's privacy ledger: persistence, exact composition, corruption handling, reporting."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.ledger_file import LedgerCorruptError
from consilia.client.privacy.ledger_records import (
    LEDGER_FORMAT,
    AccountantState,
    accountant_from_state,
    fingerprint_arrays,
    format_delta,
)

KEY = "site-a/chest-xray"


def _open(ledger: PrivacyLedger, target: float = 8.0, delta: float = 1e-5) -> None:
    ledger.open_entry(KEY, accountant="rdp", delta=delta, target_epsilon=target)


def test_missing_file_is_an_empty_ledger_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "state" / "privacy-ledger.json"
    ledger = PrivacyLedger(path)
    assert ledger.keys() == []
    assert ledger.get(KEY) is None
    assert not path.exists()
    with pytest.raises(KeyError, match="no entry for dataset"):
        ledger.entry(KEY)


def test_round_composes_like_an_opacus_accountant_and_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger(path)
    _open(ledger)
    ledger.record_round(KEY, run_id="1", server_round=1, steps=20, sample_rate=0.05,
                        noise_multiplier=1.1)
    ledger.record_round(KEY, run_id="1", server_round=2, steps=20, sample_rate=0.05,
                        noise_multiplier=1.1)

    reference = RDPAccountant()
    for _ in range(40):
        reference.step(noise_multiplier=1.1, sample_rate=0.05)

    restarted = PrivacyLedger(path)  # a new process reading the same file
    entry = restarted.entry(KEY)
    assert entry.epsilon_spent == pytest.approx(reference.get_epsilon(delta=1e-5), abs=1e-12)
    assert entry.accountant_state.to_opacus()["history"] == reference.state_dict()["history"]
    assert all(isinstance(h, tuple) for h in entry.accountant_state.to_opacus()["history"])
    assert entry.rounds_taken == 2
    assert [r.server_round for r in entry.rounds] == [1, 2]
    assert entry.rounds[-1].epsilon_after == entry.epsilon_spent
    assert entry.rounds[0].timestamp.endswith("+00:00")  # UTC ISO
    assert entry.rounds[0].epsilon_after < entry.rounds[1].epsilon_after


def test_accountant_state_is_json_safe_round_trip() -> None:
    accountant = RDPAccountant()
    for sigma in (1.0, 1.0, 2.0):
        accountant.step(noise_multiplier=sigma, sample_rate=0.1)
    state = AccountantState.from_opacus(accountant.state_dict())
    text = json.dumps(state.model_dump(mode="json"))
    back = AccountantState.model_validate(json.loads(text))
    restored = accountant_from_state(back)
    assert restored.history == accountant.history == [(1.0, 0.1, 2), (2.0, 0.1, 1)]
    assert restored.get_epsilon(delta=1e-5) == accountant.get_epsilon(delta=1e-5)


def test_spans_runs_and_counts_them(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json")
    _open(ledger)
    for run, rnd in (("7", 1), ("7", 2), ("9", 1)):
        ledger.record_round(KEY, run_id=run, server_round=rnd, steps=5, sample_rate=0.1,
                            noise_multiplier=1.0 if run == "7" else 1.5)
    entry = ledger.entry(KEY)
    assert entry.runs == ["7", "9"]
    assert entry.accountant_state.history == [(1.0, 0.1, 10), (1.5, 0.1, 5)]
    assert entry.run_history("9").history == [(1.5, 0.1, 5)]
    assert entry.run_history("unknown").history == []


def test_two_writers_on_one_file_keep_both_spends(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    first = PrivacyLedger(path)
    _open(first)
    second = PrivacyLedger(path)  # opened before the first writer's round
    first.record_round(KEY, run_id="1", server_round=1, steps=10, sample_rate=0.1,
                       noise_multiplier=1.0)
    second.record_round(KEY, run_id="2", server_round=1, steps=10, sample_rate=0.1,
                        noise_multiplier=1.0)
    entry = PrivacyLedger(path).entry(KEY)
    assert entry.accountant_state.total_steps == 20
    assert entry.rounds_taken == 2


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path)
    _open(ledger)
    ledger.record_round(KEY, run_id="1", server_round=1, steps=3, sample_rate=0.5,
                        noise_multiplier=2.0)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert json.loads(path.read_text())["format"] == LEDGER_FORMAT


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "not valid JSON"),
        ('{"format": "consilia-privacy-ledger-v1", "entries": {', "not valid JSON"),
        ("[1, 2]", "expected format"),
        ('{"format": "something-else", "entries": {}}', "expected format"),
    ],
)
def test_corrupt_file_is_refused_not_reset(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "l.json"
    path.write_text(content)
    with pytest.raises(LedgerCorruptError, match=needle) as info:
        PrivacyLedger(path)
    assert str(path) in str(info.value)
    assert "refused" in str(info.value)
    assert path.read_text() == content  # never overwritten


def test_tampered_history_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path)
    _open(ledger)
    ledger.record_round(KEY, run_id="1", server_round=1, steps=10, sample_rate=0.1,
                        noise_multiplier=1.0)
    raw = json.loads(path.read_text())
    raw["entries"][KEY]["accountant_state"]["history"] = []  # someone "reset" the budget
    path.write_text(json.dumps(raw))
    with pytest.raises(LedgerCorruptError, match="round records sum to 10 steps"):
        PrivacyLedger(path)


def test_delta_only_tightens_and_budget_follows_policy(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json")
    _open(ledger, target=8.0, delta=1e-5)
    ledger.record_round(KEY, run_id="1", server_round=1, steps=50, sample_rate=0.1,
                        noise_multiplier=1.0)
    before = ledger.entry(KEY).epsilon_spent
    _open(ledger, target=6.0, delta=1e-4)  # looser delta ignored, lower budget applied
    entry = ledger.entry(KEY)
    assert (entry.delta, entry.target_epsilon, entry.epsilon_spent) == (1e-5, 6.0, before)
    _open(ledger, target=6.0, delta=1e-6)  # tighter delta: spend re-evaluated, larger
    entry = ledger.entry(KEY)
    assert entry.delta == 1e-6
    assert entry.epsilon_spent > before
    assert entry.accountant == "rdp"


def test_to_text_explains_the_spend_for_hospital_it(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json")
    assert "no differentially private training" in ledger.to_text()
    _open(ledger)
    for run, rnd in (("1", 1), ("1", 2), ("2", 1)):
        ledger.record_round(KEY, run_id=run, server_round=rnd, steps=10, sample_rate=0.1,
                            noise_multiplier=1.0)
    text = ledger.to_text()
    spent = ledger.entry(KEY).epsilon_spent
    assert f"has spent ε={spent:.2f} of its ε=8.00 budget (δ=1e-5, RDP" in text
    assert "over 3 rounds in 2 runs" in text
    assert "Epsilon (ε) bounds" in text
    data = ledger.to_dict()
    assert data["format"] == LEDGER_FORMAT
    assert data["entries"][KEY]["epsilon_spent"] == spent


def test_helpers() -> None:
    assert format_delta(1e-5) == "1e-5"
    assert format_delta(2.5e-6) == "2.5e-6"
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert fingerprint_arrays(a) == fingerprint_arrays(a.copy())
    assert fingerprint_arrays(a) != fingerprint_arrays(a + 1)
    assert fingerprint_arrays(a).startswith("sha256:")


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rounds=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=30),
            st.sampled_from([0.8, 1.0, 1.7]),
            st.sampled_from([0.01, 0.02]),  # small q: RDP is cheap to evaluate
        ),
        min_size=1,
        max_size=5,
    )
)
def test_property_ledger_equals_one_accountant_and_never_decreases(
    tmp_path_factory: pytest.TempPathFactory, rounds: list[tuple[int, float, float]]
) -> None:
    path = tmp_path_factory.mktemp("ledger") / "l.json"
    ledger = PrivacyLedger(path)
    _open(ledger)
    reference = RDPAccountant()
    previous = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (steps, sigma, q) in enumerate(rounds):
            entry = ledger.record_round(KEY, run_id="r", server_round=i + 1, steps=steps,
                                        sample_rate=q, noise_multiplier=sigma)
            for _ in range(steps):
                reference.step(noise_multiplier=sigma, sample_rate=q)
            assert entry.epsilon_spent >= previous
            previous = entry.epsilon_spent
    expected = reference.get_epsilon(delta=1e-5) if reference.history else 0.0
    assert PrivacyLedger(path).entry(KEY).epsilon_spent == pytest.approx(expected, abs=1e-9)
