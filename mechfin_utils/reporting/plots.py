"""Consistent plotly figures for the notebooks: short calls, the same look everywhere.

Every function takes the ``model`` that produced the numbers and puts its display name into the title
(``"Head DLA — SmolLM2-135M-Instruct"``; a title that already contains it is kept as is), so a figure can
be handed to :func:`mechfin_utils.reporting.figures.save_figure` directly. Every figure gets a fixed width and height,
which the static export uses.

Conventions:

* Heatmaps use a diverging scale centred on ``zmid`` (0 by default) with a symmetric range, so equal
  colours mean equal magnitudes: blue is positive (e.g. towards `` Yes`` for the logit difference), red
  negative, white ``zmid``. Row 0 is drawn at the top (layer 0 first), as in a matrix.
* Categorical axes are drawn from positions with the labels as tick text, so repeated labels (the same token
  at two positions) stay separate columns instead of being merged by plotly.
* Confidence intervals are passed as explicit ``low``/``high`` values (e.g. from
  :func:`mechfin_utils.core.stats.bootstrap_ci`), never recomputed here. A mean outside its own interval, a
  length mismatch, a NaN or an infinity raises a ValueError naming the argument and the entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.colors import qualitative

from mechfin_utils.core.arrays import ArrayLike, as_checked_array

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DIVERGING_SCALE = "RdBu"
SERIES_COLOURS: tuple[str, ...] = tuple(qualitative.Plotly)
TEMPLATE = "plotly_white"
DEFAULT_WIDTH = 900
DEFAULT_HEIGHT = 550


# ---------------------------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------------------------


def model_title(title: str, model) -> str:
    """``title`` with the model's display name appended (``"<title> — <model name>"``) unless it has it."""
    name = getattr(model, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model must have a non-empty display name in .name, got {name!r}")
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"title must be a non-empty string, got {title!r}")
    return title if name in title else f"{title} — {name}"


def _labels(labels: Sequence[Any] | None, count: int, argument: str, *, unique: bool = False) -> list[str]:
    if labels is None:
        return [str(i) for i in range(count)]
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(f"{argument} has {len(labels)} labels for {count} entries")
    if unique:
        seen: set[str] = set()
        for label in labels:
            if label in seen:
                raise ValueError(f"{argument} repeats the label {label!r}; bar labels must be unique")
            seen.add(label)
    return labels


def _layout(fig: go.Figure, *, model, title: str, x_title: str, y_title: str, width: int, height: int) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=model_title(title, model), x=0.02, xanchor="left"),
        xaxis_title=x_title,
        yaxis_title=y_title,
        width=int(width),
        height=int(height),
        margin=dict(l=70, r=30, t=70, b=60),
    )
    return fig


def _reference_line(fig: go.Figure, reference: float | None) -> None:
    if reference is not None:
        fig.add_hline(y=float(reference), line_dash="dot", line_color="grey", line_width=1)


def _check_interval(means: np.ndarray, lows: np.ndarray, highs: np.ndarray, labels: list[str], what: str) -> None:
    tolerance = 1e-9 * np.maximum(1.0, np.abs(means))
    for index in np.flatnonzero((lows > means + tolerance) | (highs < means - tolerance)):
        raise ValueError(
            f"{what}{labels[index]!r}: mean {means[index]:.6g} is outside its interval "
            f"[{lows[index]:.6g}, {highs[index]:.6g}]"
        )


def _as_series(values: ArrayLike, argument: str) -> np.ndarray:
    """[points] or [series, points] values as a [series, points] float array."""
    array = as_checked_array(values, argument)
    if array.ndim not in (1, 2):
        raise ValueError(f"{argument} must be [points] or [series, points], got shape {array.shape}")
    return array[None, :] if array.ndim == 1 else array


