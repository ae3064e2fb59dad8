"""One task's edge circuit, measured the way a reader needs it: which edges, how faithful, against what baseline,
and whether another sample of prompts would give the same circuit.

:func:`edge_circuit_report` runs the stages of notebook 10 for one task, in order:

1. exact edge patching set up on the task's first ``n_evaluate`` prompts
   (:class:`~mechfin_utils.methods.circuits.edges.EdgePatcher`);
2. EAP and EAP-IG scores of every edge, per prompt, on *every* prompt of the task (in chunks that fit in memory);
3. faithfulness curves over circuit sizes -- top-n and greedy circuits, node-level circuits if given, random circuits
   of the same sizes -- each point with a 95% bootstrap interval over the evaluated prompts;
4. the headline circuit: the fewest EAP-IG top-n edges reaching ``min_faithfulness`` (the largest size tried if none
   does), its faithfulness with interval and the random circuits' at that size;
5. stability of that circuit: bootstrap resamples at the full sample, the curve against the number of prompts from
   disjoint samples, and the disjoint-sample Jaccard of every circuit size at half the sample
   (:mod:`~mechfin_utils.methods.circuits.stability`).

Why two sample sizes: *choosing* a circuit and *measuring* it ask different things of the sample. A circuit is chosen
from the mean of per-prompt scores, and only a large sample makes that choice repeatable (the stability curve says how
large); its faithfulness is a mean over prompts whose interval is already narrow at a few dozen. Scores cost about a
forward and backward pass per prompt and step, an exact evaluation a forward pass per prompt and circuit, and the
curves need dozens of evaluations: so the circuit is chosen on every prompt and measured on the first ``n_evaluate``.

:meth:`EdgeCircuitReport.summary` is one row of the notebook's closing table: the n used for each, Jaccard at that n,
the faithfulness with its interval and its random baseline, and the prompts a stable circuit would need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import Tensor

from mechfin_utils.core.stats import BootstrapResult
from mechfin_utils.methods.circuits.edges import (
    EdgePatcher,
    EdgeScores,
    edge_scores_in_chunks,
    method_curves,
    smallest_faithful,
    task_chunks,
    top_edges,
)
from mechfin_utils.methods.circuits.stability import (
    Stability,
    StabilityCurve,
    bootstrap_stability,
    largest_stable_size,
    stability_by_size,
    stability_curve,
)
from mechfin_utils.tasks.circuit_tasks import CircuitTask

HEADLINE = "EAP-IG top-n"


@dataclass
class EdgeCircuitReport:
    """Everything :func:`edge_circuit_report` measured for one task."""

    task_name: str
    model_name: str
    patcher: EdgePatcher
    scores: dict[str, EdgeScores]
    curves: pd.DataFrame
    n_edges: int
    kept: Tensor
    faithfulness: BootstrapResult
    random_at_size: dict[str, float]  # mean, min, max faithfulness of random circuits of the headline's size
    stability: Stability
    curve: StabilityCurve
    by_size: pd.DataFrame  # disjoint-sample Jaccard of each circuit size at the curve's largest n
    min_faithfulness: float

    def summary(self) -> dict[str, Any]:
        stable = self.stability.summary()
        along = self.curve.summary()
        return {
            "task": self.task_name,
            "model": self.model_name,
            "n_prompts": int(self.scores["EAP-IG"].per_prompt.shape[0]),
            "n_evaluated": self.patcher.task.n_prompts,
            "circuit_edges": self.n_edges,
            "reaches_min_faithfulness": bool(self.faithfulness.estimate >= self.min_faithfulness),
            "faithfulness": float(self.faithfulness.estimate),
            "faithfulness_low": float(self.faithfulness.low),
            "faithfulness_high": float(self.faithfulness.high),
            "random_faithfulness": self.random_at_size["mean"],
            "random_faithfulness_max": self.random_at_size["max"],
            "bootstrap_jaccard_at_n": stable["mean_pairwise_jaccard"],
            "disjoint_n": along["largest_n"],
            "disjoint_jaccard": along["jaccard_at_largest_n"],
            "disjoint_spearman": along["spearman_at_largest_n"],
            "prompts_for_jaccard_0.8": along["prompts_for_jaccard_0.8"],
            "prompts_for_jaccard_0.8_extrapolated": along["prompts_for_jaccard_0.8_extrapolated"],
            "largest_stable_circuit_edges": largest_stable_size(self.by_size),
        }


def doubling_sizes(pool: int, smallest: int = 2) -> list[int]:
    """``smallest, 2*smallest, ...`` up to half of ``pool`` (two disjoint samples), ending at ``pool // 2``."""
    half = pool // 2
    if half < smallest:
        raise ValueError(f"a pool of {pool} prompts is too small for two disjoint samples of {smallest}")
    sizes = []
    n = smallest
    while n < half:
        sizes.append(n)
        n *= 2
    return sizes + [half]


