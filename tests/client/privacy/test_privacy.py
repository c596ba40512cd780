"""Local DP-SGD controller: calibration, budget guard, exact accounting over rounds and runs."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consilia.client.privacy import planning as planning_module
from consilia.client.privacy.budget import PrivacyBudgetExceeded, PrivacyConfigError
from consilia.client.privacy.controller import PrivacyController
from consilia.client.privacy.dpsgd import (
    GRAD_SAMPLE_MODES,
    apply_proximal_gradient,
    choose_grad_sample_mode,
    train_private_epochs,
)
from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.ledger_file import LedgerCorruptError
from consilia.client.privacy.planning import default_delta
from consilia.common.config import DPConfig
from consilia.common.models import MODELS, build_model
from consilia.common.training.engine import snapshot_params

N, BATCH, SIZE = 128, 4, 28  # q = 1/32: cheap to account, 32 DP-SGD steps per epoch
KEY = "site-a/train"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(N, 1, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, 3, (N,), generator=gen)
    return TensorDataset(images, labels)


def _loader(dataset: TensorDataset, seed: int = 0, batch_size: int = BATCH) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)


def _dp(**overrides: object) -> DPConfig:
    values: dict = {
        "enabled": True,
        "target_epsilon": 3.0,
        "grad_sample_mode": "hooks",
        "max_physical_batch_size": 2,
    }
    values.update(overrides)
    return DPConfig(**values)


def _controller(path: Path, dp: DPConfig, budget: float = 3.0) -> PrivacyController:
    """Fresh ledger + controller objects, as a new ClientApp process would build them."""
    return PrivacyController(dp, budget, None, PrivacyLedger(path), KEY, model_name="cnn")


def _train_round(
    path: Path, dataset: TensorDataset, model: nn.Module, dp: DPConfig, budget: float,
    run: str, rnd: int, total: int,
) -> tuple[PrivacyController, float, int, int]:
    ctrl = _controller(path, dp, budget).bind_round(run, rnd, total)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, n, steps = ctrl.train(model, opt, _loader(dataset, rnd), nn.CrossEntropyLoss(), 1)
    return ctrl, loss, n, steps


def _accounting_round(ctrl: PrivacyController, run: str, rnd: int) -> float:
    """A round without the training: the guard, then the ledger composition of its steps."""
    ctrl.check_budget(ctrl.steps_per_round)
    cal = ctrl.calibration
    assert cal is not None
    entry = ctrl.ledger.record_round(
        KEY, run_id=run, server_round=rnd, steps=cal.steps_per_round,
        sample_rate=cal.sample_rate, noise_multiplier=cal.noise_multiplier,
    )
    return entry.epsilon_spent


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


# ---------------------------------------------------------------------------------------
# Budget over rounds, restarts and runs
# ---------------------------------------------------------------------------------------


def test_rounds_stay_within_budget_compose_exactly_and_the_next_is_refused(
    tmp_path: Path, dataset: TensorDataset
) -> None:
    path = tmp_path / "privacy-ledger.json"
    model = build_model("cnn", 1, 3, SIZE)
    plain_keys = list(build_model("cnn", 1, 3, SIZE).state_dict())
    dp, rounds, spent = _dp(target_epsilon=3.0), 3, []
    for rnd in range(1, rounds + 1):  # new ledger/controller objects each round (= restart)
        ctrl, loss, n, steps = _train_round(path, dataset, model, dp, 3.0, "run-1", rnd, rounds)
        assert math.isfinite(loss) and n == N
        assert steps == 32  # one step per logical batch, empty Poisson batches included
        spent.append(ctrl.spent_epsilon())
        summary = ctrl.summary()
        assert summary["epsilon"] == spent[-1] and summary["delta"] == 1e-5
        assert summary["budget-epsilon"] == 3.0 and summary["sample-rate"] == 1 / 32
        assert spent[-1] <= 3.0 + 1e-9
        weights = ctrl.unwrap_state_dict(model)
        assert list(weights) == plain_keys  # no "_module." prefix ever leaks
        assert list(model.state_dict()) == plain_keys
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks removed
    assert spent == sorted(spent) and spent[0] < spent[-1]

    entry = PrivacyLedger(path).entry(KEY)
    cal = entry.calibrations["run-1"]
    assert entry.accountant_state.history == [(cal.noise_multiplier, 1 / 32, 96)]
    one_long_run = _rdp_epsilon([(cal.noise_multiplier, 1 / 32, 96)])
    assert entry.epsilon_spent == pytest.approx(one_long_run, abs=1e-6)
    assert entry.epsilon_spent >= 3.0 - 0.011  # calibrated to use the budget (tolerance 0.01)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyBudgetExceeded, match="refuses to train") as info:
        _train_round(path, dataset, model, dp, 3.0, "run-1", rounds + 1, rounds)
    assert "budget" in info.value.reason
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert PrivacyLedger(path).entry(KEY).rounds_taken == rounds


def test_restart_reuses_the_cached_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "l.json"
    first = _controller(path, _dp()).calibrate(N, BATCH, 3, 1, run_id=11)

    def _no_recalibration(**_: object) -> float:
        raise AssertionError("a restarted site must reuse the run's calibration")

    monkeypatch.setattr(planning_module, "get_noise_multiplier", _no_recalibration)
    again = _controller(path, _dp()).calibrate(N, BATCH, 3, 1, run_id="11")
    assert again == first
    with pytest.raises(PrivacyConfigError, match="cannot change within a run"):
        _controller(path, _dp()).calibrate(N, BATCH, 5, 1, run_id=11)


def test_noise_multiplier_equals_get_noise_multiplier(tmp_path: Path) -> None:
    sigma = _controller(tmp_path / "a.json", _dp(target_epsilon=8.0), budget=5.0).calibrate(
        N, BATCH, 3, 2, run_id=1
    )
    expected = get_noise_multiplier(
        target_epsilon=5.0, target_delta=1e-5, sample_rate=BATCH / N, steps=3 * 2 * (N // BATCH),
        accountant="rdp",
    )
    assert sigma == expected  # budget 5 < request 8: the site's budget wins
    ctrl = _controller(tmp_path / "b.json", _dp(target_epsilon=2.0), budget=8.0)
    assert ctrl.calibrate(N, BATCH, 3, 2, run_id=1) == get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=BATCH / N, steps=192, accountant="rdp"
    )  # the request is lower: it wins
    ctrl = _controller(tmp_path / "c.json", _dp())
    ctrl.calibrate(130, BATCH, 1, 1, run_id=1)  # 130/4: Opacus' loader has 33 batches
    assert ctrl.calibration is not None
    assert (ctrl.calibration.sample_rate, ctrl.steps_per_round) == (1 / 33, 33)


def test_second_run_continues_from_the_spent_budget(
    tmp_path: Path, dataset: TensorDataset
) -> None:
    path, budget = tmp_path / "l.json", 4.0
    first = _controller(path, _dp(target_epsilon=2.0), budget)
    first.calibrate(N, BATCH, 2, 1, run_id="A")
    for rnd in (1, 2):
        _accounting_round(first, "A", rnd)
    spent_a = first.spent_epsilon()
    assert 1.98 <= spent_a <= 2.0 + 1e-9  # run A asked for 2.0 of the site's 4.0

    second = _controller(path, _dp(target_epsilon=8.0), budget)  # asks for more than is left
    sigma_b = second.calibrate(N, BATCH, 3, 1, run_id="B")
    cal = second.calibration
    assert cal is not None and cal.spent_before_run == pytest.approx(spent_a)
    assert budget - 0.011 <= cal.planned_epsilon <= budget + 1e-9  # uses what remains
    # epsilons do not add: run B alone may spend more than "budget - spent" (why the
    # calibration searches on the composed accountant instead of a fresh one)
    assert cal.planned_run_epsilon > budget - spent_a

    model = build_model("cnn", 1, 3, SIZE)  # one real round: the engine continues the history
    ctrl, _, _, steps = _train_round(path, dataset, model, _dp(target_epsilon=8.0), budget,
                                     "B", 1, 3)
    sigma_a = first.calibration.noise_multiplier  # type: ignore[union-attr]
    expected = _rdp_epsilon([(sigma_a, 1 / 32, 64), (sigma_b, 1 / 32, steps)])
    assert ctrl.spent_epsilon() == pytest.approx(expected, abs=1e-6)
    for rnd in (2, 3):
        assert _accounting_round(second, "B", rnd) <= budget + 1e-9
    with pytest.raises(PrivacyBudgetExceeded, match="site's budget"):
        second.check_budget(second.steps_per_round)
    entry = PrivacyLedger(path).entry(KEY)
    assert entry.runs == ["A", "B"] and entry.rounds_taken == 5
    third = _controller(path, _dp(), budget)  # what is left (< 0.011) buys only heavy noise
    assert third.calibrate(N, BATCH, 3, 1, run_id="C") > 5 * sigma_b
    assert third.calibration.planned_epsilon <= budget + 1e-9  # type: ignore[union-attr]


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(200, 800),
    batch=st.integers(2, 10),
    rounds=st.integers(1, 5),
    epochs=st.integers(1, 2),
    budget=st.floats(1.0, 8.0),
    request=st.floats(1.0, 10.0),
)
def test_property_spend_never_exceeds_the_target_and_round_r_plus_1_is_refused(
    tmp_path_factory: pytest.TempPathFactory,
    n: int, batch: int, rounds: int, epochs: int, budget: float, request: float,
) -> None:
    path = tmp_path_factory.mktemp("prop") / "l.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl = _controller(path, _dp(target_epsilon=request), budget)
        ctrl.calibrate(n, batch, rounds, epochs, run_id="r")
        target = min(request, budget)
        for rnd in range(1, rounds + 1):
            assert _accounting_round(ctrl, "r", rnd) <= target + 1e-9
        with pytest.raises(PrivacyBudgetExceeded):
            ctrl.check_budget(ctrl.steps_per_round)


# ---------------------------------------------------------------------------------------
# Opacus objects: ghost criterion, memory manager, FedProx, cleanup
# ---------------------------------------------------------------------------------------


def test_ghost_mode_returns_the_criterion_to_use_and_bounds_physical_batches(
    tmp_path: Path, dataset: TensorDataset
) -> None:
    dp = _dp(grad_sample_mode="ghost", max_physical_batch_size=2)
    ctrl = _controller(tmp_path / "l.json", dp)
    ctrl.calibrate(N, BATCH, 2, 1, run_id="g")
    ctrl.check_budget(ctrl.steps_per_round)
    model = build_model("cnn", 1, 3, SIZE)
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    private = ctrl.make_private(model, opt, _loader(dataset), nn.CrossEntropyLoss())
    assert private.grad_sample_mode == "ghost"
    assert type(private.criterion).__name__ == "DPLossFastGradientClipping"
    loss = train_private_epochs(private, 1)
    assert ctrl.steps_taken() == 32  # logical steps, not physical batches
    epsilon = ctrl.commit_round("g", 1)
    private.close()
    handle.remove()
    assert math.isfinite(loss)
    assert max(seen) <= 2 and sum(seen) > 0
    assert epsilon == ctrl.spent_epsilon() > 0
    assert not any(k.startswith("_module.") for k in ctrl.unwrap_state_dict(private.model))


def test_apply_proximal_gradient_adds_mu_times_distance() -> None:
    model = nn.Linear(3, 2)
    anchors = [p.detach() + 0.5 for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    apply_proximal_gradient(model, anchors, mu=0.2)
    for p in model.parameters():
        assert torch.allclose(p.grad, torch.ones_like(p) + 0.2 * (-0.5))
    with pytest.raises(ValueError, match="2 trainable parameters vs 1"):
        apply_proximal_gradient(model, anchors[:1], mu=0.2)
    with pytest.raises(ValueError, match=">= 0"):
        apply_proximal_gradient(model, anchors, mu=-1.0)


def test_opacus_drops_a_proximal_term_added_to_the_loss_in_hooks_mode(
    dataset: TensorDataset,
) -> None:
    """Why FedProx is applied after privatisation: Opacus overwrites p.grad (measured)."""

    def one_step(with_prox: bool) -> list[torch.Tensor]:
        torch.manual_seed(3)
        model = build_model("cnn", 1, 3, SIZE)
        anchors = [p.detach() + 1.0 for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=_loader(dataset, batch_size=16),
            noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False,
        )
        images, labels = dataset.tensors[0][:16], dataset.tensors[1][:16]
        loss = nn.functional.cross_entropy(model(images), labels)
        if with_prox:
            loss = loss + 5.0 * sum(((p - g) ** 2).sum() for p, g in
                                    zip(model.parameters(), anchors, strict=True))
        loss.backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(one_step(False), one_step(True), strict=True))


def test_proximal_hook_adds_exactly_lr_mu_distance_to_a_private_step(
    tmp_path: Path, dataset: TensorDataset
) -> None:
    def one_round(mu: float, ledger_name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(5)
        model = build_model("cnn", 1, 3, SIZE)
        anchors = [p.detach() + 0.1 for p in snapshot_params(model)]
        ledger = PrivacyLedger(tmp_path / ledger_name)
        ctrl = PrivacyController(_dp(max_physical_batch_size=N), 3.0, None, ledger, KEY,
                                 noise_seed=6)  # same Poisson sample and noise in both
        ctrl.calibrate(N, N, 1, 1, run_id="p")  # one logical batch = one DP-SGD step
        private = ctrl.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    _loader(dataset, batch_size=N), nn.CrossEntropyLoss())
        private.add_proximal_term(anchors, mu)
        train_private_epochs(private, 1)
        ctrl.commit_round("p", 1)
        private.close()
        return [p.detach().clone() for p in model.parameters()], anchors

    plain, _ = one_round(0.0, "a.json")
    prox, _ = one_round(0.5, "b.json")
    # w_start - g = -0.1, so the proximal gradient is 0.5 * -0.1 and SGD adds +lr * 0.05
    for a, b in zip(plain, prox, strict=True):
        assert torch.allclose(b - a, torch.full_like(a, 0.1 * 0.5 * 0.1), atol=1e-6)


def test_failed_round_still_records_the_steps_taken(
    tmp_path: Path, dataset: TensorDataset
) -> None:
    calls = {"n": 0}

    def flaky_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk full")
        return nn.functional.cross_entropy(logits, labels)

    path = tmp_path / "l.json"
    ctrl = _controller(path, _dp(max_physical_batch_size=BATCH * 8)).bind_round("f", 1, 2)
    model = build_model("cnn", 1, 3, SIZE)
    with pytest.raises(RuntimeError, match="disk full"):
        ctrl.train(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(dataset),
                   flaky_loss, 1)
    entry = PrivacyLedger(path).entry(KEY)
    assert [r.steps for r in entry.rounds] == [3]  # conservative: spent steps are never lost
    assert entry.epsilon_spent > 0


# ---------------------------------------------------------------------------------------
# Policy and configuration errors
# ---------------------------------------------------------------------------------------


def test_central_mode_and_bad_policies_are_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json")
    with pytest.raises(PrivacyConfigError, match="coordinator"):
        PrivacyController(_dp(mode="central"), 8.0, None, ledger, KEY)
    with pytest.raises(PrivacyConfigError, match="positive epsilon"):
        PrivacyController(_dp(), 0.0, None, ledger, KEY)
    ctrl = PrivacyController(_dp(), 8.0, 0.05, ledger, KEY)
    with pytest.raises(PrivacyConfigError, match="not below 1/n"):
        ctrl.calibrate(N, BATCH, 1, 1, run_id=1)
    assert default_delta(100) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    site_delta = PrivacyController(_dp(target_delta=1e-4), 8.0, 1e-6, ledger, KEY)
    assert site_delta.effective_delta(N) == 1e-6  # the smaller of site policy and request


def test_corrupt_ledger_refuses_training(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    ctrl = _controller(path, _dp())
    ctrl.calibrate(N, BATCH, 1, 1, run_id=1)
    path.write_text('{"format": "consilia-privacy-ledger-v1", "entries": {"x": ')
    with pytest.raises(LedgerCorruptError, match="not valid JSON"):
        ctrl.check_budget(ctrl.steps_per_round)
    with pytest.raises(LedgerCorruptError, match="reset the privacy budget"):
        _controller(path, _dp())


def test_gdp_and_a_ledger_of_another_accountant_are_refused(tmp_path: Path) -> None:
    # Issue 14 item 1 changed this expectation: GDP used to train (and could not compose a new
    # sampling rate); it is an approximation, not an upper bound, so no site accounts with it.
    with pytest.raises(PrivacyConfigError, match="'gdp' accountant is not allowed: it gives "
                       "an approximation, not an upper bound"):
        _controller(tmp_path / "g.json", _dp(accountant="gdp"))
    old = tmp_path / "old.json"  # a ledger written when GDP was still accepted
    PrivacyLedger(old).open_entry(KEY, accountant="gdp", delta=1e-5, target_epsilon=3.0)
    with pytest.raises(PrivacyConfigError, match="accounted with the 'gdp' accountant but this "
                       "site accounts with 'rdp'.*must review"):
        _controller(old, _dp()).calibrate(N, BATCH, 3, 1, run_id=1)
    prv = tmp_path / "prv.json"
    _controller(prv, _dp(accountant="prv")).calibrate(N, BATCH, 1, 1, run_id=1)
    with pytest.raises(PrivacyConfigError, match="set policy.dp.accountant: prv"):
        _controller(prv, _dp()).calibrate(N, BATCH, 1, 1, run_id=2)
    assert PrivacyLedger(prv).entry(KEY).accountant == "prv"  # nothing was re-accounted


def test_grad_sample_mode_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert choose_grad_sample_mode("not-a-model") == "hooks"
    assert choose_grad_sample_mode(None) == "hooks"
    measured_grad_sample_mode = {name: MODELS.get(name).dp_grad_sample_mode
                                 for name in MODELS.names()}
    for name, mode in measured_grad_sample_mode.items():
        assert name in MODELS.names() and mode in GRAD_SAMPLE_MODES
    monkeypatch.setitem(MODELS._entries, "cnn",
                        dataclasses.replace(MODELS.get("cnn"), dp_grad_sample_mode="ghost"))
    ctrl = PrivacyController(_dp(grad_sample_mode="auto"), 8.0, None,
                             PrivacyLedger(tmp_path / "l.json"), KEY, model_name="cnn")
    assert ctrl.resolve_grad_sample_mode(nn.CrossEntropyLoss()) == "ghost"
    assert ctrl.resolve_grad_sample_mode(lambda logits, labels: logits.sum()) == "hooks"


def test_noise_and_sampling_do_not_follow_the_coordinator_known_torch_seed(
    tmp_path: Path, dataset: TensorDataset
) -> None:
    def one_round(name: str, noise_seed: int | None, torch_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("cnn", 1, 3, SIZE)
        ctrl = PrivacyController(_dp(), 3.0, None, PrivacyLedger(tmp_path / name), KEY,
                                 noise_seed=noise_seed)
        ctrl.calibrate(N, BATCH, 1, 1, run_id="s")
        private = ctrl.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    _loader(dataset, seed=1), nn.CrossEntropyLoss())
        torch.manual_seed(torch_seed)  # what the trainer does with the run's (public) seed
        train_private_epochs(private, 1)
        ctrl.commit_round("s", 1)
        private.close()
        return [p.detach().clone() for p in model.parameters()]

    secret_a, secret_b = one_round("a.json", None, 42), one_round("b.json", None, 42)
    assert not all(torch.equal(a, b) for a, b in zip(secret_a, secret_b, strict=True))
    seeded_a, seeded_b = one_round("c.json", 7, 1), one_round("d.json", 7, 2)
    assert all(torch.equal(a, b) for a, b in zip(seeded_a, seeded_b, strict=True))


# ---------------------------------------------------------------------------------------
# Noised feature statistics for classifier calibration (one Gaussian release per run)


def _release_controller(path: Path, budget: float = 3.0, sigma: float | None = 5.0):
    return PrivacyController(_dp(), budget, None, PrivacyLedger(path), KEY, model_name="cnn",
                             noise_seed=1, release_noise_multiplier=sigma)


def test_a_run_planned_with_a_release_stays_within_its_epsilon_after_it(tmp_path: Path) -> None:
    plain = _controller(tmp_path / "plain.json", _dp(), budget=3.0)
    sigma_plain = plain.calibrate(N, BATCH, 2, 1, run_id="r")
    ctrl = _release_controller(tmp_path / "l.json").bind_round("r", 2, 2)
    sigma = ctrl.calibrate(N, BATCH, 2, 1, run_id="r")
    assert sigma > sigma_plain  # the release's share of the run's epsilon is reserved
    cal = ctrl.calibration
    assert cal is not None and cal.reserved_release_noise == 5.0
    assert cal.planned_run_epsilon == pytest.approx(3.0, abs=0.02)
    for rnd in (1, 2):
        _accounting_round(ctrl, "r", rnd)
    spent = ctrl.release_feature_statistics(N)
    expected = _rdp_epsilon([(sigma, cal.sample_rate, 2 * cal.steps_per_round), (5.0, 1.0, 1)])
    assert spent == pytest.approx(expected, rel=1e-6) and spent <= 3.0 + 0.02
    entry = ctrl.ledger.entry(KEY)
    assert [r.kind for r in entry.rounds] == ["train", "train", "feature-statistics"]
    assert entry.rounds_taken == 2 and entry.statistics_releases == 1


def test_a_release_that_does_not_fit_is_refused_and_nothing_is_recorded(tmp_path: Path) -> None:
    unplanned = _controller(tmp_path / "a.json", _dp(), budget=3.0).bind_round("r", 1, 1)
    unplanned.calibrate(N, BATCH, 1, 1, run_id="r")
    _accounting_round(unplanned, "r", 1)  # spends the run's whole epsilon
    unplanned.release_noise_multiplier = 5.0
    with pytest.raises(PrivacyBudgetExceeded, match="feature statistics"):
        unplanned.release_feature_statistics(N)
    assert [r.kind for r in unplanned.ledger.entry(KEY).rounds] == ["train"]
    tiny = _release_controller(tmp_path / "b.json", budget=0.5).bind_round("s", 1, 1)
    with pytest.raises(PrivacyBudgetExceeded, match="over the site's budget"):
        tiny.release_feature_statistics(N)  # sigma 5 alone costs about 0.8
    with pytest.raises(PrivacyConfigError, match="dp_noise_multiplier"):
        _release_controller(tmp_path / "c.json", sigma=None).bind_round("s", 1, 1) \
            .release_feature_statistics(N)
    with pytest.raises(PrivacyConfigError, match="'gdp' accountant is not allowed"):
        # changed by issue 14 item 1: a GDP controller is refused before any release
        PrivacyController(_dp(accountant="gdp"), 3.0, None, PrivacyLedger(tmp_path / "d.json"),
                          KEY, release_noise_multiplier=5.0)


def test_a_release_too_costly_for_a_small_run_is_not_planned(tmp_path: Path) -> None:
    ctrl = PrivacyController(_dp(target_epsilon=1.0), 3.0, None, PrivacyLedger(tmp_path / "l"),
                             KEY, release_noise_multiplier=5.0).bind_round("r", 1, 1)
    ctrl.calibrate(N, BATCH, 1, 1, run_id="r")  # sigma 5 alone: about 0.8 of the run's 1.0
    assert ctrl.calibration is not None and ctrl.calibration.reserved_release_noise is None
    _accounting_round(ctrl, "r", 1)
    with pytest.raises(PrivacyBudgetExceeded, match="asked for"):
        ctrl.release_feature_statistics(N)


def test_release_noise_comes_from_the_os_at_a_real_site(tmp_path: Path) -> None:
    site = PrivacyController(_dp(), 3.0, None, PrivacyLedger(tmp_path / "l.json"), KEY,
                             release_noise_multiplier=5.0)
    assert site.release_rng().normal() != site.release_rng().normal()
    sim = _release_controller(tmp_path / "m.json")
    assert sim.release_rng().normal() == sim.release_rng().normal()


def test_model_specs_carry_the_measured_grad_sample_modes() -> None:
    measured = {"cnn": "hooks", "lenet5": "ew", "alexnet": "ghost", "efficientnet_b0": "hooks",
                "densenet121": "hooks", "inception": "hooks", "resnet18": "hooks",
                "vgg11": "hooks", "vit": "hooks"}
    for name, mode in measured.items():
        assert MODELS.get(name).dp_grad_sample_mode == mode
        assert choose_grad_sample_mode(name) == mode


# ---------------------------------------------------------------------------------------
# A site that is done says so (policy.dp.max_noise_multiplier)
# ---------------------------------------------------------------------------------------


def _capped_controller(path: Path, budget: float, cap: float = 10.0) -> PrivacyController:
    return PrivacyController(_dp(target_epsilon=8.0), budget, None, PrivacyLedger(path), KEY,
                             model_name="cnn", max_noise_multiplier=cap)


def _spend_one_run(path: Path, budget: float) -> float:
    """Run "A" spends the site's whole budget (to within the 0.01 search tolerance)."""
    first = _capped_controller(path, budget)
    first.calibrate(N, BATCH, 2, 1, run_id="A")
    for rnd in (1, 2):
        _accounting_round(first, "A", rnd)
    return first.spent_epsilon()


