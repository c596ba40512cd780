"""Pydantic models for everything a run needs, parsed once from YAML/TOML + CLI overrides.

No other module indexes raw config dicts: they receive these models.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "AugmentationConfig",
    "BaselinesConfig",
    "CalibrationConfig",
    "ConfigError",
    "DataConfig",
    "DPConfig",
    "ExperimentConfig",
    "FeatureSkewConfig",
    "ModelConfig",
    "PartitionConfig",
    "PreprocessConfig",
    "RunConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TaskSpec",
    "TrainConfig",
    "UpdateValidationConfig",
    "apply_overrides",
    "format_validation_error",
    "load_config_file",
    "load_experiment_config",
    "parse_model",
]


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem, with a message naming the file, the field and the fix."""


class StrictModel(BaseModel):
    """Base model: unknown keys are errors (typos must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskSpec(StrictModel):
    """The label space and input geometry every participant must agree on."""

    class_names: list[str] = Field(min_length=2)
    in_channels: Literal[1, 3] = 1
    image_size: int = Field(default=64, ge=8, le=1024)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


class AugmentationConfig(StrictModel):
    """Training-time augmentations (MONAI random transforms); all off when ``enabled`` is false."""

    enabled: bool = False
    prob: float = Field(default=0.5, ge=0, le=1, description="probability of each random transform")
    rotate_degrees: float = Field(default=10.0, ge=0, le=180)
    flip: bool = True
    zoom: float = Field(default=0.1, ge=0, le=0.5, description="max relative zoom in/out")
    shift: float = Field(
        default=0.05, ge=0, le=0.5, description="max translation, fraction of size"
    )
    noise_std: float = Field(default=0.02, ge=0)
    contrast_gamma: tuple[float, float] = (0.8, 1.2)
    elastic: bool = False
    bias_field: bool = False


class PreprocessConfig(StrictModel):
    """Deterministic preprocessing applied to train and eval images alike."""

    normalize: Literal["none", "zscore", "minmax", "histogram"] = "none"
    smooth_sigma: float = Field(default=0.0, ge=0, description="Gaussian denoising sigma (0 = off)")
    bias_field_correction: bool = False


class DataConfig(StrictModel):
    """Which dataset to load and how to split it when it has no official split."""

    dataset: str = "mednist"
    root: Path | None = None
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    max_samples: int | None = Field(
        default=None, ge=10, description="subsample the pool (quick runs)"
    )
    image_size: int | None = Field(
        default=None, ge=8, le=1024, description="resize (None = native)"
    )


class FeatureSkewConfig(StrictModel):
    """Per-site "scanner" shift: gamma/contrast, noise level, blur/resolution."""

    enabled: bool = False
    strength: float = Field(default=1.0, ge=0, le=3, description="scales every per-site shift")


class PartitionConfig(StrictModel):
    """How the pooled training data are split into virtual hospitals."""

    num_sites: int = Field(default=5, ge=1, le=10000)
    scheme: Literal["iid", "dirichlet", "pathological", "quantity"] = "dirichlet"
    alpha: float = Field(
        default=0.5, gt=0, description="Dirichlet concentration (label or quantity)"
    )
    classes_per_site: int = Field(default=2, ge=1, description="for scheme=pathological")
    min_samples_per_site: int = Field(default=10, ge=1)
    site_val_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="each site's held-out split"
    )
    feature_skew: FeatureSkewConfig = FeatureSkewConfig()
    holdout_site: int | None = Field(
        default=None,
        ge=0, description="leave-one-site-out: this site never trains and is evaluated "
        "at the end (external validation); the federation runs with num_sites - 1 sites"
    )


class ModelConfig(StrictModel):
    """Which registered architecture to build."""

    name: str = "cnn"
    kwargs: dict[str, float | int | str | bool] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from consilia.common.models import MODELS

        if value not in MODELS:
            raise ValueError(f"unknown model '{value}'; allowed: {', '.join(MODELS.names())}")
        return value


class TrainConfig(StrictModel):
    """Local training at each site (and in the baselines)."""

    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    lr: float = Field(default=1e-3, gt=0, le=10)
    optimizer: Literal["sgd", "adam", "rmsprop"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    loss: Literal["cross_entropy", "bce", "focal"] = "cross_entropy"
    focal_gamma: float = Field(default=2.0, ge=0)
    class_weights: bool = Field(
        default=False, description="weight the loss by inverse class frequency"
    )
    augmentation: AugmentationConfig = AugmentationConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    num_threads: int | None = Field(default=None, ge=1, description="torch threads (None = auto)")


class CalibrationConfig(StrictModel):
    """Classifier calibration after the last round (CCVR; see :mod:`consilia.common.ccvr`).

    Sites send per-class sums of the head's input features; the coordinator re-fits the
    classifier head on virtual features drawn from the pooled class Gaussians.
    """

    enabled: bool = False
    virtual_per_class: int = Field(default=2000, ge=10, le=100_000)
    epochs: int = Field(default=100, ge=1, le=10_000)
    lr: float = Field(default=0.04, gt=0)
    batch_size: int = Field(default=256, ge=1)
    min_sites: int | None = Field(
        default=None, ge=1, description="sites that must send statistics (None = min_train_sites)"
    )
    feature_clip_norm: float | None = Field(
        default=None, gt=0, description="L2 bound on features for sites that answer with DP-noised "
        "statistics (None = the 90th percentile of the final model's feature norms on the "
        "coordinator's test images)"
    )


class UpdateValidationConfig(StrictModel):
    """Checks every training reply passes before aggregation (``strategy.validation``).

    A reply must match the global model's layout (names, shapes, dtypes), hold only finite
    values, report a positive whole ``num-examples`` within the caps below, and move the model
    no further than ``max_update_norm_ratio`` × the round's median update; a reply that fails
    is dropped and recorded (``rejected`` in ``rounds.jsonl``). The defaults leave honest
    runs unchanged.
    """

    max_num_examples: int = Field(
        default=100_000_000, ge=1,
        description="largest num-examples a site may report in one reply")
    max_num_examples_growth: float = Field(
        default=10.0, ge=1,
        description="a site may report at most this × the num-examples of its first accepted "
        "reply in the run (growing data stays possible; one site cannot take over the average)")
    max_update_norm_ratio: float | None = Field(
        default=10.0, gt=1,
        description="largest ||w_site - w_global|| as a multiple of the round's median update "
        "norm (checked with 3 or more replies); null turns the check off")
    exclude_after: int | None = Field(
        default=3, ge=1,
        description="a site rejected in this many rounds is excluded for the rest of the run; "
        "null never excludes")


class StrategyConfig(StrictModel):
    """The server-side aggregation strategy and round schedule."""

    name: Literal["fedavg", "fedprox", "fedadam"] = "fedprox"
    rounds: int = Field(default=5, ge=1, le=10000)
    proximal_mu: float = Field(default=0.01, ge=0)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    fraction_evaluate: float = Field(default=1.0, ge=0, le=1)
    site_evaluation: Literal["with-next-round", "separate"] = Field(
        default="with-next-round",
        description="with-next-round: the sites that train round r+1 first score round r's "
        "global model (the one they receive) on their validation split and send the scores "
        "with their training reply (one message and one model download per site per round "
        "fewer); the final model gets evaluate messages of its own. separate: evaluate "
        "messages after every round. fraction_evaluate applies to evaluate messages; 0 turns "
        "site evaluation off",
    )
    min_train_sites: int = Field(default=2, ge=1)
    min_evaluate_sites: int = Field(default=2, ge=0)
    min_available_sites: int = Field(default=2, ge=1)
    round_timeout_s: float = Field(default=3600.0, gt=0)
    server_lr: float = Field(default=0.01, gt=0, description="FedAdam eta")
    server_beta_1: float = Field(default=0.9, ge=0, lt=1)
    server_beta_2: float = Field(default=0.99, ge=0, lt=1)
    server_tau: float = Field(default=1e-3, gt=0)
    calibration: CalibrationConfig = CalibrationConfig()
    validation: UpdateValidationConfig = UpdateValidationConfig()


class DPConfig(StrictModel):
    """Differential privacy request (the site's own policy may demand more)."""

    enabled: bool = False
    mode: Literal["local", "central"] = Field(
        default="local", description="local = Opacus DP-SGD at each site (sample-level); "
        "central = server-side clipping + noise (client-level)"
    )
    target_epsilon: float = Field(default=8.0, gt=0)
    target_delta: float | None = Field(
        default=None, gt=0, lt=1, description="None = < 1/N per site"
    )
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    grad_sample_mode: Literal["auto", "hooks", "functorch", "ew", "ghost"] = "auto"
    max_physical_batch_size: int = Field(default=128, ge=1)
    central_noise_multiplier: float = Field(default=1.0, ge=0)
    central_clipping_norm: float = Field(default=1.0, gt=0)


class BaselinesConfig(StrictModel):
    """Which baselines run in the same harness on the same splits."""

    centralized: bool = True
    local_only: bool = True


class SimulationConfig(StrictModel):
    """Flower simulation engine (Ray backend) settings."""

    cpus_per_client: float = Field(default=1.0, gt=0)
    ray_address: str | None = Field(default=None, description="attach to an existing Ray cluster")
    threads_per_client: int = Field(default=1, ge=1)


class RunConfig(StrictModel):
    """What the coordinator's ServerApp needs for one federated run."""

    name: str = "consilia-run"
    seed: int = 42
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    dp: DPConfig = DPConfig()
    task: TaskSpec | None = None
    tracking: Literal["none", "tensorboard", "mlflow"] = Field(
        default="none",
        description="also log per-round metrics to TensorBoard or MLflow (optional extras)"
    )


class ExperimentConfig(RunConfig):
    """A full simulation experiment: a run plus data, partition, baselines and engine."""

    name: str = "mednist-fedprox"
    output_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    simulation: SimulationConfig = SimulationConfig()

    @model_validator(mode="after")
    def _sites_vs_minimums(self) -> ExperimentConfig:
        n = self.partition.num_sites
        holdout = self.partition.holdout_site
        if holdout is not None:
            if holdout >= n:
                raise ValueError(
                    f"partition.holdout_site={holdout} does not exist: sites are 0..{n - 1}"
                )
            n -= 1  # the held-out site never trains
        s = self.strategy
        for field in ("min_train_sites", "min_evaluate_sites", "min_available_sites"):
            if getattr(s, field) > n:
                raise ValueError(
                    f"strategy.{field}={getattr(s, field)} exceeds partition.num_sites="
                    f"{self.partition.num_sites}"
                    + (" less the holdout_site" if holdout is not None else "")
                    + "; lower it or add sites"
                )
        return self

    def run_config(self) -> RunConfig:
        """Return the coordinator-owned part of this experiment."""
        return RunConfig.model_validate(
            self.model_dump(include=set(RunConfig.model_fields), mode="json")
        )


# ---------------------------------------------------------------------------------------
# Loading, overrides and error formatting
# ---------------------------------------------------------------------------------------


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
