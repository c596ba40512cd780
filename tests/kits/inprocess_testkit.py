"""Run an ``fl-sim`` experiment on the in-process Flower grid (no Ray) and keep what it sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from consilia.common.rundir.round_records import read_round_records
from consilia.simulations.inprocess import run_inprocess_simulation


def run_inprocess_experiment(cfg: Any, out: Path, **grid_options: Any):
    """Run ``cfg`` with ``run_experiment`` on the in-process grid.

    Returns ``(result, replies, rounds)``: the ExperimentResult, every site reply (in the
    order they were sent) and the parsed ``metrics/rounds.jsonl``. ``grid_options`` go to
    :func:`~consilia.simulations.inprocess.run_inprocess_simulation` (e.g. ``client_app``).
    """
    from consilia.simulations import run as run_module

    replies: list[Message] = []

    def simulate(*args: Any, **kwargs: Any):
        return run_inprocess_simulation(*args, on_reply=replies.append, **grid_options,
                                        **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(run_module, "run_flower_simulation", simulate)
    try:
        result = run_module.run_experiment(cfg, out)
    finally:
        mp.undo()
    return result, replies, read_round_records(result.run_dir)


def model_shapes(cfg: Any, run_dir: Path) -> dict[str, tuple[int, ...]]:
    """The run's packed model weights' keys and shapes (what a training reply may carry)."""
    from consilia.common.config import TaskSpec
    from consilia.common.serde import model_from_run_config, packed_shapes

    run = cfg.run_config().model_copy(update={"task": TaskSpec.model_validate_json(
        (run_dir / "task.json").read_text())})
    return packed_shapes(model_from_run_config(run).state_dict())
