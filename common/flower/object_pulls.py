"""Retry Flower's object pulls after 50 ms instead of 1 s.

Flower 1.42 hands a message to its receiver (a SuperNode, or the ServerApp's Grid) as soon as
the message is stored, while its objects (the model's arrays) may still be uploading; the
receiver's ``pull_objects`` then finds an object unavailable and waits ``PULL_INITIAL_BACKOFF``
= 1 s (doubling up to 10 s) before asking again. For a small model the upload takes
milliseconds, so every message paid up to a second for nothing, twice per round.

:func:`quicker_object_pulls` rebinds ``pull_objects`` in one Flower module (the SuperNode's
main loop or the ServerApp's ``HttpGrid``) to the same function with a 50 ms first retry and
a 1 s cap; retries are still bounded by Flower's per-object try limit and total time limit.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

from consilia.common.flower.compat import require_supported_flower

require_supported_flower()

__all__ = ["quicker_object_pulls"]

log = logging.getLogger("consilia")


def quicker_object_pulls(
    module: ModuleType, initial_backoff_s: float = 0.05, backoff_cap_s: float = 1.0
) -> bool:
    """Make ``module.pull_objects`` retry sooner; return whether it applied.

    Parameters
    ----------
    module : module
        A Flower module that calls ``pull_objects`` by that name.
    initial_backoff_s, backoff_cap_s : float
        First wait after an unavailable object, and the cap of its doubling.
    """
    current = getattr(module, "pull_objects", None)
    if current is None:
        log.warning("%s has no pull_objects: object pull timing unchanged", module.__name__)
        return False
    original = getattr(current, "func", current)  # idempotent: unwrap an earlier partial
    if getattr(original, "__name__", "") != "pull_objects":
        log.warning("%s.pull_objects changed: object pull timing unchanged", module.__name__)
        return False
    quicker = functools.partial(
        original, initial_backoff=initial_backoff_s, backoff_cap=backoff_cap_s
    )
    setattr(module, "pull_objects", quicker)  # noqa: B010 - the patch this module exists for
    return True
