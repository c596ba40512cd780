"""Report section: federated vs centralized vs local-only on the common test split."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from consilia.common.analysis.report.context import ReportContext
from consilia.common.analysis.report.html import embed_figure, note, table
from consilia.common.analysis.report.run_files import RunFiles, Unavailable

__all__ = ["HEADLINE_METRICS", "headline_scalars", "section_comparison"]


HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity")


_ALIASES = {"f1": ("f1", "macro_f1")}


def headline_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Return the headline scalars of a ``ClassificationMetrics.to_dict()`` (None -> NaN)."""
    out: dict[str, float] = {}
    for key in HEADLINE_METRICS:
        for alias in _ALIASES.get(key, (key,)):
            value = metrics.get(alias, "missing")
            if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
                out[key] = math.nan if value is None else float(value)
                break
    return out


def section_comparison(run: RunFiles, ctx: ReportContext) -> str:
    """Compare the headline metrics of every model on the test split, with a bar chart."""
    final = run.json("final_metrics.json")
    rows: list[tuple[str, dict[str, float], bool]] = []  # (label, metrics, per-site row)
    for key, label in (("federated", "federated (global model)"),
                       ("federated_before_calibration",
                        "federated, last round before classifier calibration"),
                       ("centralized", "centralized")):
        if isinstance(final.get(key), dict):
            rows.append((label, headline_scalars(final[key]), False))
    local = final.get("local_only") or {}
    if isinstance(local.get("mean"), dict):
        rows.append(("local-only (mean of sites)", headline_scalars(local["mean"]), False))
    for site, metrics in sorted(local.items()):
        if site != "mean" and isinstance(metrics, dict):
            rows.append((f"local-only {site}", headline_scalars(metrics), True))
    if not rows:
        raise Unavailable("final_metrics.json has no federated/centralized/local_only entries")
    columns = [c for c in HEADLINE_METRICS if any(c in r for _, r, _ in rows)]
    out = table(("model", *columns), [[label, *[r.get(c) for c in columns]]
                                         for label, r, _ in rows])
    main_rows = [(label, r) for label, r, per_site in rows if not per_site]
    shown = [c for c in ("accuracy", "balanced_accuracy", "auc", "f1") if c in columns]
    if shown and main_rows:
        fig = Figure(figsize=(7, 3.6))
        ax = fig.subplots()
        width = 0.8 / len(main_rows)
        for i, (label, r) in enumerate(main_rows):
            values = [r.get(c, math.nan) for c in shown]
            ax.bar(np.arange(len(shown)) + i * width, values, width, label=label)
        ax.set_xticks(np.arange(len(shown)) + width * (len(main_rows) - 1) / 2, shown)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title("test split", fontsize=10)
        fig.tight_layout()
        out += embed_figure(fig, "federated vs centralized vs local-only")
    return out + _calibration_note(final.get("calibration")) + note(
        "All models are scored on the same common test split.")


def _calibration_note(outcome: Any) -> str:
    """Say what the classifier calibration after the last round did (if the run asked)."""
    if not isinstance(outcome, dict):
        return ""
    declined = outcome.get("declined") or {}
    why = "; ".join(f"{site}: {reason}" for site, reason in sorted(declined.items()))
    if outcome.get("applied"):
        text = (f"Classifier calibration: the head was re-fitted on "
                f"{outcome.get('virtual_per_class')} virtual features per class from the "
                f"per-class feature statistics of {len(outcome.get('sites') or [])} site(s) "
                f"({outcome.get('images')} images).")
        noised = outcome.get("noised_sites") or {}
        if noised:
            levels = sorted(set(noised.values()))
            noise = (f"noise multiplier {levels[0]:g}" if len(levels) == 1 else
                     "noise multipliers " + ", ".join(f"{site}: {sigma:g}"
                                                      for site, sigma in sorted(noised.items())))
            clip = outcome.get("feature_clip_norm")
            bound = f"{clip:.3g}" if isinstance(clip, int | float) else "n/a"
            text += (f" {len(noised)} of them trained with local DP and sent Gaussian-noised "
                     f"statistics ({noise}; features clipped to {bound}), accounted in their "
                     "privacy ledgers.")
    else:
        text = f"Classifier calibration was not applied: {outcome.get('reason', '')}"
    return note(text + (f" Declined: {why}." if why else ""))
