"""Circuit discovery by iterative pruning (node-level ACDC): the algorithm, the :class:`Circuit` it finds, sweeps.

A *circuit* for a task is a subset of nodes (heads and MLPs, :class:`~mechfin_utils.methods.circuits.nodes.Node`)
that, on its own, reproduces the model's behaviour on that task: run the model with every node *outside* the circuit
ablated (:class:`~mechfin_utils.methods.circuits.nodes.NodeAblator`) and the task metric should stay close to the
full model's.

**Pruning** (Conmy et al. 2023, at node level). Walk the nodes from the output backwards, layer by layer (in
each layer the MLP first, since it reads the heads' output, then heads 0..H-1). For each node, ablate it *on top
of every node already removed*; if the task metric moves by less than a threshold ``tau`` the node is removed for
good, otherwise it is kept. One forward pass per node: 300 for SmolLM2 (30 layers x (9 heads + 1 MLP)), 156 for
GPT-2 Small. The metric is normalised so that thresholds mean the same thing on every task and model::

    normalised(S) = (metric(S ablated) - metric(all ablated)) / (metric(nothing ablated) - metric(all ablated))

so the full model scores 1 and the fully-ablated model 0; ``tau = 0.02`` removes a node when it changes the
result by less than 2 % of the full-vs-baseline gap. The found circuit's **faithfulness** is its normalised
metric (1 = recovers the full model's effect, 0 = no better than ablating everything); the raw ratio
``metric(circuit) / metric(full)`` is reported too. Two things to keep in mind when reading a sweep: each removal
may move the metric by up to ``tau``, and the moves add up, so faithfulness falls as ``tau`` grows (greedy
drift); and when the full-vs-baseline gap is small or noisy (a task the model barely does), every normalised
delta is large and almost nothing gets pruned; look at ``full_metric - baseline_metric`` first.

The algorithm itself, :func:`prune_nodes`, involves no model (any nodes, any metric of a set of ablated nodes);
:func:`discover_circuit` runs it on a :class:`~mechfin_utils.methods.circuits.nodes.NodeAblator`,
:func:`threshold_sweep` at several thresholds, and :func:`choose_circuit` picks one from the sweep by a written rule.
The circuit is validated by knockout in :mod:`mechfin_utils.methods.circuits.validation`.

**Nodes here, edges in** :mod:`mechfin_utils.methods.circuits.edges`. ACDC proper prunes *edges*: the path from a
sender's output to one receiver's input (a head's query/key/value input, an MLP's input, the logits). Testing every
edge by patching is tens of thousands of forward passes on a CPU, so this module prunes nodes, exactly, with one pass
per node, and :attr:`Circuit.edges` lists the residual-stream connections *implied* by the kept nodes. Edge-level
circuits are scored by gradients (EAP, EAP-IG) and checked by exact edge patching in
:mod:`mechfin_utils.methods.circuits.edges`, where :func:`~mechfin_utils.methods.circuits.edges.node_circuit_curve` puts this
module's circuits on the same axes (a node circuit as its edge set gives the same run as the node ablation; tested).

**Tasks** are in :mod:`mechfin_utils.tasks.circuit_tasks` (greater-than, Hanna et al. 2023; fair lending, the paper's
task): batches of (clean tokens, corrupted tokens, per-prompt score function of the logits). **Figures** are in
:mod:`mechfin_utils.reporting.circuit_plots`.

Typical use::

    task = circuit_tasks.greater_than_task(model, n_prompts=16)
    ablator = NodeAblator(model, task)
    circuit = discover_circuit(ablator, threshold=0.02)
    circuit.faithfulness, len(circuit.nodes)
    knockout_test(ablator, circuit, n_random=10).summary()
    circuit_plots.circuit_figure(circuit, model, "Greater-than circuit")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pandas as pd

from mechfin_utils.methods.circuits.nodes import Node, NodeAblator

Criterion = Literal["abs", "drop"]

N = TypeVar("N", bound=Hashable)


# ---------------------------------------------------------------------------------------------------------
# The pruning algorithm itself (no model involved: any nodes, any metric of a set of ablated nodes)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruningStep:
    """One decision: the metric before, the metric with ``node`` also ablated, and whether it was removed."""

    node: Hashable
    metric_before: float
    metric_if_removed: float
    removed: bool

    @property
    def delta(self) -> float:
        """``metric_if_removed - metric_before``: what ablating the node did, given the nodes already removed."""
        return self.metric_if_removed - self.metric_before


@dataclass
class PruningResult:
    """What :func:`prune_nodes` decided, step by step."""

    threshold: float
    criterion: str
    kept: list
    removed: list
    steps: list[PruningStep]
    start_metric: float
    final_metric: float

    @property
    def importance(self) -> dict:
        """``|delta|`` of every node at the moment it was considered (kept nodes have ``>= threshold``)."""
        return {step.node: abs(step.delta) for step in self.steps}

    def trace(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "node": str(s.node),
                    "metric_before": s.metric_before,
                    "metric_if_removed": s.metric_if_removed,
                    "delta": s.delta,
                    "removed": s.removed,
                }
                for s in self.steps
            ]
        )


def _is_removable(delta: float, threshold: float, criterion: Criterion) -> bool:
    if criterion == "abs":
        return abs(delta) < threshold
    return delta > -threshold  # "drop": only a fall of the metric by >= threshold keeps a node


def prune_nodes(
    nodes: Sequence[N],
    evaluate: Callable[[frozenset[N]], float],
    threshold: float,
    *,
    criterion: Criterion = "abs",
    on_step: Callable[[PruningStep], None] | None = None,
) -> PruningResult:
    """Greedy iterative pruning: the core of ACDC, independent of any model.

    Args:
        nodes: every candidate node, in the order to consider them (for a transformer: :func:`acdc_order`).
        evaluate: the task metric with exactly the given set of nodes ablated (``frozenset()`` = full model).
        threshold: ``tau >= 0``. A node is removed when ablating it on top of the nodes already removed
            changes the metric by less than ``tau``.
        criterion: ``"abs"`` (default): remove when ``|delta| < tau``, so a node that *raises* the metric a lot
            when ablated (one that works against the task) is kept too. ``"drop"``: remove unless the metric
            *falls* by at least ``tau`` (ACDC's rule for a loss-like metric, mirrored).
        on_step: called with each :class:`PruningStep` as soon as it is decided (progress display).

    Returns:
        A :class:`PruningResult`: kept and removed nodes (each in consideration order), every step's metric
        before and after, the starting metric (nothing ablated) and the final one (the circuit alone).
    """
    if criterion not in ("abs", "drop"):
        raise ValueError(f"criterion must be 'abs' or 'drop', got {criterion!r}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    nodes = list(nodes)
    if not nodes:
        raise ValueError("no nodes to prune")
    seen: set = set()
    for i, node in enumerate(nodes):
        if node in seen:
            raise ValueError(f"node {node} appears twice in the pruning order (second time at index {i})")
        seen.add(node)

    def checked(ablated: frozenset, node: Any) -> float:
        value = float(evaluate(ablated))
        if not math.isfinite(value):
            raise ValueError(f"the metric is {value} with {len(ablated)} nodes ablated (last added: {node})")
        return value

    removed: set = set()
    current = start = checked(frozenset(), None)
    steps, kept_order, removed_order = [], [], []
    for node in nodes:
        candidate = checked(frozenset(removed | {node}), node)
        remove = _is_removable(candidate - current, threshold, criterion)
        steps.append(PruningStep(node, current, candidate, remove))
        if on_step is not None:
            on_step(steps[-1])
        if remove:
            removed.add(node)
            removed_order.append(node)
            current = candidate
        else:
            kept_order.append(node)
    return PruningResult(float(threshold), criterion, kept_order, removed_order, steps, start, current)


# ---------------------------------------------------------------------------------------------------------
# Circuits: discovery on a model, threshold sweep, choice
# ---------------------------------------------------------------------------------------------------------

OUTPUT_NODE = "logits"
INPUT_NODE = "embed"


@dataclass
class Circuit:
    """A discovered circuit: its nodes, how they were found, and how faithful it is.

    ``importance[node]`` is ``|delta|`` when the node was considered (normalised units: a fraction of the
    full-vs-baseline gap), for kept and removed nodes alike. ``faithfulness`` is the circuit-only model's
    normalised metric; ``raw_faithfulness`` is ``circuit_metric / full_metric``.
    """

    model_name: str
    task_name: str
    metric_name: str
    ablation: str
    threshold: float
    criterion: str
    n_layers: int
    n_heads: int
    nodes: list[Node]
    removed: list[Node]
    importance: dict[Node, float]
    full_metric: float
    baseline_metric: float
    circuit_metric: float
    faithfulness: float
    seconds: float = 0.0
    n_forward_passes: int = 0
    pruning: PruningResult | None = None

    @property
    def raw_faithfulness(self) -> float:
        return self.circuit_metric / self.full_metric if self.full_metric != 0 else float("nan")

    @property
    def n_heads_kept(self) -> int:
        return sum(not n.is_mlp for n in self.nodes)

    @property
    def n_mlps_kept(self) -> int:
        return sum(n.is_mlp for n in self.nodes)

    @property
    def edges(self) -> list[tuple[str, str]]:
        """Residual-stream connections implied by the kept nodes (not separately tested; see module docs).

        ``embed`` feeds every kept node, every kept node feeds ``logits``, and a kept node feeds every kept node
        that reads the residual stream after it writes (a head in layer L feeds the MLP of layer L and anything
        in later layers; an MLP in layer L feeds anything in later layers).
        """
        ordered = sorted(self.nodes, key=Node.sort_key)
        edges = [(INPUT_NODE, n.name) for n in ordered]
        for i, sender in enumerate(ordered):
            for receiver in ordered[i + 1 :]:
                if receiver.layer > sender.layer or (receiver.is_mlp and not sender.is_mlp):
                    edges.append((sender.name, receiver.name))
        edges.extend((n.name, OUTPUT_NODE) for n in ordered)
        return edges

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "task": self.task_name,
            "ablation": self.ablation,
            "threshold": self.threshold,
            "n_nodes": len(self.nodes),
            "n_heads": self.n_heads_kept,
            "n_mlps": self.n_mlps_kept,
            "of_nodes": self.n_layers * (self.n_heads + 1),
            "full_metric": self.full_metric,
            "baseline_metric": self.baseline_metric,
            "circuit_metric": self.circuit_metric,
            "faithfulness": self.faithfulness,
            "raw_faithfulness": self.raw_faithfulness,
            "seconds": self.seconds,
            "forward_passes": self.n_forward_passes,
        }

    def __repr__(self) -> str:
        return (
            f"Circuit({self.task_name} on {self.model_name}, tau={self.threshold}: {len(self.nodes)} nodes "
            f"({self.n_heads_kept} heads, {self.n_mlps_kept} MLPs), faithfulness {self.faithfulness:.3f})"
        )


def discover_circuit(
    ablator: NodeAblator,
    threshold: float,
    *,
    criterion: Criterion = "abs",
    on_step: Callable[[PruningStep], None] | None = None,
) -> Circuit:
    """Prune ``ablator``'s model on its task at threshold ``tau`` (normalised units) and return the circuit.

    Costs one forward pass per batch per node (plus one to measure the circuit alone in raw units).
    """
    start_passes, t0 = ablator.n_forward_passes, time.perf_counter()
    result = prune_nodes(ablator.nodes, ablator.normalised_metric, threshold, criterion=criterion, on_step=on_step)
    circuit_metric = ablator.metric(result.removed)
    return Circuit(
        model_name=ablator.model.name,
        task_name=ablator.task.name,
        metric_name=ablator.task.metric_name,
        ablation=ablator.ablation,
        threshold=float(threshold),
        criterion=criterion,
        n_layers=ablator.n_layers,
        n_heads=ablator.n_heads,
        nodes=sorted(result.kept, key=Node.sort_key),
        removed=sorted(result.removed, key=Node.sort_key),
        importance=result.importance,
        full_metric=ablator.full_metric,
        baseline_metric=ablator.baseline_metric,
        circuit_metric=circuit_metric,
        faithfulness=result.final_metric,
        seconds=time.perf_counter() - t0,
        n_forward_passes=ablator.n_forward_passes - start_passes,
        pruning=result,
    )


def threshold_sweep(
    ablator: NodeAblator, thresholds: Sequence[float], *, criterion: Criterion = "abs"
) -> tuple[pd.DataFrame, list[Circuit]]:
    """Discover a circuit at each threshold: a table of size vs faithfulness (one row each) and the circuits."""
    if not thresholds:
        raise ValueError("thresholds is empty")
    with ablator.remembering():  # the walks share their passes up to their first different decision
        circuits = [discover_circuit(ablator, t, criterion=criterion) for t in thresholds]
    return pd.DataFrame([c.summary() for c in circuits]), circuits


def choose_circuit(circuits: Sequence[Circuit], min_faithfulness: float = 0.8) -> Circuit:
    """From a threshold sweep, the smallest circuit whose faithfulness is at least ``min_faithfulness``
    (ties: the larger threshold); when none reaches it, the most faithful one (ties: the smaller).

    The rule a reader would apply to the size-vs-faithfulness plot, written down so the notebook's choice is
    reproducible rather than eyeballed.
    """
    if not circuits:
        raise ValueError("circuits is empty: run threshold_sweep first")
    if not 0 <= min_faithfulness <= 1:
        raise ValueError(f"min_faithfulness must be in [0, 1], got {min_faithfulness!r}")
    good = [c for c in circuits if c.faithfulness >= min_faithfulness]
    if good:
        return min(good, key=lambda c: (len(c.nodes), -c.threshold))
    return max(circuits, key=lambda c: (c.faithfulness, -len(c.nodes)))
