"""What the sweep report and the audit share: figures as PNG bytes, number formatting, tables in Markdown and HTML,
standalone HTML pages with embedded images, and atomic writes of report files."""

from __future__ import annotations

import base64
import html
import io
import math
import os
import uuid
from pathlib import Path

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:right}img{max-width:100%}")  # fmt: skip


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (80 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    plt.close(fig)
    return buffer.getvalue()


def number(value, digits: int = 3) -> str:
    """A table cell: strings as they are, None / NaN as '-', small numbers in scientific notation."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2e}" if abs(value) < 0.001 and value else f"{value:.{digits}f}"


def markdown_table(header: list, body: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(number(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def html_table(header: list, body: list) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(number(v))}</td>" for v in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


def image_tag(png: bytes, alt: str, extra: str = "") -> str:
    """An <img> holding ``png`` itself (base64), so the page needs no other file."""
    return f'<img alt="{html.escape(alt)}" {extra}src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_document(title: str, parts: list[str], style: str = STYLE, script: str = "") -> str:
    """A standalone page: ``parts`` (HTML) under ``title``."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}{script}</body></html>")  # fmt: skip


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` under a temporary name, then rename."""
    path = Path(path)
    temp = path.with_name(f".{uuid.uuid4().hex[:8]}.tmp.{path.name}")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
