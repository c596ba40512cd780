"""Central (client-level) DP: accounting, weighted-FedAvg noise, labelled records, refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from inprocess_testkit import run_inprocess_experiment
from opacus.accountants import RDPAccountant

from consilia.server.central_dp import client_level_epsilon


def test_client_level_epsilon_matches_opacus_rdp_and_grows_with_releases() -> None:
    assert client_level_epsilon([], 1e-5) == 0.0
    assert math.isinf(client_level_epsilon([1.0, 0.0], 1e-5))
    reference = RDPAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=2.0, sample_rate=1.0)
    assert client_level_epsilon([2.0] * 3, 1e-5) == pytest.approx(
        reference.get_epsilon(delta=1e-5))
    eps = [client_level_epsilon([2.0] * t, 1e-5) for t in range(1, 5)]
    assert eps == sorted(eps) and eps[0] > 0


def _run(tmp_path: Path, overrides: list[str], client_app: ClientApp | None = None):
    from consilia.common.config import load_experiment_config

    cfg = load_experiment_config(None, [
        "data.dataset=synthetic", "data.max_samples=240", "data.image_size=16",
        "model.name=cnn", "model.kwargs={width: 4}", "strategy.name=fedavg",
        "strategy.rounds=2", "baselines.centralized=false", "baselines.local_only=false",
        "train.batch_size=16", *overrides,
    ])

    result, _replies, rounds = run_inprocess_experiment(cfg, tmp_path / "run",
                                                        client_app=client_app)
    return result, rounds


@pytest.mark.slow
def test_central_dp_run_records_client_level_epsilon_each_round(tmp_path: Path) -> None:
    from consilia.common.config import RunConfig
    from consilia.server.recorder import RunRecorder

    _, rounds = _run(tmp_path, [
        "partition.num_sites=3", "partition.scheme=quantity", "partition.alpha=1.0",
        "strategy.min_train_sites=3", "strategy.min_evaluate_sites=3",
        "strategy.min_available_sites=3", "dp.enabled=true", "dp.mode=central",
        "dp.central_noise_multiplier=2.0", "dp.central_clipping_norm=0.5",
    ])
    records = [r["central_dp"] for r in rounds if r["round"] > 0]
    assert len(records) == 2
    eps = [c["client-level-epsilon"] for c in records]
    assert 0 < eps[0] < eps[1]
    for c in records:
        assert c["sites-aggregated"] == 3 and c["clipping-norm"] == 0.5
        # FedAvg weights sites by size: the largest site's share w_max > 1/3 means less
        # effective noise than Flower's sigma, and that is what is accounted
        assert c["effective-noise-multiplier"] < 2.0
    assert eps[1] == pytest.approx(client_level_epsilon(
        [c["effective-noise-multiplier"] for c in records], 1e-5))
    for r in rounds[1:]:
        assert all(site.get("epsilon") is None for site in r["sites"].values())
    recorder = RunRecorder.__new__(RunRecorder)
    recorder.run = RunConfig()
    assert f"client-level eps (central DP) {eps[1]:.2f}" in recorder.progress_line(rounds[-1])


def _refusing_app(partition: int) -> ClientApp:
    from consilia.client.app import app as consilia_app

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == partition:
            raise RuntimeError("site-01 refuses this round")
        return consilia_app(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return consilia_app(msg, context)

    return app


@pytest.mark.slow
def test_a_refusing_site_does_not_stop_central_dp_aggregation(tmp_path: Path) -> None:
    _, rounds = _run(tmp_path, [
        "partition.num_sites=3", "partition.scheme=iid", "strategy.min_train_sites=2",
        "strategy.min_evaluate_sites=2", "strategy.min_available_sites=3",
        "dp.enabled=true", "dp.mode=central", "dp.central_noise_multiplier=1.0",
    ], client_app=_refusing_app(1))
    for record in rounds[1:]:
        assert [e["reason"] for e in record["errors"]] == [
            "RuntimeError: site-01 refuses this round"]
        assert record["central_dp"]["sites-aggregated"] == 2
        # two equal-sized sites out of the two the noise was sized for: sigma unchanged
        assert record["central_dp"]["effective-noise-multiplier"] == pytest.approx(1.0, 0.1)
        assert "train" in record
