"""Circuit stability: would another sample of prompts give the same circuit, and how many prompts does that take?

A circuit found on a handful of prompts is a property of those prompts until shown otherwise. Circuit stability has
no standard yet (Méloux et al. 2025 compare circuits across bootstrap resamples); mechfin measures it two ways, both
from the per-prompt edge scores of :func:`~mechfin_utils.methods.circuits.edges.edge_scores`, so neither costs a
forward pass:

* :func:`bootstrap_stability` -- at the sample size used: resample the prompts with replacement, choose a circuit of
  ``n_edges`` edges from each resample's mean scores, compare the circuits (pairwise Jaccard, and which nodes are
  always, sometimes or never in them). Two resamples share most of their prompts, so this is an optimistic reading.
* :func:`stability_curve` -- against the number of prompts ``n``: draw two **disjoint** sets of ``n`` prompts from the
  scored pool, choose a circuit of the same ``n_edges`` from each, and measure how far the two agree: the Jaccard
  overlap of their edges, and the Spearman rank correlation of all edge scores. Repeated over ``n_draws`` draws per
  ``n`` (up to half the pool). Two disjoint samples are two independent samples of the task's prompts, so the curve
  says what a second analyst with ``n`` other prompts would find. The ``n`` at which the mean Jaccard reaches 0.8
  (Méloux et al.'s bar for "stable") is read off the curve, or, when the pool is too small to reach it, extrapolated
  from a power-law fit of ``1 - Jaccard`` against ``n`` (and said to be extrapolated; only from points at Jaccard
  0.5 or more, so a curve that is still far from stable gets no such number).

The circuit size is held fixed along the curve (the selection rule "top-n edges at a fixed size"): notebook 10 uses
the fewest EAP-IG edges whose circuit reaches faithfulness 0.8 on the whole pool.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechfin_utils.methods.circuits.edges import SELECTIONS, EdgeScores

STABLE_JACCARD = 0.8
"""Méloux et al.'s bar: a circuit is called stable when circuits from other samples overlap it this much."""


def jaccard(a: Tensor, b: Tensor) -> float:
    union = int((a | b).sum())
    return float(int((a & b).sum()) / union) if union else 1.0


def _ranks(values: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks 0..n-1 (ties broken by position; edge scores are continuous, so ties are the zeros of dead edges)."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[values.argsort()] = torch.arange(values.numel(), dtype=torch.float64)
    return ranks


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's rank correlation of two score vectors (Pearson's correlation of their ranks)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / math.sqrt(float(ra @ ra) * float(rb @ rb)))


# ---------------------------------------------------------------------------------------------------------
# At the sample size used: bootstrap resamples
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Stability:
    """Circuits of ``n_edges`` edges found on ``n_boot`` bootstrap resamples of the prompts."""

    method: str
    selection: str
    n_edges: int
    n_boot: int
    pairwise_jaccard: list[float]
    jaccard_to_full: list[float]
    node_frequency: pd.Series  # share of resamples whose circuit touches each node
    edge_frequency: pd.Series  # share of resamples keeping each edge (edges kept at least once)
    all_nodes: list[str] = field(default_factory=list)
    n_prompts: int = 0

    def summary(self) -> dict:
        freq = self.node_frequency.reindex(self.all_nodes, fill_value=0.0)
        return {
            "method": self.method,
            "selection": self.selection,
            "n_edges": self.n_edges,
            "n_prompts": self.n_prompts,
            "n_boot": self.n_boot,
            "mean_pairwise_jaccard": float(np.mean(self.pairwise_jaccard)),
            "min_pairwise_jaccard": float(np.min(self.pairwise_jaccard)),
            "mean_jaccard_to_full_sample": float(np.mean(self.jaccard_to_full)),
            "stable (mean Jaccard >= 0.8)": bool(np.mean(self.pairwise_jaccard) >= STABLE_JACCARD),
            "nodes_always": int((freq == 1.0).sum()),
            "nodes_sometimes": int(((freq > 0) & (freq < 1)).sum()),
            "nodes_never": int((freq == 0).sum()),
            "edges_always": int((self.edge_frequency == 1.0).sum()),
        }


