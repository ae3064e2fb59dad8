"""Figures of circuit discovery: size against faithfulness, knockout validation, and the circuit as a graph.

Every title carries the model's name; a figure made from another model's results is refused.
"""

from __future__ import annotations

import pandas as pd

from mechfin_utils.circuits import INPUT_NODE, OUTPUT_NODE, Circuit, KnockoutReport, Node, acdc_order


def size_faithfulness_figure(table: pd.DataFrame, model, task_name: str):
    """Circuit size against faithfulness over a threshold sweep (one point per threshold, labelled tau)."""
    import plotly.graph_objects as go

    needed = {"threshold", "n_nodes", "faithfulness", "of_nodes"}
    if not needed <= set(table.columns):
        raise ValueError(
            f"table needs the columns of threshold_sweep's table, missing {sorted(needed - set(table.columns))}"
        )
    fig = go.Figure(
        go.Scatter(
            x=table["n_nodes"],
            y=table["faithfulness"],
            mode="lines+markers+text",
            text=[f"tau={t:g}" for t in table["threshold"]],
            textposition="top right",
            hovertemplate="%{text}: %{x} nodes, faithfulness %{y:.3f}<extra></extra>",
            name="circuit",
        )
    )
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="full model")
    fig.add_hline(y=0.0, line_dash="dot", line_color="grey", annotation_text="everything ablated")
    fig.update_layout(
        title=f"{task_name}: circuit size vs faithfulness — {model.name}",
        xaxis_title=f"nodes kept (of {int(table['of_nodes'].iloc[0])})",
        yaxis_title="faithfulness (normalised metric)",
        plot_bgcolor="white",
    )
    return fig


def knockout_figure(report: KnockoutReport, model):
    """The circuit's knockout next to each random knockout (points) and their mean +- one standard deviation."""
    import plotly.graph_objects as go

    if report.model_name != model.name:
        raise ValueError(f"this knockout was run on {report.model_name}, not {model.name}")
    kind = "same number of heads and MLPs" if report.match_kinds else "same number of nodes, any kind"
    fig = go.Figure()
    fig.add_trace(
        go.Bar(x=["circuit"], y=[report.circuit_knockout], name="circuit knocked out", marker_color="#d62728")
    )
    fig.add_trace(
        go.Bar(
            x=["random, outside the circuit"],
            y=[report.random_mean],
            name="random sets (mean)",
            marker_color="#7f7f7f",
            error_y=dict(type="data", array=[report.random_std]),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=["random, outside the circuit"] * len(report.random_knockouts),
            y=report.random_knockouts,
            mode="markers",
            marker=dict(color="black", size=6),
            name="each random set",
        )
    )
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="full model")
    fig.update_layout(
        title=(
            f"{report.task_name}: knocking out the circuit's {len(report.nodes)} nodes vs {len(report.random_knockouts)} "
            f"random sets ({kind}) — {model.name}"
        ),
        yaxis_title="normalised metric (1 = unchanged, 0 = everything ablated)",
        plot_bgcolor="white",
        showlegend=True,
    )
    return fig


