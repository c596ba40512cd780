"""Membership-inference audit: attack scores, class-matched sampling, audit file, report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from fake_run import make_run_dir

from consilia.simulations.audits.membership_inference import (
    AUDIT_FILE,
    attack_auc,
    audit_run,
    class_matched_sample,
    lira_scores,
    logit_confidence,
    per_example_loss,
    tpr_at_fpr,
)


def test_loss_and_logit_confidence_from_probabilities() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    labels = np.array([0, 0, 1])
    np.testing.assert_allclose(per_example_loss(probs, labels), -np.log([0.9, 0.2, 0.5]))
    np.testing.assert_allclose(logit_confidence(probs, labels),
                               np.log([0.9 / 0.1, 0.2 / 0.8, 1.0]))
    assert np.isfinite(logit_confidence(np.array([[1.0, 0.0]]), np.array([0]))).all()


def test_attack_auc_and_tpr_at_low_fpr() -> None:
    assert attack_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert attack_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    rng = np.random.default_rng(0)
    same = attack_auc(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(same - 0.5) < 0.03
    assert tpr_at_fpr(np.arange(100.0) + 1000, np.arange(100.0)) == 1.0


def test_lira_tells_in_from_out_only_when_the_target_behaves_like_the_in_shadows() -> None:
    rng = np.random.default_rng(1)
    k, n = 8, 400
    in_mask = np.zeros((k, n), dtype=bool)
    for pair in range(k // 2):
        half = rng.permutation(n)[: n // 2]
        in_mask[2 * pair, half] = True
        in_mask[2 * pair + 1] = ~in_mask[2 * pair]
    difficulty = rng.normal(0, 2, n)  # per-example offset shared by every model
    shadow_phi = difficulty + np.where(in_mask, 3.0, 0.0) + rng.normal(0, 0.5, (k, n))
    members = np.arange(n) < n // 2
    leaky_target = difficulty + np.where(members, 3.0, 0.0) + rng.normal(0, 0.5, n)
    scores = lira_scores(leaky_target, shadow_phi, in_mask)
    assert attack_auc(scores[members], scores[~members]) > 0.95
    # the per-example calibration is what beats a global threshold on hard/easy examples
    assert attack_auc(leaky_target[members], leaky_target[~members]) < 0.9

    private_target = difficulty + 1.5 + rng.normal(0, 0.5, n)  # membership-independent
    scores = lira_scores(private_target, shadow_phi, in_mask)
    assert abs(attack_auc(scores[members], scores[~members]) - 0.5) < 0.1

    with pytest.raises(ValueError, match="at least one"):
        lira_scores(private_target, shadow_phi, np.ones((k, n), dtype=bool))


def test_class_matched_sample_gives_both_groups_the_same_class_counts() -> None:
    members = np.array([0] * 10 + [1] * 90)
    non_members = np.array([0] * 40 + [1] * 60)
    mi, ni = class_matched_sample(members, non_members, per_group=1000, seed=0)
    assert np.bincount(members[mi]).tolist() == np.bincount(non_members[ni]).tolist() == [10, 60]
    mi, ni = class_matched_sample(members, non_members, per_group=35, seed=0)
    assert len(mi) == len(ni) <= 35
    assert np.bincount(members[mi]).tolist() == np.bincount(non_members[ni]).tolist()
    assert len(set(mi.tolist())) == len(mi)  # no index twice


def test_audit_run_writes_the_audit_and_the_report_shows_it(tmp_path: Path) -> None:
    from consilia.common.analysis.report import build_report

    run_dir = make_run_dir(tmp_path / "run", dp=False)
    audit = audit_run(run_dir, shadows=2, per_group=40, seed=0)
    saved = json.loads((run_dir / AUDIT_FILE).read_text())
    assert saved["members"] == saved["non_members"] == audit.members <= 40
    assert 0.0 <= saved["loss_auc"] <= 1.0 and 0.0 <= saved["lira_auc"] <= 1.0
    assert saved["shadows"] == 2 and saved["dp"] == "none"
    with pytest.raises(ValueError, match="even"):
        audit_run(run_dir, shadows=3)

    html = build_report(run_dir, n_boot=10, gallery=0).read_text(encoding="utf-8")
    privacy = html[html.index('<section id="privacy">'):]
    privacy = privacy[: privacy.index("</section>")]
    assert "Membership-inference audit" in privacy
    assert f"{saved['loss_auc']:.3f}" in privacy
    assert re.search(r"LiRA \(2 shadow models\)", privacy)


def test_report_labels_central_dp_as_client_level(tmp_path: Path) -> None:
    from consilia.common.analysis.report import build_report

    run_dir = make_run_dir(tmp_path / "central", dp=False)
    path = run_dir / "metrics" / "rounds.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    for r in records[1:]:
        r["central_dp"] = {"client-level-epsilon": 2.5 * r["round"], "delta": 1e-5,
                           "effective-noise-multiplier": 1.0, "clipping-norm": 1.0,
                           "sites-aggregated": 2}
    path.write_text("\n".join(json.dumps(r) for r in records))
    html = build_report(run_dir, n_boot=10, gallery=0).read_text(encoding="utf-8")
    privacy = html[html.index('<section id="privacy">'):]
    privacy = privacy[: privacy.index("</section>")]
    assert "Central DP (client level" in privacy and "client-level epsilon" in privacy
    assert "7.500" in privacy  # round 3
    assert "Local DP-SGD" not in privacy
