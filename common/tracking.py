"""Optional experiment tracking: per-round scalars to TensorBoard or MLflow.

Both are optional extras (``pip install tensorboard`` / ``pip install mlflow``); nothing here
imports them until a tracker is asked for. The run recorder (simulation and deployment alike)
calls :meth:`Tracker.log_round` once per round with the flattened round record
(``server_eval.auc``, ``sites.site-00.train-loss``, ...); non-numeric values are skipped.

* ``tensorboard``: event files under ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``),
  written with :class:`torch.utils.tensorboard.SummaryWriter`; tags use ``/`` instead of dots.
* ``mlflow``: one MLflow run named after the Consilia run, the flattened configuration as
  parameters and every scalar as a metric with ``step=round``. The tracking URI is
  ``$MLFLOW_TRACKING_URI`` when set, else a file store at ``RUN_DIR/mlruns``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from consilia.common.registry import Registry
from consilia.common.rundir.round_records import LATE_KEY

__all__ = [
    "TRACKERS",
    "TRACKER_KINDS",
    "MLflowTracker",
    "TensorBoardTracker",
    "Tracker",
    "TrackerKind",
    "TrackingUnavailableError",
    "create_tracker",
    "open_tracker",
    "scalars",
]

logger = logging.getLogger("consilia")

#: MLflow limits a parameter value to 6000 characters (older servers: 500).
_MLFLOW_PARAM_MAX = 500


class TrackingUnavailableError(RuntimeError):
    """The requested tracker's package is not installed."""


class Tracker(Protocol):
    """What the run recorder needs from a tracker."""

    def log_round(self, server_round: int, values: Mapping[str, Any]) -> None:
        """Log one round's flattened record."""

    def close(self) -> None:
        """Flush and release the backend."""


#: Keys of a round record that are bookkeeping, not metrics.
_NOT_SCALARS = frozenset({"round", LATE_KEY})


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """Keep the finite numeric entries of a flat record (bookkeeping keys excluded).

    Parameters
    ----------
    values : mapping
        Flat ``{dotted.name: value}`` record.

    Returns
    -------
    dict
        ``{name: float}`` for ints and floats that are finite; booleans, strings, lists and
        ``None`` are dropped.

    """
    out: dict[str, float] = {}
    for key, value in values.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    """Write each round's scalars as TensorBoard events under ``run_dir/tensorboard``.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    config : mapping, optional
        The run configuration, stored once as a text summary (``config``).

    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if config:
            import json

            text = json.dumps(dict(config), indent=2, default=str)
            self.writer.add_text("config", f"```\n{text}\n```", 0)

    def log_round(self, server_round: int, values: Mapping[str, Any]) -> None:
        """Add every scalar of the round as ``group/name`` at step ``server_round``."""
        for key, value in scalars(values).items():
            self.writer.add_scalar(key.replace(".", "/"), value, server_round)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class MLflowTracker:
    """Log each round's scalars to one MLflow run.

    Parameters
    ----------
    run_dir : Path
        The run directory (the default file store is ``run_dir/mlruns``).
    run_name : str
        MLflow run name (the Consilia run name).
    config : mapping, optional
        The flattened run configuration, logged as parameters.

    """

    def __init__(self, run_dir: Path, run_name: str,
                 config: Mapping[str, Any] | None = None) -> None:
        import mlflow

        self._mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
        self.run = mlflow.start_run(run_name=run_name)
        if config:
            params = {k: str(v)[:_MLFLOW_PARAM_MAX] for k, v in config.items()}
            mlflow.log_params(params)
        mlflow.set_tag("consilia.run_dir", str(Path(run_dir).resolve()))

    def log_round(self, server_round: int, values: Mapping[str, Any]) -> None:
        """Log every scalar of the round with ``step=server_round``."""
        metrics = {_mlflow_key(k): v for k, v in scalars(values).items()}
        if metrics:
            self._mlflow.log_metrics(metrics, step=server_round)

    def close(self) -> None:
        """End the MLflow run."""
        self._mlflow.end_run()


def _mlflow_key(key: str) -> str:
    """MLflow metric names allow alphanumerics, ``_ - . / space``; replace anything else."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


#: ``factory(run_dir, run_name, config)`` of a tracker backend.
TrackerFactory = Callable[[Path, str, Mapping[str, Any] | None], Tracker]


