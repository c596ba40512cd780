"""Metric values as text for progress lines and logs (one formatter for the whole project)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

__all__ = ["format_number"]


def format_number(value: Any, digits: int = 4) -> str:
    """Return ``value`` in fixed-point notation, or ``"n/a"`` when there is no number.

    Parameters
    ----------
    value : Any
        A metric value; ``None``, non-numbers, NaN and infinities have no number to show.
    digits : int
        Digits after the decimal point.

    Returns
    -------
    str
        E.g. ``"0.9758"`` for ``0.97581`` with 4 digits, ``"n/a"`` for ``None`` or NaN.

    """
    if not isinstance(value, Real) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"
