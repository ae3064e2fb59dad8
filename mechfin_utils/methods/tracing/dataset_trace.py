"""Causal tracing and attention knockout of a whole set of prompts, with their averages and timings.

:func:`trace_dataset` prepares every prompt first (so a bad row -- subject not found, multi-token answer --
raises before any compute is spent), then, per prompt, runs
:func:`~mechfin_utils.methods.tracing.causal_trace.causal_trace` for each kind of state and
:func:`~mechfin_utils.methods.tracing.knockout.attention_knockout`, and finally averages the traces by position
category (:func:`~mechfin_utils.methods.tracing.category_averages.average_by_position_category`) and the
knockouts over prompts. All prompts share one noise scale. It is the only module that imports both tracing and
knockout, so neither of those needs the other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float

from mechfin_utils.methods.tracing.category_averages import CategoryAverage, average_by_position_category
from mechfin_utils.methods.tracing.causal_trace import TraceResult, causal_trace
from mechfin_utils.methods.tracing.knockout import KnockoutResult, attention_knockout, average_knockout
from mechfin_utils.methods.tracing.noise import embedding_noise_std
from mechfin_utils.methods.tracing.prepared import PreparedTrace, TraceKind, prepare_trace
from mechfin_utils.tasks.facts import TraceTask

if TYPE_CHECKING:  # pragma: no cover
    from mechfin_utils.core.models import LoadedModel


@dataclass
class DatasetTrace:
    """Causal traces and knockouts of a set of prompts, with their averages and timings."""

    model_name: str
    traces: dict[str, list[TraceResult]]
    averages: dict[str, CategoryAverage]
    knockouts: list[KnockoutResult]
    knockout_mean: Float[np.ndarray, "group layer"] | None
    trace_seconds: float
    knockout_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def trace_dataset(
    model: LoadedModel,
    tasks: Sequence[TraceTask | PreparedTrace],
    kinds: Sequence[TraceKind] = ("hidden", "mlp", "attn"),
    n_samples: int = 10,
    knockout: bool = True,
    noise_std: float | None = None,
    progress: bool = False,
    **trace_kwargs,
) -> DatasetTrace:
    """Trace every task (and knock out attention), then average by position category.

    Every prompt is prepared first, so a bad row (subject not found, multi-token answer) raises before
    any compute is spent.
    """
    prepared = [t if isinstance(t, PreparedTrace) else prepare_trace(model, t) for t in tasks]
    if noise_std is None:
        noise_std = embedding_noise_std(model)
    traces: dict[str, list[TraceResult]] = {k: [] for k in kinds}
    kos: list[KnockoutResult] = []
    t_trace = t_ko = 0.0
    iterator: Iterable = prepared
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(prepared, desc=f"causal trace ({model.name})")
    for p in iterator:
        t0 = time.perf_counter()
        results = causal_trace(model, p, kinds=kinds, n_samples=n_samples, noise_std=noise_std, **trace_kwargs)
        for kind, result in results.items():
            traces[kind].append(result)
        t_trace += time.perf_counter() - t0
        if knockout:
            t0 = time.perf_counter()
            kos.append(attention_knockout(model, p))
            t_ko += time.perf_counter() - t0
    return DatasetTrace(
        model_name=model.name,
        traces=traces,
        averages={k: average_by_position_category(v) for k, v in traces.items()},
        knockouts=kos,
        knockout_mean=average_knockout(kos) if kos else None,
        trace_seconds=t_trace,
        knockout_seconds=t_ko,
        settings={"n_samples": n_samples, "noise_std": noise_std, "kinds": tuple(kinds), **trace_kwargs},
    )
