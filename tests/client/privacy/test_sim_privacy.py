"""Local DP in simulation: per-site ledgers, epsilon in rounds.jsonl, refusal, message audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from consilia.client.privacy.controller import PrivacyController
from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.simulated_sites import (
    round_noise_seed,
    sim_ledger_path,
    simulated_privacy_factory,
)
from consilia.common.config import DPConfig, ModelConfig, TaskSpec, TrainConfig
from consilia.common.constants import MessageKey
from consilia.common.instructions import RoundInstruction
from consilia.common.rundir.round_records import read_round_records
from consilia.simulations.audits.message_audit import (
    audit_reply,
    load_recorded_replies,
    recording_client_app,
)

TARGET_EPS = 8.0
REFUSING_SITE = "site-02"


def _instr(dp: DPConfig, server_round: int = 1) -> RoundInstruction:
    return RoundInstruction(
        run_name="t", seed=1, server_round=server_round, total_rounds=3,
        model=ModelConfig(name="cnn"), train=TrainConfig(),
        task=TaskSpec(class_names=["a", "b"], image_size=28), dp=dp,
    )


# -- the simulated site's privacy factory (fast) -------------------------------------------


def test_factory_gives_a_controller_only_for_local_dp(tmp_path: Path) -> None:
    factory = simulated_privacy_factory(tmp_path, "site-01", 1, run_id=77)
    assert factory(_instr(DPConfig(enabled=False)), 100) is None
    assert factory(_instr(DPConfig(enabled=True, mode="central")), 100) is None

    ctrl = factory(_instr(DPConfig(enabled=True, target_epsilon=3.0), server_round=2), 100)
    assert isinstance(ctrl, PrivacyController)
    assert ctrl.budget_epsilon == 3.0  # the site's budget in simulation = the run's target
    assert ctrl.dataset_key == "site-01"
    assert ctrl.ledger.path == tmp_path / "site-state" / "site-01" / "privacy-ledger.json"
    assert ctrl.ledger.path == sim_ledger_path(tmp_path, "site-01")
    assert ctrl._round == ("77", 2, 3)  # bound to the instruction's round of this run


def test_local_dp_without_a_run_directory_is_a_clear_error() -> None:
    factory = simulated_privacy_factory(None, "site-00", 0, run_id=1)
    with pytest.raises(ValueError, match="consilia-run-dir"):
        factory(_instr(DPConfig(enabled=True)), 10)


def test_noise_seeds_differ_per_round_and_site_and_repeat_per_run() -> None:
    seeds = {round_noise_seed(5, site, rnd) for site in range(3) for rnd in range(1, 6)}
    assert len(seeds) == 15  # never the same noise stream twice
    assert round_noise_seed(5, 1, 2) == round_noise_seed(5, 1, 2)
    assert round_noise_seed(5, 1, 2) != round_noise_seed(6, 1, 2)


def test_a_model_left_in_eval_mode_by_evaluate_still_trains_privately(tmp_path: Path) -> None:
    """Sites cache their model; evaluate() leaves it in eval mode, which Opacus refuses."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from consilia.common.models import build_model

    factory = simulated_privacy_factory(tmp_path, "site-00", 0, run_id=1)
    ctrl = factory(_instr(DPConfig(enabled=True, target_epsilon=3.0, grad_sample_mode="hooks")),
                   32)
    model = build_model("cnn", 1, 2, 28).eval()
    data = TensorDataset(torch.rand(32, 1, 28, 28), torch.randint(0, 2, (32,)))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, n, steps = ctrl.train(model, opt, loader, torch.nn.CrossEntropyLoss(), 1)
    assert n == 32 and steps == 4 and 0 < ctrl.spent_epsilon() <= 3.0


# -- the message contract (fast) -------------------------------------------------------------


def _reply(content: RecordDict) -> Message:
    metadata = Metadata(run_id=1, message_id="m", src_node_id=3, dst_node_id=1,
                        reply_to_message_id="i", group_id="1", created_at=0.0, ttl=60.0,
                        message_type="train")
    return Message(content=content, metadata=metadata)


def test_audit_accepts_weights_scalars_and_the_site_name_and_flags_anything_else() -> None:
    shapes = {"w": (2, 3), "b": (3,)}
    clean = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)),
                               "b": Array(np.zeros(3, np.float32))}),
        "metrics": MetricRecord({"train-loss": 0.5, "num-examples": 10}),
        "site": ConfigRecord({"name": "site-00"}),
    })
    assert audit_reply(_reply(clean), shapes, "train") == []
    assert audit_reply(_reply(clean), shapes, "evaluate")  # weights in an evaluate reply

    leaky = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)),
                               "b": Array(np.zeros(3, np.float32)),
                               "images": Array(np.zeros((4, 1, 8, 8), np.uint8))}),
        "metrics": MetricRecord({"labels": [0, 1, 1]}),
        "site": ConfigRecord({"name": "site-00", "patients": "x"}),
        "data": ArrayRecord({"labels": Array(np.zeros(4, np.int64))}),
    })
    problems = " | ".join(audit_reply(_reply(leaky), shapes, "train"))
    for needle in ("unexpected record(s) ['data']", "extra ['images']", "dtype uint8",
                   "metric 'labels' is list", "expected only the site name"):
        assert needle in problems


# -- a real federated DP run on MedNIST (Flower simulation engine, Ray) ------------------------


