"""Write ``fl-predict``'s results: ``predictions.csv``, ``predictions.json``, ``skipped.csv``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from consilia.common.analysis.predict.classify import Prediction

__all__ = ["write_outputs"]

def write_outputs(
    out_dir: Path,
    predictions: Sequence[Prediction],
    skipped: Sequence[tuple[str, str]],
    class_names: Sequence[str],
    fmt: str,
) -> list[Path]:
    """Write ``predictions.csv``/``predictions.json`` and ``skipped.csv``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if fmt in {"csv", "both"}:
        path = out_dir / "predictions.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "predicted", *[f"prob_{c}" for c in class_names]])
            for p in predictions:
                writer.writerow([p.file, p.predicted,
                                 *[f"{p.probabilities[c]:.6f}" for c in class_names]])
        written.append(path)
    if fmt in {"json", "both"}:
        path = out_dir / "predictions.json"
        payload = {
            "class_names": list(class_names),
            "predictions": [
                {"file": p.file, "predicted": p.predicted, "probabilities": p.probabilities,
                 "source": p.source}
                for p in predictions
            ],
            "skipped": [{"file": f, "reason": r} for f, r in skipped],
        }
        path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        written.append(path)
    path = out_dir / "skipped.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    written.append(path)
    return written
