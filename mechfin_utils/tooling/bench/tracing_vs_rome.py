"""``make bench``'s second table: mechfin's causal tracing against a ROME-style tracer, on the same prompts.

Per model, a few facts and fair-lending prompts (:func:`trace_inputs`) are traced (hidden, MLP and attention states at
every layer and every position from the subject on, ``n_samples`` noise samples) twice (:func:`bench_causal_trace`):

* by a **ROME-style tracer**: one forward pass of the bridge per restored state, all noise samples in its batch, noise
  and restoration written by hooks (as ROME's ``trace_with_patch``; here
  :func:`mechfin_utils.methods.tracing.restoration.run_with_restorations`, through
  :func:`~mechfin_utils.methods.tracing.causal_trace.causal_trace`, with ``backend="bridge"`` and one state per batch);
* by **mechfin** on the intervention engine (``backend="engine"``).

Same numbers (max |difference| reported), both times, and the tracing FLOP floor
(:func:`mechfin_utils.tooling.bench.flop_floor.trace_floor_flops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mechfin_utils.core.functional import functional_model
from mechfin_utils.reporting.tables import markdown_table
from mechfin_utils.tooling.bench.flop_floor import trace_floor_flops
from mechfin_utils.tooling.bench.machine import timed

if TYPE_CHECKING:
    from mechfin_utils.methods.tracing import PreparedTrace


@dataclass
class TraceBenchRow:
    model: str
    prompts: str
    n_prompts: int
    mean_tokens: float
    restored_states: int
    n_samples: int
    rome_seconds: float
    mechfin_seconds: float
    speedup: float
    max_abs_diff: float
    floor_gflop: float
    floor_seconds: float
    x_floor: float


def trace_inputs(model, n_facts: int, n_pairs: int) -> list[PreparedTrace]:
    """The first ``n_facts`` candidate facts that tokenise for this model (subject found, one-token answer; not
    filtered for being right: the bench times code) and the first ``n_pairs`` fair-lending pairs."""
    from mechfin_utils.methods import tracing
    from mechfin_utils.tasks import facts
    from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs

    prepared: list[PreparedTrace] = []
    for task in facts.factual_tasks(facts.read_factual_candidates()):
        if len(prepared) >= n_facts:
            break
        try:
            prepared.append(tracing.prepare_trace(model, task))
        except ValueError:
            continue
    pairs = load_fair_lending_pairs()
    pairs = pairs[:n_pairs] if isinstance(pairs, list) else pairs.head(n_pairs)
    return (
        prepared + [tracing.prepare_trace(model, t) for t in facts.fair_lending_tasks(pairs)] if n_pairs else prepared
    )


def bench_causal_trace(
    model, prepared: Sequence[PreparedTrace], *, model_label: str, what: str, n_samples: int, throughput: float
) -> TraceBenchRow:
    """Trace every prompt with the ROME-style tracer and with mechfin; compare times and numbers."""
    from mechfin_utils.methods import tracing

    fm = functional_model(model)
    noise_std = tracing.embedding_noise_std(model)
    window = tracing.default_trace_window(fm.n_layers)

    def trace_all(backend: Literal["engine", "bridge"], batch_size: int) -> list[dict]:
        return [
            tracing.causal_trace(
                model, p, n_samples=n_samples, noise_std=noise_std, backend=backend, batch_size=batch_size
            )
            for p in prepared
        ]

    # 1. Both tracers, timed.
    rome, rome_s, _ = timed(lambda: trace_all("bridge", n_samples))  # one forward per restored state
    ours, ours_s, _ = timed(lambda: trace_all("engine", 256))
    # 2. Per prompt: the largest difference over the traced positions, and the restorations' FLOP floor.
    difference, states, floor = 0.0, 0, 0
    for p, theirs, mine in zip(prepared, rome, ours):
        traced = slice(p.subject_span[0], None)
        for kind in mine:
            difference = max(difference, float(abs(mine[kind].restored[traced] - theirs[kind].restored[traced]).max()))
        starts = []
        for kind in mine:
            for pos in range(p.subject_span[0], p.n_tokens):
                for layer in range(fm.n_layers):
                    first_layer = layer + 1 if kind == "hidden" else tracing.layer_window(layer, window, fm.n_layers)[0]
                    starts.append((first_layer, pos))
        states += len(starts)
        floor += trace_floor_flops(fm, p.n_tokens, starts, n_samples)
    floor_s = floor / throughput
    return TraceBenchRow(
        model=model_label,
        prompts=what,
        n_prompts=len(prepared),
        mean_tokens=sum(p.n_tokens for p in prepared) / len(prepared),
        restored_states=states,
        n_samples=n_samples,
        rome_seconds=rome_s,
        mechfin_seconds=ours_s,
        speedup=rome_s / ours_s,
        max_abs_diff=difference,
        floor_gflop=floor / 1e9,
        floor_seconds=floor_s,
        x_floor=ours_s / floor_s if floor_s > 0 else float("nan"),
    )


TRACE_COLUMNS = (
    ("model", "{model}"),
    ("prompts", "{prompts}"),
    ("mean tokens", "{mean_tokens:.1f}"),
    ("restored states x samples", "{restored_states:,} x {n_samples}"),
    ("ROME-style s", "{rome_seconds:,.1f}"),
    ("mechfin s", "{mechfin_seconds:,.1f}"),
    ("speed-up", "{speedup:,.1f}x"),
    ("max abs diff", "{max_abs_diff:.1e}"),
    ("FLOP floor s", "{floor_seconds:,.1f}"),
    ("x floor", "{x_floor:.1f}"),
)
"""The columns of the causal-tracing table (:func:`mechfin_utils.reporting.tables.markdown_table`)."""


def format_trace_table(rows: Sequence[TraceBenchRow]) -> str:
    """A Markdown table of the tracing results."""
    return markdown_table(rows, TRACE_COLUMNS)
