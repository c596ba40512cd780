"""The Consilia ClientApp (Flower Message API): thin adapters around the site trainer.

:func:`build_client_app` builds the app around a
:class:`~consilia.client.site.locator.SiteLocator`; the module's :data:`app` (what Flower's
simulation and its own process modes load, ``consilia.client.app:app``) uses a locator with
the standard deployed-site loader, the site worker builds its own.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from consilia.client.privacy.budget import PrivacyBudgetExceeded, PrivacyConfigError
from consilia.client.site.assembly import load_deployed_site
from consilia.client.site.locator import SiteLocator
from consilia.client.site.policy import SitePolicyViolation
from consilia.client.site.runtime import SiteRuntime
from consilia.common.constants import ConfigKey, MessageKey, MetricKey, QueryName, SiteRecordKey
from consilia.common.instructions import RoundInstruction
from consilia.common.serde import pack_state, unpack_state

__all__ = ["app", "build_client_app"]


def _prepare(
    locator: SiteLocator, msg: Message, context: Context
) -> tuple[RoundInstruction, SiteRuntime, OrderedDict]:
    instr = RoundInstruction.from_config_record(msg.content[MessageKey.CONFIG.value])
    site = locator.resolve(dict(context.node_config), dict(context.run_config), instr,
                           context.run_id)
    site.enforce_policy(instr)
    state = unpack_state(msg.content[MessageKey.ARRAYS.value], site.trainer.state_template(instr))
    return instr, site, state


def _reply(msg: Message, site_name: str, metrics: dict,
           arrays: ArrayRecord | None = None, evaluation: dict | None = None) -> Message:
    content = RecordDict(
        {
            MessageKey.METRICS.value: MetricRecord(metrics),
            MessageKey.SITE.value: ConfigRecord({SiteRecordKey.NAME.value: site_name}),
        }
    )
    if arrays is not None:
        content[MessageKey.ARRAYS.value] = arrays
    if evaluation is not None:
        # a ConfigRecord: Flower's strategies aggregate the one MetricRecord of a train reply
        # (the training metrics), weighted by training examples
        content[MessageKey.EVALUATION.value] = ConfigRecord(evaluation)
    return Message(content=content, reply_to=msg)


def build_client_app(locator: SiteLocator) -> ClientApp:
    """Build the ClientApp whose handlers find their site through ``locator``.

    Parameters
    ----------
    locator : SiteLocator
        Finds the site of a message (simulated partition or deployed site configuration).

    Returns
    -------
    ClientApp
        With ``train``, ``evaluate`` and ``query`` handlers.

    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the received global model on this site's data.

        When the coordinator asks (``strategy.site_evaluation: with-next-round``), first
        evaluate the received model (the previous round's global model) on the site's
        validation split and send that evaluation with the training reply.
        """
        instr, site, state = _prepare(locator, msg, context)
        evaluation = None
        if instr.evaluate_received and site.trainer.has_validation_data:
            evaluation = site.trainer.evaluate(state, instr)
        new_state, metrics = site.trainer.fit(state, instr)
        return _reply(msg, site.name, metrics, arrays=pack_state(new_state),
                      evaluation=evaluation)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the received global model on this site's held-out data."""
        instr, site, state = _prepare(locator, msg, context)
        return _reply(msg, site.name, site.trainer.evaluate(state, instr))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Answer the coordinator's classifier-calibration request with per-class feature sums.

        The site's policy decides (``policy.feature_statistics``); a site training the run
        with local DP sends them clipped and Gaussian-noised, accounted in its privacy ledger
        first.
        """
        instr, site, state = _prepare(locator, msg, context)
        asked = str(msg.content[MessageKey.CONFIG.value].get(ConfigKey.QUERY.value, ""))
        if asked != QueryName.FEATURE_STATS.value:
            raise ValueError(f"unknown query '{asked}' (this site answers: "
                             f"{', '.join(q.value for q in QueryName)})")
        rule = site.statistics_rule()
        if not rule.share:
            raise SitePolicyViolation(rule.reason)
        privacy = site.trainer.trains_with_dp(instr)
        if privacy is None:
            stats = site.trainer.feature_stats(state, instr, rule.min_class_count)
            metrics = {MetricKey.NUM_EXAMPLES.value: int(stats.counts.sum())}
        else:
            stats, metrics = _noised_feature_stats(msg, site, state, instr, privacy)
        arrays = {name: torch.from_numpy(np.ascontiguousarray(value))
                  for name, value in stats.to_arrays().items()}
        return _reply(msg, site.name, metrics, arrays=ArrayRecord(OrderedDict(arrays)))

    return app


def _noised_feature_stats(
    msg: Message, site: SiteRuntime, state: OrderedDict, instr: RoundInstruction, privacy: Any
) -> tuple[Any, dict]:
    """Return the DP site's answer: clipped, Gaussian-noised statistics, accounted first."""
    if getattr(privacy, "release_noise_multiplier", None) is None:
        raise SitePolicyViolation(
            "the run trains with local DP and this site sends no noised feature statistics "
            "(policy.feature_statistics.dp_noise_multiplier: null)")
    clip = msg.content[MessageKey.CONFIG.value].get(ConfigKey.FEATURE_CLIP_NORM.value)
    if not isinstance(clip, int | float) or not clip > 0:
        raise SitePolicyViolation(
            "the run trains with local DP, so this site sends only clipped, noised feature "
            "statistics, and the coordinator sent no feature clip norm "
            "(strategy.calibration.feature_clip_norm, or a coordinator test set)")
    try:
        stats, epsilon, sigma = site.trainer.private_feature_stats(state, instr, privacy,
                                                                   float(clip))
    except (PrivacyBudgetExceeded, PrivacyConfigError) as exc:
        raise SitePolicyViolation(str(exc)) from None
    metrics = {
        MetricKey.NUM_EXAMPLES.value: max(int(round(float(stats.counts.sum()))), 0),
        MetricKey.EPSILON.value: epsilon,
        MetricKey.DP_NOISE_MULTIPLIER.value: sigma,
    }
    return stats, metrics


#: The ClientApp Flower loads (``consilia.client.app:app``): simulated sites, and deployed
#: sites under Flower's own process modes.
app = build_client_app(SiteLocator(deployed_loader=load_deployed_site))
