"""Validating a circuit by knockout: ablate its own nodes, then as many random nodes from outside it, and compare.

Knock out (ablate) the circuit's own nodes and nothing else: the metric should fall sharply.
Knock out as many random nodes from outside the circuit (seeded draws; by default the same number of heads and
of MLPs, or, when the circuit holds most MLPs, the same number of nodes of any kind): the metric should barely
move. :func:`knockout_test` reports both, with the mean and spread over the draws.

Both are measured with the same :class:`~mechfin_utils.methods.circuits.nodes.NodeAblator` that found the circuit
(:mod:`mechfin_utils.methods.circuits.pruning`), in its normalised units: 1 = the full model, 0 = every node ablated.
The figure is :func:`mechfin_utils.reporting.circuit_plots.knockout_figure`.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mechfin_utils.methods.circuits.nodes import Node, NodeAblator
from mechfin_utils.methods.circuits.pruning import Circuit

# ---------------------------------------------------------------------------------------------------------
# Knockout validation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class KnockoutReport:
    """Knocking out the circuit vs knocking out as many random nodes from outside it (normalised metric)."""

    model_name: str
    task_name: str
    nodes: list[Node]
    circuit_knockout: float
    random_knockouts: list[float]
    random_sets: list[list[Node]]
    match_kinds: bool
    seed: int

    @property
    def random_mean(self) -> float:
        return float(torch.tensor(self.random_knockouts).mean())

    @property
    def random_std(self) -> float:
        values = torch.tensor(self.random_knockouts)
        return float(values.std()) if len(values) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        values = self.random_knockouts
        return {
            "model": self.model_name,
            "task": self.task_name,
            "n_nodes_knocked_out": len(self.nodes),
            "circuit_knockout": self.circuit_knockout,
            "random_mean": self.random_mean,
            "random_std": self.random_std,
            "random_min": min(values),
            "random_max": max(values),
            "n_random": len(values),
            "match_kinds": self.match_kinds,
            "seed": self.seed,
        }


def knockout_test(
    ablator: NodeAblator,
    circuit: Circuit | Collection[Node],
    *,
    n_random: int = 10,
    seed: int = 0,
    match_kinds: bool | Literal["auto"] = True,
) -> KnockoutReport:
    """Ablate the circuit's nodes (only them), then ``n_random`` seeded random sets drawn from outside it.

    With ``match_kinds`` (default) each random set has as many heads and as many MLPs as the circuit: MLPs and
    heads differ a lot in how much they matter, so matching the mix keeps the comparison fair; it raises when
    the outside has too few heads or MLPs (a circuit holding most MLPs). ``match_kinds=False`` draws the same
    *number* of nodes from everything outside, whatever their kind; ``"auto"`` matches kinds when the outside
    allows it and otherwise draws from everything outside (``report.match_kinds`` says which was done).
    Values are the normalised metric: 1 = unchanged, 0 = as bad as ablating everything.
    """
    if isinstance(circuit, Circuit):
        if circuit.model_name != ablator.model.name or circuit.task_name != ablator.task.name:
            raise ValueError(
                f"circuit is for {circuit.task_name} on {circuit.model_name}, the ablator for "
                f"{ablator.task.name} on {ablator.model.name}"
            )
        nodes = list(circuit.nodes)
    else:
        nodes = ablator.check_nodes(circuit)
    if not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be a positive integer, got {n_random!r}")
    if match_kinds not in (True, False, "auto"):
        raise ValueError(f"match_kinds must be True, False or 'auto', got {match_kinds!r}")
    inside = set(nodes)
    outside = [n for n in ablator.nodes if n not in inside]
    rng = random.Random(seed)
    if match_kinds == "auto":
        n_outside_heads = sum(not n.is_mlp for n in outside)
        match_kinds = (
            sum(not n.is_mlp for n in inside) <= n_outside_heads
            and sum(n.is_mlp for n in inside) <= len(outside) - n_outside_heads
        )
    if match_kinds:
        outside_heads = [n for n in outside if not n.is_mlp]
        outside_mlps = [n for n in outside if n.is_mlp]
        k_heads, k_mlps = sum(not n.is_mlp for n in inside), sum(n.is_mlp for n in inside)
        if k_heads > len(outside_heads) or k_mlps > len(outside_mlps):
            raise ValueError(
                f"the circuit has {k_heads} heads and {k_mlps} MLPs but only {len(outside_heads)} heads and "
                f"{len(outside_mlps)} MLPs lie outside it: no random set of the same make-up exists "
                "(use match_kinds=False, or a larger threshold)"
            )
        draw = lambda: rng.sample(outside_heads, k_heads) + rng.sample(outside_mlps, k_mlps)  # noqa: E731
    else:
        if len(inside) > len(outside):
            raise ValueError(f"the circuit has {len(inside)} nodes but only {len(outside)} lie outside it")
        draw = lambda: rng.sample(outside, len(inside))  # noqa: E731
    random_sets = [sorted(draw(), key=Node.sort_key) for _ in range(n_random)]
    return KnockoutReport(
        model_name=ablator.model.name,
        task_name=ablator.task.name,
        nodes=sorted(inside, key=Node.sort_key),
        circuit_knockout=ablator.normalised_metric(nodes),
        random_knockouts=[ablator.normalised_metric(s) for s in random_sets],
        random_sets=random_sets,
        match_kinds=match_kinds,
        seed=seed,
    )
