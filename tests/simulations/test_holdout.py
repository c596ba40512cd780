"""Tests for leave-one-site-out (consilia.simulations.holdout) and its fl-sim wiring."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_run import make_run_dir, synthetic_images

from consilia.common.config import ConfigError, PartitionConfig, load_experiment_config
from consilia.common.data.images import ImageData
from consilia.common.rundir.round_records import read_round_records
from consilia.simulations.cli import _overrides, build_parser
from consilia.simulations.cli import main as fl_sim
from consilia.simulations.holdout import HOLDOUT_DIR, external_validation, split_holdout
from consilia.simulations.partition import SiteData, build_partition, save_partition

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _partition(tmp_path: Path, num_sites: int = 3):
    images, labels = synthetic_images(90, 3, np.random.default_rng(1))
    cfg = PartitionConfig(num_sites=num_sites, scheme="iid", min_samples_per_site=5)
    partition = build_partition(ImageData(images, labels), ["a", "b", "c"], cfg, seed=0)
    save_partition(partition, tmp_path)
    return partition


def test_split_holdout_moves_the_site_out_of_the_federation(tmp_path):
    partition = _partition(tmp_path)
    rest, held = split_holdout(partition, 1, tmp_path)
    assert held.name == "site-01"
    assert [s.name for s in rest.sites] == ["site-00", "site-02"]
    assert rest.num_sites == 2 and partition.num_sites == 3
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["site-00.npz", "site-02.npz"]
    assert (tmp_path / HOLDOUT_DIR / "site-01.npz").is_file()


@pytest.mark.parametrize("site", [-1, 3])
def test_split_holdout_rejects_unknown_sites(tmp_path, site):
    with pytest.raises(ValueError, match="holdout_site"):
        split_holdout(_partition(tmp_path), site, tmp_path)


def test_config_checks_holdout_site_and_the_remaining_minimums():
    with pytest.raises(ConfigError, match="holdout_site=3 does not exist"):
        load_experiment_config(None, ["partition.num_sites=3", "partition.holdout_site=3"])
    with pytest.raises(ConfigError, match="less the holdout_site"):
        load_experiment_config(None, ["partition.num_sites=2", "partition.holdout_site=0"])
    cfg = load_experiment_config(None, ["partition.num_sites=3", "partition.holdout_site=2"])
    assert cfg.partition.holdout_site == 2


def test_cli_shortcut_keeps_the_minimums_feasible_for_the_remaining_sites():
    args = build_parser().parse_args(["run", "--sites", "2", "--holdout-site", "0"])
    cfg = load_experiment_config(None, _overrides(args))
    assert cfg.partition.holdout_site == 0
    assert cfg.strategy.min_train_sites == 1 and cfg.strategy.min_available_sites == 1


def test_external_validation_scores_every_model_on_all_of_the_site(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", num_sites=2, dp=False)
    x_tr, y_tr = synthetic_images(20, 3, np.random.default_rng(5))
    x_va, y_va = synthetic_images(7, 3, np.random.default_rng(6))
    site = SiteData(4, "site-04", ImageData(x_tr, y_tr), ImageData(x_va, y_va))
    out = external_validation(run_dir, site)
    assert out["site"] == "site-04" and out["n"] == 27
    assert set(out) >= {"federated", "centralized", "local_only", "class_counts"}
    assert set(out["local_only"]) == {"site-00", "site-01", "mean"}
    assert sum(out["class_counts"]) == 27
    with np.load(run_dir / "predictions" / "external-federated.npz") as z:
        np.testing.assert_array_equal(z["y_true"], np.concatenate([y_tr, y_va]))
        predicted = (z["y_prob"].argmax(1) == z["y_true"]).mean()
    assert out["federated"]["accuracy"] == pytest.approx(predicted)
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------------------------------
# End to end: a real Flower simulation with site 1 held out
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loso_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loso") / "run"
    argv = ["run", "--dataset", "synthetic", "--sites", "3", "--holdout-site", "1",
            "--rounds", "1", "--set", "model.kwargs.width=4", "--set", "data.max_samples=240",
            "--set", "data.image_size=16", "--set", "partition.scheme=iid", "--out", str(out)]
    if HAS_TENSORBOARD:
        argv += ["--tracking", "tensorboard"]
    assert fl_sim(argv) == 0
    return out


def _rounds(run_dir: Path) -> list[dict]:
    return read_round_records(run_dir)


@pytest.mark.slow
def test_held_out_site_never_trains(loso_run):
    partition = json.loads((loso_run / "partition.json").read_text())
    assert partition["num_sites"] == 3 and partition["config"]["holdout_site"] == 1
    for record in _rounds(loso_run)[1:]:
        assert set(record["sites"]) == {"site-00", "site-02"}
        assert all("train-loss" in entry for entry in record["sites"].values())
    assert sorted(p.stem for p in (loso_run / "sites").glob("*.npz")) == ["site-00", "site-02"]
    assert sorted(p.stem for p in (loso_run / "models").glob("local-*.safetensors")) == [
        "local-site-00", "local-site-02"]


@pytest.mark.slow
def test_held_out_site_is_evaluated_at_the_end(loso_run):
    final = json.loads((loso_run / "final_metrics.json").read_text())
    ext = final["external_validation"]
    site = next(s for s in json.loads((loso_run / "partition.json").read_text())["sites"]
                if s["name"] == "site-01")
    assert ext["site"] == "site-01" and ext["n"] == site["n_train"] + site["n_val"]
    assert {"federated", "centralized", "local_only"} <= set(ext)
    assert 0.0 <= ext["federated"]["auc"] <= 1.0
    with np.load(loso_run / HOLDOUT_DIR / "site-01.npz") as z, \
            np.load(loso_run / "predictions" / "external-federated.npz") as p:
        np.testing.assert_array_equal(p["y_true"], np.concatenate([z["train_labels"],
                                                                   z["val_labels"]]))


@pytest.mark.slow
def test_cross_site_matrix_of_a_real_run_matches_the_sites_own_evaluation(loso_run):
    frame = pd.read_csv(loso_run / "cross_site.csv")
    assert len(frame) == 4 * 2  # global, centralized, 2 local models x 2 training sites
    assert (loso_run / "plots" / "cross_site_heatmap.png").is_file()
    last = _rounds(loso_run)[-1]
    glob = frame[frame["model"] == "global"].set_index("site")
    for site, reported in last["sites"].items():
        assert glob.at[site, "auc"] == pytest.approx(reported["auc"], abs=1e-6)
        assert glob.at[site, "accuracy"] == pytest.approx(reported["accuracy"], abs=1e-6)
    final = json.loads((loso_run / "final_metrics.json").read_text())
    assert set(final["cross_site"]["generalisation_gap"]) == {"site-00", "site-02"}
    assert final["fairness"]["global"]["auc"]["n_sites"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORBOARD, reason="optional extra 'tensorboard' not installed")
def test_simulation_writes_tensorboard_events(loso_run):
    assert list((loso_run / "tensorboard").glob("events.out.tfevents.*"))
