"""The site's long-lived ClientApp process (Flower's ``--isolation process``).

``fl-client`` starts the Flower SuperNode with ``--isolation process`` and this process next
to it. Flower's default (``subprocess``) starts a fresh ``flwr-clientapp`` for every task and
lets it import whatever ClientApp the run's app bundle names; this process instead

- imports the Consilia ClientApp installed at the site once (torch, MONAI and the site's data
  stay loaded between rounds: no per-task process start or import);
- asks the SuperNode's local runtime API (127.0.0.1, protected by a shared secret) for tasks;
- for each task, checks the run's app bundle against the site's ``policy.approved_apps``
  (:mod:`consilia.client.site.app_approval`) **before** anything runs, refuses unapproved bundles
  with a clear reason (an error reply the coordinator logs), and never installs or imports
  code from a bundle;
- runs the installed ``consilia.client.app:app`` on the task's message and context, turns
  a policy refusal or any failure into an error reply naming the site and the reason;
- logs every task it takes part in (``<state_dir>/logs/site.log`` and one JSON line per task
  in ``<state_dir>/logs/rounds.jsonl``).

It uses the same Flower 1.42 runtime calls as ``flwr-clientapp`` (``pull_task_input``,
``push_message``, ``push_task_output``) and ``flower-superexec`` (``AcquireTask``), all
behind :mod:`consilia.common.flower.clientapp_process`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consilia.client.site.app_approval import AppNotApproved, check_app_approved, identity_from_fab
from consilia.client.site.config import SiteConfig, load_site_config
from consilia.client.site.policy import SitePolicyViolation
from consilia.common.config import ConfigError
from consilia.common.constants import ConfigKey, MessageKey
from consilia.common.flower.clientapp_process import (
    TaskAcquirer,
    TaskChannel,
    failure_reply,
    refusal_reply,
    stop_with_parent,
)
from consilia.common.logs import SITE, setup_logging

if TYPE_CHECKING:  # the locator module loads torch; the worker imports it in load_app
    from consilia.client.site.locator import SiteLocator

__all__ = ["SiteWorker", "TaskOutcome", "main", "setup_site_logging"]

log = logging.getLogger("consilia.site")


@dataclass
class TaskOutcome:
    """What happened to one task (one round's train or evaluate message)."""

    run_id: int
    server_round: str
    message_type: str
    status: str  # "ok" | "refused" | "failed"
    seconds: float
    reason: str = ""
    app: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    #: a train task's scores of the model it received (``site_evaluation: with-next-round``)
    evaluation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Return one JSON line for ``rounds.jsonl``."""
        record = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "run_id": str(self.run_id),
            "round": self.server_round,
            "type": self.message_type,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
            "app": self.app,
            "metrics": self.metrics,
            "timing": self.timing,
        }
        if self.evaluation:
            record["evaluation"] = self.evaluation
        return json.dumps(record, ensure_ascii=False)


def setup_site_logging(config: SiteConfig, verbose: bool = False) -> None:
    """Log ``consilia`` messages to stdout and ``<state_dir>/logs/site.log``."""
    setup_logging(verbose, config.log_dir / "site.log", SITE, quiet_flower=True)


def _refusal_text(site: str, exc: BaseException) -> str:
    reason = str(getattr(exc, "reason", None) or exc)
    return reason if reason.startswith(f"site '{site}'") else f"site '{site}' refused: {reason}"


def _failure_text(site: str, exc: BaseException) -> str:
    return f"site '{site}' failed the task: {type(exc).__name__}: {exc}"


def _is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, SitePolicyViolation | AppNotApproved):
        return True
    return type(exc).__name__ in {"PrivacyBudgetExceeded", "LedgerCorruptError"}


class SiteWorker:
    """Execute the SuperNode's tasks with the installed Consilia ClientApp.

    Parameters
    ----------
    config_path : Path
        The site YAML (re-read for every task, so policy edits apply at the next task).
    runtime_api_address : str
        The SuperNode's local runtime API, ``127.0.0.1:PORT``.
    secret : bytes, optional
        Shared secret the SuperNode was started with (``--superexec-auth-secret-file``).
    poll_interval_s : float
        Wait between task requests when idle.
    active_poll_interval_s : float, optional
        Wait between task requests within ``active_window_s`` of the last task (a run is
        going on and its next message is due soon); default ``poll_interval_s``.
    active_window_s : float
        How long after a task the worker keeps the active pace.
    config : SiteConfig, optional
        The configuration already read from ``config_path`` (default: read it here).

    """

    def __init__(
        self,
        config_path: Path,
        runtime_api_address: str,
        secret: bytes | None = None,
        poll_interval_s: float = 0.2,
        active_poll_interval_s: float | None = None,
        active_window_s: float = 60.0,
        config: SiteConfig | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.config = config if config is not None else load_site_config(self.config_path)
        self.address = runtime_api_address
        self.secret = secret
        self.poll_interval_s = poll_interval_s
        self.active_poll_interval_s = min(
            poll_interval_s if active_poll_interval_s is None else active_poll_interval_s,
            poll_interval_s,
        )
        self.active_window_s = active_window_s
        self._last_task = float("-inf")
        self.stop_event = threading.Event()
        self._app: Any = None
        self._locator: SiteLocator | None = None
        self._runs_seen: list[int] = []

    # -- set-up ---------------------------------------------------------------------------

    def load_app(self) -> Any:
        """Import the installed Consilia ClientApp once (torch and friends load here)."""
        if self._app is None:
            start = time.perf_counter()
            # imported here, not at the top: torch and friends load once the worker runs
            from consilia.client.app import build_client_app
            from consilia.client.site.assembly import load_deployed_site
            from consilia.client.site.locator import SiteLocator

            # the deployed site reads the configuration this worker re-reads once per task
            self._locator = SiteLocator(deployed_loader=partial(
                load_deployed_site, config_source=lambda: self.config))
            self._app = build_client_app(self._locator)
            log.info("Consilia ClientApp loaded in %.1f s", time.perf_counter() - start)
        return self._app

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Ask for tasks until :attr:`stop_event` is set (back off while the SuperNode is away)."""
        import httpx

        self.load_app()
        acquire = TaskAcquirer(self.address, self.secret)
        backoff, connected = 0.5, False
        log.info("site %s: waiting for tasks from the SuperNode at %s",
                 self.config.name, self.address)
        try:
            while not self.stop_event.is_set():
                try:
                    token = acquire.acquire()
                except httpx.HTTPError as exc:
                    if connected:
                        log.warning("SuperNode runtime API unavailable (%s); retrying", exc)
                    connected = False
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                if not connected:
                    log.debug("connected to the SuperNode runtime API at %s", self.address)
                connected, backoff = True, 0.5
                if token is not None:
                    self.execute(token)
                    self._last_task = time.monotonic()
                    continue
                self.stop_event.wait(self.current_poll_interval())
        finally:
            acquire.close()

    def current_poll_interval(self) -> float:
        """Return the wait before the next task request: short during a run, long when idle."""
        if time.monotonic() - self._last_task < self.active_window_s:
            return self.active_poll_interval_s
        return self.poll_interval_s

    # -- one task -------------------------------------------------------------------------

    def _reload_config(self) -> None:
        try:
            self.config = load_site_config(self.config_path)
        except ConfigError as exc:  # keep serving with the last good policy, say so
            log.error("site config no longer valid, keeping the previous one:\n%s", exc)

    def execute(self, token: str) -> TaskOutcome:
        """Run one task: approve the bundle, run the installed app, push the reply."""
        start = time.perf_counter()
        self._reload_config()
        name = self.config.name
        channel = TaskChannel(self.address, token)
        timing: dict[str, float] = {}
        message = context = reply = None
        outcome = TaskOutcome(0, "", "", "failed", 0.0)
        completed, details = False, "task failed before it started"
        try:
            task = channel.pull()
            message, context = task.message, task.context
            timing["pull"] = time.perf_counter() - start
            outcome.run_id = task.run_id
            outcome.server_round = _round_of(message)
            outcome.message_type = message.metadata.message_type
            try:
                identity = identity_from_fab(task.fab_content, task.fab_hash)
                outcome.app = identity.describe()
                check_app_approved(self.config.policy.approved_apps, identity, name)
            except AppNotApproved as exc:
                reason = _refusal_text(name, exc)
                reply = refusal_reply(message, reason)
                outcome.status, outcome.reason, details = "refused", reason, reason
            else:
                if identity.code_files:
                    log.debug("bundle carries %s (never imported here)", identity.code_files)
                self._note_run(task.run_id)
                app_start = time.perf_counter()
                try:
                    reply = self.load_app()(message=message, context=context)
                    completed, details, outcome.status = True, "", "ok"
                    outcome.metrics = _metrics_of(reply)
                    outcome.evaluation = _metrics_of(reply, MessageKey.EVALUATION.value)
                except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
                    refused = _is_refusal(exc)
                    reason = _refusal_text(name, exc) if refused else _failure_text(name, exc)
                    if not refused:
                        log.exception("task of run %s failed", task.run_id)
                    reply = failure_reply(message, reason)
                    outcome.status = "refused" if refused else "failed"
                    outcome.reason = details = reason
                timing["app"] = time.perf_counter() - app_start
        except Exception as exc:  # noqa: BLE001 - runtime API trouble: report, keep serving
            log.exception("could not process task")
            details = outcome.reason = _failure_text(name, exc)
        finally:
            push_start = time.perf_counter()
            try:
                if channel.cancelled:
                    log.warning("the SuperNode cancelled this task (run stopped or expired)")
                if reply is not None and context is not None:
                    channel.push_reply(reply, context)
                channel.finish(context, completed, details)
            except Exception:  # noqa: BLE001
                log.exception("could not hand the reply to the SuperNode")
            finally:
                channel.close()
            timing["push"] = time.perf_counter() - push_start
        outcome.seconds = time.perf_counter() - start
        outcome.timing = {k: round(v, 3) for k, v in timing.items()}
        self._log_outcome(outcome)
        return outcome

    def _note_run(self, run_id: int) -> None:
        """Keep the loaded data of the two most recent runs only (long-lived process)."""
        if run_id in self._runs_seen:
            return
        self._runs_seen = [*self._runs_seen[-1:], run_id]
        if self._locator is not None:
            self._locator.forget_runs(set(self._runs_seen))

    def _log_outcome(self, outcome: TaskOutcome) -> None:
        where = f"run {outcome.run_id} round {outcome.server_round or '?'} {outcome.message_type}"
        if outcome.status == "ok":
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in outcome.metrics.items()
            )
            if outcome.evaluation:
                shown += "; received model: " + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in outcome.evaluation.items())
            log.info("took part in %s (%.1f s): %s", where, outcome.seconds, shown)
        elif outcome.status == "refused":
            log.warning("refused %s: %s", where, outcome.reason)
        else:
            log.error("failed %s: %s", where, outcome.reason)
        try:
            self.config.rounds_log.parent.mkdir(parents=True, exist_ok=True)
            with self.config.rounds_log.open("a", encoding="utf-8") as handle:
                handle.write(outcome.to_json() + "\n")
        except OSError as exc:
            log.error("cannot write %s: %s", self.config.rounds_log, exc)


