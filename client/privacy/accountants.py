"""Which privacy accountants a site may use: only those whose epsilon is an upper bound.

Opacus offers three accountants. ``rdp`` (Rényi DP) and ``prv`` (privacy random variables)
report an epsilon that upper-bounds the true privacy loss. ``gdp`` (Gaussian DP) reports a
central-limit *approximation*, which can under-state the loss (see the tech notes), so a
site never accounts with it: :data:`SiteAccountant` refuses ``gdp`` in a site policy with one
clear line, and the privacy controller refuses it too. The site's policy, not the run, decides
the accountant (:func:`consilia.client.site.policy.site_dp_request`).

Light to import (no torch or Opacus).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator

from consilia.common.constants import DP_ACCOUNTANT_METRIC_PREFIX

__all__ = [
    "ACCOUNTANT_WORDS",
    "UPPER_BOUND_ACCOUNTANTS",
    "AccountantName",
    "SiteAccountant",
    "accountant_metric_key",
    "not_an_upper_bound_reason",
]

#: Every accountant name Opacus knows (what an old ledger file or a run request may hold).
AccountantName = Literal["rdp", "prv", "gdp"]

#: The accountants whose epsilon is an upper bound: the only ones a site accounts with.
UPPER_BOUND_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

ACCOUNTANT_WORDS = {
    "rdp": "RDP (Rényi DP) accountant",
    "prv": "PRV accountant",
    "gdp": "GDP (Gaussian DP) accountant",
}


def not_an_upper_bound_reason(name: str) -> str:
    """Return why ``name`` cannot account a site's privacy (one line, names the fix)."""
    return (
        f"the '{name}' accountant is not allowed: it gives an approximation, not an upper "
        f"bound, of the privacy loss; use one of {', '.join(UPPER_BOUND_ACCOUNTANTS)} "
        "(default rdp)"
    )


def _upper_bound_only(value: object) -> object:
    if value == "gdp":
        raise ValueError(not_an_upper_bound_reason("gdp"))
    return value


#: A site policy's accountant: ``rdp`` or ``prv``; ``gdp`` is refused with the reason.
SiteAccountant = Annotated[Literal["rdp", "prv"], BeforeValidator(_upper_bound_only)]


def accountant_metric_key(name: str) -> str:
    """Return the reply metric that says which accountant the site used (``dp-accountant-rdp``).

    A site training with local DP reports ``{accountant_metric_key(name): 1.0}`` in its train
    reply, so the coordinator's round records show the accountant each site chose.
    """
    return f"{DP_ACCOUNTANT_METRIC_PREFIX}{name}"
