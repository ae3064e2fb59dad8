"""Figures of circuit discovery: size against faithfulness, knockout validation, and the circuit as a graph.

Every title carries the model's name; a figure made from another model's results is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mechfin_utils.methods.circuits.nodes import Node, acdc_order
from mechfin_utils.methods.circuits.pruning import INPUT_NODE, OUTPUT_NODE, Circuit
from mechfin_utils.methods.circuits.validation import KnockoutReport
from mechfin_utils.reporting.plots import model_title


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
    return (float(node.layer) + (0.35 if node.is_mlp else 0.0), -1.5 if node.head is None else float(node.head))


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


# ---------------------------------------------------------------------------------------------------------
# Edge-level circuits
# ---------------------------------------------------------------------------------------------------------


def faithfulness_curves_figure(table: pd.DataFrame, model, task_name: str, n_edges_total: int):
    """Edges kept (log axis) against faithfulness measured by exact edge patching, one line per method; error bars
    from the table's ``low`` / ``high`` when it has them (a bootstrap interval over prompts for a circuit, the
    min-max of the draws for random circuits, drawn dashed and grey)."""
    import plotly.graph_objects as go

    needed = {"method", "n_edges", "faithfulness"}
    if not needed <= set(table.columns):
        raise ValueError(f"table needs columns {sorted(needed)}, missing {sorted(needed - set(table.columns))}")
    fig = go.Figure()
    for method, rows in table.groupby("method", sort=False):
        rows = rows.sort_values("n_edges")
        bars = None
        if {"low", "high"} <= set(rows.columns) and rows[["low", "high"]].notna().all().all():
            bars = dict(
                type="data",
                symmetric=False,
                array=(rows["high"] - rows["faithfulness"]).clip(lower=0),
                arrayminus=(rows["faithfulness"] - rows["low"]).clip(lower=0),
            )
        random = method == "random"
        fig.add_trace(
            go.Scatter(
                x=rows["n_edges"],
                y=rows["faithfulness"],
                error_y=bars,
                mode="lines+markers",
                name=str(method) + (" (min-max of draws)" if random else ""),
                line=dict(dash="dash", color="grey") if random else None,
                hovertemplate=f"{method}: %{{x}} edges, faithfulness %{{y:.3f}}<extra></extra>",
            )
        )
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="full model")
    fig.add_hline(y=0.0, line_dash="dot", line_color="grey", annotation_text="corrupted run")
    fig.update_layout(
        title=(
            f"{task_name}: edges kept vs faithfulness (exact edge patching) — {model.name}"
            "<br><sup>bars: 95% bootstrap interval over prompts; random circuits: the spread of the draws</sup>"
        ),
        xaxis=dict(title=f"edges kept (of {n_edges_total:,}; log scale)", type="log"),
        yaxis_title="faithfulness (1 = full model, 0 = corrupted)",
        plot_bgcolor="white",
        width=900,
        height=500,
    )
    return fig


def stability_curves_figure(curves: Sequence, model, threshold: float = 0.8):
    """Agreement of circuits from two disjoint samples of ``n`` prompts against ``n`` (log axis), one line per task
    (:class:`~mechfin_utils.methods.circuits.stability.StabilityCurve`): the Jaccard overlap of their edges (left)
    and the Spearman correlation of all edge scores (right), each with the 5th-95th percentile band of the draws."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not curves:
        raise ValueError("no stability curves to draw")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("Jaccard overlap of the two circuits' edges", "Spearman correlation of all edge scores"),
    )
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, curve in enumerate(curves):
        table, colour = curve.table, palette[i % len(palette)]
        label = f"{curve.task_name} ({curve.n_edges:,} edges)"
        for column, (name, stat) in enumerate((("Jaccard", "jaccard"), ("Spearman", "spearman")), start=1):
            fig.add_trace(
                go.Scatter(
                    x=table["n_prompts"],
                    y=table[f"{stat}_mean"],
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=table[f"{stat}_p95"] - table[f"{stat}_mean"],
                        arrayminus=table[f"{stat}_mean"] - table[f"{stat}_p05"],
                    ),
                    mode="lines+markers",
                    name=label,
                    legendgroup=label,
                    showlegend=column == 1,
                    line=dict(color=colour),
                    hovertemplate=f"{curve.task_name}: n=%{{x}}, mean {name} %{{y:.3f}}<extra></extra>",
                ),
                row=1,
                col=column,
            )
    fig.add_hline(y=threshold, line_dash="dot", line_color="grey", row=1, col=1, annotation_text="stable (0.8)")
    fig.update_xaxes(type="log", title_text="prompts in each of two disjoint samples (log scale)")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(
        title=(
            f"Would another sample of prompts give the same circuit? — {model.name}<br><sup>two disjoint samples of n "
            f"prompts, EAP-IG top-n circuits of a fixed size; mean over draws, bars: 5th-95th percentile of draws</sup>"
        ),
        plot_bgcolor="white",
        width=1100,
        height=480,
    )
    return fig


