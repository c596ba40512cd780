"""What the coordinator asks of a site in one round, packed into / read from a ConfigRecord.

The coordinator owns the run configuration; a site only ever sees this instruction (and
keeps its own policy and data configuration to itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord

from consilia.common.config import DPConfig, ModelConfig, RunConfig, TaskSpec, TrainConfig
from consilia.common.constants import ConfigKey

__all__ = ["RoundInstruction"]


@dataclass(frozen=True)
class RoundInstruction:
    """One round's instruction to a site (training or evaluation)."""

    run_name: str
    seed: int
    server_round: int
    total_rounds: int
    model: ModelConfig
    train: TrainConfig
    task: TaskSpec
    dp: DPConfig
    proximal_mu: float = 0.0
    calibration: bool = False
    evaluate_received: bool = False

    @classmethod
    def base_config(cls, run: RunConfig) -> ConfigRecord:
        """Build the ConfigRecord sent with every round of ``run`` (the strategy adds the round)."""
        if run.task is None:
            raise ValueError("run config has no task (class_names, in_channels, image_size)")
        return ConfigRecord(
            {
                ConfigKey.RUN_NAME.value: run.name,
                ConfigKey.SEED.value: run.seed,
                ConfigKey.TOTAL_ROUNDS.value: run.strategy.rounds,
                ConfigKey.MODEL_JSON.value: run.model.model_dump_json(),
                ConfigKey.TRAIN_JSON.value: run.train.model_dump_json(),
                ConfigKey.TASK_JSON.value: run.task.model_dump_json(),
                ConfigKey.DP_JSON.value: run.dp.model_dump_json(),
                ConfigKey.CALIBRATION.value: run.strategy.calibration.enabled,
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundInstruction:
        """Parse the ConfigRecord a site received (raises ``ValueError`` naming a missing key)."""
        try:
            return cls(
                run_name=str(record[ConfigKey.RUN_NAME.value]),
                seed=int(record[ConfigKey.SEED.value]),  # type: ignore[arg-type]
                server_round=int(record.get(ConfigKey.SERVER_ROUND.value, 0)),  # type: ignore[arg-type]
                total_rounds=int(record[ConfigKey.TOTAL_ROUNDS.value]),  # type: ignore[arg-type]
                model=ModelConfig.model_validate_json(str(record[ConfigKey.MODEL_JSON.value])),
                train=TrainConfig.model_validate_json(str(record[ConfigKey.TRAIN_JSON.value])),
                task=TaskSpec.model_validate_json(str(record[ConfigKey.TASK_JSON.value])),
                dp=DPConfig.model_validate_json(str(record[ConfigKey.DP_JSON.value])),
                proximal_mu=float(record.get(ConfigKey.PROXIMAL_MU.value, 0.0)),  # type: ignore[arg-type]
                calibration=bool(record.get(ConfigKey.CALIBRATION.value, False)),
                evaluate_received=bool(record.get(ConfigKey.EVALUATE_RECEIVED.value, False)),
            )
        except KeyError as exc:
            raise ValueError(f"instruction from the coordinator lacks key {exc}") from None