def _round_of(message: Any) -> str:
    """Return a message's server round: its group id, else the ``server-round`` it carries."""
    if message.metadata.group_id:
        return str(message.metadata.group_id)
    try:
        config = message.content.config_records.get(MessageKey.CONFIG.value)
        value = config.get(ConfigKey.SERVER_ROUND.value) if config is not None else None
    except Exception:  # noqa: BLE001 - a message without content (error) has no round
        return ""
    return "" if value is None else str(value)


def _metrics_of(reply: Any, key: str = MessageKey.METRICS.value) -> dict[str, Any]:
    """Return the scalar entries of the reply's record ``key`` (empty when it has none)."""
    try:
        record = reply.content[key]
    except (KeyError, AttributeError, ValueError):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, int | float)}


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m consilia.client.site.worker --site site.yaml ...``."""
    parser = argparse.ArgumentParser(description="Consilia site ClientApp process")
    parser.add_argument("--site", required=True, type=Path)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--secret-file", type=Path)
    parser.add_argument("--parent-pid", type=int, help="stop when this process ends")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = load_site_config(args.site)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_site_logging(config, args.verbose)
    secret = args.secret_file.read_bytes() if args.secret_file else None
    worker = SiteWorker(
        args.site, args.runtime_api_address, secret, config.runtime.task_poll_interval_s,
        config.runtime.active_poll_interval_s, config.runtime.active_window_s, config=config,
    )

    def _stop(signum: int, _frame: Any) -> None:
        log.info("site worker stopping (signal %d)", signum)
        worker.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.parent_pid is not None:
        stop_with_parent(args.parent_pid)  # raises SIGINT here when fl-client dies
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
