"""Plot helpers: each returns a plotly ``Figure``; nothing here shows or writes files."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go


def line_by_layer(layers: Sequence[float], series: dict[str, Sequence[float]], title: str, y_title: str) -> go.Figure:
    """One line per named series over layer indices."""
    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(go.Scatter(x=list(layers), y=list(values), mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title="layer (output of block l)", yaxis_title=y_title,
                      template="plotly_white", height=380)
    return fig
