"""Fast, exact activation patching: TransformerLens's ``get_act_patch_*`` results, without its redundant work.

Context
-------
Activation patching (Meng et al. 2022; Wang et al. 2022) runs the model on a *corrupted* prompt, replaces
one activation with its value from the *clean* prompt, and measures how far the answer moves back toward
the clean one. Sweeping every component at every position localises the computation behind the answer.
TransformerLens's ``patching`` module does this with one full forward pass per patched component, one after
another. For GPT-2 Small, 8 prompts x 20 tokens, the head-output-by-position sweep is 2,880 full passes.

This module returns the *same numbers* (the tests hold it to 1e-4 against TransformerLens on the same
bridge, the same prompts and the same metric) while recomputing only what a patch can change:

1. **Earlier layers cannot change.** A patch at layer ``L`` starts from the corrupted run's cached residual
   stream, so layers ``< L`` are never recomputed.
2. **Earlier positions cannot change.** Attention is causal: a patch at position ``p`` is invisible to
   positions ``< p`` at every layer. Their keys and values are taken from the corrupted run, and only
   positions ``>= p`` are recomputed.
3. **Only the answer is read.** The metric looks at the final position, so the last layer computes its
   query, attention and MLP there only; with :class:`~mechfin_utils.core.metrics.NormalisedLogitDiff` the
   unembedding computes just the two answer logits instead of the whole vocabulary.
4. **A patched head is a known change.** Patching head ``h``'s output moves the attention output by
   ``(z_clean - z_corrupted) @ W_O[h]``; the patched layer's attention is not recomputed. Queries, keys,
   values and patterns are patched the same way: the new head outputs of that one layer are computed
   directly from the cached pieces, then the rest of the block (MLP) and the later layers run.
5. **Many patches share one batched pass.** Every patch that starts at the same layer and position (all
   heads x all prompts, typically) is one batch, bounded by ``batch_size`` sequences.

The forward pass behind this is :mod:`mechfin_utils.core.functional` (GPT-2 and Llama families). For any other
architecture the sweep falls back, with a warning, to the *bridge path*: the same hooks TransformerLens
uses, with many patched copies stacked into one full forward pass. It is exact but gains only the batching.

Usage
-----
``clean_tokens`` and ``corrupted_tokens`` are ``[batch, pos]`` (equal shapes: no padding, ever). Arguments
are in :mod:`mechfin_utils.methods.patching.attribution`'s order, so exact and approximate results line up::

    metric = NormalisedLogitDiff(clean_logits, corrupted_logits, batch.answer_tokens)
    exact = activation_patch(model, batch.clean_tokens, batch.corrupted_tokens, metric, "attn_head_out_by_pos")
    # == transformer_lens.patching.get_act_patch_attn_head_out_by_pos(bridge, corrupted_tokens,
    #                                                                 clean_cache, metric)

Per-prompt values for bootstrap intervals: with ``NormalisedLogitDiff``, ``return_per_prompt=True`` returns a
:class:`PatchSweep` holding the TransformerLens-equal result *and* each prompt's patched logit difference
``[*axes, batch]`` with the clean and corrupted ones; :meth:`PatchSweep.normalised` renormalises any subset
(a bootstrap resample) of prompts. With any other metric, ``reduce="none"`` works as in TransformerLens.

Metric contract
---------------
``NormalisedLogitDiff`` is recognised and computed from the two answer logits. Any other callable is called
once per patch with the **final position's logits only**, shaped ``[batch, 1, d_vocab]`` (so ``logits[:, -1]``
works); a metric that reads other positions (e.g. a loss over the whole prompt) needs TransformerLens.

Layout of the results, and grouped-query attention
--------------------------------------------------
Each result has the axes of its component, exactly as ``transformer_lens.patching.get_act_patch_<key>`` returns
them; the table of keys, hooks and shapes, and how key/value heads are counted under grouped-query attention, are
in :mod:`mechfin_utils.methods.patching.components`.

Where things are
----------------
This module is the one generic function, :func:`activation_patch`: it checks its arguments, picks the path and
returns the result. What can be patched is :mod:`~mechfin_utils.methods.patching.components`; how a patched run
becomes a metric value, and the per-prompt result, :mod:`~mechfin_utils.methods.patching.results`; the fast path
:mod:`~mechfin_utils.methods.patching.functional_path`; the fallback :mod:`~mechfin_utils.methods.patching.bridge_path`.
Sweeps over many batches with bootstrap intervals are :mod:`mechfin_utils.methods.patching.sweeps`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, overload

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from mechfin_utils.core.functional import UnsupportedArchitecture, functional_model
from mechfin_utils.core.inputs import check_token_pairs
from mechfin_utils.core.metrics import NormalisedLogitDiff, logit_diff
from mechfin_utils.methods.patching.bridge_path import bridge_of, bridge_sweep
from mechfin_utils.methods.patching.components import COMPONENTS, cells, cells_from_index_df, result_shape
from mechfin_utils.methods.patching.functional_path import functional_sweep, record_fields
from mechfin_utils.methods.patching.results import MetricReadout, PatchSweep, Reduce

Engine = Literal["auto", "functional", "bridge"]

DEFAULT_BATCH_SIZE = 128


def _check_metric_matches(readout: MetricReadout, clean_diff: Tensor, corrupted_diff: Tensor) -> None:
    """NormalisedLogitDiff carries the clean/corrupted logit differences it was built from: they must be
    the ones of these prompts, else the normalisation (and every value) would be silently wrong."""
    for which, ours, theirs in (
        ("clean", clean_diff.mean(), readout.metric.clean),
        ("corrupted", corrupted_diff.mean(), readout.metric.corrupted),
    ):
        theirs = float(theirs)
        if abs(float(ours) - theirs) > 1e-3 * max(1.0, abs(theirs)):
            raise ValueError(
                f"metric was built from {which} logits whose mean logit difference is {theirs:.6f}, but {which}_tokens "
                f"give {float(ours):.6f} on this model: build NormalisedLogitDiff from this model's logits on these prompts"
            )


@overload
def activation_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: NormalisedLogitDiff | Callable[[Tensor], Tensor],
    component: str,
    *,
    reduce: Reduce = ...,
    return_per_prompt: Literal[False] = ...,
    index_df: pd.DataFrame | None = ...,
    batch_size: int = ...,
    progress: bool = ...,
    engine: Engine = ...,
) -> Tensor: ...
@overload
def activation_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: NormalisedLogitDiff,
    component: str,
    *,
    reduce: Reduce = ...,
    return_per_prompt: Literal[True],
    index_df: pd.DataFrame | None = ...,
    batch_size: int = ...,
    progress: bool = ...,
    engine: Engine = ...,
) -> PatchSweep: ...
def activation_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: NormalisedLogitDiff | Callable[[Tensor], Tensor],
    component: str,
    *,
    reduce: Reduce = "scalar",
    return_per_prompt: bool = False,
    index_df: pd.DataFrame | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    engine: Engine = "auto",
) -> Tensor | PatchSweep:
    """Exact activation patching of one component type, clean -> corrupted, at every layer/position/head.

    Each cell of the result is the metric of the corrupted run with that one activation replaced by its
    clean value: ``transformer_lens.patching.get_act_patch_<component>(bridge, corrupted_tokens, clean_cache,
    metric)`` to float32 rounding (one documented exception, ``resid_mid``, below), computed as described in
    the module docstring.

    ``resid_mid`` is the residual stream between attention and MLP, as in TransformerLens's HookedTransformer:
    the patch replaces what the MLP reads *and* what the skip connection carries, so it equals ``resid_pre`` of
    the next layer. On TransformerLens 4.3's bridge ``hook_resid_mid`` is an alias of ``ln2.hook_in``, the
    MLP branch's input. TransformerLens's ``get_act_patch_resid_mid`` writes into that tensor in place: under
    ``torch.no_grad()`` (how patching is run) the write also reaches the skip connection and the result is
    this sweep; with gradients enabled the hook works on a copy, only the MLP's input changes, and the result
    is the ``mlp_out`` sweep instead (``tests/test_patching.py`` pins both facts). The bridge engine here
    patches by returning a new tensor, which cannot reach the skip connection, so it refuses ``resid_mid``.

    Args:
        model: a :class:`~mechfin_utils.core.models.LoadedModel` (or a TransformerLens bridge).
        clean_tokens: ``[batch, pos]`` clean prompts (the source of patched activations).
        corrupted_tokens: ``[batch, pos]`` corrupted prompts (the run being patched); same shape.
        metric: :class:`~mechfin_utils.core.metrics.NormalisedLogitDiff` (fast path; normalised with the clean and
            corrupted values it holds, which must be these prompts'), or a callable on the final-position
            logits ``[batch, 1, d_vocab]`` returning a scalar (``reduce="scalar"``) or ``[batch]``.
        component: a key of :data:`COMPONENTS` (e.g. ``"attn_head_out_by_pos"``).
        reduce: as in TransformerLens, for callables: ``"none"`` gives ``[*axes, batch]``, ``"mean"`` their mean.
        return_per_prompt: with NormalisedLogitDiff, return a :class:`PatchSweep` (values + per-prompt logit
            differences ``[*axes, batch]`` + clean/corrupted ones) instead of the tensor.
        index_df: as in TransformerLens: patch only these cells (columns = the result's axes in order,
            ``head_index`` accepted for ``head``); the result is then flat, one value per row.
        batch_size: memory bound: each pass recomputes at most ``batch_size`` full-length sequences' worth of
            rows (a cell larger than that runs alone). Peak memory is about ``batch_size x pos x (d_mlp + 6
            d_model)`` floats on top of the model and the two cached runs.
        progress: a tqdm bar over the patches.
        engine: ``"functional"`` (GPT-2 / Llama only), ``"bridge"`` (any architecture, slower, exact), or
            ``"auto"``: functional when the architecture is supported, else the bridge path with a warning.

    Returns:
        ``[*axes]`` tensor (``[*axes, batch]`` under ``reduce="none"``), or a :class:`PatchSweep`.
    """
    # 1. Check the arguments; the metric reader checks the metric against the batch.
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {sorted(COMPONENTS)}, got {component!r}")
    spec = COMPONENTS[component]
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (sequences per pass), got {batch_size!r}")
    if engine not in ("auto", "functional", "bridge"):
        raise ValueError(f"engine must be 'auto', 'functional' or 'bridge', got {engine!r}")
    bridge = bridge_of(model)
    if bridge.training:
        raise ValueError(
            "the model is in training mode (dropout would randomise every patch): call model.bridge.eval()"
        )
    model_name = getattr(model, "name", None) or str(getattr(bridge.cfg, "model_name", "model"))
    check_token_pairs(clean_tokens, corrupted_tokens, bridge.cfg.d_vocab, model_name=model_name)
    batch, n_pos = corrupted_tokens.shape
    readout = MetricReadout(metric, reduce, batch, return_per_prompt)

    # 2. Pick the path: the functional forward pass when the architecture has one, else the bridge's hooks.
    fm = None
    if engine in ("auto", "functional"):
        try:
            fm = functional_model(model)
        except UnsupportedArchitecture as err:
            if engine == "functional":
                raise
            warnings.warn(
                f"{err}. Falling back to the bridge path: exact, but every patch is a full forward pass "
                f"(batched, {max(1, batch_size // batch)} patches per pass; no layer/position savings).",
                stacklevel=2,
            )
    if engine == "bridge" and spec.site == "resid_mid":
        raise ValueError(
            "resid_mid (the residual stream between attention and MLP) cannot be patched by the bridge engine: "
            "TransformerLens 4.3's hook_resid_mid is the MLP branch's input, and a hook that returns a new tensor "
            "there does not reach the skip connection; use engine='functional'"
        )

    # 3. The cells to patch, and the result tensors they are written into.
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    n_kv_heads = getattr(bridge.cfg, "n_key_value_heads", None) or n_heads
    shape = result_shape(spec, n_layers, n_pos, n_heads, n_kv_heads)
    if index_df is None:
        patch_cells = cells(spec, n_layers, n_pos, n_heads, n_kv_heads)
    else:
        patch_cells = cells_from_index_df(spec, index_df, shape)
        shape = (len(patch_cells),)
    store = torch.zeros(shape + readout.tail())
    store_diffs = torch.zeros(shape + (batch,)) if readout.logit_diff else None
    desc = f"{component} patching ({model_name})"

    # 4. Run every patch; with NormalisedLogitDiff, also the clean and corrupted runs' logit differences.
    with torch.no_grad():
        if fm is not None:
            keep_corrupted, keep_clean = record_fields(spec)
            corrupted_run = fm.record(corrupted_tokens, keep_corrupted)
            clean_run = fm.record(clean_tokens, keep_clean)
            functional_sweep(
                fm,
                corrupted_run,
                clean_run,
                spec,
                patch_cells,
                readout,
                store,
                store_diffs,
                batch_size,
                progress,
                desc,
            )
            if readout.logit_diff:
                clean_diff = readout.prompt_logit_diffs(fm, clean_run.final_normed)
                corrupted_diff = readout.prompt_logit_diffs(fm, corrupted_run.final_normed)
        else:
            bridge_sweep(
                bridge,
                clean_tokens,
                corrupted_tokens,
                spec,
                patch_cells,
                readout,
                store,
                store_diffs,
                batch_size,
                progress,
                desc,
            )
            if readout.logit_diff:
                clean_diff = logit_diff(bridge(clean_tokens)[:, -1], readout.answers)
                corrupted_diff = logit_diff(bridge(corrupted_tokens)[:, -1], readout.answers)

    # 5. Check the metric was built from these prompts, and return the values (or the per-prompt sweep).
    if readout.logit_diff:
        _check_metric_matches(readout, clean_diff, corrupted_diff)
    if not return_per_prompt:
        return store
    assert store_diffs is not None  # return_per_prompt needs NormalisedLogitDiff (MetricReadout checks it)
    return PatchSweep(
        values=store,
        logit_diff=store_diffs,
        clean_logit_diff=clean_diff,
        corrupted_logit_diff=corrupted_diff,
        axes=("row",) if index_df is not None else spec.axes,
        key=component,
        model_name=model_name,
    )
