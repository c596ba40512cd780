"""Shared fixtures: tiny synthetic data and the real files in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from consilia.common.paths import DATA_ROOT_ENV, repo_shared_data_dir


def _shared_root() -> Path:
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env) if env else repo_shared_data_dir()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Return ``../shared/data``; fail loudly in CI (CI=true) when it is missing, else skip."""
    root = _shared_root()
    if not root.is_dir():
        message = (
            f"shared test data not found at {root}; set {DATA_ROOT_ENV} or place the "
            "repository next to shared/data (see README)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def mednist_dir(shared_data_dir: Path) -> Path:
    """Return the MedNIST subset folder (``images/`` + ``labels.csv``)."""
    path = shared_data_dir / "mednist"
    if not (path / "labels.csv").is_file():
        pytest.fail(f"{path}/labels.csv missing from the shared data")
    return path


@pytest.fixture(scope="session")
def dicom_dir(shared_data_dir: Path) -> Path:
    """Return the folder of public DICOM test files."""
    path = shared_data_dir / "dicom"
    if not path.is_dir():
        pytest.fail(f"{path} missing from the shared data")
    return path


@pytest.fixture()
def rng() -> np.random.Generator:
    """A seeded random generator."""
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give each test a Flower task identity, so ``Message(...)`` can be built outside a run.

    Flower 1.42 reads the current task's run and node ids when a message is created; a test
    that builds messages by hand would otherwise depend on an earlier test having run a
    federation in this process. Restored after the test.
    """
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        if getattr(TaskIdentity, name) is None:
            monkeypatch.setattr(TaskIdentity, name, 1)
