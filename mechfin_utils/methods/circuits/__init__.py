"""Circuits: which heads, MLPs and edges carry a task's behaviour, found by ablation and checked by knockout.

Node level, one module per stage: ``nodes`` (a node, and :class:`NodeAblator`, which runs a task with any set of
nodes ablated) <- ``pruning`` (node-level ACDC: :func:`prune_nodes`, :func:`discover_circuit`, threshold sweeps,
:class:`Circuit`) <- ``validation`` (:func:`knockout_test`). Edge level: ``edges`` (exact edge patching, EAP and
EAP-IG scores, top-n, greedy and random circuits, faithfulness curves with intervals) <- ``stability`` (would
another sample of prompts give the same circuit: bootstrap stability, and stability against the number of prompts)
<- ``task_report`` (one task's circuit measured end to end: faithfulness with intervals and random baselines,
stability, the summary row). Readings on known tasks:
``ioi_heads`` (IOI name movers and S-inhibition heads against Wang et al.) and ``knowledge`` (one fact's circuit
across edits and contexts). The tasks are in :mod:`mechfin_utils.tasks.circuit_tasks`; the figures in
:mod:`mechfin_utils.reporting.circuit_plots`.
"""

from mechfin_utils.methods.circuits.edges import (
    METHODS,
    EdgePatcher,
    EdgeScores,
    edge_scores,
    faithfulness_curve,
    greedy_edges,
    method_curves,
    node_circuit_curve,
    random_curve,
    random_edges,
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
from mechfin_utils.methods.circuits.stability import (
    Stability,
    StabilityCurve,
    bootstrap_stability,
    jaccard,
    spearman,
    stability_curve,
)
from mechfin_utils.methods.circuits.task_report import EdgeCircuitReport, doubling_sizes, edge_circuit_report
from mechfin_utils.methods.circuits.validation import KnockoutReport, knockout_test

__all__ = [
    "INPUT_NODE",
    "METHODS",
    "OUTPUT_NODE",
    "Circuit",
    "EdgeCircuitReport",
    "EdgePatcher",
    "EdgeScores",
    "KnockoutReport",
    "Node",
    "NodeAblator",
    "PruningResult",
    "PruningStep",
    "Stability",
    "StabilityCurve",
    "acdc_order",
    "bootstrap_stability",
    "choose_circuit",
    "discover_circuit",
    "doubling_sizes",
    "edge_circuit_report",
    "edge_scores",
    "faithfulness_curve",
    "greedy_edges",
    "jaccard",
    "knockout_test",
    "method_curves",
    "node_circuit_curve",
    "prune_nodes",
    "random_curve",
    "random_edges",
    "smallest_faithful",
    "spearman",
    "stability_curve",
    "threshold_sweep",
    "top_edges",
]
