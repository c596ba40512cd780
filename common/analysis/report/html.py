"""HTML fragments of the report: escaping, number formatting, tables, embedded PNG figures."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["CSS", "embed_figure", "embed_picture", "esc", "fmt", "note", "table"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #345;padding-bottom:.2em}
h2{margin-top:2em;border-bottom:1px solid #ccc;color:#234}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#eef2f6}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em;max-height:30em}
.na{color:#888;font-style:italic}.note{color:#555;font-size:.9em}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}
.gallery figure{margin:0;text-align:center;font-size:.8em;width:170px}
nav ul{columns:2;font-size:.95em}
"""


def esc(value: Any) -> str:
    """Escape ``value`` for HTML text and attributes."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """Format a number for a table cell (``n/a`` for None and non-finite values)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return an HTML table of ``rows`` under ``header`` (cells formatted with :func:`fmt`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def embed_figure(fig: Figure, alt: str) -> str:
    """Return a matplotlib figure as an embedded PNG ``<img>``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return f'<img src="{_png_uri(buffer.getvalue())}" alt="{esc(alt)}">'


def embed_picture(rgb: np.ndarray, alt: str, width: int = 160) -> str:
    """Return an RGB image as an embedded PNG ``<img>``, enlarged to at least ``width`` pixels."""
    picture = Image.fromarray(rgb)
    if picture.width < width:
        factor = max(1, round(width / picture.width))
        picture = picture.resize((picture.width * factor, picture.height * factor),
                                 Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return f'<img src="{_png_uri(buffer.getvalue())}" alt="{esc(alt)}">'


def note(text: str) -> str:
    """Return a note paragraph."""
    return f'<p class="note">{esc(text)}</p>'