def bootstrap_circuits(
    scores: EdgeScores, n_edges: int, *, n_boot: int = 50, seed: int = 0, selection: str = "top-n"
) -> list[Bool[Tensor, "n_senders n_receivers"]]:
    """The circuits of ``n_edges`` edges chosen from ``n_boot`` resamples (with replacement) of the prompts' scores.
    The resampled rows depend only on ``seed``, ``n_boot`` and the number of prompts, so two score sets of the same
    prompts (two models, :mod:`~mechfin_utils.methods.circuits.base_vs_tuned`) get the same resamples."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {selection!r}")
    choose, n_prompts = SELECTIONS[selection], scores.per_prompt.shape[0]
    generator = torch.Generator().manual_seed(seed)
    circuits = []
    for _ in range(n_boot):
        rows = torch.randint(n_prompts, (n_prompts,), generator=generator)
        circuits.append(choose(scores.per_prompt[rows].mean(0), scores.graph, n_edges))
    return circuits


def bootstrap_stability(
    scores: EdgeScores, n_edges: int, *, n_boot: int = 50, seed: int = 0, selection: str = "top-n"
) -> Stability:
    """Méloux et al.'s check: resample the prompts with replacement ``n_boot`` times, choose a circuit of ``n_edges``
    edges from each resample's mean scores, and compare the circuits (Jaccard overlap of their edges, pairwise and
    with the full sample's circuit) and which nodes are always, sometimes or never in them. No forward pass: the
    scores are per prompt."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {selection!r}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    graph, n_prompts = scores.graph, scores.per_prompt.shape[0]
    full = SELECTIONS[selection](scores.mean, graph, n_edges)
    circuits = bootstrap_circuits(scores, n_edges, n_boot=n_boot, seed=seed, selection=selection)
    node_counts = pd.Series(
        [node for kept in circuits for node in graph.nodes_of(kept)], dtype=object
    ).value_counts() / len(circuits)
    stacked = torch.stack(circuits).float().mean(0)
    edge_index = stacked.nonzero().tolist()
    return Stability(
        method=scores.method,
        selection=selection,
        n_edges=n_edges,
        n_boot=n_boot,
        pairwise_jaccard=[jaccard(a, b) for a, b in itertools.combinations(circuits, 2)],
        jaccard_to_full=[jaccard(full, c) for c in circuits],
        node_frequency=node_counts.sort_values(ascending=False),
        edge_frequency=pd.Series(
            [float(stacked[sender, receiver]) for sender, receiver in edge_index],
            index=[graph.edge_name(sender, receiver) for sender, receiver in edge_index],
        ).sort_values(ascending=False),
        all_nodes=[graph.sender_name(sender) for sender in range(1, graph.n_senders)],
        n_prompts=int(n_prompts),
    )


# ---------------------------------------------------------------------------------------------------------
# Against the number of prompts: disjoint samples
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StabilityCurve:
    """Agreement of circuits from two disjoint samples of ``n`` prompts, for each ``n`` in ``table``.

    ``table``: one row per ``n_prompts`` with the mean Jaccard of the two circuits' edges and the mean Spearman
    correlation of all edge scores over ``n_draws`` draws, and the 5th and 95th percentiles of each over the draws
    (``*_p05``, ``*_p95``: how much one analyst's sample can differ from another's, not an interval for the mean).
    """

    task_name: str
    method: str
    selection: str
    n_edges: int
    pool: int
    n_draws: int
    table: pd.DataFrame

    def prompts_needed(self, threshold: float = STABLE_JACCARD) -> int | None:
        """The smallest measured ``n`` whose mean Jaccard reaches ``threshold`` (None: none up to half the pool)."""
        reached = self.table[self.table["jaccard_mean"] >= threshold]
        return int(reached["n_prompts"].min()) if not reached.empty else None

    def power_law(self) -> tuple[float, float] | None:
        """``(a, b)`` of the least-squares fit ``log(1 - Jaccard) = a + b log(n)`` over the measured points with a
        mean Jaccard from 0.5 to 1 (exclusive): further from stable, the overlap of two noisy top-n sets does not
        yet follow the noise's ``1/sqrt(n)`` and a fit there says nothing about where it would reach 0.8. None
        with fewer than 3 such points."""
        jaccard = self.table["jaccard_mean"]
        rows = self.table[(jaccard >= 0.5) & (jaccard < 1.0)]
        if len(rows) < 3:
            return None
        b, a = np.polyfit(np.log(rows["n_prompts"]), np.log(1.0 - rows["jaccard_mean"]), 1)
        return float(a), float(b)

    def extrapolated_prompts_needed(self, threshold: float = STABLE_JACCARD) -> float | None:
        """Where the power-law fit crosses ``threshold`` (None when the fit does not fall with ``n``). An
        extrapolation beyond the measured ``n``: a rough guide to the prompts a stable circuit would need."""
        fit = self.power_law()
        if fit is None or fit[1] >= 0:
            return None
        a, b = fit
        return float(math.exp((math.log(1.0 - threshold) - a) / b))

    def summary(self, threshold: float = STABLE_JACCARD) -> dict[str, Any]:
        largest = self.table.iloc[-1]
        needed = self.prompts_needed(threshold)
        guess = None if needed is not None else self.extrapolated_prompts_needed(threshold)
        return {
            "task": self.task_name,
            "method": self.method,
            "selection": self.selection,
            "n_edges": self.n_edges,
            "pool": self.pool,
            "n_draws": self.n_draws,
            "largest_n": int(largest["n_prompts"]),
            "jaccard_at_largest_n": float(largest["jaccard_mean"]),
            "spearman_at_largest_n": float(largest["spearman_mean"]),
            "prompts_for_jaccard_0.8": needed,
            "prompts_for_jaccard_0.8_extrapolated": None if guess is None else round(guess),
        }


