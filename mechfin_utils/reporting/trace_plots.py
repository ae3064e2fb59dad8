"""Figures of causal tracing and attention knockout (plotly; every title carries the model's name)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Float

from mechfin_utils.methods.tracing.category_averages import CategoryAverage
from mechfin_utils.methods.tracing.causal_trace import TraceResult
from mechfin_utils.methods.tracing.knockout import KNOCKOUT_GROUPS
from mechfin_utils.methods.tracing.module_trace import COMPONENT_LABELS
from mechfin_utils.methods.tracing.prepared import KIND_LABELS

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

COLOURS = {
    "hidden": "Purples",
    "mlp": "Greens",
    "attn": "Reds",
    "mixer": "Greens",
    "gate": "Oranges",
    "ssm_in": "Blues",
}


def kind_label(kind: str) -> str:
    """The state a trace restores, in words: the project's kinds first, then the generic tracer's components."""
    return KIND_LABELS.get(kind) or COMPONENT_LABELS.get(kind, kind)


def plot_trace_heatmap(result: TraceResult) -> go.Figure:
    """ROME-style heat map of one prompt: tokens (subject marked with *) x layers, colour = restored score."""
    import plotly.graph_objects as go

    start, stop = result.subject_span
    labels = [f"{i}: {t!r}{'*' if start <= i < stop else ''}" for i, t in enumerate(result.str_tokens)]
    window = "" if result.window == 1 else f", window {result.window}"
    fig = go.Figure(
        go.Heatmap(
            z=result.restored,
            x=list(range(result.n_layers)),
            y=labels,
            colorscale=COLOURS.get(result.kind, "Viridis"),
            colorbar={"title": result.score_name},
            hovertemplate="layer %{x}<br>%{y}<br>restored %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"{result.model_name}: restoring the {kind_label(result.kind)}{window} - {result.label}<br>"
        f"<sup>clean {result.clean_score:.3f}, corrupted {result.corrupted_score:.3f}; "
        f"{result.n_samples} noise samples, noise std {result.noise_std:.3g}; * = subject (noised)</sup>",
        xaxis_title="layer",
        yaxis={"autorange": "reversed"},
    )
    return fig


def plot_category_average(average: CategoryAverage) -> go.Figure:
    """Average indirect effect per position category x layer (ROME's summary figure)."""
    import plotly.graph_objects as go

    labels = [f"{c} (n={n})" for c, n in zip(average.categories, average.counts)]
    fig = go.Figure(
        go.Heatmap(
            z=average.mean,
            x=list(range(average.mean.shape[1])),
            y=labels,
            colorscale=COLOURS.get(average.kind, "Viridis"),
            colorbar={"title": "AIE"},
        )
    )
    fig.update_layout(
        title=f"{average.model_name}: average indirect effect of the {kind_label(average.kind)} "
        f"on {average.score_name}",
        xaxis_title="layer",
        yaxis={"autorange": "reversed"},
    )
    return fig


def plot_knockout(
    mean_change: Float[np.ndarray, "group layer"], model_name: str, window: int, groups: Sequence[str] = KNOCKOUT_GROUPS
) -> go.Figure:
    """Relative change of the score per knockout group, by window centre (Geva et al.'s figure)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for g, row in zip(groups, np.asarray(mean_change)):
        fig.add_trace(go.Scatter(x=list(range(len(row))), y=100 * row, mode="lines+markers", name=f"last -> {g}"))
    fig.update_layout(
        title=f"{model_name}: attention knockout from the last position (window {window})",
        xaxis_title="window centre layer",
        yaxis_title="% change of the score",
    )
    return fig
