"""``fl-report RUN_DIR``: one self-contained HTML report of a run (figures embedded as PNG).

Reads the run directory described in ``docs/run-directory.md`` and writes
``RUN_DIR/report.html``: configuration, per-site data, learning curves, ROC curves, confusion
matrix, metrics with bootstrap 95 % CIs, calibration, cross-site validation, per-site fairness,
privacy spend, a Grad-CAM gallery and federated vs centralized vs local-only. Every section
whose inputs are missing says "not available for this run" (with the reason) instead of
failing. The file has no external resources (no scripts, styles or images from elsewhere):
it can be e-mailed or archived as is.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve
from sklearn.preprocessing import label_binarize
from torch import nn

from consilia.common.evaluation.clinical import (
    METRIC_NAMES,
    cross_site_matrix,
    eval_transform_for,
    expected_calibration_error,
    generalisation_gap,
    macro_auc,
    metrics_with_ci,
    plot_heatmap,
    plot_reliability,
    predict_proba,
    sensitivity_at_specificity,
    site_spread,
    to_matrix,
)
from consilia.common.evaluation.explain import Explainer, overlay_image
from consilia.common.rundir.round_records import read_round_records
from consilia.common.serde import load_checkpoint

__all__ = ["REPORT_SECTIONS", "build_report", "main"]

log = logging.getLogger("consilia.report")

NOT_AVAILABLE = "not available for this run"

#: (id, title) of every section, in report order.
REPORT_SECTIONS: tuple[tuple[str, str], ...] = (
    ("config", "Run configuration"),
    ("sites", "Per-site data"),
    ("learning-curves", "Learning curves"),
    ("comparison", "Federated vs centralized vs local-only"),
    ("metrics-ci", "Test metrics with bootstrap 95% confidence intervals"),
    ("roc", "ROC curves"),
    ("confusion", "Confusion matrix"),
    ("calibration", "Calibration"),
    ("cross-site", "Cross-site validation"),
    ("fairness", "Per-site fairness"),
    ("privacy", "Privacy spend"),
    ("gradcam", "Grad-CAM gallery"),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #345;padding-bottom:.2em}
h2{margin-top:2em;border-bottom:1px solid #ccc;color:#234}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#eef2f6}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em;max-height:30em}
.na{color:#888;font-style:italic}.note{color:#555;font-size:.9em}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}
.gallery figure{margin:0;text-align:center;font-size:.8em;width:170px}
nav ul{columns:2;font-size:.95em}
"""


class Unavailable(Exception):  # noqa: N818 - a section state, not an error
    """A report section whose inputs are missing; the message says which."""


# ---------------------------------------------------------------------------------------
# Small helpers: reading the run directory, HTML fragments
# ---------------------------------------------------------------------------------------


class RunDir:
    """Lazy, cached access to the files of one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cache: dict[str, Any] = {}

    def file(self, rel: str) -> Path:
        """Return ``path / rel``; raise :class:`Unavailable` when it does not exist."""
        target = self.path / rel
        if not target.exists():
            raise Unavailable(f"{rel} not found")
        return target

    def json(self, rel: str) -> Any:
        """Parse a JSON file of the run (cached)."""
        key = f"json:{rel}"
        if key not in self._cache:
            self._cache[key] = json.loads(self.file(rel).read_text(encoding="utf-8"))
        return self._cache[key]

    def rounds(self) -> list[dict[str, Any]]:
        """Return one record per round of ``metrics/rounds.jsonl`` (late evaluations merged)."""
        if "rounds" not in self._cache:
            records = read_round_records(self.file("metrics/rounds.jsonl"))
            if not records:
                raise Unavailable("metrics/rounds.jsonl is empty")
            self._cache["rounds"] = sorted(records, key=lambda r: r.get("round", 0))
        return self._cache["rounds"]

    def class_names(self) -> list[str]:
        """Return the class names: ``task.json``, else the global model, else ``class k``."""
        if "class_names" not in self._cache:
            try:
                names = list(self.json("task.json")["class_names"])
            except (Unavailable, KeyError, TypeError):
                try:
                    names = list(self.checkpoint("global_model.pt")[1].task.class_names)
                except (Unavailable, AttributeError):
                    width = next(iter(self.predictions().values()))[1].shape[1]
                    names = [f"class {k}" for k in range(width)]
            self._cache["class_names"] = names
        return self._cache["class_names"]

    def predictions(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Return ``{model: (y_true, y_prob)}`` from ``predictions/*.npz`` (federated first)."""
        if "predictions" not in self._cache:
            folder = self.path / "predictions"
            found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
                with np.load(path) as data:
                    if {"y_true", "y_prob"} <= set(data.files):
                        found[path.stem] = (data["y_true"].astype(np.int64),
                                            data["y_prob"].astype(np.float64))
            if not found:
                raise Unavailable("no predictions/*.npz with y_true and y_prob")
            self._cache["predictions"] = dict(sorted(found.items(), key=lambda kv: _order(kv[0])))
        return self._cache["predictions"]

    def checkpoint(self, rel: str) -> tuple[nn.Module, Any, dict[str, Any]]:
        """Load a checkpoint of the run (cached)."""
        key = f"ckpt:{rel}"
        if key not in self._cache:
            self._cache[key] = load_checkpoint(self.file(rel))
        return self._cache[key]