def edge_circuit_report(
    model,
    task: CircuitTask,
    counts: Sequence[int],
    *,
    n_evaluate: int | None = None,
    max_prompts: int = 32,
    steps: int = 5,
    node_circuits: Sequence = (),
    node_check: bool = True,
    min_faithfulness: float = 0.8,
    n_boot: int = 1000,
    n_resamples: int = 50,
    n_draws: int = 20,
    n_random: int = 5,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
) -> EdgeCircuitReport:
    """Stages 1-5 of the module docstring for one task. ``n_evaluate``: prompts the circuits are measured on (the
    task's first, in whole batches; None: all); ``max_prompts``: prompts scored per patcher (memory); ``n_boot``:
    bootstrap resamples of the faithfulness intervals; ``n_resamples``: bootstrap circuits at the full sample;
    ``n_draws``: disjoint-sample draws per ``n`` of the stability curve, at ``sizes`` (default: doubling up to half the
    prompts). ``node_check=False`` when the node circuits were found on other prompts than the task's (see
    :func:`~mechfin_utils.methods.circuits.edges.node_circuit_curve`)."""
    # 1. exact edge patching on the prompts the circuits are measured on
    evaluated = task if n_evaluate is None or n_evaluate >= task.n_prompts else task_chunks(task, n_evaluate)[0]
    patcher = EdgePatcher(model, evaluated)
    # 2. EAP and EAP-IG, per prompt, on every prompt (the evaluation's patcher scores its own prompts)
    scores = edge_scores_in_chunks(model, task, ("EAP", "EAP-IG"), steps=steps, max_prompts=max_prompts, first=patcher)
    # 3. faithfulness curves with intervals, random circuits beside them
    curves = method_curves(
        patcher,
        list(scores.values()),
        counts,
        node_circuits=node_circuits,
        node_check=node_check,
        n_random=n_random,
        n_boot=n_boot,
        seed=seed,
    )
    # 4. the headline circuit
    n_edges = smallest_faithful(curves, HEADLINE, min_faithfulness)
    kept = top_edges(scores["EAP-IG"].mean, n_edges)
    faithfulness = patcher.faithfulness_interval(kept, n_boot=n_boot, seed=seed)
    random_rows = curves[(curves["method"] == "random") & (curves["n_edges"] == n_edges)]
    random_at_size = (
        {
            "mean": float(random_rows["faithfulness"].iloc[0]),
            "min": float(random_rows["low"].iloc[0]),
            "max": float(random_rows["high"].iloc[0]),
        }
        if not random_rows.empty
        else {"mean": float("nan"), "min": float("nan"), "max": float("nan")}
    )
    # 5. stability: at the full sample, against the number of prompts, and of every circuit size at the largest n
    stability = bootstrap_stability(scores["EAP-IG"], n_edges, n_boot=n_resamples, seed=seed)
    sizes = list(sizes) if sizes is not None else doubling_sizes(task.n_prompts)
    curve = stability_curve(scores["EAP-IG"], n_edges, sizes, n_draws=n_draws, seed=seed)
    by_size = stability_by_size(scores["EAP-IG"], sorted({*counts, n_edges}), max(sizes), n_draws=n_draws, seed=seed)
    return EdgeCircuitReport(
        task_name=task.name,
        model_name=patcher.model_name,
        patcher=patcher,
        scores=scores,
        curves=curves,
        n_edges=n_edges,
        kept=kept,
        faithfulness=faithfulness,
        random_at_size=random_at_size,
        stability=stability,
        curve=curve,
        by_size=by_size,
        min_faithfulness=min_faithfulness,
    )
