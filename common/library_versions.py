"""The software environment a run's numbers depend on (recorded in every run directory)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

__all__ = ["LIBRARIES", "library_versions"]

LIBRARIES = ("torch", "torchvision", "flwr", "flwr-datasets", "monai", "opacus", "pydicom",
             "pydantic", "numpy", "scikit-learn", "ray")


def library_versions() -> dict[str, str]:
    """Return the versions of Python, the platform and the libraries that shape the results."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