def _check_draws(scores: EdgeScores, sizes: Sequence[int], n_draws: int, selection: str) -> None:
    """Every sample size must leave room for two disjoint samples; at least two draws; a known selection rule."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {selection!r}")
    pool = scores.per_prompt.shape[0]
    too_big = [int(n) for n in sizes if not 1 <= 2 * int(n) <= pool]
    if too_big:
        raise ValueError(f"sizes {too_big} need more than the {pool} scored prompts (two disjoint sets of n each)")
    if n_draws < 2:
        raise ValueError(f"n_draws must be at least 2, got {n_draws}")


def _disjoint_means(
    scores: EdgeScores, n: int, n_draws: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """``n_draws`` times: a random permutation of the prompts cut into two disjoint sets of ``n``, and each set's mean
    scores ``[n_senders, n_receivers]``."""
    pool = scores.per_prompt.shape[0]
    for _ in range(n_draws):
        order = torch.randperm(pool, generator=generator)
        yield scores.per_prompt[order[:n]].mean(0), scores.per_prompt[order[n : 2 * n]].mean(0)


def stability_curve(
    scores: EdgeScores,
    n_edges: int,
    sizes: Sequence[int],
    *,
    n_draws: int = 20,
    seed: int = 0,
    selection: str = "top-n",
) -> StabilityCurve:
    """For each ``n`` in ``sizes`` (each at most half the scored prompts), ``n_draws`` times: split a random
    permutation of the prompts into two disjoint sets of ``n``, choose a circuit of ``n_edges`` edges from each
    set's mean scores, and record the Jaccard overlap of the two circuits and the Spearman correlation of the two
    sets' scores over every edge of the graph. No forward pass."""
    _check_draws(scores, sizes, n_draws, selection)
    choose, graph, pool = SELECTIONS[selection], scores.graph, int(scores.per_prompt.shape[0])
    on_graph = graph.valid().flatten()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in sorted({int(n) for n in sizes}):
        overlaps, correlations = [], []
        for first, second in _disjoint_means(scores, n, n_draws, generator):
            overlaps.append(jaccard(choose(first, graph, n_edges), choose(second, graph, n_edges)))
            correlations.append(spearman(first.flatten()[on_graph], second.flatten()[on_graph]))
        row: dict[str, Any] = {"n_prompts": n}
        for name, values in (("jaccard", overlaps), ("spearman", correlations)):
            row[f"{name}_mean"] = float(np.mean(values))
            row[f"{name}_p05"], row[f"{name}_p95"] = (float(q) for q in np.quantile(values, [0.05, 0.95]))
        rows.append(row)
    return StabilityCurve(
        task_name=scores.task_name,
        method=scores.method,
        selection=selection,
        n_edges=int(n_edges),
        pool=int(pool),
        n_draws=int(n_draws),
        table=pd.DataFrame(rows),
    )


def stability_by_size(
    scores: EdgeScores,
    circuit_sizes: Sequence[int],
    n: int,
    *,
    n_draws: int = 20,
    seed: int = 0,
    selection: str = "top-n",
) -> pd.DataFrame:
    """At ``n`` prompts per sample, the disjoint-sample Jaccard of circuits of each size in ``circuit_sizes`` (the same
    draws for every size). A large circuit's boundary runs through many edges of nearly equal score, so it moves
    between samples long after its core has settled: this table says how large a circuit the sample pins down.

    One row per size: ``n_edges, n_prompts, jaccard_mean, jaccard_p05, jaccard_p95``."""
    _check_draws(scores, [n], n_draws, selection)
    choose, graph = SELECTIONS[selection], scores.graph
    overlaps: dict[int, list[float]] = {int(size): [] for size in circuit_sizes}
    for first, second in _disjoint_means(scores, n, n_draws, torch.Generator().manual_seed(seed)):
        for size, values in overlaps.items():
            values.append(jaccard(choose(first, graph, size), choose(second, graph, size)))
    rows = []
    for size, values in overlaps.items():
        low, high = np.quantile(values, [0.05, 0.95])
        rows.append(
            {
                "n_edges": size,
                "n_prompts": int(n),
                "jaccard_mean": float(np.mean(values)),
                "jaccard_p05": float(low),
                "jaccard_p95": float(high),
            }
        )
    return pd.DataFrame(rows)


def largest_stable_size(by_size: pd.DataFrame, threshold: float = STABLE_JACCARD) -> int | None:
    """The largest circuit size of :func:`stability_by_size` whose mean Jaccard reaches ``threshold`` (None: none)."""
    stable = by_size[by_size["jaccard_mean"] >= threshold]
    return int(stable["n_edges"].max()) if not stable.empty else None