def _rgba(colour: str, alpha: float) -> str:
    colour = colour.lstrip("#")
    red, green, blue = (int(colour[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({red}, {green}, {blue}, {alpha})"


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def heatmap(
    values: Float[ArrayLike, "rows cols"],
    *,
    model,
    title: str,
    x_labels: Sequence[Any] | None = None,
    y_labels: Sequence[Any] | None = None,
    x_title: str = "",
    y_title: str = "",
    zmid: float = 0.0,
    zmax: float | None = None,
    colorbar_title: str = "",
    value_format: str = ".3f",
    show_values: bool = False,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """A [rows, cols] heatmap on a diverging scale centred on ``zmid``, with the values on hover.

    The colour range is ``zmid ± zmax``; ``zmax`` defaults to the largest ``|value - zmid|`` (so the
    extremes are fully saturated and 0 is white). Pass the same ``zmax`` to figures that must be compared by
    colour. NaN cells are drawn blank (and show ``nan`` on hover); infinities are an error.
    ``show_values`` also prints each value in its cell (``value_format``, a d3 format such as ``".2f"``).
    """
    z = as_checked_array(values, "values", ndim=2, allow_nan=True)
    rows, cols = z.shape
    xs = _labels(x_labels, cols, "x_labels")
    ys = _labels(y_labels, rows, "y_labels")
    if zmax is None:
        finite = np.abs(z[~np.isnan(z)] - zmid)
        zmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    elif not zmax > 0:
        raise ValueError(f"zmax must be positive, got {zmax}")
    custom = np.empty((rows, cols, 2), dtype=object)
    custom[:, :, 0] = np.array(ys, dtype=object)[:, None]
    custom[:, :, 1] = np.array(xs, dtype=object)[None, :]
    hover = (
        f"{y_title or 'row'}: %{{customdata[0]}}<br>{x_title or 'column'}: %{{customdata[1]}}"
        f"<br>value: %{{z:{value_format}}}<extra></extra>"
    )
    trace = go.Heatmap(
        z=z,
        x=np.arange(cols),
        y=np.arange(rows),
        customdata=custom,
        hovertemplate=hover,
        colorscale=DIVERGING_SCALE,
        zmid=float(zmid),
        zmin=float(zmid) - zmax,
        zmax=float(zmid) + zmax,
        colorbar=dict(title=dict(text=colorbar_title)),
        texttemplate=f"%{{z:{value_format}}}" if show_values else None,
    )
    fig = go.Figure(trace)
    width = width or int(min(1400, max(600, 200 + 32 * cols)))
    height = height or int(min(1100, max(420, 180 + 26 * rows)))
    _layout(fig, model=model, title=title, x_title=x_title, y_title=y_title, width=width, height=height)
    fig.update_xaxes(tickmode="array", tickvals=list(range(cols)), ticktext=xs, showgrid=False)
    fig.update_yaxes(tickmode="array", tickvals=list(range(rows)), ticktext=ys, autorange="reversed", showgrid=False)
    return fig


def bar_with_ci(
    labels: Sequence[Any],
    means: Float[ArrayLike, " bars"],
    lows: Float[ArrayLike, " bars"],
    highs: Float[ArrayLike, " bars"],
    *,
    model,
    title: str,
    x_title: str = "",
    y_title: str = "",
    colour: str | None = None,
    reference: float | None = 0.0,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """One bar per label at ``means`` with asymmetric error bars from ``lows`` to ``highs``.

    ``reference`` draws a dotted horizontal line (default at 0; None for none). Labels must be unique.
    """
    means_a = as_checked_array(means, "means", ndim=1)
    names = _labels(labels, means_a.size, "labels", unique=True)
    lows_a = as_checked_array(lows, "lows", ndim=1)
    highs_a = as_checked_array(highs, "highs", ndim=1)
    for argument, array in (("lows", lows_a), ("highs", highs_a)):
        if array.size != means_a.size:
            raise ValueError(f"{argument} has {array.size} entries, means has {means_a.size}")
    _check_interval(means_a, lows_a, highs_a, names, "bar ")
    fig = go.Figure(
        go.Bar(
            x=list(range(len(names))),
            y=means_a,
            marker_color=colour or SERIES_COLOURS[0],
            error_y=dict(type="data", symmetric=False, array=highs_a - means_a, arrayminus=means_a - lows_a),
            customdata=np.stack([lows_a, highs_a], axis=1),
            hovertext=names,
            hovertemplate="%{hovertext}: %{y:.4g}<br>CI [%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra></extra>",
        )
    )
    _reference_line(fig, reference)
    width = width or int(min(1400, max(500, 160 + 60 * len(names))))
    _layout(
        fig, model=model, title=title, x_title=x_title, y_title=y_title, width=width, height=height or DEFAULT_HEIGHT
    )
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(names))), ticktext=names)
    return fig


def line_with_band(
    x: Sequence[Any] | Float[ArrayLike, " points"],
    mean: Float[ArrayLike, " points"] | Float[ArrayLike, "series points"],
    low: Float[ArrayLike, " points"] | Float[ArrayLike, "series points"],
    high: Float[ArrayLike, " points"] | Float[ArrayLike, "series points"],
    *,
    model,
    title: str,
    names: Sequence[str] | None = None,
    x_title: str = "",
    y_title: str = "",
    reference: float | None = 0.0,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Lines with shaded interval bands, e.g. the logit lens per layer with bootstrap CIs.

    ``mean``, ``low`` and ``high`` are [points] for one series or [series, points] for several (then
    ``names`` is required, one per series). ``x`` gives the positions (numbers, or labels drawn in order).
    """
    mean_a = _as_series(mean, "mean")
    low_a = _as_series(low, "low")
    high_a = _as_series(high, "high")
    if low_a.shape != mean_a.shape or high_a.shape != mean_a.shape:
        raise ValueError(
            f"mean, low and high must have the same shape; got {np.shape(mean)}, {np.shape(low)}, {np.shape(high)}"
        )
    n_series, n_points = mean_a.shape
    xs = list(x.tolist() if hasattr(x, "tolist") else x)
    if len(xs) != n_points:
        raise ValueError(f"x has {len(xs)} points, the series have {n_points}")
    if names is None:
        if n_series > 1:
            raise ValueError(f"names is required for {n_series} series (one name per row of mean)")
        names = [""]
    names = list(names)
    if len(names) != n_series:
        raise ValueError(f"names has {len(names)} entries for {n_series} series")
    categorical = not all(isinstance(v, (int, float, np.integer, np.floating)) for v in xs)
    positions = list(range(n_points)) if categorical else xs
    fig = go.Figure()
    for index, name in enumerate(names):
        _check_interval(mean_a[index], low_a[index], high_a[index], [f"{name}@{p}" for p in xs], "point ")
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        fig.add_trace(
            go.Scatter(
                x=positions,
                y=high_a[index],
                mode="lines",
                line=dict(width=0),
                showlegend=False,
                hoverinfo="skip",
                legendgroup=str(index),
            )
        )
        fig.add_trace(
            go.Scatter(
                x=positions,
                y=low_a[index],
                mode="lines",
                line=dict(width=0),
                fill="tonexty",
                fillcolor=_rgba(colour, 0.2),
                showlegend=False,
                hoverinfo="skip",
                legendgroup=str(index),
            )
        )
        fig.add_trace(
            go.Scatter(
                x=positions,
                y=mean_a[index],
                mode="lines+markers",
                name=name or "mean",
                line=dict(color=colour),
                legendgroup=str(index),
                showlegend=n_series > 1,
                customdata=np.stack([low_a[index], high_a[index], np.array(xs, dtype=object)], axis=1),
                hovertemplate=(
                    f"{name + ': ' if name else ''}%{{customdata[2]}}: %{{y:.4g}}"
                    "<br>CI [%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra></extra>"
                ),
            )
        )
    _reference_line(fig, reference)
    _layout(
        fig,
        model=model,
        title=title,
        x_title=x_title,
        y_title=y_title,
        width=width or DEFAULT_WIDTH,
        height=height or DEFAULT_HEIGHT,
    )
    if categorical:
        fig.update_xaxes(tickmode="array", tickvals=positions, ticktext=[str(v) for v in xs])
    return fig


def lines(
    x: Sequence[Any] | Float[ArrayLike, " points"],
    series: Mapping[str, Float[ArrayLike, " points"]],
    *,
    model,
    title: str,
    x_title: str = "",
    y_title: str = "",
    reference: float | None = 0.0,
    markers_only: bool = False,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """One line (or marker series) per entry of ``series``, all over the same ``x``: e.g. a score per input
    for the full model and for an ablated one. No intervals: use :func:`line_with_band` when there are."""
    if not series:
        raise ValueError("series is empty: give at least one {name: values}")
    xs = list(x.tolist() if hasattr(x, "tolist") else x)
    fig = go.Figure()
    for name, values in series.items():
        ys = as_checked_array(values, f"series[{name!r}]", ndim=1)
        if ys.shape[0] != len(xs):
            raise ValueError(f"series[{name!r}] has {ys.shape[0]} values for {len(xs)} x positions")
        fig.add_trace(go.Scatter(x=xs, y=ys, name=str(name), mode="markers" if markers_only else "lines+markers"))
    _reference_line(fig, reference)
    return _layout(
        fig,
        model=model,
        title=title,
        x_title=x_title,
        y_title=y_title,
        width=width or DEFAULT_WIDTH,
        height=height or DEFAULT_HEIGHT,
    )


def grouped_bars(
    categories: Sequence[Any],
    values: Mapping[str, Float[ArrayLike, " categories"]],
    *,
    model,
    title: str,
    lows: Mapping[str, Float[ArrayLike, " categories"]] | None = None,
    highs: Mapping[str, Float[ArrayLike, " categories"]] | None = None,
    x_title: str = "",
    y_title: str = "",
    reference: float | None = 0.0,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Bars grouped by category, one colour per group: e.g. ``{"clean": ..., "corrupted": ...}`` per basis.

    ``lows``/``highs`` (both or neither) give each group's interval per category, with the same keys as
    ``values``.
    """
    if not values:
        raise ValueError("values must map at least one group name to its per-category values")
    if (lows is None) != (highs is None):
        raise ValueError("pass both lows and highs, or neither")
    names = _labels(categories, len(list(categories)), "categories", unique=True)
    if lows is not None and highs is not None and (set(lows) != set(values) or set(highs) != set(values)):
        raise ValueError(f"lows/highs keys {sorted(lows)}/{sorted(highs)} must equal values keys {sorted(values)}")
    fig = go.Figure()
    for index, (group, group_values) in enumerate(values.items()):
        means = as_checked_array(group_values, f"values[{group!r}]", ndim=1)
        if means.size != len(names):
            raise ValueError(f"values[{group!r}] has {means.size} entries for {len(names)} categories")
        error_y = None
        customdata = None
        hover = f"{group}<br>%{{hovertext}}: %{{y:.4g}}<extra></extra>"
        if lows is not None and highs is not None:
            low = as_checked_array(lows[group], f"lows[{group!r}]", ndim=1)
            high = as_checked_array(highs[group], f"highs[{group!r}]", ndim=1)
            if low.size != means.size or high.size != means.size:
                raise ValueError(f"lows/highs[{group!r}] must have {means.size} entries like values[{group!r}]")
            _check_interval(means, low, high, names, f"{group} / ")
            error_y = dict(type="data", symmetric=False, array=high - means, arrayminus=means - low)
            customdata = np.stack([low, high], axis=1)
            hover = (
                f"{group}<br>%{{hovertext}}: %{{y:.4g}}<br>CI [%{{customdata[0]:.4g}}, "
                "%{customdata[1]:.4g}]<extra></extra>"
            )
        fig.add_trace(
            go.Bar(
                x=list(range(len(names))),
                y=means,
                name=str(group),
                error_y=error_y,
                customdata=customdata,
                hovertext=names,
                hovertemplate=hover,
                marker_color=SERIES_COLOURS[index % len(SERIES_COLOURS)],
            )
        )
    _reference_line(fig, reference)
    width = width or int(min(1400, max(600, 180 + 40 * len(names) * len(values))))
    _layout(
        fig, model=model, title=title, x_title=x_title, y_title=y_title, width=width, height=height or DEFAULT_HEIGHT
    )
    fig.update_layout(barmode="group")
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(names))), ticktext=names)
    return fig


