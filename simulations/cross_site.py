"""Cross-site validation and fairness across hospitals, written into every ``fl-sim`` run.

After the federation and the baselines, every model of the run (the global model, the
centralized baseline and each site's local-only model) is evaluated on every site's own
held-out validation split (``sites/site-XX.npz``, the data that site never trained on; read through
:class:`consilia.common.rundir.layout.RunDir`):

* ``cross_site.csv``: one row per (model, site) pair with ``n``, ``auc`` and ``accuracy``
  (:func:`consilia.common.evaluation.cross_site.cross_site_matrix`);
* ``plots/cross_site_heatmap.png``: the model x site AUC matrix;
* ``final_metrics.json["cross_site"]``: the AUC and accuracy matrices plus the generalisation
  gap per site (:func:`~consilia.common.evaluation.cross_site.generalisation_gap`);
* ``final_metrics.json["fairness"]``: worst site, best site, gap, mean and std across sites of
  the global model (and of each local model on its own site), from
  :func:`~consilia.common.evaluation.fairness.site_spread`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from consilia.common.evaluation.cross_site import (
    cross_site_matrix,
    generalisation_gap,
    plot_heatmap,
    to_matrix,
)
from consilia.common.evaluation.fairness import site_spread
from consilia.common.rundir.layout import GLOBAL_MODEL, RunDir
from consilia.common.training.inference import eval_transform_for

__all__ = ["cross_site_validation"]

logger = logging.getLogger("consilia")


def _clean(value: Any) -> Any:
    """NaN -> None, numpy scalars -> Python (strict JSON)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _frame_dict(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """``{row: {column: value}}`` with NaN as None."""
    return _clean({str(i): frame.loc[i].to_dict() for i in frame.index})


def cross_site_validation(run_dir: Path, batch_size: int = 256) -> dict[str, Any]:
    """Evaluate every model of a run on every site's validation data; write table and plot.

    Parameters
    ----------
    run_dir : Path
        An ``fl-sim`` run directory (``global_model.safetensors``, ``sites/``,
        optional ``models/``).
    batch_size : int
        Inference batch size.

    Returns
    -------
    dict
        ``{"cross_site": {"auc": {model: {site: v}}, "accuracy": {...}, "n": {site: n},
        "generalisation_gap": {site: {local_own, local_on_others, local_gap,
        others_on_site, global, global_minus_local}}}, "fairness": {"global": spread,
        "local_own": spread}}`` where ``spread`` is ``{metric: {worst_site, worst,
        best_site, best, gap, mean, std, n_sites}}``; ``{}`` when no site has validation
        data. Also writes ``run_dir/cross_site.csv`` and ``plots/cross_site_heatmap.png``.

    """
    run = RunDir(run_dir)
    sites = run.read_site_validation()
    if not sites:
        logger.warning("cross-site validation skipped: no site has a validation split "
                       "(partition.site_val_fraction=0)")
        return {}
    models, run_config = run.load_models()
    frame = cross_site_matrix(models, sites, batch_size=batch_size,
                              transform=eval_transform_for(run_config))
    frame.to_csv(run.cross_site_csv_path, index=False)
    auc, acc = to_matrix(frame, "auc"), to_matrix(frame, "accuracy")
    gap = generalisation_gap(auc, global_name=GLOBAL_MODEL)

    has_auc = bool(np.isfinite(auc.to_numpy(dtype=np.float64)).any())
    shown, label = (auc, "AUC") if has_auc else (acc, "accuracy")
    fig = plot_heatmap(shown, title=f"cross-site {label}")
    run.plots_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(run.plots_dir / "cross_site_heatmap.png", dpi=120)

    per_site_global = {s: {"auc": auc.at[GLOBAL_MODEL, s], "accuracy": acc.at[GLOBAL_MODEL, s]}
                       for s in auc.columns}
    fairness: dict[str, Any] = {GLOBAL_MODEL: site_spread(per_site_global)}
    own = {s: {"auc": auc.at[f"local-{s}", s], "accuracy": acc.at[f"local-{s}", s]}
           for s in auc.columns if f"local-{s}" in auc.index}
    if own:
        fairness["local_own"] = site_spread(own)
    n = frame.drop_duplicates("site").set_index("site")["n"]
    logger.info("cross-site validation (AUC, rows model, columns site val data):\n%s",
                auc.to_string(float_format=lambda v: f"{v:.3f}"))
    return {
        "cross_site": {
            "auc": _frame_dict(auc),
            "accuracy": _frame_dict(acc),
            "n": {str(k): int(v) for k, v in n.items()},
            "generalisation_gap": _frame_dict(gap),
        },
        "fairness": _clean(fairness),
    }
