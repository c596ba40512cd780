"""The site's policy decisions: refuse a run, the site's DP for a round, the statistics answer.

Policy decisions (documented for hospital IT):

- A run whose model is not in ``policy.allowed_models`` or whose planned rounds exceed
  ``policy.max_rounds`` is refused (:class:`SitePolicyViolation`; the reason reaches the
  coordinator's log, the other sites carry on).
- ``policy.dp.required``: the site trains only with local DP-SGD (Opacus). A run that asks
  for local DP weaker than ``policy.dp.max_run_epsilon`` is refused ("DP too weak"). A run that
  does not ask for local DP (DP off, or ``mode: central``, which does not protect data from the
  coordinator) is, by default, trained with the **site's own DP** at ``max_run_epsilon``
  (``policy.dp.when_not_requested: enforce``; the reply reports ``dp-enabled=1`` and the
  epsilon); set ``when_not_requested: refuse`` to refuse such runs instead
  (:func:`check_policy`, :func:`site_dp_request`).
- The site's lifetime budget ``policy.dp.budget_epsilon`` (per dataset, in the privacy ledger
  of the state directory) caps every DP run; the coordinator cannot raise it.
- **A site that is done says so.** ``policy.dp.max_noise_multiplier`` (10 by default) is the
  least useful privacy level the site trains at: a new run whose noise, for the budget left
  (or for its own request), would exceed it is refused before anything is recorded
  ("privacy budget spent: ε 9.99 of 10 left too little for this run (needs σ 20.3 >
  policy.dp.max_noise_multiplier 10)"); the coordinator logs the reason and the run goes on
  with the other sites, instead of receiving pure-noise updates.
- **The site decides the accounting.** Every DP round is accounted with
  ``policy.dp.accountant`` (``rdp`` by default, or ``prv``: accountants whose epsilon is an
  upper bound; ``gdp`` is refused when the site configuration is loaded). A run that asks for
  another accountant is served with the site's: its noise is planned for the site's
  accountant, its requested epsilon and the site's remaining budget, so the coordinator
  cannot lower the noise below what the site allows, and the site's train reply says which
  accountant it used (``dp-accountant-rdp: 1``; :func:`site_dp_request`).
- ``policy.feature_statistics`` decides the answer to a classifier-calibration request
  (:func:`statistics_rule_for`, :class:`StatisticsRule`).

Light to import (no torch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from consilia.client.site.config import DPPolicy, SitePolicy
from consilia.common.config import DPConfig
from consilia.common.instructions import RoundInstruction

__all__ = [
    "SitePolicyViolation",
    "StatisticsRule",
    "check_policy",
    "requests_local_dp",
    "site_dp_request",
    "statistics_rule_for",
]

log = logging.getLogger(__name__)


class SitePolicyViolation(RuntimeError):  # noqa: N818 (named by the design brief)
    """The coordinator's run violates this site's policy; the site refuses it.

    Attributes
    ----------
    reason : str
        Plain-language reason (also the message), shown in the coordinator's log.

    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason



@dataclass(frozen=True)
class StatisticsRule:
    """Whether (and how) the site answers a classifier-calibration statistics request.

    Attributes
    ----------
    share : bool
        Send per-class feature sums at all.
    min_class_count : int
        Withhold every class with fewer images than this at the site (exact statistics).
    reason : str
        Why the site declines (shown at the coordinator) when ``share`` is false.
    dp_noise_multiplier : float or None
        When the site trains the run with local DP: send the statistics through the Gaussian
        mechanism with this noise multiplier, accounted in the privacy ledger (None: decline).
    """

    share: bool = True
    min_class_count: int = 20
    reason: str = ""
    dp_noise_multiplier: float | None = 5.0


def requests_local_dp(instr: RoundInstruction) -> bool:
    """Return whether the run asks for local DP-SGD (``dp.enabled`` with ``mode: local``)."""
    return bool(instr.dp.enabled and instr.dp.mode == "local")


