"""Pydantic models for everything a run needs, parsed once from YAML/TOML + CLI overrides.

No other module indexes raw config dicts: they receive these models. One module per part:
:mod:`.base` (strictness, :class:`ConfigError`), :mod:`.sections` (task, data, partition,
model, training), :mod:`.strategy`, :mod:`.run` (:class:`RunConfig`,
:class:`ExperimentConfig`) and :mod:`.loading` (files, overrides, errors).
"""

from __future__ import annotations

from consilia.common.config.base import ConfigError, StrictModel
from consilia.common.config.loading import (
    apply_overrides,
    format_validation_error,
    load_config_file,
    load_experiment_config,
    parse_model,
)
from consilia.common.config.run import (
    BaselinesConfig,
    DPConfig,
    ExperimentConfig,
    RunConfig,
    SimulationConfig,
)
from consilia.common.config.sections import (
    AugmentationConfig,
    DataConfig,
    FeatureSkewConfig,
    ModelConfig,
    PartitionConfig,
    PreprocessConfig,
    TaskSpec,
    TrainConfig,
)
from consilia.common.config.strategy import (
    CENTRAL_DP_STRATEGIES,
    BulyanConfig,
    CalibrationConfig,
    FedAdagradConfig,
    FedAvgMConfig,
    FedYogiConfig,
    KrumConfig,
    MultiKrumConfig,
    StrategyConfig,
    StrategyName,
    TrimmedMeanConfig,
    UpdateValidationConfig,
)

__all__ = [
    "AugmentationConfig",
    "BaselinesConfig",
    "BulyanConfig",
    "CENTRAL_DP_STRATEGIES",
    "CalibrationConfig",
    "ConfigError",
    "DPConfig",
    "DataConfig",
    "ExperimentConfig",
    "FeatureSkewConfig",
    "FedAdagradConfig",
    "FedAvgMConfig",
    "FedYogiConfig",
    "KrumConfig",
    "ModelConfig",
    "MultiKrumConfig",
    "PartitionConfig",
    "PreprocessConfig",
    "RunConfig",
    "SimulationConfig",
    "StrategyConfig",
    "StrategyName",
    "StrictModel",
    "TaskSpec",
    "TrainConfig",
    "TrimmedMeanConfig",
    "UpdateValidationConfig",
    "apply_overrides",
    "format_validation_error",
    "load_config_file",
    "load_experiment_config",
    "parse_model",
]