def paired_scatter(
    x: Float[ArrayLike, " points"],
    y: Float[ArrayLike, " points"],
    *,
    model,
    title: str,
    groups: Sequence[str] | None = None,
    hover: Sequence[str] | None = None,
    x_title: str = "",
    y_title: str = "",
    diagonal: bool = True,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """One point per pair (e.g. clean vs corrupted score), coloured by group, with the y = x line.

    Points above the diagonal score higher on y than on x; a model that ignores the difference between the
    two prompts puts every point on the line.
    """
    xs = as_checked_array(x, "x", ndim=1)
    ys = as_checked_array(y, "y", ndim=1)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length, got {xs.shape[0]} and {ys.shape[0]}")
    group_labels = _labels(groups, xs.shape[0], "groups") if groups is not None else ["all"] * xs.shape[0]
    hover_labels = _labels(hover, xs.shape[0], "hover") if hover is not None else [""] * xs.shape[0]
    fig = go.Figure()
    for group in sorted(set(group_labels)):
        idx = [i for i, g in enumerate(group_labels) if g == group]
        fig.add_trace(
            go.Scatter(
                x=xs[idx],
                y=ys[idx],
                mode="markers",
                name=group,
                text=[hover_labels[i] for i in idx],
                hovertemplate="%{text}<br>x=%{x:.3f}<br>y=%{y:.3f}<extra>" + group + "</extra>",
            )
        )
    if diagonal:
        lo = float(min(xs.min(), ys.min()))
        hi = float(max(xs.max(), ys.max()))
        fig.add_trace(
            go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(color="grey", dash="dash"))
        )
    return _layout(
        fig, model=model, title=title, x_title=x_title, y_title=y_title, width=width or 800, height=height or 650
    )


