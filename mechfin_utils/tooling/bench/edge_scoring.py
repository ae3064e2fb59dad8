"""``make bench``'s third table: how long EAP and EAP-IG take to score every edge, against testing each edge by
exact patching (what ACDC does, one forward pass per edge), on the same model and prompts.

Per model: the fair-lending task's largest same-length group of pairs (as the patching rows use); EAP (one gradient)
and EAP-IG (``steps`` gradients) over every edge of the computational graph, timed; and exact edge patching, timed on
``sample_edges`` single edges and scaled to all edges ("est."), since patching them all would take hours. The ratio
is the per-edge patching estimate over EAP-IG's time. The completeness error (EAP-IG's scores of the edges leaving the
input, summed, against the patched metric change) says how close ``steps`` gets to the integral. Last, the exact
evaluation of one circuit (EAP-IG's top ``circuit_edges`` edges kept, every other edge patched) as ``run_edges`` now
sums it (over the kept edges, taken from the every-edge difference) and as it did before (over the patched edges),
with both times and the largest difference of the metric. And EAP-IG on the task's first pairs of any token length,
each length's batch run apart (the earlier path) against batches joined and padded on the right (``EdgePatcher``'s
``max_batch_tokens``), with both times and the largest difference of an edge's per-prompt score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mechfin_utils.methods.circuits import edges
from mechfin_utils.reporting.tables import markdown_table
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
    circuit_edges: int = 0
    circuit_seconds: float = 0.0  # one exact evaluation, summing over the kept edges
    circuit_earlier_seconds: float = 0.0  # the same, summing over the patched edges (the earlier path)
    circuit_max_diff: float = 0.0
    circuit_metric_scale: float = 0.0  # the largest |metric| of a prompt, the scale of the difference
    lengths_prompts: int = 0  # EAP-IG on prompts of several token lengths (the task's first pairs, any length)
    lengths_groups: int = 0  # ... how many token lengths they have
    lengths_apart_seconds: float = 0.0  # ... one batch per length (the earlier path: max_batch_tokens=0)
    lengths_joined_seconds: float = 0.0  # ... joined into right-padded batches (now)
    lengths_max_diff: float = 0.0  # ... the largest difference of an edge's per-prompt score between the two
    lengths_score_scale: float = 0.0  # ... the largest |score|, the scale of that difference


def bench_edge_scoring(
    model, *, model_label: str, n_pairs: int = 8, steps: int = 5, sample_edges: int = 8, circuit_edges: int = 1000
) -> EdgeBenchRow:
    """Time EAP, EAP-IG and exact single-edge patching on ``n_pairs`` fair-lending pairs of one token length."""
    task = circuit_tasks.fair_lending_task(model, n_pairs=n_pairs, token_length="most_common")
    patcher = edges.EdgePatcher(model, task)
    eap = edges.edge_scores(patcher, "EAP")
    eap_ig = edges.edge_scores(patcher, "EAP-IG", steps=steps)
    every_edge = patcher.valid.nonzero()
    chosen = every_edge[torch.randperm(len(every_edge), generator=torch.Generator().manual_seed(0))[:sample_edges]]
    started = time.perf_counter()
    for sender, receiver in chosen.tolist():
        single = torch.zeros_like(patcher.valid)
        single[sender, receiver] = True
        patcher.metric(single)
    per_edge = (time.perf_counter() - started) / len(chosen)
    total = patcher.corrupted_metric - patcher.clean_metric
    # one circuit, evaluated both ways (best of three each: a single pass is short)
    circuit_edges = min(circuit_edges, patcher.graph.n_edges // 4)  # a small model: a quarter of its edges
    patched = patcher.valid & ~edges.top_edges(eap_ig.mean, circuit_edges)
    timings, values = {}, {}
    for label, above in (("kept", 0.5), ("earlier", 1.0)):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            values[label] = patcher.prompt_scores(patched, kept_sum_above=above, reuse=False)
            best = min(best, time.perf_counter() - started)
        timings[label] = best
    # EAP-IG on prompts of several lengths: each length's batch apart (the earlier path) against joined and padded
    mixed = circuit_tasks.fair_lending_task(model, n_pairs=n_pairs)
    per_path = {}
    for label, max_tokens in (("apart", 0), ("joined", edges.MAX_BATCH_TOKENS)):
        started = time.perf_counter()
        scored = edges.edge_scores(edges.EdgePatcher(model, mixed, max_batch_tokens=max_tokens), "EAP-IG", steps=steps)
        per_path[label] = (scored.per_prompt, time.perf_counter() - started)
    (apart, apart_seconds), (joined, joined_seconds) = per_path["apart"], per_path["joined"]
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
        circuit_edges=circuit_edges,
        circuit_seconds=timings["kept"],
        circuit_earlier_seconds=timings["earlier"],
        circuit_max_diff=float((values["kept"] - values["earlier"]).abs().max()),
        circuit_metric_scale=float(values["earlier"].abs().max()),
        lengths_prompts=mixed.n_prompts,
        lengths_groups=len({int(b.clean_tokens.shape[1]) for b in mixed.batches}),
        lengths_apart_seconds=apart_seconds,
        lengths_joined_seconds=joined_seconds,
        lengths_max_diff=float((apart - joined).abs().max()),
        lengths_score_scale=float(apart.abs().max()),
    )


EDGE_COLUMNS = (
    ("model", "{model}"),
    ("prompts x tokens", "{prompts} x {tokens}"),
    ("edges", "{n_edges:,}"),
    ("EAP s", "{eap_seconds:.1f}"),
    ("EAP-IG s (steps)", "{eap_ig_seconds:.1f} ({steps})"),
    ("exact patching, one edge s", "{patch_one_seconds:.2f}"),
    ("every edge by patching s (est.)", "{patch_all_est_seconds:,.0f}"),
    ("EAP-IG speed-up", "{speedup:,.0f}x"),
    ("EAP-IG completeness error", "{completeness_error:.1e}"),
    (
        "one circuit (edges): earlier s -> now s",
        "({circuit_edges:,}) {circuit_earlier_seconds:.2f} -> {circuit_seconds:.2f}",
    ),
    ("max |diff|", "{circuit_max_diff:.1e}"),
    (
        "EAP-IG, prompts of several lengths: apart s -> joined s",
        "({lengths_prompts} prompts, {lengths_groups} lengths) {lengths_apart_seconds:.1f} -> "
        "{lengths_joined_seconds:.1f}",
    ),
    ("max |diff| (score scale)", "{lengths_max_diff:.1e} ({lengths_score_scale:.1e})"),
)
"""The columns of the edge-scoring table (:func:`mechfin_utils.reporting.tables.markdown_table`)."""


def format_edge_table(rows: list[EdgeBenchRow]) -> str:
    """A Markdown table of the edge-scoring results."""
    return markdown_table(rows, EDGE_COLUMNS)
