"""Report sections about the run itself: configuration, per-site data, learning curves."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from consilia.common.analysis.report.context import ReportContext
from consilia.common.analysis.report.html import embed_figure, esc, fmt, note, table
from consilia.common.analysis.report.run_files import RunFiles, Unavailable

__all__ = ["section_config", "section_learning_curves", "section_sites"]


def section_config(run: RunFiles, ctx: ReportContext) -> str:
    """Show config.yaml, task.json, environment.json and the number of round checkpoints."""
    parts = []
    config = run.layout.config_path
    if config.is_file():
        parts.append("<h3>config.yaml</h3><pre>"
                     + esc(config.read_text(encoding="utf-8")) + "</pre>")
    for name in ("task.json", "environment.json"):
        try:
            data = run.json(name)
        except (Unavailable, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            rows = [(k, json.dumps(v) if isinstance(v, dict | list) else v)
                    for k, v in data.items()]
            parts.append(f"<h3>{esc(name)}</h3>" + table(("key", "value"), rows))
    checkpoints = run.layout.round_checkpoints()
    if checkpoints:
        parts.append(note(f"{len(checkpoints)} round checkpoint(s) in checkpoints/"))
    if not parts:
        raise Unavailable("config.yaml, task.json and environment.json not found")
    return "".join(parts)


def section_sites(run: RunFiles, ctx: ReportContext) -> str:
    """Show the per-site data table (``partition.csv``)."""
    frame = pd.read_csv(run.file("partition.csv"))
    return frame.to_html(index=False, border=0, na_rep="", escape=True)


def _series(rounds: list[dict[str, Any]], group: str, key: str) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for record in rounds:
        value = (record.get(group) or {}).get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(int(record.get("round", len(xs))))
            ys.append(float(value))
    return xs, ys


def section_learning_curves(run: RunFiles, ctx: ReportContext) -> str:
    """Plot loss and score per round (test, site validation) and each site's accuracy."""
    rounds = run.rounds()
    sites = sorted({s for r in rounds for s in (r.get("sites") or {})})
    fig = Figure(figsize=(13 if sites else 9, 3.8))
    axes = fig.subplots(1, 3 if sites else 2)
    ax_loss, ax_score = axes[0], axes[1]
    for group, key, label in (("train", "train-loss", "train loss (sites, weighted)"),
                              ("federated_eval", "eval-loss", "site validation loss"),
                              ("server_eval", "loss", "test loss (global model)")):
        xs, ys = _series(rounds, group, key)
        if xs:
            ax_loss.plot(xs, ys, "o-", ms=3, label=label)
    for group, key, label in (("server_eval", "auc", "test AUC"),
                              ("server_eval", "accuracy", "test accuracy"),
                              ("server_eval", "balanced_accuracy", "test balanced accuracy"),
                              ("federated_eval", "accuracy", "site-val accuracy"),
                              ("federated_eval", "auc", "site-val AUC")):
        xs, ys = _series(rounds, group, key)
        if xs:
            ax_score.plot(xs, ys, "o-", ms=3, label=label)
    if not ax_loss.lines and not ax_score.lines:
        raise Unavailable("metrics/rounds.jsonl holds no loss or score series")
    for ax, title in ((ax_loss, "loss"), (ax_score, "global model quality")):
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if sites:
        ax_site = axes[2]
        for site in sites:
            site_rounds: list[Any] = []
            accuracies: list[float] = []
            for record in rounds:
                value = ((record.get("sites") or {}).get(site) or {}).get("accuracy")
                if isinstance(value, int | float):
                    site_rounds.append(record.get("round"))
                    accuracies.append(value)
            if site_rounds:
                ax_site.plot(site_rounds, accuracies, "o-", ms=3, label=site)
        ax_site.set_title("site validation accuracy")
        ax_site.set_xlabel("round")
        ax_site.grid(alpha=0.3)
        if ax_site.lines:
            ax_site.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    last = rounds[-1]
    summary = note(f"{len(rounds)} round record(s); last round {last.get('round')} after "
                    f"{fmt(last.get('elapsed_s'), 1)} s")
    return embed_figure(fig, "learning curves") + summary
