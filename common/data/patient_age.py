"""Patient age from DICOM: the Age String (``045Y``, ``006M``, ...) as a number of years.

Used by the fairness analysis (:func:`consilia.common.evaluation.fairness.subgroup_metrics`)
to bin ages into decades; the tag itself is read by :mod:`consilia.common.data.dicom`.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["AGE_UNITS", "age_years"]

#: Years per unit of a DICOM Age String (``Y``, ``M``, ``W``, ``D``).
AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def age_years(value: Any) -> float | None:
    """Convert a DICOM age string or a number to years.

    Parameters
    ----------
    value : str, int, float or None
        A DICOM ``PatientAge`` (Age String, ``045Y``, ``006M``, ``003W``, ``010D``; no unit
        means years) or a number of years.

    Returns
    -------
    float or None
        The age in years; ``None`` when missing, negative, non-finite or unparseable.

    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) and value >= 0 else None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*", str(value).upper())
    if not match:
        return None
    return float(match.group(1)) * AGE_UNITS.get(match.group(2) or "Y", 1.0)