@dataclass(frozen=True)
class TrackerKind:
    """One accepted value of ``RunConfig.tracking``.

    Parameters
    ----------
    package : str, optional
        The package the backend needs (``None``: tracking off).
    factory : callable, optional
        ``factory(run_dir, run_name, config)`` returning the tracker (``None``: tracking off).

    """

    package: str | None
    factory: TrackerFactory | None


def _tensorboard(run_dir: Path, run_name: str, config: Mapping[str, Any] | None) -> Tracker:
    del run_name  # TensorBoard has no run name: the log folder is the run
    return TensorBoardTracker(run_dir, config)


def _mlflow(run_dir: Path, run_name: str, config: Mapping[str, Any] | None) -> Tracker:
    return MLflowTracker(run_dir, run_name, config)


_BUILT_IN: tuple[tuple[str, TrackerKind], ...] = (
    ("none", TrackerKind(None, None)),
    ("tensorboard", TrackerKind("tensorboard", _tensorboard)),
    ("mlflow", TrackerKind("mlflow", _mlflow)),
)

#: The tracker backends, by their ``RunConfig.tracking`` name.
TRACKER_KINDS: Registry[TrackerKind] = Registry("tracker")
for _name, _kind in _BUILT_IN:
    TRACKER_KINDS.register(_name, _kind)

#: Accepted values of ``RunConfig.tracking`` (in this order) and the package each one needs.
TRACKERS: dict[str, str | None] = {name: kind.package for name, kind in _BUILT_IN}


def create_tracker(
    kind: str,
    run_dir: Path,
    run_name: str = "consilia-run",
    config: Mapping[str, Any] | None = None,
) -> Tracker | None:
    """Return the tracker for ``RunConfig.tracking`` (``None`` for ``"none"``).

    Parameters
    ----------
    kind : str
        ``"none"``, ``"tensorboard"`` or ``"mlflow"``.
    run_dir : Path
        The run directory.
    run_name : str
        Name shown by the tracking UI.
    config : mapping, optional
        Flattened run configuration (logged once).

    Returns
    -------
    Tracker or None
        The tracker, or ``None`` when tracking is off.

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    TrackingUnavailableError
        When the package ``kind`` needs is not installed (the message says what to install).

    """
    if kind not in TRACKER_KINDS:
        raise ValueError(f"tracking={kind!r} unknown; allowed: {', '.join(TRACKERS)}")
    package, factory = TRACKER_KINDS.get(kind).package, TRACKER_KINDS.get(kind).factory
    if package is None or factory is None:
        return None
    if importlib.util.find_spec(package) is None:
        raise TrackingUnavailableError(
            f"tracking={kind!r} needs the '{package}' package: pip install {package} "
            "(or set tracking: none)"
        )
    return factory(run_dir, run_name, config)


class _Guarded:
    """Wrap a tracker so that a tracking failure is logged once and never stops a run."""

    def __init__(self, inner: Tracker) -> None:
        self.inner: Tracker | None = inner

    def log_round(self, server_round: int, values: Mapping[str, Any]) -> None:
        if self.inner is None:
            return
        try:
            self.inner.log_round(server_round, values)
        except Exception as exc:  # noqa: BLE001 - tracking is auxiliary to the run directory
            logger.warning("tracking failed at round %d and is now off: %s", server_round, exc)
            self.close()

    def close(self) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            try:
                inner.close()
            except Exception as exc:  # noqa: BLE001
                logger.warning("closing the tracker failed: %s", exc)


def open_tracker(
    kind: str,
    run_dir: Path,
    run_name: str = "consilia-run",
    config: Mapping[str, Any] | None = None,
) -> Tracker | None:
    """Like :func:`create_tracker`, but a missing package or a failing backend only warns.

    The run directory stays the record of the run; tracking is an extra view of it, so a
    tracker problem must not stop training. Failures while logging turn tracking off with
    one warning.
    """
    try:
        tracker = create_tracker(kind, run_dir, run_name, config)
    except TrackingUnavailableError as exc:
        logger.warning("%s; continuing without tracking", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. an unreachable MLflow server
        logger.warning("tracking=%s could not start (%s); continuing without it", kind, exc)
        return None
    if tracker is not None:
        logger.info("tracking per-round metrics with %s", kind)
    return None if tracker is None else _Guarded(tracker)