def _order(model_name: str) -> tuple[int, str]:
    rank = {"federated": 0, "global": 0, "centralized": 1}.get(model_name, 2)
    return rank, model_name


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return f'<img src="{_png_uri(buffer.getvalue())}" alt="{_esc(alt)}">'


def _picture(rgb: np.ndarray, alt: str, width: int = 160) -> str:
    picture = Image.fromarray(rgb)
    if picture.width < width:
        factor = max(1, round(width / picture.width))
        picture = picture.resize((picture.width * factor, picture.height * factor),
                                 Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return f'<img src="{_png_uri(buffer.getvalue())}" alt="{_esc(alt)}">'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


# ---------------------------------------------------------------------------------------
# Sections (each returns an HTML fragment or raises Unavailable)
# ---------------------------------------------------------------------------------------


def _section_config(run: RunDir, ctx: dict[str, Any]) -> str:
    parts = []
    config = run.path / "config.yaml"
    if config.is_file():
        parts.append("<h3>config.yaml</h3><pre>"
                     + _esc(config.read_text(encoding="utf-8")) + "</pre>")
    for name in ("task.json", "environment.json"):
        try:
            data = run.json(name)
        except (Unavailable, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            rows = [(k, json.dumps(v) if isinstance(v, dict | list) else v)
                    for k, v in data.items()]
            parts.append(f"<h3>{_esc(name)}</h3>" + _table(("key", "value"), rows))
    checkpoints = sorted((run.path / "checkpoints").glob("round-*.pt"))
    if checkpoints:
        parts.append(_note(f"{len(checkpoints)} round checkpoint(s) in checkpoints/"))
    if not parts:
        raise Unavailable("config.yaml, task.json and environment.json not found")
    return "".join(parts)


def _section_sites(run: RunDir, ctx: dict[str, Any]) -> str:
    frame = pd.read_csv(run.file("partition.csv"))
    return frame.to_html(index=False, border=0, na_rep="", escape=True)


def _series(rounds: list[dict[str, Any]], group: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in rounds:
        value = (record.get(group) or {}).get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(int(record.get("round", len(xs))))
            ys.append(float(value))
    return xs, ys


def _section_learning_curves(run: RunDir, ctx: dict[str, Any]) -> str:
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
            xs, ys = [], []
            for record in rounds:
                value = ((record.get("sites") or {}).get(site) or {}).get("accuracy")
                if isinstance(value, int | float):
                    xs.append(record.get("round"))
                    ys.append(value)
            if xs:
                ax_site.plot(xs, ys, "o-", ms=3, label=site)
        ax_site.set_title("site validation accuracy")
        ax_site.set_xlabel("round")
        ax_site.grid(alpha=0.3)
        if ax_site.lines:
            ax_site.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    last = rounds[-1]
    summary = _note(f"{len(rounds)} round record(s); last round {last.get('round')} after "
                    f"{_fmt(last.get('elapsed_s'), 1)} s")
    return _figure(fig, "learning curves") + summary


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if p.shape[1] == 2:
        fpr, tpr, _ = roc_curve(y, p[:, 1])
    else:  # micro-average over one-vs-rest problems
        onehot = label_binarize(y, classes=list(range(p.shape[1])))
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
    return fpr, tpr


def _section_roc(run: RunDir, ctx: dict[str, Any]) -> str:
    preds = run.predictions()
    names = run.class_names()
    multi = len(names) > 2
    fig = Figure(figsize=(10 if multi else 5.2, 4.6))
    axes = fig.subplots(1, 2 if multi else 1)
    ax = axes[0] if multi else axes
    for name, (y, p) in preds.items():
        fpr, tpr = _roc_points(y, p)
        local = name.startswith("local-")
        ax.plot(fpr, tpr, lw=0.8 if local else 2, alpha=0.5 if local else 1,
                label=f"{name} (AUC {_fmt(macro_auc(y, p))})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    title = "micro-averaged one-vs-rest ROC" if multi else f"ROC, positive class: {names[1]}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    if multi:
        first = next(iter(preds))
        y, p = preds[first]
        for k, cls in enumerate(names):
            if 0 < (y == k).sum() < len(y):
                fpr, tpr, _ = roc_curve(y == k, p[:, k])
                axes[1].plot(fpr, tpr, label=f"{cls} (AUC {_fmt(macro_auc(y == k, p[:, k]))})")
        axes[1].plot([0, 1], [0, 1], ":", color="grey")
        axes[1].set_title(f"{first}: one-vs-rest per class", fontsize=10)
        axes[1].set_xlabel("false positive rate")
        axes[1].legend(fontsize=7, loc="lower right")
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    legend_note = ("AUC in the legend: macro one-vs-rest (as in the metric tables)."
                   if multi else "")
    return _figure(fig, "ROC curves") + (_note(legend_note) if legend_note else "")


def _section_confusion(run: RunDir, ctx: dict[str, Any]) -> str:
    preds = run.predictions()
    names = run.class_names()
    model = next(iter(preds))
    y, p = preds[model]
    labels = list(range(len(names)))
    size = 2.0 + 0.7 * len(names)
    fig = Figure(figsize=(2 * size + 1, size))
    axes = fig.subplots(1, 2)
    for ax, normalize, title in ((axes[0], None, "counts"),
                                 (axes[1], "true", "row-normalised (recall)")):
        ConfusionMatrixDisplay.from_predictions(
            y, p.argmax(axis=1), labels=labels, display_labels=names, normalize=normalize,
            ax=ax, colorbar=False, cmap="Blues", values_format=None if normalize is None else ".2f",
            xticks_rotation=45,
        )
        ax.set_title(f"{model}: {title}", fontsize=10)
    fig.tight_layout()
    return _figure(fig, f"confusion matrix of {model}") + _note(
        f"{model} model on the test split ({len(y)} cases); rows = true class."
    )


def _section_metrics_ci(run: RunDir, ctx: dict[str, Any]) -> str:
    preds = run.predictions()
    names = run.class_names()
    n_boot, seed = ctx["n_boot"], ctx["seed"]
    rows = []
    for model, (y, p) in preds.items():
        result = metrics_with_ci(y, p, names, n_boot=n_boot, seed=seed)
        row: list[Any] = [model, len(y)]
        for metric in METRIC_NAMES:
            r = result[metric]
            row.append(f"{_fmt(r['value'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
        rows.append(row)
    out = _table(("model", "n", *METRIC_NAMES), rows)
    out += _note(f"Percentile bootstrap, {n_boot} class-stratified resamples of the test cases "
                 f"(seed {seed}). Binary tasks: positive class = {names[1]!r}; multi-class: "
                 "macro averages over the classes present.")
    if len(names) == 2:
        op_rows = []
        for model, (y, p) in preds.items():
            row = [model]
            for spec in (0.90, 0.95):
                sens, threshold = sensitivity_at_specificity(y, p[:, 1], spec)
                row += [sens, threshold]
            op_rows.append(row)
        out += "<h3>Operating points</h3>" + _table(
            ("model", "sensitivity @ 90% spec.", "threshold", "sensitivity @ 95% spec.",
             "threshold"), op_rows)
        out += _note("Thresholds are on P(positive), chosen on the test split itself: "
                     "re-validate them on independent data before clinical use.")
    return out


def _section_calibration(run: RunDir, ctx: dict[str, Any]) -> str:
    preds = run.predictions()
    rows = [(m, expected_calibration_error(y, p, n_bins=15)) for m, (y, p) in preds.items()]
    shown = [m for m in preds if not m.startswith("local-")][:2] or list(preds)[:1]
    fig = Figure(figsize=(4.8 * len(shown), 4.3))
    axes = np.atleast_1d(fig.subplots(1, len(shown)))
    for ax, model in zip(axes, shown, strict=True):
        y, p = preds[model]
        plot_reliability(y, p, n_bins=10, label=model, ax=ax)
        ax.set_title(model, fontsize=10)
    fig.tight_layout()
    return (_table(("model", "ECE (15 bins, top-label)"), rows)
            + _figure(fig, "reliability diagrams"))


def _load_site_val(run: RunDir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    sites = {}
    for path in sorted((run.path / "sites").glob("*.npz")):
        with np.load(path) as data:
            if {"val_images", "val_labels"} <= set(data.files) and len(data["val_labels"]):
                sites[path.stem] = (data["val_images"], data["val_labels"].astype(np.int64))
    if not sites:
        raise Unavailable("no sites/*.npz with validation data")
    return sites


def _cross_site(run: RunDir, ctx: dict[str, Any]) -> pd.DataFrame:
    if "cross_site" not in ctx:
        sites = _load_site_val(run)
        global_model, global_run, _ = run.checkpoint("global_model.pt")
        models: dict[str, nn.Module] = {"global": global_model}
        for path in sorted((run.path / "models").glob("local-*.pt")):
            models[path.stem] = run.checkpoint(f"models/{path.name}")[0]
        ctx["cross_site"] = cross_site_matrix(
            models, sites, batch_size=ctx["batch_size"], transform=eval_transform_for(global_run)
        )
    return ctx["cross_site"]


def _section_cross_site(run: RunDir, ctx: dict[str, Any]) -> str:
    frame = _cross_site(run, ctx)
    out = ""
    for metric in ("auc", "accuracy"):
        matrix = to_matrix(frame, metric)
        title = "AUC" if metric == "auc" else metric
        out += _figure(plot_heatmap(matrix, title=title, vmin=0.0, vmax=1.0),
                       f"cross-site {metric}")
    gap = generalisation_gap(frame, "auc")
    rows = [[site, *[gap.at[site, c] for c in gap.columns]] for site in gap.index]
    out += "<h3>Generalisation gaps (AUC)</h3>" + _table(("site", *gap.columns), rows)
    n_local = sum(1 for m in frame["model"].unique() if m.startswith("local-"))
    out += _note("local_gap = a site's local model on its own data minus its mean on the other "
                 "sites; global_minus_local > 0 means the federated model beats the site's own "
                 f"model on that site's data. {n_local} local model(s) found in models/.")
    return out


def _spread_rows(spread: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [[metric, s["best_site"], s["best"], s["worst_site"], s["worst"], s["gap"], s["std"],
             s["n_sites"]] for metric, s in spread.items()]


_SPREAD_HEADER = ("metric", "best site", "best", "worst site", "worst", "gap", "std", "sites")


def _section_fairness(run: RunDir, ctx: dict[str, Any]) -> str:
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
                    + _table(_SPREAD_HEADER, _spread_rows(spread)))
    except Unavailable:
        pass
    try:
        frame = _cross_site(run, ctx)
        glob = frame[frame["model"] == "global"].set_index("site")
        spread = site_spread({s: {"auc": glob.at[s, "auc"], "accuracy": glob.at[s, "accuracy"]}
                              for s in glob.index})
        out += ("<h3>Global model on each site's validation data (recomputed)</h3>"
                + _table(_SPREAD_HEADER, _spread_rows(spread)))
    except Unavailable:
        pass
    try:
        local = run.json("final_metrics.json").get("local_only") or {}
        per_site = {s: _scalars(m) for s, m in local.items() if s != "mean" and isinstance(m, dict)}
        spread = site_spread(per_site)
        if spread:
            out += ("<h3>Local-only models on the common test split</h3>"
                    + _table(_SPREAD_HEADER, _spread_rows(spread)))
    except Unavailable:
        pass
    if not out:
        raise Unavailable("no per-site metrics (rounds.jsonl sites, sites/*.npz or local-only "
                          "baselines)")
    return out + _note("Subgroup (sex/age) analysis needs patient metadata, which the test "
                       "split of the run directory does not carry; use "
                       "consilia.common.evaluation.clinical.subgroup_metrics with DICOM tags.")


def _section_privacy(run: RunDir, ctx: dict[str, Any]) -> str:
    parts = [fragment for fragment in (_privacy_local(run), _privacy_central(run),
                                       _privacy_audit(run)) if fragment]
    if not parts:
        raise Unavailable("no site reported an epsilon, no central DP record and no "
                          "privacy_audit.json (differential privacy was off, no audit run)")
    return "".join(parts)


def _privacy_local(run: RunDir) -> str:
    """Local DP-SGD: each site's cumulative (sample-level) epsilon per round."""
    try:
        rounds = run.rounds()
    except Unavailable:
        return ""
    sites = sorted({s for r in rounds for s, v in (r.get("sites") or {}).items()
                    if isinstance(v, dict) and v.get("epsilon") is not None})
    if not sites:
        return ""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    final_rows = []
    for site in sites:
        xs, ys, delta = [], [], None
        for record in rounds:
            values = (record.get("sites") or {}).get(site) or {}
            if values.get("epsilon") is not None:
                xs.append(record.get("round"))
                ys.append(float(values["epsilon"]))
                delta = values.get("delta", delta)
        ax.plot(xs, ys, "o-", ms=3, label=site)
        final_rows.append([site, ys[-1], delta, xs[-1]])
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("privacy spend per site")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = ("<h3>Local DP-SGD (sample level: each patient's images, per site)</h3>"
           + _table(("site", "epsilon (total so far)", "delta", "last round"), final_rows))
    accountant = _config_value(run, "dp", "accountant")
    if accountant:
        out += _note(f"Accountant: {accountant} (the same history gives different epsilon "
                     "values under different accountants).")
    return out + _figure(fig, "privacy spend per site")


def _privacy_central(run: RunDir) -> str:
    """Central DP: the coordinator's client-level epsilon per round (``central_dp`` records)."""
    try:
        rounds = run.rounds()
    except Unavailable:
        return ""
    rows = [[r.get("round"), c.get("client-level-epsilon"), c.get("delta"),
             c.get("effective-noise-multiplier"), c.get("clipping-norm"),
             c.get("sites-aggregated")]
            for r in rounds if isinstance(c := r.get("central_dp"), dict)]
    if not rows:
        return ""
    return ("<h3>Central DP (client level: a whole site's contribution)</h3>"
            + _table(("round", "client-level epsilon", "delta", "effective noise multiplier",
                      "clipping norm", "sites aggregated"), rows)
            + _note("Central DP clips each site's update and adds noise to the aggregate: it "
                    "hides whether a site took part, not individual patients from the "
                    "coordinator, which sees each site's clipped update. Epsilon: RDP, one "
                    "Gaussian release per round, no subsampling amplification; n/a = no "
                    "noise."))


def _privacy_audit(run: RunDir) -> str:
    """Membership-inference audit of the final model (``privacy_audit.json``)."""
    try:
        audit = run.json("privacy_audit.json")
    except Unavailable:
        return ""
    if not isinstance(audit, dict):
        return ""
    rows = [["loss threshold", audit.get("loss_auc"), audit.get("loss_tpr_at_1pct_fpr")]]
    if audit.get("lira_auc") is not None:
        rows.append([f"LiRA ({audit.get('shadows')} shadow models)", audit.get("lira_auc"),
                     audit.get("lira_tpr_at_1pct_fpr")])
    notes = "; ".join(str(n) for n in audit.get("notes") or [])
    return ("<h3>Membership-inference audit of the final global model</h3>"
            + _table(("attack", "attack AUC (0.5 = chance)", "TPR at 1% FPR"), rows)
            + _note(f"DP: {audit.get('dp')}; epsilon spent: {_fmt(audit.get('spent_epsilon'))}; "
                    f"{audit.get('members')} members vs {audit.get('non_members')} "
                    f"non-members. {notes}"))


def _section_gradcam(run: RunDir, ctx: dict[str, Any]) -> str:
    with np.load(run.file("test_set.npz")) as data:
        if not {"images", "labels"} <= set(data.files):
            raise Unavailable("test_set.npz lacks images/labels")
        images, labels = data["images"], data["labels"].astype(np.int64)
    model, model_run, _ = run.checkpoint("global_model.pt")
    names = run.class_names()
    transform = eval_transform_for(model_run)
    prob = predict_proba(model, images, batch_size=ctx["batch_size"], transform=transform)
    pred = prob.argmax(axis=1)
    conf = prob.max(axis=1)
    rng = np.random.default_rng(ctx["seed"])
    k = ctx["gallery"]
    correct = np.flatnonzero(pred == labels)
    wrong = np.flatnonzero(pred != labels)
    picks = {
        "correct": rng.choice(correct, size=min(k, len(correct)), replace=False)
        if len(correct) else np.array([], dtype=int),
        "incorrect": wrong[np.argsort(-conf[wrong])][:k],  # most confident mistakes first
    }
    explainer = Explainer(model)
    out = _note(f"Global model on the test split: {len(correct)} correct, {len(wrong)} "
                f"incorrect. Map: {explainer.method} (target layer "
                f"{explainer.target_layer or 'n/a'}) for the predicted class; red = evidence.")
    for title, indices in picks.items():
        out += f"<h3>{_esc(title)} predictions</h3>"
        if not len(indices):
            out += f'<p class="na">no {title} predictions</p>'
            continue
        figures = []
        for i in indices:
            raw = _as_float(images[i])
            x = transform(raw) if transform is not None else raw
            heat = explainer(x, int(pred[i]))
            display = _resize_like(raw, heat.shape)
            caption = (f"true {names[labels[i]]}, predicted {names[pred[i]]} "
                       f"(p={conf[i]:.2f}); case {i}")
            figures.append(
                "<figure>" + _picture(overlay_image(display, heat), caption)
                + f"<figcaption>{_esc(caption)}</figcaption></figure>"
            )
        out += '<div class="gallery">' + "".join(figures) + "</div>"
    return out


def _as_float(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(C, H, W)`` -> float tensor in [0, 1] (the model's raw input scale)."""
    return torch.from_numpy(np.ascontiguousarray(image)).float() / 255.0


def _resize_like(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(raw.shape[-2:]) == tuple(shape):
        return raw
    return torch.nn.functional.interpolate(raw[None], size=tuple(shape), mode="bilinear",
                                           antialias=True, align_corners=False)[0]


_PREFERRED = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity")
#: ``ClassificationMetrics.to_dict()`` stores the headline F1 as ``macro_f1``.
_ALIASES = {"f1": ("f1", "macro_f1")}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Headline scalars of a ``ClassificationMetrics.to_dict()`` (None -> NaN)."""
    out: dict[str, float] = {}
    for key in _PREFERRED:
        for alias in _ALIASES.get(key, (key,)):
            value = metrics.get(alias, "missing")
            if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
                out[key] = math.nan if value is None else float(value)
                break
    return out


def _section_comparison(run: RunDir, ctx: dict[str, Any]) -> str:
    final = run.json("final_metrics.json")
    rows: list[tuple[str, dict[str, float], bool]] = []  # (label, metrics, per-site row)
    for key, label in (("federated", "federated (global model)"),
                       ("federated_before_calibration",
                        "federated, last round before classifier calibration"),
                       ("centralized", "centralized")):
        if isinstance(final.get(key), dict):
            rows.append((label, _scalars(final[key]), False))
    local = final.get("local_only") or {}
    if isinstance(local.get("mean"), dict):
        rows.append(("local-only (mean of sites)", _scalars(local["mean"]), False))
    for site, metrics in sorted(local.items()):
        if site != "mean" and isinstance(metrics, dict):
            rows.append((f"local-only {site}", _scalars(metrics), True))
    if not rows:
        raise Unavailable("final_metrics.json has no federated/centralized/local_only entries")
    columns = [c for c in _PREFERRED if any(c in r for _, r, _ in rows)]
    out = _table(("model", *columns), [[label, *[r.get(c) for c in columns]]
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
        out += _figure(fig, "federated vs centralized vs local-only")
    return out + _calibration_note(final.get("calibration")) + _note(
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
    return _note(text + (f" Declined: {why}." if why else ""))


_SECTIONS: dict[str, Callable[[RunDir, dict[str, Any]], str]] = {
    "config": _section_config,
    "sites": _section_sites,
    "learning-curves": _section_learning_curves,
    "comparison": _section_comparison,
    "metrics-ci": _section_metrics_ci,
    "roc": _section_roc,
    "confusion": _section_confusion,
    "calibration": _section_calibration,
    "cross-site": _section_cross_site,
    "fairness": _section_fairness,
    "privacy": _section_privacy,
    "gradcam": _section_gradcam,
}


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def build_report(
    run_dir: Path,
    out: Path | None = None,
    n_boot: int = 1000,
    gallery: int = 6,
    seed: int = 0,
    batch_size: int = 256,
) -> Path:
    """Write the self-contained HTML report of a run.

    Parameters
    ----------
    run_dir : Path
        A run directory (``docs/run-directory.md``).
    out : Path, optional
        Output file; default ``run_dir / "report.html"``.
    n_boot : int
        Bootstrap resamples for the confidence intervals.
    gallery : int
        Grad-CAM cases per group (correct / incorrect).
    seed : int
        Seed of the bootstrap and of the gallery's choice of correct cases.
    batch_size : int
        Inference batch size (cross-site validation, gallery).

    Returns
    -------
    Path
        The written HTML file.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` is not a directory. Missing files inside it never raise: the
        affected sections say "not available for this run".

    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    out = Path(out) if out is not None else run_dir / "report.html"
    run = RunDir(run_dir)
    ctx: dict[str, Any] = {"n_boot": n_boot, "gallery": gallery, "seed": seed,
                           "batch_size": batch_size}
    body = []
    status: dict[str, str] = {}
    for section_id, title in REPORT_SECTIONS:
        started = time.perf_counter()
        try:
            content = _SECTIONS[section_id](run, ctx)
            status[section_id] = "ok"
        except Unavailable as exc:
            content = f'<p class="na">{NOT_AVAILABLE} ({_esc(exc)})</p>'
            status[section_id] = "n/a"
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the report
            log.warning("report section %r failed", section_id, exc_info=True)
            content = (f'<p class="na">{NOT_AVAILABLE} (error while building it: '
                       f"{_esc(type(exc).__name__)}: {_esc(exc)})</p>")
            status[section_id] = "error"
        log.debug("section %s: %s in %.2f s", section_id, status[section_id],
                  time.perf_counter() - started)
        body.append(f'<section id="{section_id}"><h2>{_esc(title)}</h2>{content}</section>')
    nav = "".join(
        f'<li><a href="#{sid}">{_esc(title)}</a>'
        + ("" if status[sid] == "ok" else ' <span class="na">(n/a)</span>') + "</li>"
        for sid, title in REPORT_SECTIONS
    )
    name = _run_name(run)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Consilia report: {_esc(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Consilia run report: {_esc(name)}</h1>"
        + _note(f"Run directory: {run_dir.resolve()} — generated "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        + f"<nav><ul>{nav}</ul></nav>" + "".join(body) + "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def _config_value(run: RunDir, *keys: str) -> Any:
    """Return a value of ``config.yaml`` (``None`` when the file or key is missing)."""
    try:
        node: Any = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _run_name(run: RunDir) -> str:
    name = _config_value(run, "name")
    return str(name) if name else run.path.name


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fl-report``; return the exit code (0 ok, 2 bad arguments)."""
    parser = argparse.ArgumentParser(
        prog="fl-report",
        description="Write RUN_DIR/report.html: one self-contained HTML report of a run.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report.html")
    parser.add_argument("--n-boot", type=int, default=1000,
                        help="bootstrap resamples for the CIs (default 1000)")
    parser.add_argument("--gallery", type=int, default=6,
                        help="Grad-CAM cases per group, correct/incorrect (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    if args.n_boot < 1 or args.gallery < 0:
        print("fl-report: --n-boot must be >= 1 and --gallery >= 0", file=sys.stderr)
        return 2
    try:
        path = build_report(args.run_dir, args.out, n_boot=args.n_boot, gallery=args.gallery,
                            seed=args.seed)
    except FileNotFoundError as exc:
        print(f"fl-report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
