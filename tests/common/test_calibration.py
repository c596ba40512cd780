"""Classifier calibration (CCVR): exact feature statistics, head fit, site rules, federation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess_testkit import model_shapes, run_inprocess_experiment
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consilia.common.ccvr import (
    CalibrationError,
    FeatureStats,
    classifier_head,
    collect_feature_stats,
    feature_norms,
    fit_head_on_virtual_features,
)
from consilia.common.models import MODELS, build_model


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int = 7) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: the head's input computed by hand (the cnn is an nn.Sequential)."""
    with torch.no_grad():
        return model[:-1](x).flatten(1).double()


def test_site_statistics_add_up_to_the_pooled_statistics_exactly() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", 1, 4, 16, width=4).eval()
    x, y = torch.rand(50, 1, 16, 16), torch.randint(0, 4, (50,))
    whole = collect_feature_stats(model, _loader(x, y), 4)
    parts = [collect_feature_stats(model, _loader(x[i::3], y[i::3]), 4) for i in range(3)]
    merged = FeatureStats.merge(parts)
    np.testing.assert_allclose(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-6)
    np.testing.assert_allclose(merged.outer_sums, whole.outer_sums, rtol=1e-6)
    # and they are the per-class sums of the head's input features
    f = _features(model, x)
    for c in range(4):
        fc = f[y == c]
        assert whole.counts[c] == len(fc)
        np.testing.assert_allclose(whole.sums[c], fc.sum(0).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(whole.outer_sums[c], (fc.T @ fc).numpy(), rtol=1e-6,
                                   atol=1e-6)


def test_clipped_statistics_bound_every_feature_and_the_noise_has_the_mechanisms_scale() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", 1, 3, 16, width=4).eval()
    x, y = torch.rand(40, 1, 16, 16), torch.randint(0, 3, (40,))
    norms = feature_norms(model, _loader(x, y), 3)
    np.testing.assert_allclose(norms, _features(model, x).norm(dim=1).numpy(), rtol=1e-6)
    clip = float(np.median(norms))
    clipped = collect_feature_stats(model, _loader(x, y), 3, clip_norm=clip)
    f = _features(model, x)
    f = f * (clip / f.norm(dim=1, keepdim=True)).clamp(max=1.0)
    np.testing.assert_allclose(clipped.sums.sum(0), f.sum(0).numpy(), rtol=1e-6)
    assert clipped.counts.sum() == 40  # clipping never drops an image
    # Gaussian mechanism: sd sqrt(3)*sigma times 1, C and C^2 on counts, sums, outer sums
    big = FeatureStats.zeros(200, 30)
    noisy = big.with_gaussian_noise(2.0, 3.0, np.random.default_rng(0))
    sd = 2.0 * np.sqrt(3.0)
    assert np.std(noisy.counts) == pytest.approx(sd, rel=0.15)
    assert np.std(noisy.sums) == pytest.approx(sd * 3.0, rel=0.05)
    assert np.std(noisy.outer_sums) == pytest.approx(sd * 9.0, rel=0.05)
    with pytest.raises(CalibrationError, match="positive"):
        big.with_gaussian_noise(0.0, 3.0, np.random.default_rng(0))


def test_noisy_classes_below_the_count_threshold_are_left_out() -> None:
    stats = FeatureStats(np.array([100.0, 4.0, -3.0]), np.ones((3, 2)), np.ones((3, 2, 2)))
    present, _means, covs = stats.gaussians(min_count=10.0)
    assert present.tolist() == [0]
    assert np.all(np.linalg.eigvalsh(covs[0]) > -1e-9)


def test_classes_below_the_site_minimum_are_withheld() -> None:
    model = build_model("cnn", 1, 3, 16, width=4).eval()
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 12)
    stats = collect_feature_stats(model, _loader(torch.rand(25, 1, 16, 16), y), 3, min_count=5)
    assert stats.counts.tolist() == [10, 0, 12]
    assert not stats.sums[1].any() and not stats.outer_sums[1].any()


