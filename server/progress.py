"""One human line per round (plus one per site failure or rejection), from a round record.

A late record (the sites' evaluation of a round's model, sent with the next round's
training) gets a line of its own.

Shared by the coordinator's recorder (the ServerApp's log) and ``fl-server run`` (which follows
the run directory), so the operator sees the same lines in simulation and deployment.
"""

from __future__ import annotations

import re
from typing import Any

from consilia.common.constants import MetricKey
from consilia.common.evaluation.formatting import format_number as _fmt
from consilia.common.rundir.round_records import LATE_KEY, is_late_record

__all__ = ["format_final", "format_round", "readable_reason"]


_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


def readable_reason(reason: str) -> str:
    """Turn Flower's ``<class 'pkg.Error'>:<'message'>`` into ``Error: message``."""
    match = _FLOWER_REASON.match(str(reason).strip())
    return f"{match.group(1)}: {match.group(2)}" if match else str(reason)


def format_round(
    record: dict[str, Any], total_rounds: int, site_names: dict[str, str] | None = None
) -> list[str]:
    """Human lines for one ``rounds.jsonl`` record: a summary plus one line per site failure.

    ``site_names`` maps ``node-<id>`` labels (error replies carry no site name) to names.
    """
    rnd = record.get("round", "?")
    sites = record.get("sites") or {}
    if is_late_record(record):  # the sites evaluated this round's model with the next round
        fed = record.get("federated_eval") or {}
        return [f"[round {rnd}/{total_rounds}] site-val acc {_fmt(fed.get('accuracy'))} "
                f"AUC {_fmt(fed.get('auc'))} ({len(sites)} site(s), evaluated with round "
                f"{record[LATE_KEY]}'s training)"]
    parts = [f"[round {rnd}/{total_rounds}] "
             + ("initial model" if rnd == 0 else f"{len(sites)} site(s) answered")]
    train = record.get("train") or {}
    if MetricKey.TRAIN_LOSS.value in train:
        parts.append(f"train loss {_fmt(train[MetricKey.TRAIN_LOSS.value])}")
    fed = record.get("federated_eval") or {}
    if "accuracy" in fed:
        parts.append(f"site-val acc {_fmt(fed['accuracy'])}")
    srv = record.get("server_eval") or {}
    if srv:
        parts.append(f"test acc {_fmt(srv.get('accuracy'))} AUC {_fmt(srv.get('auc'))}")
    eps = [s.get("epsilon") for s in sites.values() if s.get("epsilon") is not None]
    if eps:
        parts.append(f"max eps {max(eps):.2f}")
    if isinstance(central := record.get("central_dp"), dict):  # coordinator's client-level DP
        value = central.get("client-level-epsilon")
        parts.append("client-level eps (central DP) "
                     + (f"{value:.2f}" if value is not None else "inf (no noise)"))
    parts.append(f"{_fmt(record.get('elapsed_s'), 1)}s")
    lines = [" | ".join(parts)]
    inc = record.get("incomplete")
    if inc:
        lines.append(f"    ! round incomplete: only {inc.get('answered')} of the required "
                     f"{inc.get('required')} site(s) answered {inc.get('phase')}; "
                     "the global model is kept")
    names = site_names or {}
    for err in record.get("errors") or []:
        site = str(err.get("site"))
        lines.append(f"    ! {names.get(site, site)} {err.get('phase')} failed: "
                     f"{readable_reason(str(err.get('reason')))}")
    for rej in record.get("rejected") or []:
        lines.append(f"    ! {rej.get('site')} {rej.get('phase', 'train')} reply rejected: "
                     f"{rej.get('reason')}")
    for exc in record.get("excluded") or []:
        rounds = ", ".join(str(r) for r in exc.get("rejected_rounds") or [])
        lines.append(f"    ! {exc.get('site')} excluded for the rest of the run (rejected in "
                     f"round(s) {rounds}); its replies are ignored")
    return lines


def format_final(final: dict[str, Any], site_names: dict[str, str] | None = None) -> list[str]:
    """Human lines for ``federated_metrics.json``: calibration outcome and final test metrics."""
    names = site_names or {}
    lines = []
    cal = final.get("calibration")
    if isinstance(cal, dict):
        declined = "; ".join(f"{names.get(site, site)}: {readable_reason(why)}"
                             for site, why in sorted((cal.get("declined") or {}).items()))
        if cal.get("applied"):
            used = ", ".join(names.get(s, s) for s in cal.get("sites") or [])
            lines.append(f"calibration: classifier head re-fitted from the feature statistics "
                         f"of {len(cal.get('sites') or [])} site(s) ({used}), "
                         f"{cal.get('images')} images")
            noised = cal.get("noised_sites") or {}
            if noised:
                lines.append("  DP-noised statistics (local DP sites, features clipped to "
                             f"{_fmt(cal.get('feature_clip_norm'))}): " + ", ".join(
                                 f"{names.get(s, s)} (noise {sigma:g})"
                                 for s, sigma in sorted(noised.items())))
        else:
            lines.append(f"calibration: not applied: {cal.get('reason', '')}")
        if declined:
            lines.append(f"  ! declined: {declined}")
    fed = final.get("federated")
    if isinstance(fed, dict):
        text = (f"final global model on the test split: accuracy {_fmt(fed.get('accuracy'))}, "
                f"AUC {_fmt(fed.get('auc'))}")
        before = final.get("federated_before_calibration")
        if isinstance(before, dict):
            text += (f" (before calibration: accuracy {_fmt(before.get('accuracy'))}, "
                     f"AUC {_fmt(before.get('auc'))})")
        lines.append(text)
    return lines
