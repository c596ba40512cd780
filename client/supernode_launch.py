"""Start Flower's SuperNode with a shorter idle poll of the coordinator.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a poll of the SuperLink finds no message
(``flwr.supernode.start_client_internal``), and 0.5 s while waiting for a reply. Each round's
train and evaluate message therefore waits 1.5 s on average before the site even sees it. This
launcher caps those sleeps of that one module (nothing else in the process is affected), then
runs the ordinary ``flower-supernode`` command line::

    python -m consilia.client.supernode_launch --poll-interval 1.0 -- <flower-supernode args>

If a Flower upgrade moves the loop, the cap is skipped with a warning and the SuperNode runs
with Flower's own timing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import types
from typing import Any

__all__ = ["cap_supernode_poll", "main"]

log = logging.getLogger("consilia.site")


class _CappedTime(types.SimpleNamespace):
    """Stand-in for the ``time`` module whose ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_poll(cap_s: float) -> bool:
    """Cap the sleeps of Flower's SuperNode main loop at ``cap_s``; return whether it applied."""
    try:
        from flwr.supernode import start_client_internal as loop
    except ImportError:  # pragma: no cover - Flower moved the module
        log.warning("flwr.supernode.start_client_internal not found: poll interval unchanged")
        return False
    if getattr(loop, "time", None) is not time and not isinstance(loop.time, _CappedTime):
        log.warning("Flower's SuperNode loop changed: poll interval unchanged")
        return False
    loop.time = _CappedTime(cap_s)  # type: ignore[assignment]
    return True


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval S -- <flower-supernode args>`` and run the SuperNode."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, rest = argv[:cut], argv[cut + 1:]
    else:
        own, rest = [], argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-interval", type=float, default=3.0)
    args = parser.parse_args(own)
    if args.poll_interval < 3.0:
        cap_supernode_poll(args.poll_interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
