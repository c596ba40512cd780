"""Explicit named registries (one per kind of pluggable object).

Modelled on Opacus' ``accountants/registry.py``: a private dict, ``register`` raising on
duplicates, ``get`` raising a clear error that lists the known names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(KeyError):
    """Raised when a name is not registered; the message lists the allowed names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named registry of objects of one kind (models, datasets, losses, ...).

    Parameters
    ----------
    kind : str
        Human-readable kind used in error messages, e.g. ``"model"``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable directly or as a decorator.

        Returns the object (``register(name, obj)``) or a decorator that registers and returns
        what it decorates (``@register(name)``).

        Raises
        ------
        ValueError
            If ``name`` is already registered.
        """

        def _add(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = item
            return item

        if obj is None:
            return _add
        return _add(obj)

    def get(self, name: str) -> T:
        """Return the object registered under ``name``.

        Raises
        ------
        UnknownNameError
            If ``name`` is unknown; the message lists the allowed names.
        """
        try:
            return self._entries[name]
        except KeyError:
            allowed = ", ".join(sorted(self._entries)) or "(none registered)"
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; allowed: {allowed}"
            ) from None

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
