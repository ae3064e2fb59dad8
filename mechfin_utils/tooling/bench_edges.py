"""``make bench``'s edge-level row: how long EAP and EAP-IG take to score every edge, against testing each edge by
exact patching (what ACDC does, one forward pass per edge), on the same model and prompts.

Per model: the fair-lending task's largest same-length group of pairs (as the patching rows use); EAP (one gradient)
and EAP-IG (``steps`` gradients) over every edge of the computational graph, timed; and exact edge patching, timed on
``sample_edges`` single edges and scaled to all edges ("est."), since patching them all would take hours. The ratio
is the per-edge patching estimate over EAP-IG's time. The completeness error (EAP-IG's scores of the edges leaving the
input, summed, against the patched metric change) says how close ``steps`` gets to the integral.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mechfin_utils.methods.circuits import edges as ea
from mechfin_utils.tasks import circuit_tasks


@dataclass
class EdgeBenchRow:
    model: str
    prompts: int
    tokens: int
    n_edges: int
    eap_seconds: float
    eap_ig_seconds: float
    steps: int
    patch_one_seconds: float
    patch_all_est_seconds: float
    speedup: float
    completeness_error: float


def bench_edge_scoring(
    model, *, model_label: str, n_pairs: int = 8, steps: int = 5, sample_edges: int = 8
) -> EdgeBenchRow:
    """Time EAP, EAP-IG and exact single-edge patching on ``n_pairs`` fair-lending pairs of one token length."""
    task = circuit_tasks.fair_lending_task(model, n_pairs=n_pairs, token_length="most_common")
    patcher = ea.EdgePatcher(model, task)
    eap = ea.edge_scores(patcher, "EAP")
    eap_ig = ea.edge_scores(patcher, "EAP-IG", steps=steps)
    edges = patcher.valid.nonzero()
    chosen = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:sample_edges]]
    started = time.perf_counter()
    for u, d in chosen.tolist():
        single = torch.zeros_like(patcher.valid)
        single[u, d] = True
        patcher.metric(single)
    per_edge = (time.perf_counter() - started) / len(chosen)
    total = patcher.corrupted_metric - patcher.clean_metric
    return EdgeBenchRow(
        model=model_label,
        prompts=task.n_prompts,
        tokens=int(task.batches[0].clean_tokens.shape[1]),
        n_edges=patcher.graph.n_edges,
        eap_seconds=eap.seconds,
        eap_ig_seconds=eap_ig.seconds,
        steps=steps,
        patch_one_seconds=per_edge,
        patch_all_est_seconds=per_edge * patcher.graph.n_edges,
        speedup=per_edge * patcher.graph.n_edges / eap_ig.seconds,
        completeness_error=abs(float(eap_ig.mean[0].sum()) - total),
    )


def format_edge_table(rows: list[EdgeBenchRow]) -> str:
    header = (
        "| model | prompts x tokens | edges | EAP s | EAP-IG s (steps) | exact patching, one edge s | every edge by "
        "patching s (est.) | EAP-IG speed-up | EAP-IG completeness error |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.prompts} x {r.tokens} | {r.n_edges:,} | {r.eap_seconds:.1f} | {r.eap_ig_seconds:.1f} ({r.steps}) "
            f"| {r.patch_one_seconds:.2f} | {r.patch_all_est_seconds:,.0f} | {r.speedup:,.0f}x | {r.completeness_error:.1e} |"
        )
    return "\n".join(lines)
