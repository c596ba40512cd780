"""Cross-site validation: every model on every site's data, the matrix, its gaps and heatmap."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from consilia.common.data.transforms import ImageTransform
from consilia.common.evaluation.metrics import check_labels_probs, point_metrics
from consilia.common.training.inference import predict_proba

__all__ = ["cross_site_matrix", "generalisation_gap", "plot_heatmap", "to_matrix"]


def cross_site_matrix(
    models: Mapping[str, nn.Module],
    site_data: Mapping[str, tuple[Any, Any]],
    batch_size: int = 256,
    transform: ImageTransform | None = None,
) -> pd.DataFrame:
    """Evaluate every model on every site's data (cross-site validation).

    Parameters
    ----------
    models : mapping of str to nn.Module
        E.g. ``{"global": g, "local-site-00": m0, "local-site-01": m1}``.
    site_data : mapping of str to (images, labels)
        Each site's held-out data: ``uint8 (N, C, H, W)`` images and ``(N,)`` labels.
    batch_size : int
        Inference batch size.
    transform : callable, optional
        Per-image eval transform (see :func:`predict_proba`).

    Returns
    -------
    pandas.DataFrame
        Tidy frame with columns ``model, site, n, auc, accuracy`` (one row per pair); use
        :func:`to_matrix` for a model x site matrix of one metric.

    """
    if not models or not site_data:
        raise ValueError("cross_site_matrix needs at least one model and one site")
    rows = []
    for site, (images, labels) in site_data.items():
        labels = np.asarray(labels).reshape(-1)
        for name, model in models.items():
            prob = predict_proba(model, images, batch_size=batch_size, transform=transform)
            y, p = check_labels_probs(labels, prob)
            metrics = point_metrics(y, p)
            rows.append({"model": name, "site": site, "n": len(y),
                         "auc": metrics["auc"], "accuracy": metrics["accuracy"]})
    return pd.DataFrame(rows, columns=["model", "site", "n", "auc", "accuracy"])


def to_matrix(frame: pd.DataFrame, metric: str = "auc") -> pd.DataFrame:
    """Pivot a tidy :func:`cross_site_matrix` frame to models (rows) x sites (columns)."""
    if metric not in frame.columns:
        raise ValueError(f"metric {metric!r} not in the frame (columns: {list(frame.columns)})")
    order_models = list(dict.fromkeys(frame["model"]))
    order_sites = list(dict.fromkeys(frame["site"]))
    matrix = frame.pivot(index="model", columns="site", values=metric)
    return matrix.loc[order_models, order_sites]


def _local_row(matrix: pd.DataFrame, site: str) -> str | None:
    for candidate in (f"local-{site}", site):
        if candidate in matrix.index:
            return candidate
    return None


def generalisation_gap(
    matrix: pd.DataFrame, metric: str = "auc", global_name: str = "global"
) -> pd.DataFrame:
    """Per-site generalisation gaps from a cross-site matrix.

    Parameters
    ----------
    matrix : pandas.DataFrame
        Models x sites matrix (:func:`to_matrix`) or the tidy frame of
        :func:`cross_site_matrix` (then ``metric`` is pivoted). The local model of site ``s``
        is the row ``local-s`` (or ``s``).
    metric : str
        Metric to pivot when a tidy frame is given.
    global_name : str
        Row of the global (federated) model.

    Returns
    -------
    pandas.DataFrame
        Indexed by site, columns: ``local_own`` (local model on its own site),
        ``local_on_others`` (the same model's mean over the other sites), ``local_gap``
        (own - others; > 0 means it does not generalise), ``others_on_site`` (mean of the
        other sites' local models on this site), ``global`` (global model on this site) and
        ``global_minus_local`` (global - local_own; > 0 means federation helped this site).
        Missing models give NaN.

    """
    if {"model", "site"} <= set(matrix.columns):
        matrix = to_matrix(matrix, metric)
    sites = list(matrix.columns)
    rows = {}
    local_rows = {s: _local_row(matrix, s) for s in sites}
    for site in sites:
        own_row = local_rows[site]
        others = [s for s in sites if s != site]
        own = float(matrix.at[own_row, site]) if own_row else math.nan
        on_others = (
            float(np.nanmean([matrix.at[own_row, s] for s in others]))
            if own_row and others else math.nan
        )
        other_models = [local_rows[s] for s in others if local_rows[s]]
        others_on_site = (
            float(np.nanmean([matrix.at[r, site] for r in other_models]))
            if other_models else math.nan
        )
        glob = float(matrix.at[global_name, site]) if global_name in matrix.index else math.nan
        rows[site] = {
            "local_own": own,
            "local_on_others": on_others,
            "local_gap": own - on_others,
            "others_on_site": others_on_site,
            "global": glob,
            "global_minus_local": glob - own,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_heatmap(
    matrix: pd.DataFrame,
    title: str = "",
    fmt: str = ".3f",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Annotated heatmap of a models x sites matrix (:func:`to_matrix`)."""
    values = matrix.to_numpy(dtype=np.float64)
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(1.6 + 0.9 * n_cols, 1.2 + 0.5 * n_rows))
    ax = fig.subplots()
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_cols), [str(c) for c in matrix.columns], rotation=45, ha="right")
    ax.set_yticks(range(n_rows), [str(r) for r in matrix.index])
    ax.set_xlabel("evaluated on (site data)")
    ax.set_ylabel("model")
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            text = "n/a" if not np.isfinite(v) else format(v, fmt)
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(v) and v < middle else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
