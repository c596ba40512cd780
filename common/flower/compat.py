"""The one Flower version check for every module that uses Flower internals.

Consilia's modules under :mod:`consilia.common.flower` reach past Flower's public app API
(``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``): private runtime calls, protobuf
messages, module-level patches. Those are pinned to the Flower release they were written
against; each such module calls :func:`require_supported_flower` when it is imported, so an
upgrade fails at once with one clear line instead of deep inside a run.
"""

from __future__ import annotations

import flwr

__all__ = ["SUPPORTED_FLOWER", "UnsupportedFlowerError", "require_supported_flower"]

#: The Flower release series whose internals :mod:`consilia.common.flower` uses.
SUPPORTED_FLOWER = "1.42"


class UnsupportedFlowerError(ImportError):
    """The installed Flower is not the release :mod:`consilia.common.flower` supports."""


def require_supported_flower(version: str | None = None) -> None:
    """Raise :class:`UnsupportedFlowerError` unless Flower ``1.42.*`` is installed.

    Parameters
    ----------
    version : str, optional
        The version to check (default: the installed ``flwr.__version__``).

    Raises
    ------
    UnsupportedFlowerError
        With a one-line message naming the installed and the supported versions.
    """
    found = flwr.__version__ if version is None else version
    if found != SUPPORTED_FLOWER and not found.startswith(SUPPORTED_FLOWER + "."):
        raise UnsupportedFlowerError(
            f"Consilia needs Flower {SUPPORTED_FLOWER}.* (it uses Flower internals), "
            f"found flwr {found}: pip install 'flwr=={SUPPORTED_FLOWER}.*'"
        )
