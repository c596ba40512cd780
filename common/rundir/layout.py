"""The layout of a run directory and its typed readers (``docs/run-directory.md``).

:class:`RunDir` is the one place that knows where each file of a run lives (``config.yaml``,
``task.json``, ``sites/site-XX.npz``, ``test_set.npz``, ``global_model.safetensors``,
``metrics/``, ...)
and how to read it: site files through :func:`consilia.common.data.sitefile.load_site_npz`,
the test split as :class:`~consilia.common.data.images.ImageData`, checkpoints through
:func:`consilia.common.model_files.load_model_file`, round records through
:func:`consilia.common.rundir.round_records.read_round_records`. Every reader of a run
directory (``fl-report``, cross-site validation, audits, benchmarks) goes through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import nn

from consilia.common.data.images import ImageData
from consilia.common.data.sitefile import load_site_npz
from consilia.common.model_files import MODEL_SUFFIX, load_model_file, pickle_refusal
from consilia.common.rundir.round_records import read_round_records

__all__ = ["GLOBAL_MODEL", "RunDir", "SiteData"]

#: Name of the federated (global) model among a run's models (cross-site matrix rows).
GLOBAL_MODEL = "global"

#: One site file's content: ``(train, val, class_names)``.
SiteData = tuple[ImageData, ImageData, list[str]]


class RunDir:
    """Paths and typed readers of one run directory.

    Parameters
    ----------
    path : Path
        The run directory (it need not exist yet; readers raise ``FileNotFoundError``).

    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------- paths
    @property
    def config_path(self) -> Path:
        """``config.yaml``: the resolved configuration."""
        return self.path / "config.yaml"

    @property
    def environment_path(self) -> Path:
        """``environment.json``: library versions, platform, seed, command line."""
        return self.path / "environment.json"

    @property
    def task_path(self) -> Path:
        """``task.json``: ``class_names``, ``in_channels``, ``image_size``."""
        return self.path / "task.json"

    @property
    def partition_csv_path(self) -> Path:
        """``partition.csv``: the per-site table of an ``fl-sim`` run."""
        return self.path / "partition.csv"

    @property
    def partition_json_path(self) -> Path:
        """``partition.json``: the partition's metadata."""
        return self.path / "partition.json"

    @property
    def sites_dir(self) -> Path:
        """``sites/``: each simulated hospital's ``site-XX.npz``."""
        return self.path / "sites"

    @property
    def holdout_dir(self) -> Path:
        """``holdout/``: the held-out hospital's site file (``--holdout-site``)."""
        return self.path / "holdout"

    @property
    def test_set_path(self) -> Path:
        """``test_set.npz``: the common test split (``images``, ``labels``)."""
        return self.path / "test_set.npz"

    @property
    def metrics_dir(self) -> Path:
        """``metrics/``: per-round records."""
        return self.path / "metrics"

    @property
    def rounds_jsonl_path(self) -> Path:
        """``metrics/rounds.jsonl``: one JSON record per round (plus late records)."""
        return self.metrics_dir / "rounds.jsonl"

    @property
    def rounds_csv_path(self) -> Path:
        """``metrics/rounds.csv``: the merged rounds, flattened."""
        return self.metrics_dir / "rounds.csv"

    @property
    def final_metrics_path(self) -> Path:
        """``final_metrics.json``: every model's metrics on the test split."""
        return self.path / "final_metrics.json"

    @property
    def federated_metrics_path(self) -> Path:
        """``federated_metrics.json``: the federated model's part of the final metrics."""
        return self.path / "federated_metrics.json"

    @property
    def predictions_dir(self) -> Path:
        """``predictions/``: ``<model>.npz`` with ``y_true`` and ``y_prob``."""
        return self.path / "predictions"

    @property
    def checkpoints_dir(self) -> Path:
        """``checkpoints/``: the global model after each round."""
        return self.path / "checkpoints"

    @property
    def global_model_path(self) -> Path:
        """``global_model.safetensors``: the final global model."""
        return self.path / f"global_model{MODEL_SUFFIX}"

    @property
    def models_dir(self) -> Path:
        """``models/``: the baselines of an ``fl-sim`` run."""
        return self.path / "models"

    @property
    def centralized_model_path(self) -> Path:
        """``models/centralized.safetensors``: the centralized baseline."""
        return self.model_path("centralized")

    @property
    def plots_dir(self) -> Path:
        """``plots/``: quick-look figures."""
        return self.path / "plots"

    @property
    def cross_site_csv_path(self) -> Path:
        """``cross_site.csv``: every model on every site's held-out split."""
        return self.path / "cross_site.csv"

    @property
    def site_state_dir(self) -> Path:
        """``site-state/``: each simulated site's state (privacy ledger)."""
        return self.path / "site-state"

    @property
    def report_path(self) -> Path:
        """``report.html``: the ``fl-report`` output."""
        return self.path / "report.html"

    @property
    def privacy_audit_path(self) -> Path:
        """``privacy_audit.json``: the membership-inference audit."""
        return self.path / "privacy_audit.json"

    def site_path(self, site: str) -> Path:
        """Return ``sites/<site>.npz``."""
        return self.sites_dir / f"{site}.npz"

    def holdout_path(self, site: str) -> Path:
        """Return ``holdout/<site>.npz``."""
        return self.holdout_dir / f"{site}.npz"

    def prediction_path(self, model: str) -> Path:
        """Return ``predictions/<model>.npz``."""
        return self.predictions_dir / f"{model}.npz"

    def model_path(self, name: str) -> Path:
        """Return the baseline model file ``models/<name>.safetensors`` (``local-site-00``)."""
        return self.models_dir / f"{name}{MODEL_SUFFIX}"

    def round_checkpoint_path(self, server_round: int) -> Path:
        """Return ``checkpoints/round-NNN.safetensors`` of ``server_round``."""
        return self.checkpoints_dir / f"round-{server_round:03d}{MODEL_SUFFIX}"

    def privacy_ledger_paths(self) -> list[Path]:
        """Return ``site-state/*/privacy-ledger.json``, sorted."""
        return sorted(self.site_state_dir.glob("*/privacy-ledger.json"))

    # ---------------------------------------------------------------- listings
    def site_files(self) -> list[Path]:
        """Return the run's ``sites/site-*.npz``, sorted (empty when there are none)."""
        return sorted(self.sites_dir.glob("site-*.npz"))

    def round_checkpoints(self) -> list[Path]:
        """Return ``checkpoints/round-*.safetensors``, sorted."""
        return sorted(self.checkpoints_dir.glob(f"round-*{MODEL_SUFFIX}"))

    def local_model_files(self) -> list[Path]:
        """Return the local-only baselines ``models/local-site-*.safetensors``, sorted."""
        return sorted(self.models_dir.glob(f"local-site-*{MODEL_SUFFIX}"))

    def legacy_model_files(self) -> list[Path]:
        """Return the pickle-era ``.pt`` model files (``global_model.pt``, ``checkpoints/``, ...).

        Consilia no longer reads them (a pickle can run code); tools name them and stop.
        """
        found = [self.path / "global_model.pt"]
        found += sorted(self.checkpoints_dir.glob("*.pt")) + sorted(self.models_dir.glob("*.pt"))
        return [path for path in found if path.is_file()]

    def prediction_files(self) -> list[Path]:
        """Return ``predictions/*.npz``, sorted (empty when the folder is missing)."""
        folder = self.predictions_dir
        return sorted(folder.glob("*.npz")) if folder.is_dir() else []

    # ---------------------------------------------------------------- writers
    def write_test_set(self, data: ImageData, class_names: list[str] | None = None) -> Path:
        """Write the common test split ``test_set.npz`` (compressed); return its path.

        Parameters
        ----------
        data : ImageData
            The test images and labels (stored as ``images`` and ``labels``).
        class_names : list of str, optional
            Stored as ``class_names`` when given.

        """
        if class_names is None:
            np.savez_compressed(self.test_set_path, images=data.images, labels=data.labels)
        else:
            np.savez_compressed(self.test_set_path, images=data.images, labels=data.labels,
                                class_names=np.array(class_names))
        return self.test_set_path

    # ---------------------------------------------------------------- readers
    def read_json(self, rel: str) -> Any:
        """Parse the JSON file ``rel`` (relative to the run directory).

        Raises
        ------
        FileNotFoundError
            If the file does not exist.

        """
        return json.loads((self.path / rel).read_text(encoding="utf-8"))

    def read_config(self) -> Any:
        """Return the parsed ``config.yaml`` (a dict for a well-formed run).

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        yaml.YAMLError
            If it is not YAML.

        """
        return yaml.safe_load(self.config_path.read_text(encoding="utf-8"))

    def read_task(self) -> Any:
        """Return the parsed ``task.json``."""
        return self.read_json("task.json")

    def read_final_metrics(self) -> Any:
        """Return the parsed ``final_metrics.json``."""
        return self.read_json("final_metrics.json")

    def read_rounds(self) -> list[dict[str, Any]]:
        """Return one record per round of ``metrics/rounds.jsonl`` (late records merged)."""
        return read_round_records(self.rounds_jsonl_path)

    def read_site(self, site: str) -> SiteData:
        """Return ``(train, val, class_names)`` of ``sites/<site>.npz``."""
        return load_site_npz(self.site_path(site))

    def read_sites(self) -> dict[str, SiteData]:
        """Return ``{site: (train, val, class_names)}`` of every ``sites/site-*.npz``.

        Raises
        ------
        FileNotFoundError
            If the run has no ``sites/site-*.npz`` (not an ``fl-sim`` run).

        """
        files = self.site_files()
        if not files:
            raise FileNotFoundError(
                f"{self.sites_dir}: no site-XX.npz files (not an fl-sim run?)"
            )
        return {path.stem: load_site_npz(path) for path in files}

    def read_site_validation(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Return each site's held-out validation split.

        Returns
        -------
        dict
            ``{site: (uint8 images (N, C, H, W), int64 labels (N,))}`` in site order; sites
            with an empty validation split are left out.

        Raises
        ------
        FileNotFoundError
            If the run has no ``sites/site-*.npz``.

        """
        return {site: (val.images, val.labels)
                for site, (_, val, _) in self.read_sites().items() if val.labels.size}

    def read_test_set(self) -> ImageData:
        """Return the common test split ``test_set.npz`` (int64 labels).

        Raises
        ------
        FileNotFoundError
            If the file does not exist (the message names it).

        """
        path = self.test_set_path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the run's common test split is missing")
        with np.load(path) as data:
            return ImageData(data["images"], data["labels"].astype(np.int64))

    def read_predictions(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Return ``{model: (int64 y_true, float64 y_prob)}`` of ``predictions/*.npz``.

        Files without both ``y_true`` and ``y_prob`` are left out; models in file order.
        """
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for path in self.prediction_files():
            with np.load(path) as data:
                if {"y_true", "y_prob"} <= set(data.files):
                    found[path.stem] = (data["y_true"].astype(np.int64),
                                        data["y_prob"].astype(np.float64))
        return found

    def load_global_model(self) -> tuple[nn.Module, Any, dict[str, Any]]:
        """Load ``global_model.safetensors``: ``(model, run_config, meta)``.

        Raises
        ------
        FileNotFoundError
            If the run has no global model.
        consilia.common.model_files.ModelFileError
            If the model file is refused (altered, non-finite weights), or the run has only a
            pickle-era ``global_model.pt`` (never loaded).

        """
        path = self.global_model_path
        if not path.is_file():
            legacy = self.path / "global_model.pt"
            if legacy.is_file():
                raise pickle_refusal(legacy)
            raise FileNotFoundError(f"{path}: no global model (did the federated run finish?)")
        return load_model_file(path)

    def load_models(self, centralized: bool = True) -> tuple[dict[str, nn.Module], Any]:
        """Load the run's trained models: global, centralized and local-only baselines.

        Parameters
        ----------
        centralized : bool
            Include ``models/centralized.safetensors`` when it exists.

        Returns
        -------
        tuple
            ``({"global": m, "centralized": c, "local-site-00": l0, ...}, run_config)`` where
            ``run_config`` is the global model's :class:`~consilia.common.config.RunConfig`.

        Raises
        ------
        FileNotFoundError
            If ``global_model.safetensors`` is missing.

        """
        model, run_config, _ = self.load_global_model()
        models: dict[str, nn.Module] = {GLOBAL_MODEL: model}
        if centralized and self.centralized_model_path.is_file():
            models["centralized"] = load_model_file(self.centralized_model_path)[0]
        for local in self.local_model_files():
            models[local.stem] = load_model_file(local)[0]
        return models, run_config