def test_gaussians_are_the_pooled_mean_and_covariance() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 3.0
    stats = FeatureStats(np.array([200.0]), f.sum(0)[None], (f.T @ f)[None])
    present, means, covs = stats.gaussians(ridge=0.0)
    assert present.tolist() == [0]
    np.testing.assert_allclose(means[0], f.mean(0))
    np.testing.assert_allclose(covs[0], np.cov(f.T, bias=True), atol=1e-5)


def _biased_problem(seed: int = 0):
    """Well separated Gaussian classes and a head that favours class 0 heavily."""
    rng = np.random.default_rng(seed)
    d, c, n = 8, 4, 300
    centers = rng.normal(size=(c, d)) * 3
    feats = [rng.normal(size=(n, d)) + centers[k] for k in range(c)]
    stats = FeatureStats(
        np.full(c, float(n)),
        np.stack([f.sum(0) for f in feats]),
        np.stack([f.T @ f for f in feats]),
    )
    test_x = torch.tensor(np.concatenate([rng.normal(size=(100, d)) + centers[k]
                                          for k in range(c)]), dtype=torch.float32)
    test_y = torch.arange(c).repeat_interleave(100)
    head = nn.Linear(d, c)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(centers, dtype=torch.float32) * 0.1)
        head.bias.copy_(torch.tensor([20.0, 0.0, 0.0, 0.0]))
    return head, stats, test_x, test_y


def test_refitting_the_head_on_virtual_features_removes_a_class_bias() -> None:
    head, stats, x, y = _biased_problem()
    before = (head(x).argmax(1) == y).float().mean().item()
    result = fit_head_on_virtual_features(head, stats, virtual_per_class=500, epochs=20, seed=3)
    after = (head(x).argmax(1) == y).float().mean().item()
    assert before < 0.3 and after > 0.95, (before, after)
    assert result.classes == [0, 1, 2, 3] and result.final_loss < 0.2
    assert all(p.grad is None for p in head.parameters())


def test_head_fit_is_seeded() -> None:
    a, stats, _, _ = _biased_problem()
    b, _, _, _ = _biased_problem()
    fit_head_on_virtual_features(a, stats, virtual_per_class=50, epochs=3, seed=7)
    fit_head_on_virtual_features(b, stats, virtual_per_class=50, epochs=3, seed=7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_absent_class_and_rank_deficient_features_are_handled() -> None:
    # features with a dead (always zero) unit: a singular covariance; class 2 never seen
    rng = np.random.default_rng(0)
    feats = {0: rng.normal(size=(30, 4)), 1: rng.normal(size=(30, 4)) + 2}
    for f in feats.values():
        f[:, 3] = 0.0
    stats = FeatureStats.zeros(3, 4)
    for k, f in feats.items():
        stats.counts[k], stats.sums[k], stats.outer_sums[k] = len(f), f.sum(0), f.T @ f
    head = nn.Linear(4, 3)
    result = fit_head_on_virtual_features(head, stats, virtual_per_class=40, epochs=2)
    assert result.classes == [0, 1]
    assert torch.isfinite(head.weight).all()


def test_bad_statistics_are_reported() -> None:
    with pytest.raises(CalibrationError, match="inconsistent"):
        FeatureStats.from_arrays({"counts": np.zeros(3), "sums": np.zeros((2, 4)),
                                  "outer-sums": np.zeros((2, 4, 4))})
    with pytest.raises(CalibrationError, match="lack the array"):
        FeatureStats.from_arrays({"counts": np.zeros(3)})
    with pytest.raises(CalibrationError, match="different shapes"):
        FeatureStats.merge([FeatureStats.zeros(3, 4), FeatureStats.zeros(3, 5)])
    with pytest.raises(CalibrationError, match="no class"):
        FeatureStats.zeros(2, 3).gaussians()
    with pytest.raises(CalibrationError, match="maps 4 -> 3"):
        fit_head_on_virtual_features(nn.Linear(4, 3), FeatureStats.zeros(3, 5))


def test_a_model_without_a_matching_head_is_refused() -> None:
    with pytest.raises(CalibrationError, match="no nn.Linear layer with 5 outputs"):
        classifier_head(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), 5)


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_every_registered_model_exposes_its_output_layer_as_head(name: str) -> None:
    size = 32 if name in ("vit",) else 28
    torch.manual_seed(0)
    model = build_model(name, 1, 3, size).eval()
    x, y = torch.rand(4, 1, size, size), torch.tensor([0, 1, 2, 0])
    stats = collect_feature_stats(model, _loader(x, y, batch=4), 3)  # checks head == output
    assert stats.counts.tolist() == [2, 1, 1]
    assert stats.dim == classifier_head(model, 3).in_features


