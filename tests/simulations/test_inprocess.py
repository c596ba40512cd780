"""In-process Flower grid: the real ServerApp/ClientApp without Ray, with local DP sites."""

from __future__ import annotations

from pathlib import Path

import pytest
from inprocess_testkit import model_shapes, run_inprocess_experiment

from consilia.client.privacy.ledger import PrivacyLedger
from consilia.client.privacy.simulated_sites import sim_ledger_path
from consilia.common.constants import MessageKey
from consilia.simulations.audits.message_audit import audit_reply


@pytest.mark.slow
def test_local_dp_federation_in_process_reports_epsilon_and_sends_only_weights(
    tmp_path: Path,
) -> None:
    from consilia.common.config import load_experiment_config

    cfg = load_experiment_config(None, [
        "data.dataset=synthetic", "data.max_samples=300", "data.image_size=16",
        "partition.num_sites=2", "partition.scheme=iid", "model.name=cnn",
        "model.kwargs={width: 4}", "strategy.name=fedprox", "strategy.rounds=3",
        "train.batch_size=16", "train.lr=0.01", "dp.enabled=true", "dp.target_epsilon=3",
        "baselines.centralized=false", "baselines.local_only=false",
    ])
    result, replies, rounds = run_inprocess_experiment(cfg, tmp_path / "run")
    for site in ("site-00", "site-01"):
        eps = [r["sites"][site]["epsilon"] for r in rounds[1:]]
        assert len(eps) == 3 and eps == sorted(eps) and 0 < eps[0] and eps[-1] <= 3.0 + 1e-9
        entry = PrivacyLedger(sim_ledger_path(result.run_dir, site)).entry(site)
        assert [r.server_round for r in entry.rounds] == [1, 2, 3]
        assert entry.epsilon_spent == pytest.approx(eps[-1])
        deltas = {r["sites"][site]["delta"] for r in rounds[1:]}
        assert len(deltas) == 1 and 0 < deltas.pop() <= 1e-5  # min(1e-5, 1/(10 n))

    shapes = model_shapes(cfg, result.run_dir)
    # site_evaluation: with-next-round: rounds x sites train replies, evaluate only at the end
    kinds = [reply.metadata.message_type.split(".")[0] for reply in replies]
    assert kinds.count("train") == 3 * 2 and kinds.count("evaluate") == 2
    for reply, kind in zip(replies, kinds, strict=True):
        assert audit_reply(reply, shapes, kind) == []
    carried = [reply for reply, kind in zip(replies, kinds, strict=True) if kind == "train"
               and MessageKey.EVALUATION.value in reply.content.config_records]
    assert len(carried) == 2 * 2  # rounds 2 and 3 carry the evaluation of rounds 1 and 2
    for record in rounds[1:]:  # every round's global model was evaluated by both sites
        assert 0.0 <= record["federated_eval"]["accuracy"] <= 1.0
        assert all("accuracy" in record["sites"][site] for site in ("site-00", "site-01"))
