"""The new strategies drive a real federation: the in-process Flower grid, real sites, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from inprocess_testkit import run_inprocess_experiment

from consilia.common.config import load_experiment_config


def _run(tmp_path: Path, *overrides: str):
    cfg = load_experiment_config(None, [
        "data.dataset=synthetic", "data.max_samples=300", "data.image_size=16",
        "partition.scheme=iid", "model.name=cnn", "model.kwargs={width: 4}",
        "strategy.rounds=2", "train.batch_size=16", "train.lr=0.01",
        "baselines.centralized=false", "baselines.local_only=false", *overrides,
    ])
    return run_inprocess_experiment(cfg, tmp_path / "run")


def _check_rounds(rounds: list[dict], sites: list[str]) -> None:
    trained = [r for r in rounds if r.get("round", 0) >= 1]
    assert [r["round"] for r in trained] == [1, 2]
    for record in trained:
        assert "incomplete" not in record and not record.get("rejected")
        assert np.isfinite(record["train"]["train-loss"])
        assert set(sites) <= set(record["sites"])
        assert 0.0 <= record["federated_eval"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_a_median_federation_completes_and_writes_its_rounds(tmp_path: Path) -> None:
    sites = ["site-00", "site-01", "site-02"]
    result, replies, rounds = _run(tmp_path, "strategy.name=median", "partition.num_sites=3",
                                   "strategy.min_train_sites=3",
                                   "strategy.min_available_sites=3")
    assert (result.run_dir / "metrics" / "rounds.jsonl").is_file()
    assert sum(r.metadata.message_type.startswith("train") for r in replies) == 2 * 3
    _check_rounds(rounds, sites)


@pytest.mark.slow
def test_a_fedyogi_federation_completes_and_writes_its_rounds(tmp_path: Path) -> None:
    result, replies, rounds = _run(tmp_path, "strategy.name=fedyogi", "partition.num_sites=2",
                                   "strategy.fedyogi.eta=0.01")
    assert (result.run_dir / "metrics" / "rounds.jsonl").is_file()
    assert sum(r.metadata.message_type.startswith("train") for r in replies) == 2 * 2
    _check_rounds(rounds, ["site-00", "site-01"])
