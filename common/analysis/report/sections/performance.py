"""Report sections on the test split: metrics with CIs, ROC, confusion matrix, calibration."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve
from sklearn.preprocessing import label_binarize

from consilia.common.analysis.report.context import ReportContext
from consilia.common.analysis.report.html import embed_figure, fmt, note, table
from consilia.common.analysis.report.run_files import RunFiles
from consilia.common.evaluation.bootstrap import metrics_with_ci
from consilia.common.evaluation.metrics import METRIC_NAMES, macro_auc
from consilia.common.evaluation.operating_points import sensitivity_at_specificity
from consilia.common.evaluation.reliability import expected_calibration_error, plot_reliability

__all__ = ["section_calibration", "section_confusion", "section_metrics_ci", "section_roc"]


def section_metrics_ci(run: RunFiles, ctx: ReportContext) -> str:
    """Tabulate every model's metrics with bootstrap CIs (and operating points when binary)."""
    preds = run.predictions()
    names = run.class_names()
    n_boot, seed = ctx.n_boot, ctx.seed
    rows = []
    for model, (y, p) in preds.items():
        result = metrics_with_ci(y, p, names, n_boot=n_boot, seed=seed)
        row: list[Any] = [model, len(y)]
        for metric in METRIC_NAMES:
            r = result[metric]
            row.append(f"{fmt(r['value'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]")
        rows.append(row)
    out = table(("model", "n", *METRIC_NAMES), rows)
    out += note(f"Percentile bootstrap, {n_boot} class-stratified resamples of the test cases "
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
        out += "<h3>Operating points</h3>" + table(
            ("model", "sensitivity @ 90% spec.", "threshold", "sensitivity @ 95% spec.",
             "threshold"), op_rows)
        out += note("Thresholds are on P(positive), chosen on the test split itself: "
                     "re-validate them on independent data before clinical use.")
    return out


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if p.shape[1] == 2:
        fpr, tpr, _ = roc_curve(y, p[:, 1])
    else:  # micro-average over one-vs-rest problems
        onehot = label_binarize(y, classes=list(range(p.shape[1])))
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
    return fpr, tpr


def section_roc(run: RunFiles, ctx: ReportContext) -> str:
    """Plot the ROC curves of every model (micro-averaged when multi-class)."""
    preds = run.predictions()
    names = run.class_names()
    multi = len(names) > 2
    fig = Figure(figsize=(10 if multi else 5.2, 4.6))
    axes = fig.subplots(1, 2 if multi else 1, squeeze=False)[0]
    ax = axes[0]
    for name, (y, p) in preds.items():
        fpr, tpr = _roc_points(y, p)
        local = name.startswith("local-")
        ax.plot(fpr, tpr, lw=0.8 if local else 2, alpha=0.5 if local else 1,
                label=f"{name} (AUC {fmt(macro_auc(y, p))})")
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
                axes[1].plot(fpr, tpr, label=f"{cls} (AUC {fmt(macro_auc(y == k, p[:, k]))})")
        axes[1].plot([0, 1], [0, 1], ":", color="grey")
        axes[1].set_title(f"{first}: one-vs-rest per class", fontsize=10)
        axes[1].set_xlabel("false positive rate")
        axes[1].legend(fontsize=7, loc="lower right")
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    legend_note = ("AUC in the legend: macro one-vs-rest (as in the metric tables)."
                   if multi else "")
    return embed_figure(fig, "ROC curves") + (note(legend_note) if legend_note else "")


def section_confusion(run: RunFiles, ctx: ReportContext) -> str:
    """Plot the confusion matrices (counts, row-normalised) of the first model."""
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
    return embed_figure(fig, f"confusion matrix of {model}") + note(
        f"{model} model on the test split ({len(y)} cases); rows = true class."
    )


def section_calibration(run: RunFiles, ctx: ReportContext) -> str:
    """Tabulate the expected calibration error of every model and reliability diagrams."""
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
    return (table(("model", "ECE (15 bins, top-label)"), rows)
            + embed_figure(fig, "reliability diagrams"))
