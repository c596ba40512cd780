"""Membership-inference audit of a run's final global model (a privacy *measurement*).

Two attacks, both scored by the ROC AUC of telling training members from non-members
(0.5 = chance: the model's outputs say nothing about who was in the training data):

- **Loss threshold** (Yeom et al., CSF 2018): score = −loss(x, y) of the target model. For
  cross-entropy this is the same ranking as the confidence ``p(y|x)``, so one AUC covers the
  "loss/confidence threshold" attack.
- **LiRA, online, global variance** (Carlini et al., S&P 2022): ``K`` shadow models are
  trained with the run's recipe (same model, optimizer, learning rate, batch size, passes over
  the data and — for a DP run — the same ε with DP-SGD) on random halves of the audit pool,
  paired so that every candidate is *in* exactly ``K/2`` shadows. For each candidate, the
  target model's logit-scaled confidence ``φ = log p_y − log(1 − p_y)`` is compared with
  Gaussians fitted to the shadows' ``φ`` when it was in / out (one variance per side, shared
  by all candidates — the variant recommended for few shadows); the score is the likelihood
  ratio.

Members are the sites' training images (``sites/site-XX.npz``), non-members the common test
split (``test_set.npz``), never seen in training. The two groups are sampled with the *same
class composition* (per class, as many of each), because a class-prior difference between
members and non-members (PneumoniaMNIST's training split has 10 % "normal", its test split
38 %) would otherwise be scored as leakage.

Shadow models are trained centrally (one model on the shadow half, ``rounds × local_epochs``
epochs) rather than by a full federation: the usual simplification for auditing FL, which
makes the attack somewhat weaker than one replaying the exact federation.

:func:`audit_run` writes ``<run_dir>/privacy_audit.json`` (read by ``fl-report``).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from consilia.client.trainer import build_task_model, train_model
from consilia.common.config import RunConfig
from consilia.common.data.images import ImageData
from consilia.common.model_files import load_model_file
from consilia.common.rundir.layout import RunDir
from consilia.common.training.inference import evaluate_on

__all__ = [
    "AUDIT_FILE",
    "MembershipAudit",
    "attack_auc",
    "audit_run",
    "class_matched_sample",
    "lira_scores",
    "logit_confidence",
    "per_example_loss",
    "tpr_at_fpr",
]

log = logging.getLogger(__name__)

#: The audit's file in the run directory.
AUDIT_FILE = RunDir(".").privacy_audit_path.name

_EPS = 1e-12


@dataclass
class MembershipAudit:
    """Result of :func:`audit_run` (also the content of ``privacy_audit.json``)."""

    members: int
    non_members: int
    loss_auc: float
    loss_tpr_at_1pct_fpr: float
    lira_auc: float | None
    lira_tpr_at_1pct_fpr: float | None
    shadows: int
    dp: str
    target_epsilon: float | None
    spent_epsilon: float | None
    train_accuracy: float
    test_accuracy: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Scores and metrics (pure numpy)
# ---------------------------------------------------------------------------------------


def per_example_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each example from class probabilities ``(N, C)`` and labels ``(N,)``."""
    p = probs[np.arange(labels.shape[0]), labels]
    return -np.log(np.clip(p, _EPS, 1.0))


def logit_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's ``φ = log p_y − log(1 − p_y)``, computed stably from ``(N, C)`` probabilities."""
    p_true = np.clip(probs[np.arange(labels.shape[0]), labels], _EPS, 1.0)
    p_rest = np.clip(1.0 - p_true, _EPS, 1.0)
    return np.log(p_true) - np.log(p_rest)


def attack_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """ROC AUC of an attack whose *higher* scores mean "member"."""
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    return float(roc_auc_score(y, np.r_[member_scores, non_member_scores]))


