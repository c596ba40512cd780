"""Console logging for Consilia's command-line tools (one readable line per event)."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Send the ``consilia`` logger to stdout with a short timestamped format."""
    logger = logging.getLogger("consilia")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    return logger
