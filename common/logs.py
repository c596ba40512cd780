"""The one logging set-up of Consilia's processes (one readable line per event).

Every entry point (``fl-sim``, ``fl-client``, the site's ClientApp process, the benchmarks)
calls :func:`setup_logging`: the ``consilia`` logger goes to stdout and, for a site, also to
a log file under its state directory.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = ["CONSOLE", "SITE", "TOOL", "LogFormat", "setup_logging"]


@dataclass(frozen=True)
class LogFormat:
    """A line format and its timestamp format (:class:`logging.Formatter` arguments)."""

    line: str
    timestamp: str

    def formatter(self) -> logging.Formatter:
        """Return the formatter of this format."""
        return logging.Formatter(self.line, self.timestamp)


#: Command-line tools (``fl-sim``, benchmarks): ``12:00:01 message``.
CONSOLE = LogFormat("%(asctime)s %(message)s", "%H:%M:%S")
#: Site processes (``fl-client``, the site worker): ``2026-01-01 12:00:01 INFO message``.
SITE = LogFormat("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
#: One-shot tools whose stdout is their result (``fl-report``, ``fl-predict``): ``INFO message``
#: on stderr.
TOOL = LogFormat("%(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(
    verbose: bool = False,
    log_file: Path | None = None,
    fmt: LogFormat = CONSOLE,
    quiet_flower: bool = False,
    stream: TextIO | None = None,
) -> logging.Logger:
    """Send the ``consilia`` logger to stdout (and ``log_file``), replacing earlier handlers.

    Parameters
    ----------
    verbose : bool
        Log DEBUG lines too (default INFO and above).
    log_file : Path, optional
        Also append every line to this file (its folder is created).
    fmt : LogFormat
        :data:`CONSOLE` (default) or :data:`SITE`.
    quiet_flower : bool
        Also set Flower's ``flwr`` logger to WARNING (DEBUG when ``verbose``).
    stream : TextIO, optional
        Where console lines go (default stdout).

    Returns
    -------
    logging.Logger
        The ``consilia`` logger.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stdout)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logger = logging.getLogger("consilia")
    logger.handlers.clear()
    formatter = fmt.formatter()
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if quiet_flower:
        logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    return logger
