"""Flower's own explanations of its process exit codes (``flwr.supercore.exit``).

Flower 1.42's ``ExitCode`` is a plain class of int constants, not an Enum (``ExitCode(305)``
raises ``TypeError``); its ``EXIT_CODE_HELP`` maps the int codes to help texts.
"""

from __future__ import annotations

from flwr.supercore.exit.exit_code import EXIT_CODE_HELP

from consilia.common.flower.compat import require_supported_flower

require_supported_flower()

__all__ = ["flower_exit_code_help"]


def flower_exit_code_help(code: int) -> str:
    """Return Flower's help text for exit code ``code`` (empty when it has none)."""
    return str(EXIT_CODE_HELP.get(code, "") or "")