def _node_xy(name: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    if name == INPUT_NODE:
        return (-1.0, (n_heads - 1) / 2)
    if name == OUTPUT_NODE:
        return (float(n_layers), (n_heads - 1) / 2)
    node = Node.parse(name)
    return (float(node.layer) + (0.35 if node.is_mlp else 0.0), float(-1.5 if node.is_mlp else node.head))


def circuit_figure(circuit: Circuit, model, title: str | None = None, max_edges: int = 2000):
    """A plotly figure of the circuit: nodes laid out by layer (x) and head (y; MLPs on the row below the
    heads), kept nodes coloured by importance (|delta| when pruned, in units of the full-vs-baseline gap),
    the other candidate nodes as faint dots, and the circuit's implied residual edges.

    Implied edges grow with the square of the circuit's size; past ``max_edges`` (a circuit of ~60 nodes)
    they are a grey wash that says nothing and makes the SVG tens of MB, so they are left out and the
    subtitle says how many there are. The title always carries ``model.name``; a circuit found on a
    different model is refused.
    """
    import plotly.graph_objects as go

    if circuit.model_name != model.name:
        raise ValueError(f"this circuit was found on {circuit.model_name}, not {model.name}")
    base = title or f"{circuit.task_name} circuit (tau={circuit.threshold:g})"
    full_title = base if model.name in base else f"{base} — {model.name}"
    n_layers, n_heads = circuit.n_layers, circuit.n_heads
    xy = lambda name: _node_xy(name, n_layers, n_heads)  # noqa: E731

    edges = circuit.edges
    drawn = edges if len(edges) <= max_edges else []
    edge_x, edge_y = [], []
    for sender, receiver in drawn:
        (x0, y0), (x1, y1) = xy(sender), xy(receiver)
        edge_x += [x0, x1, None]
        edge_y += [y0, y1, None]
    traces = [
        go.Scatter(
            x=edge_x,
            y=edge_y,
            mode="lines",
            line=dict(width=0.5, color="rgba(120,120,120,0.15)"),
            hoverinfo="skip",
            name="implied residual edges",
        )
    ]
    kept = set(circuit.nodes)
    others = [n for n in acdc_order(n_layers, n_heads) if n not in kept]
    traces.append(
        go.Scatter(
            x=[xy(n.name)[0] for n in others],
            y=[xy(n.name)[1] for n in others],
            mode="markers",
            marker=dict(size=5, color="rgba(180,180,180,0.5)"),
            name="pruned",
            text=[f"{n.name}: |delta| {circuit.importance.get(n, float('nan')):.3g} (pruned)" for n in others],
            hoverinfo="text",
        )
    )
    ordered = sorted(circuit.nodes, key=Node.sort_key)
    traces.append(
        go.Scatter(
            x=[xy(n.name)[0] for n in ordered],
            y=[xy(n.name)[1] for n in ordered],
            mode="markers+text",
            marker=dict(
                size=14,
                color=[circuit.importance.get(n, 0.0) for n in ordered],
                colorscale="Viridis",
                showscale=True,
                colorbar=dict(title="|delta|"),
                line=dict(width=1, color="black"),
                symbol=["square" if n.is_mlp else "circle" for n in ordered],
            ),
            text=[n.name for n in ordered],
            textposition="top center",
            textfont=dict(size=9),
            hovertext=[f"{n.name}: |delta| {circuit.importance.get(n, 0.0):.3g}" for n in ordered],
            hoverinfo="text",
            name="circuit",
        )
    )
    ends = [INPUT_NODE, OUTPUT_NODE]
    traces.append(
        go.Scatter(
            x=[xy(e)[0] for e in ends],
            y=[xy(e)[1] for e in ends],
            mode="markers+text",
            text=ends,
            textposition="top center",
            marker=dict(size=16, color="black", symbol="diamond"),
            name="input / output",
            hoverinfo="text",
        )
    )
    fig = go.Figure(traces)
    fig.update_layout(
        title=(
            f"{full_title}<br><sup>{len(circuit.nodes)} of {n_layers * (n_heads + 1)} nodes, faithfulness "
            f"{circuit.faithfulness:.2f}, {circuit.ablation} ablation, metric {circuit.metric_name}"
            + ("" if drawn is edges else f"; its {len(edges):,} implied edges are not drawn")
            + "</sup>"
        ),
        xaxis=dict(title="layer", tickmode="linear", dtick=1 if n_layers <= 16 else 2, zeroline=False),
        yaxis=dict(
            title="head",
            zeroline=False,
            tickvals=[-1.5, *range(n_heads)],
            ticktext=["MLP", *[str(h) for h in range(n_heads)]],
        ),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
        plot_bgcolor="white",
        height=420 + 12 * n_heads,
        width=max(700, 45 * n_layers + 200),
    )
    return fig
