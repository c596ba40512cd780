"""Collect the sites' replies as soon as they arrive (Flower's deployment Grid waits 3 s steps).

Flower 1.42's ``HttpGrid.send_and_receive`` (the Grid a deployed ServerApp gets) sleeps a
fixed 3 s between polls for replies, so every train and every evaluate phase ends on a 3 s
boundary: on average 1.5 s lost per phase, 3 s per round, whatever the sites do.
:class:`FastPollGrid` wraps any Grid and implements the same ``send_and_receive`` on the Grid's
public ``push_messages``/``pull_messages``, polling after 0.05 s and then backing off to
``max_poll_s``; everything else is delegated unchanged. It also makes the Grid's own fetch of
a reply's arrays retry after 50 ms instead of 1 s (:mod:`consilia.common.flower.object_pulls`).

``consilia.server.app`` wraps its Grid with it; ``consilia.server.plain_grid_app:app`` is the
same ServerApp *without* the wrapper (Flower's plain polling), kept so the benchmark can
compare both.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from consilia.common.flower.compat import require_supported_flower
from consilia.common.flower.object_pulls import quicker_object_pulls

require_supported_flower()

__all__ = ["FastPollGrid"]


def _quicker_reply_object_pulls(grid: Grid) -> None:
    """Let the deployment Grid fetch a reply's arrays after 50 ms rather than 1 s."""
    module = sys.modules.get(type(grid).__module__)
    if module is not None and hasattr(module, "pull_objects"):
        quicker_object_pulls(module)


class FastPollGrid(Grid):
    """A Grid whose ``send_and_receive`` polls replies with a short, growing interval.

    Parameters
    ----------
    grid : Grid
        The Grid Flower passed to the ServerApp.
    first_poll_s, max_poll_s : float
        First wait between reply polls, and the cap it grows to (x1.5 per empty poll).

    """

    def __init__(self, grid: Grid, first_poll_s: float = 0.05, max_poll_s: float = 0.2):
        self._grid = grid
        self.first_poll_s = first_poll_s
        self.max_poll_s = max_poll_s
        _quicker_reply_object_pulls(grid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    # -- the Grid interface, delegated ------------------------------------------------------

    def set_run(self, run: Any) -> None:
        """Set the run of the wrapped Grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped Grid's run."""
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message with the wrapped Grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Return the wrapped Grid's node ids."""
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages`` through the wrapped Grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull the replies to ``message_ids`` from the wrapped Grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and return the replies that arrive within ``timeout`` seconds."""
        pending = set(self._grid.push_messages(messages))
        if not pending:  # e.g. no evaluate messages this round
            return []
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        wait = self.first_poll_s
        while timeout is None or time.time() < end:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in got)
            if not pending:
                break
            wait = self.first_poll_s if got else min(wait * 1.5, self.max_poll_s)
            time.sleep(wait if timeout is None else max(0.0, min(wait, end - time.time())))
        return replies