def reliability_diagram(
    curves: Mapping[str, pd.DataFrame], *, model, title: str, width: int | None = None, height: int | None = None
) -> go.Figure:
    """Calibration: per series, the share of prompts truly in the positive class against the mean predicted
    probability of each non-empty bin (``behaviour.calibration_curve`` tables), marker size by bin count, and the
    diagonal a calibrated model would follow."""
    if not curves:
        raise ValueError("curves is empty: give at least one {name: calibration table}")
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="calibrated", line={"dash": "dash", "color": "grey"})
    )
    for name, curve in curves.items():
        missing = {"mean_p_yes", "share_yes", "n"} - set(curve.columns)
        if missing:
            raise ValueError(f"curves[{name!r}] lacks column(s) {sorted(missing)}")
        sizes = 6 + 18 * np.sqrt(curve["n"].to_numpy() / max(1, curve["n"].max()))
        fig.add_trace(
            go.Scatter(
                x=curve["mean_p_yes"],
                y=curve["share_yes"],
                mode="lines+markers",
                name=str(name),
                marker={"size": sizes},
                text=[f"n={n}" for n in curve["n"]],
            )
        )
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1])
    return _layout(
        fig,
        model=model,
        title=title,
        x_title="predicted p(Yes), bin mean",
        y_title="share of prompts whose answer is Yes",
        width=width or DEFAULT_WIDTH,
        height=height or DEFAULT_HEIGHT,
    )