def _prefill_exhausted_ledger(run_dir: Path, site: str) -> float:
    """A site whose ledger already holds more than the run's budget (an earlier, long run)."""
    ledger = PrivacyLedger(sim_ledger_path(run_dir, site))
    ledger.open_entry(site, accountant="rdp", delta=1e-5, target_epsilon=TARGET_EPS)
    entry = ledger.record_round(site, run_id="earlier-run", server_round=1, steps=2000,
                                sample_rate=0.5, noise_multiplier=0.6)
    assert entry.epsilon_spent > TARGET_EPS
    return entry.epsilon_spent


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory, mednist_dir: Path) -> dict:
    """3 sites, local DP at ε=8, 2 rounds; site-02's budget is already spent; replies recorded."""
    from consilia.client.app import app as client_app
    from consilia.common.config import load_experiment_config
    from consilia.simulations import flower_sim
    from consilia.simulations.run import run_experiment

    root = tmp_path_factory.mktemp("dp-sim")
    run_dir, messages = root / "run", root / "messages"
    spent_before = _prefill_exhausted_ledger(run_dir, REFUSING_SITE)
    cfg = load_experiment_config(None, [
        f"data.root={mednist_dir.parent}", "data.dataset=mednist", "data.max_samples=1800",
        "data.image_size=32", "partition.num_sites=3", "partition.scheme=iid",
        "model.name=cnn", "model.kwargs={width: 16}", "strategy.name=fedavg",
        "strategy.rounds=2", "strategy.min_train_sites=2", "strategy.min_evaluate_sites=2",
        "strategy.min_available_sites=3", "train.local_epochs=2", "train.batch_size=64",
        "train.lr=0.01", "dp.enabled=true", f"dp.target_epsilon={TARGET_EPS}",
        "baselines.centralized=false", "baselines.local_only=false",
    ])
    mp = pytest.MonkeyPatch()
    mp.setattr(flower_sim, "client_app", recording_client_app(client_app, messages))
    try:
        result = run_experiment(cfg, run_dir)
    finally:
        mp.undo()
    rounds = read_round_records(run_dir)
    return {"result": result, "rounds": rounds, "run_dir": run_dir, "messages": messages,
            "cfg": cfg, "spent_before": spent_before}


@pytest.mark.slow
def test_epsilon_is_reported_per_site_per_round_non_decreasing_and_within_target(
    dp_run: dict,
) -> None:
    trained = [r for r in dp_run["rounds"] if r["round"] > 0]
    assert len(trained) == 2
    history: dict[str, list[float]] = {}
    for record in trained:
        sites = record["sites"]
        for site in ("site-00", "site-01"):
            assert sites[site]["dp-enabled"] == 1.0
            history.setdefault(site, []).append(sites[site]["epsilon"])
    for site, eps in history.items():
        assert all(0 < e <= TARGET_EPS + 1e-9 for e in eps), (site, eps)
        assert eps == sorted(eps), (site, eps)
        assert eps[-1] > 0.9 * TARGET_EPS  # the planned rounds spend (almost) all of it
        ledger = PrivacyLedger(sim_ledger_path(dp_run["run_dir"], site))
        assert ledger.entry(site).epsilon_spent == pytest.approx(eps[-1])


@pytest.mark.slow
def test_a_site_with_a_spent_budget_refuses_and_the_run_continues(dp_run: dict) -> None:
    trained = [r for r in dp_run["rounds"] if r["round"] > 0]
    for record in trained:
        refusals = [e for e in record.get("errors", []) if e["phase"] == "train"]
        assert len(refusals) == 1, record.get("errors")
        assert REFUSING_SITE in refusals[0]["reason"]
        assert "refuses" in refusals[0]["reason"]
        assert "train" in record  # the other two sites were aggregated
        assert "incomplete" not in record
    ledger = PrivacyLedger(sim_ledger_path(dp_run["run_dir"], REFUSING_SITE))
    entry = ledger.entry(REFUSING_SITE)
    assert entry.epsilon_spent == pytest.approx(dp_run["spent_before"])  # nothing more spent
    assert [r.run_id for r in entry.rounds] == ["earlier-run"]


@pytest.mark.slow
def test_dp_training_learns_clearly_above_chance(dp_run: dict) -> None:
    final = dp_run["result"].final["federated"]
    chance = 1 / 6
    assert final["accuracy"] > 2.5 * chance, final["accuracy"]
    assert final["auc"] > 0.9, final["auc"]  # initial model: about 0.77 (random weights)


@pytest.mark.slow
def test_every_message_a_site_sends_holds_only_weights_and_scalar_metrics(dp_run: dict) -> None:
    from consilia.common.serde import model_from_run_config, packed_shapes

    run = dp_run["cfg"].run_config().model_copy(update={"task": TaskSpec.model_validate_json(
        (dp_run["run_dir"] / "task.json").read_text())})
    shapes = packed_shapes(model_from_run_config(run).state_dict())
    replies = load_recorded_replies(dp_run["messages"])
    kinds = [kind for kind, _ in replies]
    assert kinds.count("train") == 4  # 2 rounds x 2 sites (site-02 refused: an error reply)
    # site_evaluation: with-next-round: round 1's model is scored with round 2's training,
    # the final model in evaluate messages (all 3 sites, site-02 too)
    assert kinds.count("evaluate") == 3
    carried = [reply for kind, reply in replies
               if kind == "train" and MessageKey.EVALUATION.value in reply.content]
    assert len(carried) == 2  # round 2's two training replies
    names = set()
    for kind, reply in replies:
        assert audit_reply(reply, shapes, kind) == [], kind
        names.add(reply.content.config_records["site"]["name"])
        assert len(reply.content.array_records) == (1 if kind == "train" else 0)
    assert names == {"site-00", "site-01", "site-02"}