def check_policy(policy: SitePolicy, instr: RoundInstruction) -> None:
    """Refuse an instruction that violates the site's policy.

    Parameters
    ----------
    policy : SitePolicy
        The site's rules.
    instr : RoundInstruction
        What the coordinator asks this round.

    Raises
    ------
    SitePolicyViolation
        With a reason naming the run's value and the site's limit.

    """
    model = instr.model.name
    if policy.allowed_models is not None and model not in policy.allowed_models:
        raise SitePolicyViolation(
            f"model '{model}' is not allowed by this site's policy (allowed: "
            f"{', '.join(policy.allowed_models) or 'none'})"
        )
    if instr.total_rounds > policy.max_rounds:
        raise SitePolicyViolation(
            f"the run plans {instr.total_rounds} rounds; this site takes part in at most "
            f"{policy.max_rounds} rounds per run"
        )
    dp = policy.dp
    if not dp.required:
        return
    if requests_local_dp(instr):
        if instr.dp.target_epsilon > dp.max_run_epsilon:
            raise SitePolicyViolation(
                f"differential privacy too weak: the run asks for ε={instr.dp.target_epsilon:g}; "
                f"this site requires ε ≤ {dp.max_run_epsilon:g} per run"
            )
        return
    if dp.when_not_requested == "refuse":
        why = (
            "central DP (dp.mode=central) does not protect the data from the coordinator"
            if instr.dp.enabled
            else "the run has DP disabled"
        )
        raise SitePolicyViolation(
            f"this site requires local differential privacy (ε ≤ {dp.max_run_epsilon:g} per "
            f"run) and {why}; enable dp with mode 'local'"
        )


def site_dp_request(policy: DPPolicy, instr: RoundInstruction) -> DPConfig | None:
    """Return the DP this site applies to a round: the run's local DP, the site's own, or none.

    The run's request (epsilon, delta, clipping) is used when it asks for local DP, but always
    with the site's accountant (``policy.accountant``), whatever the run asked; when the site
    requires DP and the run did not ask for it (and the policy enforces), the site's own DP at
    ``max_run_epsilon`` is applied. The lifetime budget caps either (privacy controller).

    Parameters
    ----------
    policy : DPPolicy
        The site's DP rules.
    instr : RoundInstruction
        What the coordinator asks this round.

    Returns
    -------
    DPConfig or None
        The DP to train with (``accountant`` is the site's), or None to train without DP.

    """
    if requests_local_dp(instr):
        if instr.dp.accountant != policy.accountant:
            log.info("the run asks for the '%s' accountant; this site accounts with '%s' "
                     "(policy.dp.accountant) and plans the run's noise for it",
                     instr.dp.accountant, policy.accountant)
        return instr.dp.model_copy(update={"accountant": policy.accountant})
    if policy.required and policy.when_not_requested == "enforce":
        return DPConfig(
            enabled=True,
            mode="local",
            target_epsilon=policy.max_run_epsilon,
            target_delta=policy.delta,
            max_grad_norm=policy.max_grad_norm,
            accountant=policy.accountant,
        )
    return None


def statistics_rule_for(policy: SitePolicy) -> StatisticsRule:
    """Translate the site's policy into its answer to a feature-statistics request."""
    rule = policy.feature_statistics
    if not rule.share:
        return StatisticsRule(False, rule.min_class_count, "this site's policy does not share "
                              "feature statistics (policy.feature_statistics.share: false)",
                              None)
    if policy.dp.required and rule.dp_noise_multiplier is None:
        return StatisticsRule(False, rule.min_class_count, "this site trains with local DP "
                              "(policy.dp.required) and sends no noised feature statistics "
                              "(policy.feature_statistics.dp_noise_multiplier: null)", None)
    return StatisticsRule(True, rule.min_class_count, "", rule.dp_noise_multiplier)