# ----------------------------------------------------------------------- site rules


def test_site_policy_decides_whether_statistics_are_shared() -> None:
    from consilia.client.site.config import SitePolicy
    from consilia.client.site.policy import statistics_rule_for

    assert statistics_rule_for(SitePolicy()).share
    assert statistics_rule_for(SitePolicy()).min_class_count == 20
    off = statistics_rule_for(SitePolicy.model_validate({"feature_statistics": {"share": False}}))
    assert not off.share and "policy.feature_statistics.share" in off.reason
    dp = statistics_rule_for(SitePolicy.model_validate({"dp": {"required": True}}))
    assert dp.share and dp.dp_noise_multiplier == 5.0  # noised, accounted in the ledger
    no_noised = statistics_rule_for(SitePolicy.model_validate(
        {"dp": {"required": True}, "feature_statistics": {"dp_noise_multiplier": None}}))
    assert not no_noised.share and "dp_noise_multiplier" in no_noised.reason
    rule = statistics_rule_for(SitePolicy.model_validate(
        {"feature_statistics": {"min_class_count": 50}}))
    assert rule.share and rule.min_class_count == 50


# ----------------------------------------------------------------------- federation


def _experiment(tmp_path: Path, *overrides: str):
    from consilia.common.config import load_experiment_config

    cfg = load_experiment_config(None, [
        "data.dataset=synthetic", "data.max_samples=360", "data.image_size=16",
        "partition.num_sites=3", "partition.scheme=dirichlet", "partition.alpha=0.3",
        "model.name=cnn", "model.kwargs={width: 4}", "strategy.name=fedavg",
        "strategy.rounds=2", "strategy.min_train_sites=3", "strategy.min_evaluate_sites=3",
        "strategy.min_available_sites=3", "strategy.calibration.enabled=true",
        "strategy.calibration.virtual_per_class=200", "strategy.calibration.epochs=5",
        "train.batch_size=16", "train.lr=0.05", "train.optimizer=sgd",
        "baselines.centralized=false", "baselines.local_only=false", *overrides,
    ])
    result, replies, _rounds = run_inprocess_experiment(cfg, tmp_path / "run")
    return cfg, result, replies


def test_federation_calibrates_the_head_with_class_aggregates_only(tmp_path: Path) -> None:
    from consilia.common.model_files import load_model_file
    from consilia.simulations.audits.message_audit import audit_reply

    cfg, result, replies = _experiment(tmp_path)
    final = json.loads((result.run_dir / "federated_metrics.json").read_text())
    cal = final["calibration"]
    assert cal["applied"] and cal["sites"] == ["site-00", "site-01", "site-02"]
    assert cal["declined"] == {} and cal["images"] > 0 and cal["virtual_per_class"] == 200
    assert "federated_before_calibration" in final and "federated" in final
    # the saved global model is the calibrated one: only the head differs from round 2's
    last, _, _ = load_model_file(result.run_dir / "checkpoints" / "round-002.safetensors")
    calibrated, _, _ = load_model_file(result.run_dir / "global_model.safetensors")
    a, b = last.state_dict(), calibrated.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    head = [k for k in a if k.endswith((".weight", ".bias"))][-2:]
    assert changed and changed <= set(head), changed
    # the sites' calibration replies carry per-class aggregates and nothing else
    queries = [r for r in replies if r.metadata.message_type.startswith("query")]
    assert len(queries) == 3
    shapes = model_shapes(cfg, result.run_dir)
    for reply in queries:
        assert audit_reply(reply, shapes, "query") == []


