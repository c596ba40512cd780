"""Launch a deployed run from a run config and follow it round by round.

``fl-server run RUN.yaml`` validates the file into :class:`~consilia.common.config.RunConfig`
(a deployed run needs ``task``), writes the run directory's metadata and the Flower app
(``write_flower_app``), submits it with ``flwr run`` and prints one line per round as the
ServerApp appends ``metrics/rounds.jsonl``. The ServerApp runs on the coordinator machine
(spawned by the SuperLink), so the run directory is a coordinator-local path; the sites
never see it (the run config carries a token, :mod:`consilia.server.control.run_dirs`).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from consilia.common.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config_file,
    parse_model,
)
from consilia.common.constants import RunConfigKey
from consilia.common.flower.app_project import write_flower_app
from consilia.common.library_versions import library_versions
from consilia.common.rundir.layout import RunDir
from consilia.common.rundir.round_records import is_late_record
from consilia.server.control.flwr_cli import FlowerOperator
from consilia.server.control.run_dirs import RUN_DIR_TOKEN_KEY, register_run_dir
from consilia.server.progress import format_final, format_round, readable_reason

__all__ = [
    "RunTimeoutError",
    "check_test_set",
    "follow_run",
    "format_round",
    "library_versions",
    "load_run_config",
    "prepare_run_dir",
    "readable_reason",
]

_TASK_HELP = (
    "a deployed run needs 'task': class_names (the labels every site uses in its labels.csv, "
    "in the same order everywhere), in_channels (1 or 3) and image_size; see "
    "deploy/run.example.yaml"
)


class RunTimeoutError(TimeoutError):
    """The run did not finish within the time the operator allowed."""


def load_run_config(
    path: Path, overrides: Sequence[str] = (), init_from: Path | None = None
) -> RunConfig:
    """Read a run config (YAML/TOML) plus ``section.field=value`` overrides.

    ``init_from`` (``--init-from FILE``) replaces the file's ``init_from``; either is resolved
    on this (the coordinator) machine, where the ServerApp reads it, and checked against the
    run's model and task before anything is submitted.

    Raises
    ------
    ConfigError
        Naming the file and each bad field; also when ``task`` is missing, and when the
        ``init_from`` model file is missing, not a Consilia model file or another model.

    """
    data = apply_overrides(load_config_file(Path(path)), list(overrides))
    run = parse_model(RunConfig, data, str(path))
    if run.task is None:
        raise ConfigError(f"{path}: {_TASK_HELP}")
    chosen = init_from if init_from is not None else run.init_from
    if chosen is not None:
        from consilia.server.app import load_initial_model

        option = "--init-from" if init_from is not None else f"{path}: init_from"
        run = run.model_copy(update={"init_from": Path(chosen).resolve()})
        load_initial_model(run, option)
    s = run.strategy
    if s.min_train_sites > s.min_available_sites:
        raise ConfigError(
            f"{path}: strategy.min_train_sites={s.min_train_sites} exceeds "
            f"strategy.min_available_sites={s.min_available_sites}; a round could never start"
        )
    return run




def check_test_set(path: Path, run: RunConfig) -> None:
    """Check a coordinator-held test split (``images`` uint8 N×C×H×W, ``labels``).

    Raises
    ------
    ConfigError
        If the file or its arrays do not match the run's task.

    """
    path = Path(path)
    task = run.task
    assert task is not None
    if not path.is_file():
        raise ConfigError(f"--test-set {path}: file not found")
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"--test-set {path}: expected an .npz with arrays 'images' and 'labels' ({exc})"
        ) from None
    want = (task.in_channels, task.image_size, task.image_size)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ConfigError(
            f"--test-set {path}: 'images' must be uint8 of shape (N, {want[0]}, {want[1]}, "
            f"{want[2]}) to match the run's task; got {images.dtype} {images.shape}"
        )
    labels = labels.reshape(-1)
    if len(labels) != len(images) or labels.min() < 0 or labels.max() >= task.num_classes:
        raise ConfigError(
            f"--test-set {path}: 'labels' must hold {len(images)} class indices in "
            f"[0, {task.num_classes - 1}]"
        )


def prepare_run_dir(
    run: RunConfig,
    run_dir: Path,
    command: Sequence[str],
    state_dir: Path,
    test_set: Path | None = None,
    extra_run_config: dict[str, str | int | float | bool] | None = None,
) -> Path:
    """Write the run directory's metadata and the Flower app; return the app directory.

    Parameters
    ----------
    run : RunConfig
        The validated run (with ``task``).
    run_dir : Path
        Coordinator-local output directory (``docs/run-directory.md``); must not hold a run.
    command : sequence of str
        The command line, recorded in ``environment.json``.
    state_dir : Path
        The coordinator's state directory, where the run directory is registered under a
        token: the run config and the app bundle reach the sites too, so they carry only
        the token (:mod:`consilia.server.control.run_dirs`).
    test_set : Path, optional
        A coordinator-held test split, copied to ``test_set.npz`` for server-side evaluation.
    extra_run_config : dict, optional
        More ``[tool.flwr.app.config]`` entries (benchmarks use simulated site files).

    Raises
    ------
    ConfigError
        If ``run_dir`` already holds a run.

    """
    run_dir = Path(run_dir).resolve()
    layout = RunDir(run_dir)
    if layout.rounds_jsonl_path.exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    layout.config_path.write_text(
        yaml.safe_dump(json.loads(run.model_dump_json()), sort_keys=False)
    )
    assert run.task is not None
    layout.task_path.write_text(run.task.model_dump_json(indent=2))
    env = {
        "mode": "deployment",
        "versions": library_versions(),
        "seed": run.seed,
        "command": list(command),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if run.init_from is not None:
        env["init_from"] = str(run.init_from)
    layout.environment_path.write_text(json.dumps(env, indent=2))
    if test_set is not None:
        check_test_set(test_set, run)
        shutil.copyfile(test_set, layout.test_set_path)
    config: dict[str, str | int | float | bool] = {
        RunConfigKey.CONFIG_JSON.value: run.model_dump_json(),
        RUN_DIR_TOKEN_KEY: register_run_dir(state_dir, run_dir),
        **(extra_run_config or {}),
    }
    app_dir = run_dir / "flower-app"
    write_flower_app(app_dir, config)
    return app_dir




def follow_run(
    operator: FlowerOperator,
    run_id: int,
    run_dir: Path,
    total_rounds: int,
    emit: Callable[[str], None] = print,
    poll_s: float = 1.0,
    status_every_s: float = 10.0,
    timeout_s: float | None = None,
    site_names: dict[str, str] | None = None,
    max_quiet_s: float = 60.0,
) -> dict[str, Any]:
    """Print each round as it lands in ``run_dir/metrics/rounds.jsonl`` until the run ends.

    The SuperLink is asked for the run's status (a ``flwr`` CLI process, about a CPU-second)
    at the start, then only when no round has landed for a while: ``status_every_s``, or
    1.5 times the typical round so far when rounds are longer (at most ``max_quiet_s``), so
    a run that stopped is noticed within about a round; every 2 s once the ServerApp wrote
    its final metrics.

    Returns
    -------
    dict
        The SuperLink's final record of the run (``status``, ``network-traffic``, ...),
        also written to ``run_dir/deployment.json``.

    Raises
    ------
    RunTimeoutError
        If the run is still going after ``timeout_s``.

    """
    jsonl = RunDir(run_dir).rounds_jsonl_path
    done_marker = RunDir(run_dir).federated_metrics_path
    seen = 0
    start = time.monotonic()
    last_status = last_progress = start
    landed: list[float] = []  # when each round's line appeared
    info: dict[str, Any] = {}

    def drain() -> None:
        nonlocal seen, last_progress
        if not jsonl.is_file():
            return
        lines = jsonl.read_text().split("\n")[:-1]  # only complete lines
        for line in lines[seen:]:
            if line.strip():
                record = json.loads(line)
                for text in format_round(record, total_rounds, site_names):
                    emit(text)
                if not is_late_record(record):
                    landed.append(time.monotonic())
        if len(lines) > seen:
            last_progress = time.monotonic()
        seen = max(seen, len(lines))

    def quiet_limit() -> float:
        gaps = [b - a for a, b in zip(landed[:-1], landed[1:], strict=True)]
        typical = statistics.median(gaps) if gaps else 0.0
        return max(status_every_s, min(max_quiet_s, 1.5 * typical))

    while True:
        drain()
        now = time.monotonic()
        if done_marker.exists():
            due = now - last_status >= min(status_every_s, 2.0)
        else:
            # while rounds keep landing the run is evidently alive
            due = now - max(last_status, last_progress) >= quiet_limit()
        if not info or due:
            info = operator.run_info(run_id)
            last_status = now
            if str(info.get("status", "")).startswith("finished"):
                drain()
                if done_marker.is_file():
                    for text in format_final(json.loads(done_marker.read_text()), site_names):
                        emit(text)
                break
        if timeout_s is not None and now - start > timeout_s:
            raise RunTimeoutError(f"run {run_id} still {info.get('status', 'running')} after "
                             f"{timeout_s:.0f}s")
        time.sleep(poll_s)
    (Path(run_dir) / "deployment.json").write_text(
        json.dumps({"run_id": run_id, **info}, indent=2)
    )
    return info
