"""Reading config files, ``--set`` overrides and one-line validation errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from consilia.common.config.base import ConfigError
from consilia.common.config.run import (
    ExperimentConfig,
)

__all__ = [
    "apply_overrides",
    "format_validation_error",
    "load_config_file",
    "load_experiment_config",
    "parse_model",
]

M = TypeVar("M", bound=BaseModel)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a dict.

    Raises
    ------
    ConfigError
        If the file is missing, unreadable or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data)}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML scalars/lists).

    Raises
    ------
    ConfigError
        If an override is not of the form ``key=value``.
    """
    result = json.loads(json.dumps(data, default=str))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.field=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return result


def format_validation_error(exc: ValidationError, source: str) -> str:
    """Turn a pydantic error into short lines naming each field and what is allowed."""
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the example configs)"
        got = err.get("input")
        shown = "" if err["type"] in {"extra_forbidden", "missing"} or isinstance(got, dict) else (
            f" (got {got!r})"
        )
        lines.append(f"  - {loc}: {msg}{shown}")
    return "\n".join(lines)


def parse_model(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate ``data`` into ``model``; raise :class:`ConfigError` with a readable message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_experiment_config(
    path: Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load an experiment config from a file (optional) plus ``key=value`` overrides.

    Parameters
    ----------
    path : Path, optional
        YAML or TOML file; defaults are used for anything it omits.
    overrides : list of str, optional
        ``section.field=value`` strings, applied after the file.

    Returns
    -------
    ExperimentConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        With one line per bad field, naming the field and the allowed values.
    """
    data = load_config_file(path) if path else {}
    data = apply_overrides(data, overrides or [])
    source = str(path) if path else "command-line overrides"
    return parse_model(ExperimentConfig, data, source)
