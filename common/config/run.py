"""A run's whole configuration (``RunConfig``) and a simulation's (``ExperimentConfig``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from consilia.common.config.base import StrictModel
from consilia.common.config.sections import (
    DataConfig,
    ModelConfig,
    PartitionConfig,
    TaskSpec,
    TrainConfig,
)
from consilia.common.config.strategy import (
    CENTRAL_DP_STRATEGIES,
    StrategyConfig,
)

__all__ = [
    "BaselinesConfig",
    "DPConfig",
    "ExperimentConfig",
    "RunConfig",
    "SimulationConfig",
]


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
    init_from: Path | None = Field(
        default=None,
        description="start from the weights of this Consilia model file (.safetensors, read "
        "on the coordinator) instead of a freshly seeded model; its model and task must match "
        "this run's (fl-sim run / fl-server run --init-from FILE)"
    )

    @model_validator(mode="after")
    def _central_dp_needs_a_mean(self) -> RunConfig:
        name = self.strategy.name
        if self.dp.enabled and self.dp.mode == "central" and name not in CENTRAL_DP_STRATEGIES:
            raise ValueError(
                f"strategy.name={name} cannot run with dp.mode=central (its noise covers a "
                "mean of the clipped updates, not this aggregate); use fedavg or fedprox, "
                "or dp.mode=local")
        return self


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
        needed, field = s.min_replies()
        if needed > n:
            raise ValueError(
                f"{field} needs at least {needed} training sites per round but "
                f"partition.num_sites={self.partition.num_sites}"
                + (" less the holdout_site" if holdout is not None else "")
                + f" gives {n}; add sites or lower it"
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
