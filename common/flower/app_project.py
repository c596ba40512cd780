"""Write the Flower app project (``pyproject.toml`` with ``[tool.flwr.app]``) for a run.

Simulation and deployment run the same ServerApp/ClientApp objects; this file tells Flower
where they are (the Consilia code installed at the coordinator and each site — an app bundle
carries only this project file, never code that a site has not installed and approved) and
carries the run configuration.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import tomli_w

__all__ = [
    "APP_PUBLISHER",
    "CLIENTAPP_REF",
    "SERVERAPP_REF",
    "consilia_version",
    "write_flower_app",
]

APP_PUBLISHER = "consilia"
SERVERAPP_REF = "consilia.server.app:app"
CLIENTAPP_REF = "consilia.client.app:app"


def consilia_version() -> str:
    """Return the installed Consilia version (sites approve app bundles by version)."""
    try:
        return metadata.version("consilia")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.1.0"


def write_flower_app(
    app_dir: Path, run_config: dict[str, str | int | float | bool], version: str | None = None
) -> Path:
    """Write ``app_dir/pyproject.toml`` for a Flower run.

    Parameters
    ----------
    app_dir : Path
        Directory to create.
    run_config : dict
        Flat run configuration (Flower ``run_config``); every key becomes a default of
        ``[tool.flwr.app.config]`` so ``flwr run --run-config`` may override it.
    version : str, optional
        App version (sites approve bundles by version); default: the installed Consilia.

    Returns
    -------
    Path
        The written ``pyproject.toml``.
    """
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "consilia-run",
            "version": version or consilia_version(),
            "description": "Consilia federated run (code is the Consilia package installed "
            "at each participant)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": APP_PUBLISHER,
                    "components": {"serverapp": SERVERAPP_REF, "clientapp": CLIENTAPP_REF},
                    "config": dict(run_config),
                }
            },
        },
    }
    path = app_dir / "pyproject.toml"
    path.write_text(tomli_w.dumps(project))
    return path
