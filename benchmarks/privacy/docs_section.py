"""Replace the ``## Differential privacy`` section of a Markdown file (``--docs``)."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["SECTION", "update_docs"]

SECTION = "## Differential privacy"


def update_docs(path: Path, section: str) -> None:
    """Replace (or append) the ``## Differential privacy`` section of ``path``."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        text = text[:start] + section + ("\n" if nxt else "") + text[end:]
    path.write_text(text, encoding="utf-8")
