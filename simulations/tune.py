"""``fl-sim tune``: hyperparameter search on the federated validation objective (Optuna).

Every trial is a full federated simulation (:func:`~consilia.simulations.run.run_experiment`,
baselines off) in ``OUT/trial-XXX/``. The objective is the **federated validation AUC**: the
sites' held-out validation AUC aggregated by the strategy in the last round
(``metrics/rounds.jsonl`` → ``federated_eval.auc``). The common test split is never used to
choose, so the chosen configuration's test metrics stay an unbiased estimate.

Search spaces are ``name=spec`` strings (``--space``):

* ``lr=1e-4:1e-2:log`` — a float range, log-uniform (``lo:hi`` is uniform); a range of two
  integers (``local_epochs=1:5``) is an integer range;
* ``proximal_mu=0,0.01,0.1`` — a list of choices (numbers, strings or booleans).

``name`` is a config path (``train.lr``, ``strategy.rounds``) or one of the short names in
:data:`ALIASES`. Samplers (all seeded with the experiment seed): ``grid``
(:class:`optuna.samplers.GridSampler`; ranges become ``grid_points`` values, log- or
linearly spaced), ``random`` (:class:`~optuna.samplers.RandomSampler`) and ``tpe``
(:class:`~optuna.samplers.TPESampler`, Bayesian; its first ``min(10, trials // 2)`` trials
are random start-up trials). All trials use the same seed, hence the same data partition,
so they differ only by their hyperparameters.

Outputs in ``OUT``: ``tuning_results.csv`` (trial, parameters, objective, seconds, state),
``tuning_summary.json`` and ``best_config.yaml`` — the base configuration with the best
parameters, a complete :class:`~consilia.common.config.ExperimentConfig` for
``fl-sim run --config OUT/best_config.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from consilia.common.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    parse_model,
)
from consilia.common.rundir.round_records import read_round_records

__all__ = [
    "ALIASES",
    "ParamSpec",
    "TuneResult",
    "federated_objective",
    "format_results",
    "grid_values",
    "make_sampler",
    "parse_space",
    "run_tuning",
]

logger = logging.getLogger("consilia")

#: Short names accepted in ``--space`` and the config fields they set.
ALIASES: dict[str, str] = {
    "lr": "train.lr",
    "local_epochs": "train.local_epochs",
    "batch_size": "train.batch_size",
    "optimizer": "train.optimizer",
    "weight_decay": "train.weight_decay",
    "momentum": "train.momentum",
    "proximal_mu": "strategy.proximal_mu",
    "rounds": "strategy.rounds",
    "strategy": "strategy.name",
    "server_lr": "strategy.server_lr",
}

SearchKind = Literal["grid", "random", "tpe"]


@dataclass(frozen=True)
class ParamSpec:
    """One dimension of the search space.

    Parameters
    ----------
    name : str
        The name given by the user (column of the results table).
    path : str
        The config field it sets, e.g. ``train.lr``.
    kind : {"float", "int", "categorical"}
        Range of floats, range of integers, or a list of choices.
    low, high : float
        Range bounds (ranges only).
    log : bool
        Log-uniform range.
    choices : tuple
        The choices (categorical only).

    """

    name: str
    path: str
    kind: Literal["float", "int", "categorical"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = field(default_factory=tuple)


def _number(text: str) -> int | float:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def _choice(text: str) -> Any:
    text = text.strip()
    try:
        return _number(text)
    except ValueError:
        value = yaml.safe_load(text)
        return value if isinstance(value, bool | str) else text


def parse_space(items: list[str]) -> list[ParamSpec]:
    """Parse ``name=spec`` strings into :class:`ParamSpec` (see the module docstring).

    Parameters
    ----------
    items : list of str
        E.g. ``["lr=1e-4:1e-2:log", "local_epochs=1,2"]``.

    Returns
    -------
    list of ParamSpec
        One per item, in order.

    Raises
    ------
    ConfigError
        For a malformed item, a duplicate name, a range with ``lo >= hi`` or a log range
        that is not positive.

    """
    specs: list[ParamSpec] = []
    for item in items:
        name, sep, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise ConfigError(f"--space '{item}': expected NAME=LO:HI[:log] or NAME=A,B,C")
        if any(s.name == name for s in specs):
            raise ConfigError(f"--space '{item}': '{name}' given twice")
        path = ALIASES.get(name, name)
        if "." not in path:
            raise ConfigError(
                f"--space '{item}': unknown name '{name}'; use a config path such as "
                f"train.lr or one of {', '.join(ALIASES)}"
            )
        if ":" in spec:
            parts = spec.split(":")
            log = len(parts) == 3 and parts[2].strip().lower() == "log"
            if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
                raise ConfigError(f"--space '{item}': a range is LO:HI or LO:HI:log")
            try:
                low, high = _number(parts[0]), _number(parts[1])
            except ValueError:
                raise ConfigError(f"--space '{item}': range bounds must be numbers") from None
            if low >= high:
                raise ConfigError(f"--space '{item}': LO must be below HI")
            if log and low <= 0:
                raise ConfigError(f"--space '{item}': a log range needs LO > 0")
            kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
            specs.append(ParamSpec(name, path, kind, float(low), float(high), log))
        else:
            choices = tuple(_choice(c) for c in spec.split(",") if c.strip())
            if not choices:
                raise ConfigError(f"--space '{item}': no choices given")
            specs.append(ParamSpec(name, path, "categorical", choices=choices))
    if not specs:
        raise ConfigError("tune needs at least one --space NAME=SPEC")
    return specs


def grid_values(spec: ParamSpec, points: int = 3) -> list[Any]:
    """Return the values a grid search tries for ``spec``.

    Choices are used as given; ranges become ``points`` values (geometric spacing for log
    ranges, linear otherwise; integer ranges rounded and de-duplicated).
    """
    if spec.kind == "categorical":
        return list(spec.choices)
    if points < 2:
        raise ConfigError(f"--grid-points must be >= 2 (got {points})")
    space = np.geomspace if spec.log else np.linspace
    values = space(spec.low, spec.high, points)
    if spec.kind == "int":
        return sorted({int(round(v)) for v in values})
    return [float(f"{v:.6g}") for v in values]


def make_sampler(
    search: SearchKind, specs: list[ParamSpec], seed: int, trials: int, grid_points: int = 3
) -> Any:
    """Return the seeded Optuna sampler for ``search``.

    Raises
    ------
    ConfigError
        For an unknown ``search``.

    """
    import optuna

    if search == "grid":
        space = {s.name: grid_values(s, grid_points) for s in specs}
        return optuna.samplers.GridSampler(space, seed=seed)
    if search == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, trials // 2)))
    raise ConfigError(f"--search {search!r}: choose grid, random or tpe")


def _suggest(trial: Any, spec: ParamSpec, search: SearchKind, grid_points: int) -> Any:
    if search == "grid" or spec.kind == "categorical":
        values = grid_values(spec, grid_points)
        return trial.suggest_categorical(spec.name, values)
    if spec.kind == "int":
        return trial.suggest_int(spec.name, int(spec.low), int(spec.high), log=spec.log)
    return trial.suggest_float(spec.name, spec.low, spec.high, log=spec.log)


def federated_objective(run_dir: Path) -> float:
    """Return the tuning objective of a run: last round's federated validation AUC.

    Parameters
    ----------
    run_dir : Path
        A run directory with ``metrics/rounds.jsonl``.

    Returns
    -------
    float
        ``federated_eval.auc`` of the last round (the strategy's aggregate of the sites'
        own validation AUCs); NaN when that round has none (e.g. a site's validation split
        holds one class only, or the round was incomplete).

    """
    records = read_round_records(Path(run_dir))
    if not records:
        return math.nan
    last = records[-1]
    value = (last.get("federated_eval") or {}).get("auc")
    return float(value) if isinstance(value, int | float) else math.nan


@dataclass
class TuneResult:
    """Outcome of :func:`run_tuning`."""

    out_dir: Path
    table: pd.DataFrame
    best_params: dict[str, Any]
    best_value: float
    best_config: ExperimentConfig


def _config_with(base: dict[str, Any], overrides: list[str], source: str) -> ExperimentConfig:
    return parse_model(ExperimentConfig, apply_overrides(base, overrides), source)


def _override(spec: ParamSpec, value: Any) -> str:
    return f"{spec.path}={json.dumps(value)}"


def _check_space(base: dict[str, Any], specs: list[ParamSpec], grid_points: int) -> None:
    """Fail before the first trial if any value of the space makes an invalid config."""
    for spec in specs:
        values = grid_values(spec, grid_points) if spec.kind == "categorical" else (
            [int(spec.low), int(spec.high)] if spec.kind == "int" else [spec.low, spec.high]
        )
        for value in values:
            _config_with(base, [_override(spec, value)], f"--space {spec.name}={value}")


def _default_out(cfg: ExperimentConfig) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output_dir) / f"{cfg.name}-tune-{stamp}"


def run_tuning(
    cfg: ExperimentConfig,
    specs: list[ParamSpec],
    search: SearchKind = "tpe",
    trials: int | None = None,
    out_dir: Path | None = None,
    grid_points: int = 3,
    verbose: bool = False,
) -> TuneResult:
    """Search hyperparameters; each trial is a full federated simulation.

    Parameters
    ----------
    cfg : ExperimentConfig
        The base experiment; the best parameters are written on top of it.
    specs : list of ParamSpec
        The search space (:func:`parse_space`).
    search : {"grid", "random", "tpe"}
        The sampler.
    trials : int, optional
        Number of trials (default: the grid size for ``grid``, else 10). A grid search
        stops early once every grid point was tried.
    out_dir : Path, optional
        Output folder (default ``cfg.output_dir/<name>-tune-<UTC time>``).
    grid_points : int
        Values per range in a grid search.
    verbose : bool
        Show Flower/Ray logs.

    Returns
    -------
    TuneResult
        The results table (one row per trial), the best parameters and objective, and the
        best configuration (also written to ``best_config.yaml``).

    Raises
    ------
    ConfigError
        If the space yields invalid configurations, the federation does not evaluate on the
        sites (``strategy.fraction_evaluate`` or ``min_evaluate_sites`` is 0), or no trial
        produced an objective.

    """
    import optuna

    from consilia.simulations.run import run_experiment

    if cfg.strategy.fraction_evaluate == 0 or cfg.strategy.min_evaluate_sites == 0:
        raise ConfigError(
            "tune optimises the sites' federated validation AUC: set "
            "strategy.fraction_evaluate > 0 and strategy.min_evaluate_sites >= 1"
        )
    base = json.loads(cfg.model_dump_json())
    _check_space(base, specs, grid_points)
    grid_size = int(np.prod([len(grid_values(s, grid_points)) for s in specs]))
    n_trials = trials if trials is not None else (grid_size if search == "grid" else 10)
    if n_trials < 1:
        raise ConfigError(f"--trials must be >= 1 (got {n_trials})")
    out = Path(out_dir) if out_dir is not None else _default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    fixed = ["baselines.centralized=false", "baselines.local_only=false"]
    rows: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        params = {s.name: _suggest(trial, s, search, grid_points) for s in specs}
        run_dir = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial_cfg = _config_with(base, fixed + [_override(s, params[s.name]) for s in specs],
                                 f"trial {trial.number}")
        logger.info("trial %d/%d: %s", trial.number + 1, n_trials,
                    ", ".join(f"{k}={v}" for k, v in params.items()))
        start = time.perf_counter()
        row: dict[str, Any] = {"trial": trial.number, **params, "objective": math.nan,
                               "seconds": math.nan, "state": "FAIL", "run_dir": str(run_dir),
                               "error": ""}
        try:
            run_experiment(trial_cfg, run_dir, verbose=verbose)
            value = federated_objective(run_dir)
            row.update(objective=value, state="COMPLETE" if math.isfinite(value) else "FAIL")
            if not math.isfinite(value):
                row["error"] = "no federated_eval.auc in the last round"
            return value
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise
        finally:
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            _write_table(out, rows, specs)
            logger.info("trial %d: federated validation AUC %s (%.1fs)", trial.number,
                        f"{row['objective']:.4f}" if math.isfinite(row["objective"]) else "n/a",
                        row["seconds"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", study_name=f"{cfg.name}-{search}",
        sampler=make_sampler(search, specs, cfg.seed, n_trials, grid_points),
    )
    study.optimize(objective, n_trials=n_trials, catch=(Exception,))
    table = _write_table(out, rows, specs)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ConfigError(
            f"no tuning trial produced a federated validation AUC; see {out}/tuning_results.csv"
        )
    best = study.best_trial
    best_cfg = _config_with(base, [_override(s, best.params[s.name]) for s in specs],
                            "best configuration")
    (out / "best_config.yaml").write_text(
        yaml.safe_dump(json.loads(best_cfg.model_dump_json()), sort_keys=False)
    )
    summary = {
        "search": search, "objective": "federated validation AUC (last round, "
        "rounds.jsonl federated_eval.auc)", "trials": len(study.trials),
        "completed": len(done), "best_trial": best.number, "best_value": best.value,
        "best_params": best.params, "best_run_dir": best.user_attrs.get("run_dir"),
        "space": [asdict(s) for s in specs],
    }
    (out / "tuning_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return TuneResult(out, table, dict(best.params), float(best.value), best_cfg)


def _write_table(out: Path, rows: list[dict[str, Any]], specs: list[ParamSpec]) -> pd.DataFrame:
    columns = ["trial", *[s.name for s in specs], "objective", "seconds", "state", "run_dir",
               "error"]
    table = pd.DataFrame(rows, columns=columns)
    table.to_csv(out / "tuning_results.csv", index=False)
    return table


def format_results(table: pd.DataFrame) -> str:
    """Render the results table, best objective first, without paths and errors."""
    shown = table.drop(columns=["run_dir", "error"]).sort_values(
        "objective", ascending=False, na_position="last"
    )
    return shown.to_string(index=False, float_format=lambda v: f"{v:.6g}")
