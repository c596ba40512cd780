"""The options every report section receives, and what sections share while one report is built."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

__all__ = ["ReportContext"]


@dataclass
class ReportContext:
    """Options of one report and results shared between its sections.

    Parameters
    ----------
    n_boot : int
        Bootstrap resamples for the confidence intervals.
    gallery : int
        Grad-CAM cases per group (correct / incorrect).
    seed : int
        Seed of the bootstrap and of the gallery's choice of correct cases.
    batch_size : int
        Inference batch size (cross-site validation, gallery).
    cross_site : pandas.DataFrame, optional
        The cross-site matrix, once a section computed it (the fairness section reuses it).

    """

    n_boot: int
    gallery: int
    seed: int
    batch_size: int
    cross_site: pd.DataFrame | None = None
