"""The flat views of the round records: dotted keys for ``metrics/rounds.csv`` and trackers."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["flatten", "write_rounds_csv"]

#: Round-record keys holding per-site lists (kept out of the CSV)
_LIST_KEYS = frozenset({"errors", "rejected", "excluded"})


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dotted keys (for the CSV view)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def write_rounds_csv(path: Path, rounds: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``path`` with one row per round record; columns in order of first appearance.

    The per-site lists (``errors``, ``rejected``, ``excluded``) stay out of the CSV (they are
    in ``rounds.jsonl``).
    """
    rows = [flatten(r) for r in rounds]
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns and c not in _LIST_KEYS)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
