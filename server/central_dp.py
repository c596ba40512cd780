"""Central (client-level) DP: Flower's server-side clipping wrapper plus client-level accounting.

``dp.mode = "central"`` protects *whether a site took part* (its whole update is clipped to
``central_clipping_norm`` and Gaussian noise is added to the aggregate); it is **client-level**
DP, not the sample-level (per-patient) DP of local DP-SGD, and the coordinator still sees each
site's clipped update. :class:`AccountedServerSideClipping` keeps Flower's
``DifferentialPrivacyServerSideFixedClipping`` and adds what the run directory needs:

- the client-level ε after each round (Opacus RDP accountant, one Gaussian release per round,
  no subsampling amplification), written to ``metrics/rounds.jsonl`` as
  ``"central_dp": {"client-level-epsilon": ..., "delta": ..., "effective-noise-multiplier":
  ..., ...}`` through the recorder's round hooks, so the progress line and ``fl-report``
  can label it (``null`` epsilon = no noise, no guarantee);
- honest noise for *weighted* FedAvg: Flower's noise ``σ·C/m`` (``m`` = sampled sites)
  assumes uniform averaging, but FedAvg weights sites by ``num-examples``, so the largest
  site moves the aggregate by up to ``w_max·C`` (``w_max`` its weight fraction). The
  accountant therefore uses the effective noise multiplier ``σ·C/m / (w_max·C) = σ/(m·w_max)``
  (equal to ``σ`` for equal weights, smaller otherwise);
- every reply is screened first (the recording strategy's
  :meth:`~consilia.server.strategy.RecordingStrategy.screen_train_replies`: layout, finite
  values, example counts, update norm), before clipping touches its arrays;
- a site that fails or refuses no longer stops aggregation (Flower skips the whole round on
  any error): its error is recorded and the other sites' updates are aggregated; the
  accounting above covers the smaller set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from opacus.accountants import RDPAccountant

from consilia.common.constants import MetricKey
from consilia.server.round_hooks import RoundHooks

__all__ = ["CENTRAL_DP_KEY", "AccountedServerSideClipping", "client_level_epsilon"]

logger = logging.getLogger("consilia")

#: Key of the per-round central-DP record in ``rounds.jsonl``.
CENTRAL_DP_KEY = "central_dp"
_DEFAULT_DELTA = 1e-5


def client_level_epsilon(noise_multipliers: Iterable[float], delta: float) -> float:
    """Epsilon of a sequence of full-participation Gaussian releases (RDP, no amplification).

    Parameters
    ----------
    noise_multipliers : iterable of float
        Effective noise multiplier of each round's release (noise std / sensitivity).
    delta : float
        Target delta.

    Returns
    -------
    float
        Epsilon (``inf`` if a release had no noise; 0 for no release).

    """
    sigmas = list(noise_multipliers)
    if not sigmas:
        return 0.0
    if min(sigmas) <= 0:
        return math.inf
    accountant = RDPAccountant()
    for sigma in sigmas:
        accountant.step(noise_multiplier=float(sigma), sample_rate=1.0)
    return float(accountant.get_epsilon(delta=delta))


class AccountedServerSideClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, with client-level accounting and recording.

    Parameters
    ----------
    strategy : Strategy
        The wrapped (recording) strategy.
    noise_multiplier, clipping_norm, num_sampled_clients
        As Flower's ``DifferentialPrivacyServerSideFixedClipping``.
    hooks : RoundHooks, optional
        Receive the failed train replies and each round's accounting (default: none).
    delta : float, optional
        Delta of the reported epsilon (default 1e-5).
    weight_key : str
        Metric FedAvg weights sites by.
    screen : callable, optional
        ``screen(server_round, replies) -> replies`` drops (and records) bad replies before
        they are clipped; default: keep all.

    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        hooks: RoundHooks | None = None,
        delta: float | None = None,
        weight_key: str = MetricKey.NUM_EXAMPLES.value,
        screen: Callable[[int, Iterable[Message]], list[Message]] | None = None,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.hooks: RoundHooks = hooks if hooks is not None else RoundHooks()
        self.delta = float(delta) if delta is not None else _DEFAULT_DELTA
        self.weight_key = weight_key
        self.effective_multipliers: list[float] = []
        self.screen = screen if screen is not None else (lambda _round, replies: list(replies))

    def __repr__(self) -> str:
        """Name it as what it is."""
        return "Central DP, client-level (server-side fixed clipping, RDP accounting)"

    def _weight_fraction(self, replies: list[Message]) -> float:
        weights = []
        for reply in replies:
            metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
            weight = metrics.get(self.weight_key, 1.0)
            if isinstance(weight, list):
                raise TypeError(f"'{self.weight_key}' must be a number, not a list")
            weights.append(max(float(weight), 0.0))
        total = sum(weights)
        return max(weights) / total if total > 0 else 1.0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, clip, aggregate the sites that answered, add noise, account the release."""
        replies = self.screen(server_round, replies)
        ok = [r for r in replies if not r.has_error()]
        failed = [r for r in replies if r.has_error()]
        if failed:
            self.hooks.on_failed_replies(server_round, failed, "train")
        arrays, metrics = super().aggregate_train(server_round, ok)
        if arrays is not None and ok:
            w_max = self._weight_fraction(ok)
            sigma_eff = self.noise_multiplier / (self.num_sampled_clients * w_max)
            self.effective_multipliers.append(sigma_eff)
            eps = client_level_epsilon(self.effective_multipliers, self.delta)
            record = MetricRecord({
                "client-level-epsilon": eps,
                "delta": self.delta,
                "noise-multiplier": self.noise_multiplier,
                "effective-noise-multiplier": sigma_eff,
                "clipping-norm": self.clipping_norm,
                "sites-aggregated": len(ok),
                "releases": len(self.effective_multipliers),
            })
            self.hooks.on_central_dp_release(server_round, record)
            logger.info("round %d: central DP (client-level) ε=%.2f at δ=%g, effective noise "
                        "multiplier %.3f over %d site(s)", server_round, eps, self.delta,
                        sigma_eff, len(ok))
        return arrays, metrics
