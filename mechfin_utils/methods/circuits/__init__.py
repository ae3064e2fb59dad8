"""Circuits: which heads, MLPs and edges carry a task's behaviour, found by ablation and checked by knockout.

Node level, one module per stage: ``nodes`` (a node, and :class:`NodeAblator`, which runs a task with any set of
nodes ablated) <- ``pruning`` (node-level ACDC: :func:`prune_nodes`, :func:`discover_circuit`, threshold sweeps,
:class:`Circuit`) <- ``validation`` (:func:`knockout_test`). Edge level: ``edges`` (exact edge patching, EAP and
EAP-IG scores, top-n and greedy circuits, faithfulness curves, bootstrap stability). Readings on known tasks:
``ioi_heads`` (IOI name movers and S-inhibition heads against Wang et al.) and ``knowledge`` (one fact's circuit
across edits and contexts). The tasks are in :mod:`mechfin_utils.tasks.circuit_tasks`; the figures in
:mod:`mechfin_utils.reporting.circuit_plots`.
"""

from mechfin_utils.methods.circuits.edges import (
    METHODS,
    EdgePatcher,
    EdgeScores,
    Stability,
    bootstrap_stability,
    edge_scores,
    faithfulness_curve,
    greedy_edges,
    method_curves,
    node_circuit_curve,
    smallest_faithful,
    top_edges,
)
from mechfin_utils.methods.circuits.nodes import Node, NodeAblator, acdc_order
from mechfin_utils.methods.circuits.pruning import (
    INPUT_NODE,
    OUTPUT_NODE,
    Circuit,
    PruningResult,
    PruningStep,
    choose_circuit,
    discover_circuit,
    prune_nodes,
    threshold_sweep,
)
from mechfin_utils.methods.circuits.validation import KnockoutReport, knockout_test

__all__ = [
    "INPUT_NODE",
    "METHODS",
    "OUTPUT_NODE",
    "Circuit",
    "EdgePatcher",
    "EdgeScores",
    "KnockoutReport",
    "Node",
    "NodeAblator",
    "PruningResult",
    "PruningStep",
    "Stability",
    "acdc_order",
    "bootstrap_stability",
    "choose_circuit",
    "discover_circuit",
    "edge_scores",
    "faithfulness_curve",
    "greedy_edges",
    "knockout_test",
    "method_curves",
    "node_circuit_curve",
    "prune_nodes",
    "smallest_faithful",
    "threshold_sweep",
    "top_edges",
]
