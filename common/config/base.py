"""The base of every config model: strict parsing, and the error every config problem raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ConfigError",
    "StrictModel",
]


class ConfigError(ValueError):
    """A configuration problem, with a message naming the file, the field and the fix."""


class StrictModel(BaseModel):
    """Base model: unknown keys are errors (typos must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