def tpr_at_fpr(member_scores: np.ndarray, non_member_scores: np.ndarray,
               fpr: float = 0.01) -> float:
    """True-positive rate of the attack at a false-positive rate of at most ``fpr``."""
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    fprs, tprs, _ = roc_curve(y, np.r_[member_scores, non_member_scores])
    ok = fprs <= fpr
    return float(tprs[ok].max()) if ok.any() else 0.0


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, in_mask: np.ndarray) -> np.ndarray:
    """Online LiRA with global variances: log-likelihood ratio "in" vs "out" per candidate.

    Parameters
    ----------
    target_phi : ndarray (N,)
        The target model's logit-scaled confidence on each candidate.
    shadow_phi : ndarray (K, N)
        The same for each shadow model.
    in_mask : ndarray of bool (K, N)
        Whether candidate ``n`` was in shadow ``k``'s training data; every candidate must be
        in at least one and out of at least one shadow.

    Returns
    -------
    ndarray (N,)
        Higher = more likely a member.

    """
    in_mask = np.asarray(in_mask, dtype=bool)
    n_in, n_out = in_mask.sum(0), (~in_mask).sum(0)
    if (n_in == 0).any() or (n_out == 0).any():
        raise ValueError("every candidate needs at least one 'in' and one 'out' shadow model")
    mu_in = np.where(in_mask, shadow_phi, 0.0).sum(0) / n_in
    mu_out = np.where(~in_mask, shadow_phi, 0.0).sum(0) / n_out
    sd_in = max(float(np.std((shadow_phi - mu_in)[in_mask])), 1e-6)
    sd_out = max(float(np.std((shadow_phi - mu_out)[~in_mask])), 1e-6)
    log_in = -0.5 * ((target_phi - mu_in) / sd_in) ** 2 - math.log(sd_in)
    log_out = -0.5 * ((target_phi - mu_out) / sd_out) ** 2 - math.log(sd_out)
    return log_in - log_out