def test_a_nearly_spent_budget_refuses_the_run_with_the_reason_and_records_nothing(
    tmp_path: Path, dataset: TensorDataset
) -> None:
    path, budget = tmp_path / "l.json", 4.0
    spent = _spend_one_run(path, budget)
    assert budget - 0.011 <= spent <= budget + 1e-9
    before = PrivacyLedger(path).entry(KEY)
    model = build_model("cnn", 1, 3, SIZE)
    weights = [p.detach().clone() for p in model.parameters()]
    ctrl = _capped_controller(path, budget).bind_round("B", 1, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        ctrl.train(model, opt, _loader(dataset), nn.CrossEntropyLoss(), 1)
    reason = info.value.reason
    assert reason.startswith(f"privacy budget spent: ε {spent:.2f} of 4 left too little for "
                             "this run (needs σ ")
    needed = float(reason.split("needs σ ")[1].split(" >")[0])
    assert needed > 10.0 and reason.endswith("> policy.dp.max_noise_multiplier 10)")
    assert "\n" not in reason
    from consilia.client.site.worker import _is_refusal, _refusal_text

    assert _is_refusal(info.value)  # the worker answers with an error reply the coordinator logs
    assert _refusal_text("hospital-a", info.value) == f"site 'hospital-a' refused: {reason}"
    after = PrivacyLedger(path).entry(KEY)
    assert after.runs == ["A"] and "B" not in after.calibrations
    assert after.rounds_taken == before.rounds_taken == 2
    assert after.epsilon_spent == before.epsilon_spent
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    # the same run at a site that accepts heavier noise: calibrated at the noise it named
    heavy = _capped_controller(path, budget, cap=1e6).calibrate(N, BATCH, 3, 1, run_id="B")
    assert heavy == pytest.approx(needed, rel=1e-3)


def test_a_budget_with_room_left_trains_below_the_cap(
    tmp_path: Path, dataset: TensorDataset
) -> None:
    path = tmp_path / "l.json"
    model = build_model("cnn", 1, 3, SIZE)
    ctrl = _capped_controller(path, budget=6.0).bind_round("A", 1, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, n, steps = ctrl.train(model, opt, _loader(dataset), nn.CrossEntropyLoss(), 1)
    assert math.isfinite(loss) and (n, steps) == (N, 32)
    cal = PrivacyLedger(path).entry(KEY).calibrations["A"]
    assert 0 < cal.noise_multiplier <= 10.0
    assert PrivacyLedger(path).entry(KEY).rounds_taken == 1


def test_a_request_too_strict_for_the_cap_is_refused_as_such(tmp_path: Path) -> None:
    ctrl = PrivacyController(_dp(target_epsilon=0.5), 10.0, None,
                             PrivacyLedger(tmp_path / "l.json"), KEY, max_noise_multiplier=2.0)
    with pytest.raises(PrivacyBudgetExceeded, match=r"^privacy request too strict for this "
                       r"site: ε 0.5 over 96 DP-SGD steps needs σ [\d.]+ > "
                       r"policy.dp.max_noise_multiplier 2; ask for a larger"):
        ctrl.calibrate(N, BATCH, 3, 1, run_id="A")
    assert PrivacyLedger(tmp_path / "l.json").entry(KEY).calibrations == {}
    with pytest.raises(PrivacyConfigError, match="max_noise_multiplier must be positive"):
        PrivacyController(_dp(), 3.0, None, PrivacyLedger(tmp_path / "m.json"), KEY,
                          max_noise_multiplier=0.0)
