"""Where the coordinator checkpoints global models: one per round, and the final one.

Both are ``.safetensors`` model files (:mod:`consilia.common.model_files`).
"""

from __future__ import annotations

from torch import nn

from consilia.common.config import RunConfig
from consilia.common.model_files import save_model_file
from consilia.common.rundir.layout import RunDir

__all__ = ["save_final_model", "save_round_checkpoint"]


def save_round_checkpoint(run_dir: RunDir, model: nn.Module, run: RunConfig,
                          server_round: int) -> None:
    """Checkpoint the global model after ``server_round`` (the initial model is not saved)."""
    if server_round > 0:
        save_model_file(run_dir.round_checkpoint_path(server_round), model, run, server_round)


def save_final_model(run_dir: RunDir, model: nn.Module, run: RunConfig,
                     last_round: int) -> None:
    """Write ``global_model.safetensors``: the final global model, tagged with its last round."""
    save_model_file(run_dir.global_model_path, model, run, last_round)
