"""The scan/load report for hospital IT: per-class counts, sizes and every file not used."""

from __future__ import annotations

import difflib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DATA_REPORT_FILE", "DataReport", "SkippedFile"]

DATA_REPORT_FILE = "data-report.json"
"""The full report's file name in the site's state directory (every file and its reason)."""

_MAX_LISTED = 20


@dataclass
class SkippedFile:
    """A file that was found but not used."""

    path: str
    reason: str


@dataclass
class DataReport:
    """What a scan or load found: per-class counts, sizes and every problem, for hospital IT.

    Parameters
    ----------
    source : str
        One line describing the source.
    class_names : list of str
        The run's label space.
    decoded : bool
        True when pixels were decoded (a load or ``scan_site_data(decode=True)``); False for a
        header-only check.

    Once :meth:`write_json` has written the full report, the text report names that file
    wherever it shortens a list.

    """

    source: str
    class_names: list[str]
    decoded: bool = False
    files_found: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    image_sizes: Counter[str] = field(default_factory=Counter)
    channels: Counter[str] = field(default_factory=Counter)
    modalities: Counter[str] = field(default_factory=Counter)
    skipped: list[SkippedFile] = field(default_factory=list)
    unknown_labels: dict[str, list[str]] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cache_hits: int = 0
    decoded_now: int = 0
    json_path: Path | None = None

    def __post_init__(self) -> None:
        for name in self.class_names:
            self.counts.setdefault(name, 0)

    @property
    def n_usable(self) -> int:
        """Number of usable labelled images."""
        return int(sum(self.counts.values()))

    @property
    def n_problems(self) -> int:
        """Number of files/rows that were not used (skipped, unknown label, unlabelled, missing)."""
        unknown = sum(len(v) for v in self.unknown_labels.values())
        return len(self.skipped) + unknown + len(self.unlabelled) + len(self.missing_files)

    @property
    def empty_classes(self) -> list[str]:
        """Classes of the run without any usable image here."""
        return [name for name in self.class_names if self.counts.get(name, 0) == 0]

    def to_dict(self) -> dict[str, Any]:
        """Return the full report as JSON-safe data (every listed file included)."""
        return {
            "source": self.source,
            "class_names": list(self.class_names),
            "decoded": self.decoded,
            "files_found": self.files_found,
            "usable": self.n_usable,
            "counts": dict(self.counts),
            "empty_classes": self.empty_classes,
            "image_sizes": dict(self.image_sizes.most_common()),
            "channels": dict(self.channels),
            "modalities": dict(self.modalities.most_common()),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "unknown_labels": {k: list(v) for k, v in self.unknown_labels.items()},
            "unlabelled": list(self.unlabelled),
            "missing_files": list(self.missing_files),
            "notes": list(self.notes),
            "cache_hits": self.cache_hits,
            "decoded_now": self.decoded_now,
            "problems": self.n_problems,
        }

    def write_json(self, path: Path) -> Path:
        """Write the full report (:meth:`to_dict`) to ``path`` atomically and remember it.

        Parameters
        ----------
        path : Path
            Usually ``<state_dir>/data-report.json`` (:data:`DATA_REPORT_FILE`).

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        OSError
            If the file cannot be written.

        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self.json_path = path
        return path

    def _listed(self, items: list[str], indent: str = "    ") -> list[str]:
        out = [f"{indent}{item}" for item in items[:_MAX_LISTED]]
        if len(items) > _MAX_LISTED:
            where = (
                f"full list in {self.json_path}"
                if self.json_path is not None
                else f"not listed here; fl-client --check writes every one to {DATA_REPORT_FILE}"
                " in the state directory"
            )
            out.append(f"{indent}... and {len(items) - _MAX_LISTED} more ({where})")
        return out

    def _decoded_line(self) -> str:
        if not self.decoded:
            return (
                "Pixels decoded: no (header check only; a corrupt compressed image is found "
                "only when the data are loaded)"
            )
        if self.cache_hits + self.decoded_now == 0:
            return "Pixels decoded: none (no labelled file to decode)"
        if self.cache_hits == 0:
            return f"Pixels decoded: yes ({self.decoded_now} file(s) decoded)"
        return (
            f"Pixels decoded: yes ({self.decoded_now} file(s) decoded now, "
            f"{self.cache_hits} from the cache)"
        )

    def to_text(self) -> str:
        """Return a plain report for the hospital's IT staff (long lists are shortened)."""
        lines = [f"Site data: {self.source}", self._decoded_line(), ""]
        lines.append(f"Usable images: {self.n_usable} of {self.files_found} files found")
        width = max((len(n) for n in self.class_names), default=0)
        for name in self.class_names:
            lines.append(f"  {name:<{width}}  {self.counts.get(name, 0)}")
        if self.empty_classes:
            lines.append(
                f"  WARNING: no usable image for class(es) {', '.join(self.empty_classes)}"
            )
        if self.image_sizes:
            lines.append(f"Image sizes (native, rows x columns): {_size_summary(self.image_sizes)}")
        if self.channels:
            lines.append("Channels: " + ", ".join(f"{k} {v}" for k, v in self.channels.items()))
        if self.modalities:
            lines.append(
                "Modalities: " + ", ".join(f"{k} {v}" for k, v in self.modalities.most_common())
            )
        lines.append("")
        if not self.n_problems:
            lines.append("Problems: none")
        else:
            lines.append(f"Problems: {self.n_problems} file(s) or CSV row(s) not used")
            if self.skipped:
                lines.append(f"  Unusable files ({len(self.skipped)}):")
                lines += self._listed([f"{s.path}: {s.reason}" for s in self.skipped])
            if self.unknown_labels:
                total = sum(len(v) for v in self.unknown_labels.values())
                lines.append(
                    f"  Labels not in the class list {self.class_names} "
                    f"({len(self.unknown_labels)} label(s), {total} file(s)):"
                )
                for label, paths in sorted(self.unknown_labels.items()):
                    close = difflib.get_close_matches(label, self.class_names, n=1, cutoff=0.6)
                    close += [c for c in self.class_names if c.lower() == label.lower()]
                    hint = f" (did you mean '{close[-1]}'?)" if close else ""
                    example = f", e.g. {paths[0]}" if paths else ""
                    lines.append(f"    '{label}': {len(paths)} file(s){hint}{example}")
            if self.unlabelled:
                lines.append(f"  Files with no label ({len(self.unlabelled)}):")
                lines += self._listed(self.unlabelled)
            if self.missing_files:
                lines.append(
                    f"  Labels CSV rows with no matching file ({len(self.missing_files)}):"
                )
                lines += self._listed(self.missing_files)
        if self.notes:
            lines.append("")
            lines.append("Notes:")
            lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines) + "\n"




def _size_summary(sizes: Counter[str]) -> str:
    def area(key: str) -> int:
        rows, cols = (int(v) for v in key.split("x"))
        return rows * cols

    common = ", ".join(f"{k} ({v})" for k, v in sizes.most_common(5))
    more = f", {len(sizes) - 5} other sizes" if len(sizes) > 5 else ""
    ordered = sorted(sizes, key=area)
    return f"{common}{more}; smallest {ordered[0]}, largest {ordered[-1]}"
