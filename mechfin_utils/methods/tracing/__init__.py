"""Causal tracing (ROME) and attention knockout (Geva et al.): where a model carries an answer, and how it moves.

One module per stage, imports pointing one way. At the bottom ``prepared`` (a task tokenised for a model, its
score, windows, backend) and ``noise`` (the subject noise); ``restoration`` (the generic noised-and-restored run)
and ``knockout`` (attention knockout) build on ``prepared``; ``causal_trace`` (one prompt's heat maps) on those
below it; ``category_averages`` averages traces by token category; ``dataset_trace`` runs tracing and knockout
over a set of prompts. The tasks (:class:`~mechfin_utils.tasks.facts.TraceTask`, the factual prompts) are in
:mod:`mechfin_utils.tasks.facts`, the figures in :mod:`mechfin_utils.reporting.trace_plots`.
"""

from mechfin_utils.methods.tracing.category_averages import (
    POSITION_CATEGORIES,
    CategoryAverage,
    average_by_position_category,
    position_categories,
)
from mechfin_utils.methods.tracing.causal_trace import TraceResult, causal_trace
from mechfin_utils.methods.tracing.dataset_trace import DatasetTrace, trace_dataset
from mechfin_utils.methods.tracing.knockout import (
    KNOCKOUT_GROUPS,
    Knockout,
    KnockoutResult,
    attention_knockout,
    average_knockout,
    knockout_groups,
    run_with_knockouts,
)
from mechfin_utils.methods.tracing.noise import (
    DEFAULT_NOISE_MULTIPLIER,
    DEFAULT_SEED,
    embedding_noise_std,
    sample_subject_noise,
)
from mechfin_utils.methods.tracing.prepared import (
    KIND_LABELS,
    PreparedTrace,
    default_knockout_window,
    default_trace_window,
    layer_window,
    prepare_trace,
)
from mechfin_utils.methods.tracing.restoration import Restoration, run_with_restorations

__all__ = [
    "DEFAULT_NOISE_MULTIPLIER",
    "DEFAULT_SEED",
    "KIND_LABELS",
    "KNOCKOUT_GROUPS",
    "POSITION_CATEGORIES",
    "CategoryAverage",
    "DatasetTrace",
    "Knockout",
    "KnockoutResult",
    "PreparedTrace",
    "Restoration",
    "TraceResult",
    "attention_knockout",
    "average_by_position_category",
    "average_knockout",
    "causal_trace",
    "default_knockout_window",
    "default_trace_window",
    "embedding_noise_std",
    "knockout_groups",
    "layer_window",
    "position_categories",
    "prepare_trace",
    "run_with_knockouts",
    "run_with_restorations",
    "sample_subject_noise",
    "trace_dataset",
]