def test_dp_sites_send_noised_statistics_accounted_within_the_runs_epsilon(tmp_path: Path) -> None:
    from consilia.client.privacy.budget import EPSILON_SLACK
    from consilia.client.privacy.ledger import PrivacyLedger
    from consilia.client.privacy.simulated_sites import sim_ledger_path
    from consilia.simulations.audits.message_audit import audit_reply

    cfg, result, replies = _experiment(tmp_path, "dp.enabled=true", "dp.target_epsilon=8")
    final = json.loads((result.run_dir / "federated_metrics.json").read_text())
    cal = final["calibration"]
    assert cal["applied"], cal
    assert cal["noised_sites"] == {"site-00": 5.0, "site-01": 5.0, "site-02": 5.0}
    assert cal["feature_clip_norm"] > 0 and cal["declined"] == {}
    queries = [r for r in replies if r.metadata.message_type.startswith("query")]
    shapes = model_shapes(cfg, result.run_dir)
    for reply in queries:
        assert audit_reply(reply, shapes, "query") == []
        assert reply.content["metrics"]["dp-noise-multiplier"] == 5.0
    for site in ("site-00", "site-01", "site-02"):
        ledger = PrivacyLedger(sim_ledger_path(result.run_dir, site))
        ledger.load()
        entry = ledger.entry(site)
        kinds = [r.kind for r in entry.rounds]
        assert kinds == ["train", "train", "feature-statistics"], kinds
        release = entry.rounds[-1]
        assert (release.steps, release.sample_rate, release.noise_multiplier) == (1, 1.0, 5.0)
        # the run's noise was planned with the release: the whole run stays within its request
        assert entry.epsilon_spent <= 8 + EPSILON_SLACK, entry.epsilon_spent
        assert entry.rounds_taken == 2 and entry.statistics_releases == 1
        assert "noised release" in entry.to_text()


def test_dp_sites_that_send_no_noised_statistics_decline_and_the_model_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consilia.client.site import policy as site_runtime

    monkeypatch.setattr(site_runtime.StatisticsRule, "__init__", _rule_without_noise())
    _cfg, result, replies = _experiment(tmp_path, "dp.enabled=true", "dp.target_epsilon=8")
    final = json.loads((result.run_dir / "federated_metrics.json").read_text())
    cal = final["calibration"]
    assert not cal["applied"] and "kept uncalibrated" in cal["reason"]
    assert set(cal["declined"]) == {"site-00", "site-01", "site-02"}
    assert all("dp_noise_multiplier" in why for why in cal["declined"].values())
    assert "federated_before_calibration" not in final
    queries = [r for r in replies if r.metadata.message_type.startswith("query")]
    assert len(queries) == 3 and all(r.has_error() for r in queries)


def test_a_central_dp_run_keeps_its_model_uncalibrated_and_asks_no_site(tmp_path: Path) -> None:
    _cfg, result, replies = _experiment(tmp_path, "dp.enabled=true", "dp.mode=central")
    final = json.loads((result.run_dir / "federated_metrics.json").read_text())
    cal = final["calibration"]
    assert not cal["applied"] and "central DP" in cal["reason"], cal
    assert not [r for r in replies if r.metadata.message_type.startswith("query")]
    assert "federated_before_calibration" not in final


def _rule_without_noise():
    from consilia.client.site.policy import StatisticsRule

    original = StatisticsRule.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        object.__setattr__(self, "dp_noise_multiplier", None)

    return init


def test_audit_flags_anything_but_class_aggregates_in_a_query_reply() -> None:
    from collections import OrderedDict

    from flwr.app import ArrayRecord, Message, RecordDict

    from consilia.simulations.audits.message_audit import audit_reply

    def reply(arrays: dict) -> Message:
        msg = Message(RecordDict({"arrays": ArrayRecord(OrderedDict(arrays))}), dst_node_id=1,
                      message_type="query")
        return msg

    good = {"counts": torch.zeros(3, dtype=torch.float64),
            "sums": torch.zeros(3, 4, dtype=torch.float64),
            "outer-sums": torch.zeros(3, 4, 4, dtype=torch.float64)}
    assert audit_reply(reply(good), {}, "query") == []
    leak = {**good, "images": torch.zeros(5, 1, 8, 8)}
    assert "holds arrays" in audit_reply(reply(leak), {}, "query")[0]
    per_image = {**good, "sums": torch.zeros(50, 4, dtype=torch.float64)}
    assert "not per-class aggregates" in audit_reply(reply(per_image), {}, "query")[0]
