"""Cached, report-friendly access to a run directory: a missing input is :class:`Unavailable`.

Wraps :class:`consilia.common.rundir.layout.RunDir` (the one reader of the run directory's
layout): every reader turns a missing file into :class:`Unavailable`, which a report section
shows as "not available for this run", and caches what it read (several sections share the
predictions, the round records and the global model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import nn

from consilia.common.data.images import ImageData
from consilia.common.model_files import load_model_file
from consilia.common.rundir.layout import RunDir

__all__ = ["NOT_AVAILABLE", "RunFiles", "Unavailable"]

NOT_AVAILABLE = "not available for this run"


class Unavailable(Exception):  # noqa: N818 - a section state, not an error
    """A report section whose inputs are missing; the message says which."""


def _order(model_name: str) -> tuple[int, str]:
    rank = {"federated": 0, "global": 0, "centralized": 1}.get(model_name, 2)
    return rank, model_name


class RunFiles:
    """Lazy, cached access to the files of one run directory.

    Parameters
    ----------
    layout : RunDir
        The run directory.

    """

    def __init__(self, layout: RunDir) -> None:
        self.layout = layout
        self._cache: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        """The run directory."""
        return self.layout.path

    def file(self, rel: str) -> Path:
        """Return ``path / rel``; raise :class:`Unavailable` when it does not exist."""
        target = self.layout.path / rel
        if not target.exists():
            raise Unavailable(f"{rel} not found")
        return target

    def json(self, rel: str) -> Any:
        """Parse a JSON file of the run (cached)."""
        key = f"json:{rel}"
        if key not in self._cache:
            self.file(rel)
            self._cache[key] = self.layout.read_json(rel)
        return self._cache[key]

    def config_value(self, *keys: str) -> Any:
        """Return a value of ``config.yaml`` (``None`` when the file or key is missing)."""
        try:
            node: Any = self.layout.read_config()
        except (OSError, yaml.YAMLError):
            return None
        for key in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    def rounds(self) -> list[dict[str, Any]]:
        """Return one record per round of ``metrics/rounds.jsonl`` (late evaluations merged)."""
        if "rounds" not in self._cache:
            self.file("metrics/rounds.jsonl")
            records = self.layout.read_rounds()
            if not records:
                raise Unavailable("metrics/rounds.jsonl is empty")
            self._cache["rounds"] = sorted(records, key=lambda r: r.get("round", 0))
        return self._cache["rounds"]

    def class_names(self) -> list[str]:
        """Return the class names: ``task.json``, else the global model, else ``class k``."""
        if "class_names" not in self._cache:
            try:
                names = list(self.json("task.json")["class_names"])
            except (Unavailable, KeyError, TypeError):
                try:
                    names = list(self.global_model()[1].task.class_names)
                except (Unavailable, AttributeError):
                    width = next(iter(self.predictions().values()))[1].shape[1]
                    names = [f"class {k}" for k in range(width)]
            self._cache["class_names"] = names
        return self._cache["class_names"]

    def predictions(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Return ``{model: (y_true, y_prob)}`` from ``predictions/*.npz`` (federated first)."""
        if "predictions" not in self._cache:
            found = self.layout.read_predictions()
            if not found:
                raise Unavailable("no predictions/*.npz with y_true and y_prob")
            self._cache["predictions"] = dict(sorted(found.items(), key=lambda kv: _order(kv[0])))
        return self._cache["predictions"]

    def checkpoint(self, rel: str) -> tuple[nn.Module, Any, dict[str, Any]]:
        """Load a model file of the run (cached): ``(model, run_config, meta)``."""
        key = f"ckpt:{rel}"
        if key not in self._cache:
            self._cache[key] = load_model_file(self.file(rel))
        return self._cache[key]

    def global_model(self) -> tuple[nn.Module, Any, dict[str, Any]]:
        """Load the run's final global model (cached): ``(model, run_config, meta)``."""
        return self.checkpoint(self.layout.global_model_path.name)

    def test_set(self) -> ImageData:
        """Return the common test split ``test_set.npz``."""
        self.file("test_set.npz")
        try:
            return self.layout.read_test_set()
        except KeyError:
            raise Unavailable("test_set.npz lacks images/labels") from None

    def site_validation(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Return each site's validation split (``sites/site-*.npz``, empty splits left out)."""
        try:
            sites = self.layout.read_site_validation()
        except FileNotFoundError:
            sites = {}
        if not sites:
            raise Unavailable("no sites/*.npz with validation data")
        return sites