def edge_circuit_figure(graph, kept, scores, model, title: str):
    """An edge circuit: heads at (layer, head), MLPs on the bottom row, input on the left and logits on the right;
    one line per kept edge, red where patching it lowers the metric (it carries the behaviour), blue where it raises
    it. Key/value receivers of a grouped-query head are drawn at the middle of the query heads that share them."""
    import plotly.graph_objects as go

    n_layers, n_heads = graph.n_layers, graph.n_heads
    rep = n_heads // graph.n_kv_heads
    mlp_y, mid = -1.5, (n_heads - 1) / 2

    def sender_xy(u: int) -> tuple[float, float]:
        if u == 0:
            return (-1.0, mid)
        layer, offset = divmod(u - 1, n_heads + 1)
        return (layer, mlp_y if offset == n_heads else offset)

    def receiver_xy(d: int) -> tuple[float, float]:
        if d == graph.logits_receiver:
            return (n_layers, mid)
        layer, offset = divmod(d, graph.receivers_per_layer)
        if offset == graph.receivers_per_layer - 1:
            return (layer, mlp_y)
        if offset < n_heads:
            return (layer - 0.12, offset)
        group = (offset - n_heads) % graph.n_kv_heads
        return (layer - 0.12, group * rep + (rep - 1) / 2)

    edges = kept.nonzero().tolist()
    traces = []
    for sign, colour, label in (
        (-1, "rgba(214,39,40,0.55)", "patching lowers the metric"),
        (1, "rgba(31,119,180,0.55)", "patching raises it"),
    ):
        xs, ys = [], []
        for u, d in edges:
            if (float(scores[u, d]) < 0) == (sign < 0):
                (x0, y0), (x1, y1) = sender_xy(u), receiver_xy(d)
                xs += [x0, x1, None]
                ys += [y0, y1, None]
        traces.append(
            go.Scatter(x=xs, y=ys, mode="lines", line=dict(width=1, color=colour), name=label, hoverinfo="skip")
        )
    nodes = graph.nodes_of(kept)
    index = {n: i for i, n in enumerate(graph.sender_names())}
    points = [sender_xy(index[n]) for n in nodes]
    traces.append(
        go.Scatter(
            x=[p[0] for p in points] + [-1.0, n_layers],
            y=[p[1] for p in points] + [mid, mid],
            mode="markers+text",
            text=nodes + ["input", "logits"],
            textposition="top center",
            textfont=dict(size=8),
            marker=dict(
                size=[10] * len(nodes) + [16, 16],
                symbol=["square" if n.startswith("MLP") else "circle" for n in nodes] + ["diamond", "diamond"],
                color=["#444"] * len(nodes) + ["black", "black"],
            ),
            name="nodes",
            hoverinfo="text",
        )
    )
    fig = go.Figure(traces)
    fig.update_layout(
        title=f"{model_title(title, model)}<br><sup>{len(edges):,} of {graph.n_edges:,} edges, {len(nodes)} nodes</sup>",
        xaxis=dict(title="layer", tickmode="linear", dtick=1 if n_layers <= 16 else 2, zeroline=False),
        yaxis=dict(
            title="head", zeroline=False, tickvals=[mlp_y, *range(n_heads)], ticktext=["MLP", *map(str, range(n_heads))]
        ),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
        plot_bgcolor="white",
        height=420 + 12 * n_heads,
        width=max(700, 45 * n_layers + 200),
    )
    return fig


def stability_figure(stability, model, task_name: str, top: int = 40):
    """How often each node is in the bootstrap circuits (the ``top`` most frequent), with the Jaccard summary."""
    import plotly.graph_objects as go

    freq = stability.node_frequency.head(top)
    summary = stability.summary()
    fig = go.Figure(
        go.Bar(
            x=list(freq.index),
            y=list(freq.values),
            marker_color=["#2ca02c" if v == 1 else "#7f7f7f" for v in freq.values],
        )
    )
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    fig.update_layout(
        title=(
            f"{task_name}: nodes in {summary['n_boot']} bootstrap circuits of {summary['n_edges']} edges "
            f"({summary['method']} {summary['selection']}) — {model.name}<br><sup>mean pairwise Jaccard "
            f"{summary['mean_pairwise_jaccard']:.2f} (min {summary['min_pairwise_jaccard']:.2f}; stable means >= 0.8); "
            f"{summary['nodes_always']} nodes always in, {summary['nodes_sometimes']} sometimes, {summary['nodes_never']} never</sup>"
        ),
        xaxis_title="node (most frequent first; green = in every resample)",
        yaxis_title="share of resamples",
        plot_bgcolor="white",
        width=1100,
        height=480,
    )
    return fig


def ioi_roles_figure(roles: pd.DataFrame, model, label: int = 8):
    """Every head: attention from the end position to IO minus to S (x) against its direct effect on
    logit(IO) - logit(S) (y). Name movers sit top right; the ``label`` largest |DLA| heads are named."""
    import plotly.graph_objects as go

    needed = {"head", "layer", "dla", "attn_io", "attn_s"}
    if not needed <= set(roles.columns):
        raise ValueError(
            f"roles needs columns {sorted(needed)} (ioi.head_roles), missing {sorted(needed - set(roles.columns))}"
        )
    named = set(roles.reindex(roles["dla"].abs().sort_values(ascending=False).index).head(label)["head"])
    fig = go.Figure(
        go.Scatter(
            x=roles["attn_io"] - roles["attn_s"],
            y=roles["dla"],
            mode="markers+text",
            text=[h if h in named else "" for h in roles["head"]],
            textposition="top center",
            hovertext=[
                f"head {h}: DLA {d:+.3f}, attention IO {a:.2f}, S {s:.2f}"
                for h, d, a, s in zip(roles["head"], roles["dla"], roles["attn_io"], roles["attn_s"])
            ],
            hoverinfo="text",
            marker=dict(
                color=roles["layer"], colorscale="Viridis", showscale=True, colorbar=dict(title="layer"), size=8
            ),
        )
    )
    fig.add_hline(y=0.0, line_color="grey", line_dash="dot")
    fig.add_vline(x=0.0, line_color="grey", line_dash="dot")
    fig.update_layout(
        title=f"IOI: each head's direct effect vs where the end position looks — {model.name}",
        xaxis_title="attention to IO − attention to S (from the end position)",
        yaxis_title="direct effect on logit(IO) − logit(S)",
        plot_bgcolor="white",
        width=900,
        height=520,
    )
    return fig
