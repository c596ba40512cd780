"""The Consilia ServerApp (Flower Message API): the same object in simulation and deployment."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from consilia.common.config import RunConfig
from consilia.common.constants import RunConfigKey
from consilia.common.data.images import ImageData
from consilia.common.flower.fast_grid import FastPollGrid
from consilia.common.instructions import RoundInstruction
from consilia.common.rundir.layout import RunDir
from consilia.common.serde import arrays_from_model
from consilia.common.training.engine import seed_everything
from consilia.server.ccvr_round import calibrate_classifier, central_dp_outcome
from consilia.server.control.run_dirs import run_dir_from_run_config
from consilia.server.recorder import RunRecorder
from consilia.server.strategy import build_strategy

__all__ = ["app", "evaluate_and_close_round", "load_run", "run_federation"]

app = ServerApp()


def _load_test_set(run_dir: RunDir) -> ImageData | None:
    """Return the run's common test split, or None when the run has none."""
    return run_dir.read_test_set() if run_dir.test_set_path.is_file() else None


def evaluate_and_close_round(
    recorder: RunRecorder,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Return the ``evaluate_fn`` of ``Strategy.start``: the last step of each round.

    Flower calls ``evaluate_fn`` once with the initial model (round 0) and once after each
    round's training and site evaluation; the recorder evaluates and checkpoints the
    round's global model, then the round is closed (its record written).
    """

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = recorder.on_global_evaluation(server_round, arrays)
        recorder.close_round(server_round)
        return metrics

    return end_of_round


def run_federation(grid: Grid, run: RunConfig, run_dir: Path) -> dict:
    """Run all rounds of ``run`` on ``grid`` and write ``run_dir``; return final metrics."""
    seed_everything(run.seed)
    layout = RunDir(run_dir)
    recorder = RunRecorder(run_dir, run, _load_test_set(layout))
    strategy = build_strategy(run.strategy, run.dp, recorder)
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays_from_model(recorder.model),
        num_rounds=run.strategy.rounds,
        timeout=run.strategy.round_timeout_s,
        train_config=RoundInstruction.base_config(run),
        evaluate_config=RoundInstruction.base_config(run),
        evaluate_fn=evaluate_and_close_round(recorder),
    )
    arrays = result.arrays
    if run.strategy.calibration.enabled:
        if arrays is None or len(arrays) == 0:
            arrays = arrays_from_model(recorder.model)
        if run.dp.enabled and run.dp.mode == "central":
            outcome = central_dp_outcome()
        else:
            arrays, outcome = calibrate_classifier(grid, run, arrays, recorder.model,
                                                   recorder.test_data, recorder.site_names)
        recorder.note_calibration(outcome.to_dict())
    final = recorder.finish(arrays)
    layout.federated_metrics_path.write_text(json.dumps(final, indent=2))
    return final


def load_run(context: Context) -> tuple[RunConfig, Path]:
    """Parse the run configuration and run directory from ``context.run_config``."""
    raw = context.run_config.get(RunConfigKey.CONFIG_JSON.value)
    if not raw:
        raise ValueError(
            f"run config lacks '{RunConfigKey.CONFIG_JSON.value}'; launch runs with "
            "fl-server run or fl-sim"
        )
    run = RunConfig.model_validate_json(str(raw))
    run_dir = run_dir_from_run_config(context.run_config)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run, run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Parse the run configuration from ``context.run_config`` and run the federation."""
    run, run_dir = load_run(context)
    # Flower's deployment Grid polls replies every 3 s; collect them as soon as they arrive.
    run_federation(FastPollGrid(grid), run, run_dir)
