"""Fairness: how a metric spreads across sites, and metrics per demographic subgroup."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from consilia.common.data.patient_age import age_years
from consilia.common.evaluation.metrics import METRIC_NAMES, check_labels_probs, point_metrics

__all__ = ["SubgroupReport", "site_spread", "subgroup_metrics"]


def _lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return "loss" in name or name in {"epsilon", "ece", "brier"}


def site_spread(per_site_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Spread of each metric across sites (the worst site is what fairness is about).

    Parameters
    ----------
    per_site_metrics : mapping
        ``{site: {metric: value}}``; NaN/None values are ignored.

    Returns
    -------
    dict
        ``{metric: {"worst_site", "worst", "best_site", "best", "gap", "mean", "std",
        "n_sites"}}``; for losses (names containing "loss", and ``epsilon``/``ece``) lower is
        better. ``gap = |best - worst|``; ``std`` is the population standard deviation.

    """
    metrics: dict[str, dict[str, float]] = {}
    for site, values in per_site_metrics.items():
        for metric, value in values.items():
            if value is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(float(value)):
                metrics.setdefault(metric, {})[site] = float(value)
    out: dict[str, dict[str, Any]] = {}
    for metric, by_site in metrics.items():
        lower = _lower_is_better(metric)
        best_site = (min if lower else max)(by_site, key=by_site.__getitem__)
        worst_site = (max if lower else min)(by_site, key=by_site.__getitem__)
        site_values = np.array(list(by_site.values()))
        out[metric] = {
            "worst_site": worst_site,
            "worst": by_site[worst_site],
            "best_site": best_site,
            "best": by_site[best_site],
            "gap": abs(by_site[best_site] - by_site[worst_site]),
            "mean": float(site_values.mean()),
            "std": float(site_values.std()),
            "n_sites": len(by_site),
        }
    return out


def _group_value(key: str, value: Any) -> str:
    if key == "PatientAge":
        years = age_years(value)
        if years is None:
            return "unknown"
        decade = int(years // 10) * 10
        return f"{decade}-{decade + 9}"
    if value is None or str(value).strip() == "":
        return "unknown"
    return str(value).strip().upper() if key == "PatientSex" else str(value).strip()


@dataclass
class SubgroupReport:
    """Per-subgroup metrics.

    Attributes
    ----------
    table : pandas.DataFrame
        Columns ``key, group, n`` and the metrics of :data:`METRIC_NAMES` (AUC is NaN for a
        group holding a single class).
    notes : list of str
        Why a key was skipped (e.g. the tag is absent from every record).

    """

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def subgroup_metrics(
    y_true: Any,
    y_prob: Any,
    meta: Sequence[Mapping[str, Any]],
    keys: Sequence[str] = ("PatientSex", "PatientAge"),
) -> SubgroupReport:
    """Metrics per demographic subgroup (DICOM tags), ages binned into decades.

    Parameters
    ----------
    y_true, y_prob
        Labels and probabilities of N cases.
    meta : sequence of mapping
        One record per case, e.g. ``{"PatientSex": "F", "PatientAge": "045Y"}``; cases
        without a tag fall into the group ``"unknown"``.
    keys : sequence of str
        Tags to group by; a tag absent from every record is skipped with a note.

    Returns
    -------
    SubgroupReport

    """
    y, p = check_labels_probs(y_true, y_prob)
    if len(meta) != len(y):
        raise ValueError(f"meta has {len(meta)} records but there are {len(y)} cases")
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for key in keys:
        if not any(key in record and record[key] not in (None, "") for record in meta):
            notes.append(f"{key}: not present in any record; subgroup analysis skipped")
            continue
        groups = np.array([_group_value(key, record.get(key)) for record in meta])
        for group in sorted(set(groups)):
            mask = groups == group
            values = point_metrics(y[mask], p[mask])
            rows.append({"key": key, "group": group, "n": int(mask.sum()), **values})
    table = pd.DataFrame(rows, columns=["key", "group", "n", *METRIC_NAMES])
    return SubgroupReport(table, notes)
