"""Patching: replace activations of one run with another's and measure how far the answer moves.

Exact activation patching is one generic function, :func:`activation_patch` (``activation``), over one registry of
what can be patched (``components``). It reads the metric through ``results`` and runs on the fast ``functional_path``
(GPT-2, Llama) or the ``bridge_path`` (TransformerLens hooks, any architecture). Beside it: ``attribution``
(attribution patching, a gradient estimate of the same cells), ``sweeps`` (sweeps over a task set with bootstrap
intervals), ``segments`` (pairs of unequal token length, patched segment by segment) and ``cross_model`` (base vs
fine-tuned: weight change and cross-model patching). The planner pieces (:func:`cells`, :func:`result_shape`,
:func:`divergence_positions`, :func:`sequence_starts`) are exported for cost models such as ``tooling.bench``.
"""

from mechfin_utils.methods.patching.activation import DEFAULT_BATCH_SIZE, activation_patch
from mechfin_utils.methods.patching.attribution import (
    TRANSFORMER_LENS_KEYS,
    WHOLE_LAYER_KEYS,
    Attributions,
    attribution_patch,
    compare_attribution_with_exact,
    gather_cells,
)
from mechfin_utils.methods.patching.components import (
    COMPONENTS,
    PatchCell,
    PatchComponent,
    cells,
    cells_from_index_df,
    result_shape,
)
from mechfin_utils.methods.patching.cross_model import (
    change_by_layer_and_module,
    cross_model_patching,
    load_state,
    weight_change,
)
from mechfin_utils.methods.patching.functional_path import divergence_positions, sequence_starts
from mechfin_utils.methods.patching.results import PatchSweep
from mechfin_utils.methods.patching.segments import (
    SEGMENTS,
    SegmentedPair,
    attention_by_segment,
    pair_batches,
    restoration_grid,
    segment_lengths,
    segment_pair,
    segment_pairs,
    segment_patching,
)
from mechfin_utils.methods.patching.sweeps import (
    SweepSummary,
    bootstrap_sweep,
    group_shift_table,
    rank_cells,
    raw_shift_sweep,
    sweep_batches,
)

__all__ = [
    "COMPONENTS",
    "DEFAULT_BATCH_SIZE",
    "SEGMENTS",
    "TRANSFORMER_LENS_KEYS",
    "WHOLE_LAYER_KEYS",
    "Attributions",
    "PatchCell",
    "PatchComponent",
    "PatchSweep",
    "SegmentedPair",
    "SweepSummary",
    "activation_patch",
    "attention_by_segment",
    "attribution_patch",
    "bootstrap_sweep",
    "cells",
    "cells_from_index_df",
    "change_by_layer_and_module",
    "compare_attribution_with_exact",
    "cross_model_patching",
    "divergence_positions",
    "gather_cells",
    "group_shift_table",
    "load_state",
    "pair_batches",
    "rank_cells",
    "raw_shift_sweep",
    "restoration_grid",
    "result_shape",
    "segment_lengths",
    "segment_pair",
    "segment_pairs",
    "segment_patching",
    "sequence_starts",
    "sweep_batches",
    "weight_change",
]