def class_matched_sample(
    member_labels: np.ndarray, non_member_labels: np.ndarray, per_group: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return indices of members and non-members with the same number of each class.

    Per class ``c`` both groups give ``min(#members_c, #non_members_c)`` examples, scaled down
    proportionally so that each group has at most ``per_group``.
    """
    rng = np.random.default_rng(seed)
    classes = np.union1d(member_labels, non_member_labels)
    avail = {c: min(int((member_labels == c).sum()), int((non_member_labels == c).sum()))
             for c in classes}
    total = sum(avail.values())
    if total == 0:
        raise ValueError("members and non-members share no class; nothing to audit")
    scale = min(1.0, per_group / total)
    take = {c: int(math.floor(k * scale)) for c, k in avail.items()}
    picked_m, picked_n = [], []
    for c, k in take.items():
        if k:
            picked_m.append(rng.choice(np.flatnonzero(member_labels == c), k, replace=False))
            picked_n.append(rng.choice(np.flatnonzero(non_member_labels == c), k, replace=False))
    return np.sort(np.concatenate(picked_m)), np.sort(np.concatenate(picked_n))


# ---------------------------------------------------------------------------------------
# The audit of a run directory
# ---------------------------------------------------------------------------------------


def _site_members(run: RunDir) -> ImageData:
    if not run.site_files():
        raise FileNotFoundError(f"{run.sites_dir}: no site-*.npz (the members); run fl-sim")
    trains = [train for train, _, _ in run.read_sites().values()]
    return ImageData(np.concatenate([t.images for t in trains]),
                     np.concatenate([t.labels for t in trains]))


def _test_set(run: RunDir) -> ImageData:
    if not run.test_set_path.is_file():
        raise FileNotFoundError(
            f"{run.test_set_path}: the common test split (the non-members) is missing")
    return run.read_test_set()


def _probs(model, data: ImageData, run: RunConfig) -> np.ndarray:
    return evaluate_on(model, data, run.train, run.task).y_prob  # type: ignore[arg-type]


def _spent_epsilon(run: RunDir) -> float | None:
    eps = [v.get("epsilon") for record in run.read_rounds()
           for v in (record.get("sites") or {}).values() if isinstance(v, dict)]
    eps = [e for e in eps if e is not None]
    return max(eps) if eps else None


def _train_shadow(run: RunConfig, data: ImageData, epochs: int, seed: int,
                  ledger_dir: Path, index: int):
    model = build_task_model(run.model.name, dict(run.model.kwargs), run.task)  # type: ignore[arg-type]
    privacy = None
    if run.dp.enabled and run.dp.mode == "local":
        from consilia.client.privacy.controller import PrivacyController
        from consilia.client.privacy.ledger import PrivacyLedger
        from consilia.client.privacy.simulated_sites import simulated_site_dp

        privacy = PrivacyController(
            simulated_site_dp(run.dp), budget_epsilon=run.dp.target_epsilon, budget_delta=None,
            ledger=PrivacyLedger(ledger_dir / f"shadow-{index}.json"), dataset_key="shadow",
            model_name=run.model.name, noise_seed=seed,
        ).bind_round(f"shadow-{index}", 1, 1)
    train_model(model, data, run.train, run.task, epochs, seed, privacy=privacy)  # type: ignore[arg-type]
    model.eval()
    return model


def audit_run(
    run_dir: Path, shadows: int = 8, per_group: int = 500, seed: int = 0, write: bool = True
) -> MembershipAudit:
    """Run both attacks against ``run_dir/global_model.safetensors``; write ``privacy_audit.json``.

    Parameters
    ----------
    run_dir : Path
        An ``fl-sim`` run directory (needs ``global_model.safetensors``, ``sites/`` and
        ``test_set.npz``).
    shadows : int
        Shadow models for LiRA (even; 0 = loss attack only).
    per_group : int
        At most this many members and as many non-members (class-matched).
    seed : int
        Sampling, shadow splits and shadow training.
    write : bool
        Write ``run_dir/privacy_audit.json``.

    Returns
    -------
    MembershipAudit
        The attack AUCs (0.5 = chance) and context.

    Raises
    ------
    FileNotFoundError
        If a needed file of the run directory is missing.
    ValueError
        If ``shadows`` is odd or negative.

    """
    if shadows < 0 or shadows % 2:
        raise ValueError(f"shadows must be an even number >= 0, got {shadows}")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    target, run, _ = load_model_file(layout.global_model_path)
    members_all, test_all = _site_members(layout), _test_set(layout)
    mi, ni = class_matched_sample(members_all.labels, test_all.labels, per_group, seed)
    members = ImageData(members_all.images[mi], members_all.labels[mi])
    non_members = ImageData(test_all.images[ni], test_all.labels[ni])
    pool = ImageData(np.concatenate([members.images, non_members.images]),
                     np.concatenate([members.labels, non_members.labels]))
    n = len(members)
    probs = _probs(target, pool, run)
    loss = per_example_loss(probs, pool.labels)
    loss_auc = attack_auc(-loss[:n], -loss[n:])
    loss_tpr = tpr_at_fpr(-loss[:n], -loss[n:])
    pred = probs.argmax(1)
    dp_text = (f"local DP-SGD, target ε={run.dp.target_epsilon:g}" if run.dp.enabled
               and run.dp.mode == "local" else "central DP (client-level)" if run.dp.enabled
               else "none")
    notes = [f"members: sites' training images; non-members: test split; class-matched "
             f"sample of {n} each"]

    lira_auc = lira_tpr = None
    if shadows:
        rng = np.random.default_rng(seed + 1)
        epochs = run.strategy.rounds * run.train.local_epochs
        in_mask = np.zeros((shadows, 2 * n), dtype=bool)
        for pair in range(shadows // 2):
            half = rng.permutation(2 * n)[:n]
            in_mask[2 * pair, half] = True
            in_mask[2 * pair + 1] = ~in_mask[2 * pair]
        shadow_phi = np.empty((shadows, 2 * n))
        with tempfile.TemporaryDirectory(prefix="consilia-mia-") as tmp:
            for k in range(shadows):
                idx = np.flatnonzero(in_mask[k])
                shadow = _train_shadow(run, ImageData(pool.images[idx], pool.labels[idx]),
                                       epochs, seed * 1000 + k, Path(tmp), k)
                shadow_phi[k] = logit_confidence(_probs(shadow, pool, run), pool.labels)
        scores = lira_scores(logit_confidence(probs, pool.labels), shadow_phi, in_mask)
        lira_auc = attack_auc(scores[:n], scores[n:])
        lira_tpr = tpr_at_fpr(scores[:n], scores[n:])
        notes.append(f"LiRA: {shadows} shadow models trained centrally for {epochs} epochs on "
                     f"{n} pool images each (same model/optimizer/batch"
                     + (f", DP-SGD at ε={run.dp.target_epsilon:g}" if run.dp.enabled
                        and run.dp.mode == "local" else "") + ")")
    audit = MembershipAudit(
        members=n, non_members=n, loss_auc=loss_auc, loss_tpr_at_1pct_fpr=loss_tpr,
        lira_auc=lira_auc, lira_tpr_at_1pct_fpr=lira_tpr, shadows=shadows, dp=dp_text,
        target_epsilon=run.dp.target_epsilon if run.dp.enabled else None,
        spent_epsilon=_spent_epsilon(layout),
        train_accuracy=float((pred[:n] == pool.labels[:n]).mean()),
        test_accuracy=float((pred[n:] == pool.labels[n:]).mean()),
        seconds=time.perf_counter() - start, notes=notes,
    )
    if write:
        layout.privacy_audit_path.write_text(json.dumps(audit.to_dict(), indent=2))
    log.info("membership audit of %s: loss AUC %.3f, LiRA AUC %s (%d shadows, %.0f s)",
             run_dir, loss_auc, "n/a" if lira_auc is None else f"{lira_auc:.3f}", shadows,
             audit.seconds)
    return audit
