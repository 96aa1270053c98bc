"""Rebuild every figure of a study's report from its stage files alone (no model is loaded).

``em-interp figures OUT --to DIR`` (or ``python -m em_interp.figures OUT --to DIR``) writes, per
figure, ``<stage>-<n>-<title>.html`` (interactive), ``.svg`` and ``.png`` (plotly static export
through kaleido, which drives a Chromium: Debian's ``chromium`` package provides one; without one,
the command says so and writes HTML and CSV only) and ``.csv`` (the numbers behind the figure:
one row per plotted point, or per heat-map cell). ``--headline`` limits it to the figures shown in
the README (:data:`HEADLINE_FIGURES`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Literal

import plotly.graph_objects as go

from em_interp.errors import EmInterpError
from em_interp.io import atomic_write_text

PlotlyJs = Literal["directory", "cdn", "embed"]

#: Figures of the README (stage name, index of the figure in its section).
HEADLINE_FIGURES: tuple[tuple[str, int], ...] = (
    ("organisms", 1), ("rank1", 1), ("direction", 1), ("ablation", 1), ("steering", 1))


def load_study(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """The config and the stored results (by stage name) of the study in ``folder``."""
    from em_interp.study.config import Budget, StudyConfig
    from em_interp.study.records import StageStore
    from em_interp.study.stages import default_stages

    folder = Path(folder)
    marker = folder / "stages" / "study.json"
    if not marker.is_file():
        raise EmInterpError(f"{folder} has no stage files ({marker} is missing): run `em-interp study --out {folder}` first")
    try:
        identity = json.loads(marker.read_text())["identity"]
        fields = {k: v for k, v in identity.items() if k != "external_sets"}  # found files, not a setting
        config = StudyConfig(out=folder, **{**fields, "budget": Budget.from_dict(identity["budget"])})
    except (OSError, ValueError, KeyError, TypeError, EmInterpError) as exc:
        raise EmInterpError(f"{marker} is not a study identity file ({type(exc).__name__}: {exc})") from None
    store = StageStore(folder, identity)
    results = {}
    for stage in default_stages():
        record = store.load(stage.name, key=None, then="no figures for stage")
        if record is not None:
            results[stage.name] = record.result
    if not results:
        raise EmInterpError(f"{folder / 'stages'} holds no readable stage file of this study")
    return config, results


def study_figures(folder: str | Path) -> list[tuple[str, go.Figure]]:
    """Every figure of the report, named ``<stage>-<n>-<title slug>``, in report order."""
    from em_interp.study.stages import default_stages

    config, results = load_study(folder)
    out = []
    for stage in default_stages():
        if stage.name not in results:
            continue
        for i, fig in enumerate(stage.section(results[stage.name], config).figures, start=1):
            out.append((f"{stage.name}-{i}-{_slug(fig.layout.title.text or 'figure')}", fig))
    return out


def _slug(text: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-").split("-")
    slug = ""
    for word in words:  # whole words up to 48 characters
        if len(slug) + len(word) + 1 > 48:
            break
        slug = f"{slug}-{word}" if slug else word
    return slug or "figure"


def figure_rows(fig: go.Figure) -> list[dict[str, Any]]:
    """The numbers a figure plots: one row per point (``trace, x, y[, error]``) or heat-map cell."""
    rows: list[dict[str, Any]] = []
    for trace in fig.data:
        name = trace.name or ""
        if trace.type == "heatmap":
            z = [list(r) for r in trace.z]
            xs = list(trace.x) if trace.x is not None else list(range(len(z[0]) if z else 0))
            ys = list(trace.y) if trace.y is not None else list(range(len(z)))
            rows += [{"trace": name, "x": x, "y": y, "value": float(z[i][j])}
                     for i, y in enumerate(ys) for j, x in enumerate(xs)]
            continue
        errors = trace.error_y.array if getattr(trace, "error_y", None) is not None and trace.error_y.array is not None else None
        for j, (x, y) in enumerate(zip(trace.x, trace.y)):
            row = {"trace": name, "x": x, "y": y}
            if errors is not None:
                row["error"] = errors[j]
            rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns or ["trace", "x", "y"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def export_figures(folder: str | Path, to: str | Path, static: bool = True, headline: bool = False,
                   plotlyjs: PlotlyJs = "directory") -> list[Path]:
    """Write every figure (or the headline ones) of the study in ``folder`` into ``to``; return the paths.

    ``plotlyjs``: ``"directory"`` writes ``plotly.min.js`` once beside the HTML files (offline),
    ``"cdn"`` links it (small files, for a repository), ``"embed"`` puts it in every file.
    """
    from em_interp.options import check_option

    check_option("plotlyjs", plotlyjs, ("directory", "cdn", "embed"))
    figures = study_figures(folder)
    if headline:
        wanted = {f"{stage}-{i}-" for stage, i in HEADLINE_FIGURES}
        figures = [(n, f) for n, f in figures if any(n.startswith(w) for w in wanted)]
    to = Path(to)
    if to.exists() and not to.is_dir():
        raise EmInterpError(f"--to {to} is a file, not a folder")
    to.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures:
        html = fig.to_html(full_html=True, include_plotlyjs=plotlyjs == "embed" or ("cdn" if plotlyjs == "cdn" else "directory"))
        written.append(atomic_write_text(to / f"{name}.html", html))
        written.append(atomic_write_text(to / f"{name}.csv", _csv(figure_rows(fig))))
    if plotlyjs == "directory" and figures:
        from plotly.offline import get_plotlyjs

        written.append(atomic_write_text(to / "plotly.min.js", get_plotlyjs()))
    if static and figures:
        problem = _write_static(figures, to, written)
        if problem:
            print(f"em-interp figures: no static export ({problem}); wrote HTML and CSV only. "
                  "Install a Chromium (Debian: apt-get install chromium) for SVG and PNG.", file=sys.stderr)
    return written


def _write_static(figures: list[tuple[str, go.Figure]], to: Path, written: list[Path]) -> str | None:
    """SVG and PNG of every figure through kaleido (one browser session); the reason if impossible.

    Images are rendered into a temporary folder inside ``to`` and moved into place only when all
    of them were made, so a failed export leaves no partial image behind.
    """
    import os
    import shutil
    import tempfile

    import plotly.io as pio

    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "kaleido is not installed"
    tmp = Path(tempfile.mkdtemp(prefix=".figures-", dir=to))
    try:
        figs, paths = [], []
        for name, fig in figures:
            sized = go.Figure(fig).update_layout(width=fig.layout.width or 900)
            for fmt in ("svg", "png"):
                figs.append(sized)
                paths.append(tmp / f"{name}.{fmt}")
        try:
            pio.write_images(figs, paths, scale=2)
        except Exception as exc:  # kaleido raises its own kinds when no browser can start
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no Chromium found'}"
        for path in paths:
            os.replace(path, to / path.name)
            written.append(to / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m em_interp.figures OUT --to DIR [--headline] [--html-only] [--plotlyjs MODE]``."""
    parser = argparse.ArgumentParser(prog="python -m em_interp.figures", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--to", type=Path, required=True)
    parser.add_argument("--headline", action="store_true")
    parser.add_argument("--html-only", action="store_true")
    parser.add_argument("--plotlyjs", default="directory", choices=["directory", "cdn", "embed"])
    args = parser.parse_args(argv)
    try:
        written = export_figures(args.folder, args.to, static=not args.html_only, headline=args.headline,
                                 plotlyjs=args.plotlyjs)
    except EmInterpError as exc:
        print(f"em-interp figures: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.to}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
