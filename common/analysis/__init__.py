"""Tools that read finished runs: ``fl-report`` and ``fl-predict``."""

__all__: list[str] = []
