"""Start Flower's SuperNode with adaptive polling of the coordinator.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a poll of the SuperLink finds no message
(``flwr.supernode.start_client_internal``), and 0.5 s steps while it waits for the ClientApp's
reply. Each round's train and evaluate message therefore waits 1.5 s on average before the
site even sees it, plus up to 0.5 s before the reply leaves. This launcher replaces the
``time`` module of that one loop (nothing else in the process is affected) with
:class:`AdaptivePollTime`: while a run is active (a message was handled in the last
``active_window_s``) the SuperNode polls every ``active_s`` and checks for the reply at the
same pace; when idle it polls every ``idle_s``. It also makes the loop's object pulls retry
after 50 ms instead of 1 s (:mod:`consilia.common.flower.object_pulls`). Then it runs the ordinary
``flower-supernode`` command line::

    python -m consilia.common.flower.supernode_launch --poll-interval 1.0 \
        --active-poll-interval 0.1 --active-window 60 -- <flower-supernode args>

If a Flower upgrade moves the loop, the change is skipped with a warning and the SuperNode
runs with Flower's own timing.

The SuperNode runs in this process (no further child), so the parent-death signal ``fl-client``
sets for it (:func:`consilia.common.child_env.die_with_parent`) reaches Flower's own SIGTERM
handling; the ``flower-superexec`` / ``flwr-clientapp`` processes Flower starts watch this
process's pid and end with it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from consilia.common.flower.compat import require_supported_flower
from consilia.common.flower.object_pulls import quicker_object_pulls

require_supported_flower()

__all__ = ["AdaptivePollTime", "main", "tune_supernode_poll"]

log = logging.getLogger("consilia.site")

#: Flower's SuperNode sleeps this long or longer only when a poll found no message.
_IDLE_SLEEP_MIN_S = 1.0


class AdaptivePollTime(types.SimpleNamespace):
    """Stand-in for the ``time`` module of Flower's SuperNode loop.

    ``sleep`` calls shorter than a second are Flower's waits for a reply (a run is active):
    they are shortened to ``active_s`` and mark the node active. Longer ones are its idle
    poll: ``active_s`` within ``window_s`` of the last activity, ``idle_s`` otherwise.
    Every other attribute is the real ``time`` module's.

    Parameters
    ----------
    idle_s : float
        Longest idle wait between polls of the coordinator.
    active_s : float
        Wait between polls (and reply checks) while a run is active.
    window_s : float
        How long after the last handled message the node counts as active.
    clock, sleeper : callable, optional
        Injected for tests (default ``time.monotonic``/``time.sleep``).
    """

    def __init__(
        self,
        idle_s: float,
        active_s: float,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleeper: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self._idle, self._active, self._window = idle_s, min(active_s, idle_s), window_s
        self._clock, self._sleep = clock, sleeper
        self._last_active = float("-inf")

    @property
    def active(self) -> bool:
        """Whether a message was handled within the active window."""
        return self._clock() - self._last_active < self._window

    def sleep(self, seconds: float) -> None:
        """Sleep the adapted time instead of Flower's fixed one."""
        if seconds < _IDLE_SLEEP_MIN_S:  # waiting for the ClientApp's reply: a run is active
            self._last_active = self._clock()
            self._sleep(min(seconds, self._active))
            return
        self._sleep(min(seconds, self._active if self.active else self._idle))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def tune_supernode_poll(idle_s: float, active_s: float, window_s: float) -> bool:
    """Install :class:`AdaptivePollTime` in Flower's SuperNode loop; return whether it applied."""
    try:
        from flwr.supernode import start_client_internal as loop
    except ImportError:  # pragma: no cover - Flower moved the module
        log.warning("flwr.supernode.start_client_internal not found: poll interval unchanged")
        return False
    if getattr(loop, "time", None) is not time and not isinstance(loop.time, AdaptivePollTime):
        log.warning("Flower's SuperNode loop changed: poll interval unchanged")
        return False
    setattr(loop, "time", AdaptivePollTime(idle_s, active_s, window_s))  # noqa: B010 - the patch
    quicker_object_pulls(loop)  # the model's arrays: retry after 50 ms, not 1 s
    return True


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval S [--active-poll-interval A --active-window W] -- <args>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, rest = argv[:cut], argv[cut + 1:]
    else:
        own, rest = [], argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-interval", type=float, default=3.0,
                        help="idle wait between polls of the coordinator (Flower: 3 s)")
    parser.add_argument("--active-poll-interval", type=float, default=None,
                        help="wait between polls while a run is active (default: the idle one)")
    parser.add_argument("--active-window", type=float, default=60.0,
                        help="seconds after the last message that count as an active run")
    args = parser.parse_args(own)
    active = args.poll_interval if args.active_poll_interval is None else args.active_poll_interval
    if args.poll_interval < 3.0 or active < 0.5:
        tune_supernode_poll(args.poll_interval, active, args.active_window)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
