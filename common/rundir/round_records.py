"""Read a run's ``metrics/rounds.jsonl``: one record per round, late site evaluations merged.

The coordinator appends one record per round when the round ends. With
``strategy.site_evaluation: with-next-round`` (the default) the sites evaluate each round's
global model when it reaches them with the next round's training, so the federated
evaluation of round ``r`` arrives one round later; it is appended as a *late record*::

    {"round": r, "evaluated_with_round": r + 1, "federated_eval": {...}, "sites": {...}}

:func:`merge_round_records` folds late records into their round's record (per-site metrics
merged site by site); :func:`read_round_records` reads and merges a file. Every reader of
``rounds.jsonl`` should use these rather than parse lines itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["LATE_KEY", "is_late_record", "merge_round_records", "read_round_records"]

log = logging.getLogger("consilia")

#: Key that marks a late record (its value: the round whose messages carried the evaluation).
LATE_KEY = "evaluated_with_round"


def is_late_record(record: dict[str, Any]) -> bool:
    """Whether ``record`` is a late federated evaluation of an earlier round's global model."""
    return LATE_KEY in record


def _merge_into(target: dict[str, Any], late: dict[str, Any]) -> None:
    for key, value in late.items():
        if key in ("round", LATE_KEY):
            continue
        if key == "sites" and isinstance(value, dict):
            sites = target.setdefault("sites", {})
            for name, metrics in value.items():
                sites.setdefault(name, {}).update(metrics)
        elif key == "errors" and isinstance(value, list):
            target.setdefault("errors", []).extend(value)
        else:
            target[key] = value


def merge_round_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one record per round, in file order, with late records merged into theirs.

    A late record whose round has no record (a truncated file) becomes that round's record.
    The input records are not modified.
    """
    merged: list[dict[str, Any]] = []
    by_round: dict[Any, dict[str, Any]] = {}
    for record in records:
        if is_late_record(record) and record.get("round") in by_round:
            _merge_into(by_round[record["round"]], record)
            continue
        copy = json.loads(json.dumps(record))
        merged.append(copy)
        by_round.setdefault(copy.get("round"), copy)
    return merged


def read_round_records(path: Path, merge: bool = True) -> list[dict[str, Any]]:
    """Read ``rounds.jsonl`` (a file, or a run directory holding ``metrics/rounds.jsonl``).

    Parameters
    ----------
    path : Path
        The file, or the run directory.
    merge : bool
        Fold late federated evaluations into their rounds (default); ``False`` returns the
        lines as written.

    Returns
    -------
    list of dict
        The records; empty when the file does not exist. A line that is not JSON (e.g. the
        last line of a file being written) is skipped with a warning naming the line.

    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics" / "rounds.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped", path, number)
    return merge_round_records(records) if merge else records
