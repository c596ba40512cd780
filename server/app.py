"""The Consilia ServerApp (Flower Message API): the same object in simulation and deployment."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch import nn

from consilia.common.config import ConfigError, RunConfig
from consilia.common.constants import RunConfigKey
from consilia.common.data.images import ImageData
from consilia.common.flower.fast_grid import FastPollGrid
from consilia.common.instructions import RoundInstruction
from consilia.common.model_files import ModelFileError, load_model_file
from consilia.common.rundir.layout import RunDir
from consilia.common.serde import arrays_from_model
from consilia.common.training.engine import seed_everything
from consilia.server.ccvr_round import calibrate_classifier, central_dp_outcome
from consilia.server.control.run_dirs import run_dir_from_run_config
from consilia.server.recorder import RunRecorder
from consilia.server.strategy import build_strategy

__all__ = ["app", "evaluate_and_close_round", "load_initial_model", "load_run",
           "run_federation"]

app = ServerApp()


def _load_test_set(run_dir: RunDir) -> ImageData | None:
    """Return the run's common test split, or None when the run has none."""
    return run_dir.read_test_set() if run_dir.test_set_path.is_file() else None


def _describe_model(run: RunConfig) -> str:
    """Describe what ``run`` builds: ``cnn {'width': 4} for 6 classes at 64 px, 1 channel(s)``."""
    kwargs = f" {run.model.kwargs}" if run.model.kwargs else ""
    task = run.task
    geometry = (f" for {task.num_classes} classes at {task.image_size} px, "
                f"{task.in_channels} channel(s)") if task is not None else ""
    return f"{run.model.name}{kwargs}{geometry}"


def load_initial_model(run: RunConfig, option: str = "--init-from") -> nn.Module | None:
    """Load and check the model file ``run.init_from`` names; None when it names none.

    The file must be a Consilia model file (:func:`~consilia.common.model_files.load_model_file`
    refuses pickles, altered files and non-finite weights) whose model (name, kwargs) and task
    (class names, channels, image size) are the run's. The model is built under a forked
    torch RNG, so checking a file never shifts the run's seeded random streams.

    Parameters
    ----------
    run : RunConfig
        The run (with ``task``) whose ``init_from`` is checked.
    option : str
        How the user named the file, for the error message.

    Returns
    -------
    torch.nn.Module or None
        The loaded model (eval mode), or None when ``run.init_from`` is None.

    Raises
    ------
    ConfigError
        One line naming the file and the fix: missing, not a Consilia model file, or a model
        that does not match the run's.
    """
    if run.init_from is None:
        return None
    path = Path(run.init_from)
    where = f"{option} {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: file not found; give a model file a Consilia run wrote "
                          "(e.g. RUN_DIR/global_model.safetensors)")
    try:
        with torch.random.fork_rng(devices=[]):
            model, saved, _ = load_model_file(path)
    except ModelFileError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    mine, theirs = run.task, saved.task
    same_model = (saved.model.name == run.model.name and saved.model.kwargs == run.model.kwargs)
    if not same_model or mine is None or theirs is None or theirs.model_dump() != mine.model_dump():
        detail = ""
        if (same_model and mine is not None and theirs is not None
                and theirs.class_names != mine.class_names):
            detail = f" (its classes are {theirs.class_names}, this run's {mine.class_names})"
        raise ConfigError(f"{where} holds a {_describe_model(saved)}; this run builds "
                          f"{_describe_model(run)}{detail} — choose a matching checkpoint")
    return model


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
    """Run all rounds of ``run`` on ``grid`` and write ``run_dir``; return final metrics.

    The first global model is the freshly seeded one, or the weights of ``run.init_from``
    (checked by :func:`load_initial_model`); round 0 evaluates it on the test split.
    """
    seed_everything(run.seed)
    layout = RunDir(run_dir)
    recorder = RunRecorder(run_dir, run, _load_test_set(layout))
    initial = load_initial_model(run, "init_from")
    if initial is not None:
        recorder.model.load_state_dict(initial.state_dict(), strict=True)
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
