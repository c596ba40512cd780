"""Report sections across hospitals: cross-site validation and per-site fairness."""

from __future__ import annotations

from typing import Any

import pandas as pd
from torch import nn

from consilia.common.analysis.report.context import ReportContext
from consilia.common.analysis.report.html import embed_figure, note, table
from consilia.common.analysis.report.run_files import RunFiles, Unavailable
from consilia.common.analysis.report.sections.comparison import headline_scalars
from consilia.common.evaluation.cross_site import (
    cross_site_matrix,
    generalisation_gap,
    plot_heatmap,
    to_matrix,
)
from consilia.common.evaluation.fairness import site_spread
from consilia.common.rundir.layout import GLOBAL_MODEL
from consilia.common.training.inference import eval_transform_for

__all__ = ["section_cross_site", "section_fairness"]


def _cross_site(run: RunFiles, ctx: ReportContext) -> pd.DataFrame:
    if ctx.cross_site is None:
        sites = run.site_validation()
        global_model, global_run, _ = run.global_model()
        models: dict[str, nn.Module] = {GLOBAL_MODEL: global_model}
        for path in run.layout.local_model_files():
            models[path.stem] = run.checkpoint(f"models/{path.name}")[0]
        ctx.cross_site = cross_site_matrix(
            models, sites, batch_size=ctx.batch_size, transform=eval_transform_for(global_run)
        )
    return ctx.cross_site


def section_cross_site(run: RunFiles, ctx: ReportContext) -> str:
    """Show the model x site AUC and accuracy matrices and the generalisation gaps."""
    frame = _cross_site(run, ctx)
    out = ""
    for metric in ("auc", "accuracy"):
        matrix = to_matrix(frame, metric)
        title = "AUC" if metric == "auc" else metric
        out += embed_figure(plot_heatmap(matrix, title=title, vmin=0.0, vmax=1.0),
                       f"cross-site {metric}")
    gap = generalisation_gap(frame, "auc")
    rows = [[site, *[gap.at[site, c] for c in gap.columns]] for site in gap.index]
    out += "<h3>Generalisation gaps (AUC)</h3>" + table(("site", *gap.columns), rows)
    n_local = sum(1 for m in frame["model"].unique() if m.startswith("local-"))
    out += note("local_gap = a site's local model on its own data minus its mean on the other "
                 "sites; global_minus_local > 0 means the federated model beats the site's own "
                 f"model on that site's data. {n_local} local model(s) found in models/.")
    return out


def _spread_rows(spread: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [[metric, s["best_site"], s["best"], s["worst_site"], s["worst"], s["gap"], s["std"],
             s["n_sites"]] for metric, s in spread.items()]


_SPREAD_HEADER = ("metric", "best site", "best", "worst site", "worst", "gap", "std", "sites")


def section_fairness(run: RunFiles, ctx: ReportContext) -> str:
    """Tabulate the best/worst site spread of the global and local-only models."""
    out = ""
    try:
        last_sites: dict[str, dict[str, float]] = {}
        for record in run.rounds():
            for site, values in (record.get("sites") or {}).items():
                last_sites[site] = {k: values.get(k) for k in ("accuracy", "auc", "eval-loss")
                                    if values.get(k) is not None} or last_sites.get(site, {})
        spread = site_spread(last_sites)
        if spread:
            out += ("<h3>Global model, site-reported validation metrics (last round)</h3>"
                    + table(_SPREAD_HEADER, _spread_rows(spread)))
    except Unavailable:
        pass
    try:
        frame = _cross_site(run, ctx)
        glob = frame[frame["model"] == GLOBAL_MODEL].set_index("site")
        spread = site_spread({s: {"auc": glob.at[s, "auc"], "accuracy": glob.at[s, "accuracy"]}
                              for s in glob.index})
        out += ("<h3>Global model on each site's validation data (recomputed)</h3>"
                + table(_SPREAD_HEADER, _spread_rows(spread)))
    except Unavailable:
        pass
    try:
        local = run.json("final_metrics.json").get("local_only") or {}
        per_site = {s: headline_scalars(m) for s, m in local.items()
                    if s != "mean" and isinstance(m, dict)}
        spread = site_spread(per_site)
        if spread:
            out += ("<h3>Local-only models on the common test split</h3>"
                    + table(_SPREAD_HEADER, _spread_rows(spread)))
    except Unavailable:
        pass
    if not out:
        raise Unavailable("no per-site metrics (rounds.jsonl sites, sites/*.npz or local-only "
                          "baselines)")
    return out + note("Subgroup (sex/age) analysis needs patient metadata, which the test "
                       "split of the run directory does not carry; use "
                       "consilia.common.evaluation.fairness.subgroup_metrics with DICOM tags.")
