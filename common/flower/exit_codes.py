"""Flower's process exit codes (``flwr.supercore.exit``): help texts and truncated statuses.

Flower 1.42's ``ExitCode`` is a plain class of int constants, not an Enum (``ExitCode(305)``
raises ``TypeError``); its ``EXIT_CODE_HELP`` maps the int codes to help texts. A process exit
status is one byte, so a parent sees Flower's codes above 255 truncated (``code % 256``:
305 → 49, 302 → 46, 303 → 47, 600 → 88, 604 → 92). :func:`untruncated_exit_code` maps a
status back where only one Flower code truncates to it and the status means nothing else:
not a Flower code of its own, and not in 129..192, where a status 128 + N says "killed by
signal N" (400, 401, 402, 700 and 701 land there and stay ambiguous).
"""

from __future__ import annotations

from flwr.supercore.exit.exit_code import EXIT_CODE_HELP, ExitCode

from consilia.common.flower.compat import require_supported_flower

require_supported_flower()

__all__ = [
    "SIGNAL_STATUSES",
    "TRUNCATED_EXIT_CODES",
    "flower_exit_code_help",
    "flower_exit_codes",
    "untruncated_exit_code",
]

#: Exit statuses 128 + N that a shell (or a wrapper imitating one) reports for signal N.
SIGNAL_STATUSES = range(129, 193)


def flower_exit_codes() -> dict[str, int]:
    """Return Flower's exit codes by name (``{"SUPERNODE_CONNECTION_ERROR": 305, ...}``)."""
    return {name: value for name, value in vars(ExitCode).items()
            if not name.startswith("_") and isinstance(value, int)}


def _truncation_table() -> dict[int, int]:
    codes = set(flower_exit_codes().values())
    seen: dict[int, list[int]] = {}
    for code in sorted(codes):
        if code > 255:
            seen.setdefault(code % 256, []).append(code)
    return {status: originals[0] for status, originals in sorted(seen.items())
            if len(originals) == 1 and status not in codes and status not in SIGNAL_STATUSES}


#: Exit status seen by a parent -> the Flower exit code above 255 it unambiguously stands for.
TRUNCATED_EXIT_CODES: dict[int, int] = _truncation_table()


def untruncated_exit_code(status: int) -> int | None:
    """Return the Flower exit code above 255 that exit status ``status`` is a truncation of.

    ``None`` when the status is not one, or is ambiguous (see the module docstring).
    """
    return TRUNCATED_EXIT_CODES.get(status)


def flower_exit_code_help(code: int) -> str:
    """Return Flower's help text for exit code ``code`` (empty when it has none)."""
    return str(EXIT_CODE_HELP.get(code, "") or "").strip()
