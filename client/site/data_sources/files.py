"""Finding labelled files: the walk over a data root and the labels a run can use."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from consilia.client.site.data_sources.config import DataSourceError
from consilia.client.site.data_sources.report import DataReport, SkippedFile

__all__ = [
    "LabelledFile",
    "UnusableFileError",
    "check_root",
    "relative_posix",
    "resolve_labels",
    "walk_files",
]


@dataclass
class LabelledFile:
    """A file with a label in the run's label space (``extra``: its other CSV columns)."""

    rel: str
    path: Path
    label: int
    extra: dict[str, str] = field(default_factory=dict)


class UnusableFileError(Exception):
    """A file that cannot be used (reason in ``args[0]``)."""


def walk_files(root: Path) -> Iterable[Path]:
    """Yield the regular files under ``root`` in sorted order, skipping hidden entries."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def relative_posix(path: Path, root: Path) -> str:
    """Return ``path`` relative to ``root`` as a POSIX string."""
    return path.relative_to(root).as_posix()


def check_root(root: Path, what: str) -> Path:
    """Return the data root; raise :class:`DataSourceError` when it is not a folder."""
    root = root.expanduser()
    if not root.is_dir():
        raise DataSourceError(
            f"{what} root {root} is not a folder; set data.root in the site config to the "
            "folder that holds the images"
        )
    return root


def resolve_labels(
    labelled: dict[str, tuple[int, str, dict[str, str]]],
    conflicts: dict[str, list[str]],
    root: Path,
    class_names: list[str],
    report: DataReport,
) -> list[LabelledFile]:
    """Keep the files whose label is in ``class_names``; report conflicts and unknown labels."""
    index = {name: i for i, name in enumerate(class_names)}
    entries = []
    for rel in labelled:  # CSV row order (folder sources: sorted walk order)
        line, label, extra = labelled[rel]
        if rel in conflicts:
            report.skipped.append(
                SkippedFile(rel, "conflicting labels in the CSV: " + ", ".join(conflicts[rel]))
            )
        elif not label:
            report.unlabelled.append(f"{rel} (line {line}: empty label)")
        elif label not in index:
            report.unknown_labels.setdefault(label, []).append(rel)
        else:
            entries.append(LabelledFile(rel, root / rel, index[label], extra))
    return entries
