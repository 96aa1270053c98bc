"""A self-contained HTML report: sections of text, tables and plotly figures.

Plot helpers elsewhere return plotly ``Figure`` objects; only this module writes HTML. The plotly
JavaScript is embedded once, so the report opens offline.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_interp.io import atomic_write_text


@dataclass
class Section:
    """One report section: a title, paragraphs, key-value rows, a free table and figures."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    rows: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    figures: list[Any] = field(default_factory=list)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, default=str)[:400])
    return html.escape(str(value))


def render(title: str, sections: list[Section]) -> str:
    """Render sections into one HTML page (plotly.js embedded in the first figure only)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
        "vertical-align:top;font-size:0.92em}th{background:#f4f4f4}h2{border-bottom:1px solid #ddd;margin-top:2em}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    plotly_included = False
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.extend(f"<p>{html.escape(p)}</p>" for p in section.paragraphs)
        if section.rows:
            parts.append("<table>")
            parts.extend(f"<tr><th>{html.escape(k)}</th><td>{_format(v)}</td></tr>" for k, v in section.rows.items())
            parts.append("</table>")
        if section.table:
            columns = list(section.table[0])
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
            for row in section.table:
                parts.append("<tr>" + "".join(f"<td>{_format(row.get(c, ''))}</td>" for c in columns) + "</tr>")
            parts.append("</table>")
        for fig in section.figures:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=not plotly_included))
            plotly_included = True
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, title: str, sections: list[Section]) -> Path:
    """Render and write the report atomically; return its path."""
    return atomic_write_text(path, render(title, sections))
