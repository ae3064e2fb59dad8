"""Patching sweeps over a whole task set: combine batches, put bootstrap intervals on the normalised metric,
rank components.

The task set comes in batches of equal token length (no padding), while the normalised patching metric is a
ratio of *means* over prompts: ``(mean patched - mean corrupted) / (mean clean - mean corrupted)``. So the
per-prompt logit differences of every batch are concatenated first and normalised once, and a bootstrap
resamples prompts and recomputes that ratio, never averaging per-batch ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechfin_utils.core.head_labels import head_label
from mechfin_utils.core.metrics import NormalisedLogitDiff, normalised_patching_metric
from mechfin_utils.methods.patching.activation import activation_patch
from mechfin_utils.methods.patching.bridge_path import bridge_of
from mechfin_utils.methods.patching.components import COMPONENTS, result_shape
from mechfin_utils.methods.patching.results import PatchSweep


@dataclass(frozen=True)
class SweepSummary:
    """A sweep over many prompts: normalised values with bootstrap intervals (same shape as ``values``)."""

    key: str
    axes: tuple[str, ...]
    values: Tensor
    low: Tensor
    high: Tensor
    n_prompts: int
    model_name: str


def _logits(model, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        return model.bridge(tokens)


def _only_layers(model, component: str, n_pos: int, layers: Sequence[int] | None, kwargs: dict):
    """``activation_patch``'s keyword arguments patching only ``layers`` (every other axis whole) and the shape to
    put its flat result back on (first axis: ``layers`` in the order given); for every layer, ``kwargs`` unchanged
    and ``None``."""
    cfg = bridge_of(model).cfg
    if layers is None or list(layers) == list(range(cfg.n_layers)):
        return kwargs, None
    if kwargs.get("index_df") is not None:
        raise ValueError("pass layers or index_df, not both")
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {sorted(COMPONENTS)}, got {component!r}")
    spec = COMPONENTS[component]
    layers = [int(layer) for layer in layers]
    if not layers or len(set(layers)) != len(layers) or not all(0 <= layer < cfg.n_layers for layer in layers):
        raise ValueError(f"layers must be distinct layers of 0..{cfg.n_layers - 1}, got {layers}")
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    shape = (len(layers), *result_shape(spec, cfg.n_layers, n_pos, cfg.n_heads, n_kv)[1:])
    grid = np.stack(np.meshgrid(layers, *(range(size) for size in shape[1:]), indexing="ij"), axis=-1)
    return {**kwargs, "index_df": pd.DataFrame(grid.reshape(-1, len(shape)), columns=list(spec.axes))}, shape


def sweep_batches(
    model, batches: Sequence, component: str, *, layers: Sequence[int] | None = None, **kwargs
) -> PatchSweep:
    """Exact patching of ``component`` on every batch, per-prompt logit differences concatenated.

    Position-resolved components need one shared token length: pass batches of one template (see
    ``NotebookSession.template_batch``); a length mismatch is an error naming the batches.

    ``layers`` (default: every layer) patches only those layers: the result keeps the component's axes, its first
    axis being ``layers`` in the order given (index ``i`` is layer ``layers[i]``, not layer ``i``).
    """
    if not batches:
        raise ValueError("batches is empty")
    sweeps = []
    for batch in batches:
        metric = NormalisedLogitDiff(
            _logits(model, batch.clean_tokens), _logits(model, batch.corrupted_tokens), batch.answer_tokens
        )
        patch_kwargs, shape = _only_layers(model, component, int(batch.clean_tokens.shape[1]), layers, kwargs)
        sweep = activation_patch(
            model, batch.clean_tokens, batch.corrupted_tokens, metric, component, return_per_prompt=True, **patch_kwargs
        )
        if shape is not None:  # the flat result of index_df, back on the component's axes
            sweep.values = sweep.values.reshape(shape)
            sweep.logit_diff = sweep.logit_diff.reshape(*shape, -1)
            sweep.axes = COMPONENTS[component].axes
        sweeps.append(sweep)
    shapes = {tuple(s.logit_diff.shape[:-1]) for s in sweeps}
    if len(shapes) != 1:
        raise ValueError(
            f"{component}: batches give result shapes {sorted(shapes)}; position-resolved sweeps need batches of "
            "one token length (use one template batch)"
        )
    patched = torch.cat([s.logit_diff for s in sweeps], dim=-1)
    clean = torch.cat([s.clean_logit_diff for s in sweeps])
    corrupted = torch.cat([s.corrupted_logit_diff for s in sweeps])
    values = normalised_patching_metric(patched.mean(-1), clean.mean(), corrupted.mean())
    first = sweeps[0]
    return PatchSweep(values, patched, clean, corrupted, first.axes, first.key, first.model_name)


def bootstrap_sweep(sweep: PatchSweep, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> SweepSummary:
    """Percentile bootstrap over prompts of the normalised metric, for every cell at once."""
    n = int(sweep.clean_logit_diff.shape[0])
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 prompts, the sweep has {n}")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = torch.as_tensor(rng.integers(0, n, size=n))
        gap = (sweep.clean_logit_diff[idx].mean() - sweep.corrupted_logit_diff[idx].mean()).abs()
        if gap < 1e-6:  # a resample with no clean/corrupted difference has no normalised value
            continue
        draws.append(sweep.normalised(idx))
    if len(draws) < n_boot // 2:
        raise ValueError("most bootstrap resamples have no clean/corrupted gap: the normalised metric is undefined")
    stacked = torch.stack(draws)
    alpha = (1 - ci) / 2
    low = torch.quantile(stacked, alpha, dim=0)
    high = torch.quantile(stacked, 1 - alpha, dim=0)
    return SweepSummary(sweep.key, sweep.axes, sweep.values, low, high, n, sweep.model_name)


def _cell_label(axes: Sequence[str], cell: Sequence[int]) -> str:
    """A cell's name: the head's label (``"L10H7"``) on [layer, head] axes, else its indices joined by dots."""
    if tuple(axes) == ("layer", "head"):
        return head_label(*cell)
    return ".".join(str(int(i)) for i in cell)


def rank_cells(summary: SweepSummary, k: int = 10, *, label_axes: Sequence[str] | None = None) -> pd.DataFrame:
    """The ``k`` largest and ``k`` most negative cells, e.g. heads ``"L10H7"`` for a [layer, head] sweep.

    Columns: ``component`` (the cell: a head label on [layer, head] axes, else its indices as "a.b"), ``value``,
    ``low``, ``high``, ``direction`` (positive / negative), ``excludes_zero`` (whether the interval excludes 0).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = summary.values.flatten()
    order = torch.argsort(values, descending=True)
    shape = tuple(summary.values.shape)
    rows = []
    for direction, idx in (("positive", order[:k]), ("negative", order.flip(0)[:k])):
        for flat in idx.tolist():
            cell = np.unravel_index(flat, shape)
            low, high = summary.low.flatten()[flat].item(), summary.high.flatten()[flat].item()
            rows.append(
                {
                    "component": _cell_label(summary.axes, cell),
                    "value": values[flat].item(),
                    "low": low,
                    "high": high,
                    "direction": direction,
                    "excludes_zero": bool(low > 0 or high < 0),
                }
            )
    return pd.DataFrame(rows)


def raw_shift_sweep(model, batch, component: str, *, layers: Sequence[int] | None = None, **kwargs) -> Tensor:
    """Patching with the *raw* logit-difference shift (patched - corrupted run), per prompt ``[*axes, batch]``.

    For the counterfactual decision family, where the two prompts may score almost the same and the
    normalised metric (which divides by that gap) is undefined or explosive. Computed from the per-prompt
    logit differences of the fast path (two answer logits per patch); only when the two prompts' mean
    logit differences are exactly equal (no normalisation can be built) does it fall back to a metric
    callable on the full final-position logits. ``layers`` as in :func:`sweep_batches` (default: every layer).
    """
    answers = batch.answer_tokens
    kwargs, shape = _only_layers(model, component, int(batch.clean_tokens.shape[1]), layers, kwargs)
    with torch.no_grad():
        clean_logits = model.bridge(batch.clean_tokens)
        corrupted_logits = model.bridge(batch.corrupted_tokens)
    try:
        metric = NormalisedLogitDiff(clean_logits, corrupted_logits, answers)
    except ValueError:
        metric = None
    if metric is not None:
        sweep = activation_patch(
            model, batch.clean_tokens, batch.corrupted_tokens, metric, component, return_per_prompt=True, **kwargs
        )
        shifts = sweep.logit_diff - sweep.corrupted_logit_diff
        return shifts if shape is None else shifts.reshape(*shape, -1)
    base = corrupted_logits[:, -1].gather(1, answers)
    base = base[:, 0] - base[:, 1]

    def shift(logits: Tensor) -> Tensor:
        picked = logits[:, -1].gather(1, answers)
        return picked[:, 0] - picked[:, 1] - base

    shifts = activation_patch(
        model, batch.clean_tokens, batch.corrupted_tokens, shift, component, reduce="none", **kwargs
    )
    return shifts if shape is None else shifts.reshape(*shape, -1)


def group_shift_table(
    sweep: PatchSweep, groups: Sequence[str], cells: Sequence[tuple[int, ...]], labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per group of prompts (e.g. prohibited basis): the clean - corrupted gap and each chosen cell's restoration,
    both in raw logits.

    A normalised value per group would divide by that group's own clean - corrupted gap, which for a handful
    of prompts of a model that barely separates them can be ~0 or negative: the ratio explodes or flips sign.
    So this reports the two numbers it would be made of. ``shift[cell]`` is the mean over the group of
    ``patched - corrupted`` logit difference for that cell; compare it with ``gap`` (a cell that restores
    the whole clean behaviour has ``shift == gap``).

    Args:
        groups: one label per prompt of the sweep, in its order (``[p.basis for b in batches for p in b.pairs]``).
        cells: indices into the sweep's axes, e.g. ``(layer, head)`` for ``attn_head_out_all_pos``.
        labels: column names for the cells (default: head labels ``"L10H7"`` on [layer, head] axes, else ``"a.b"``).
    """
    n = int(sweep.clean_logit_diff.shape[0])
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} labels for a sweep over {n} prompts")
    labels = [_cell_label(sweep.axes, cell) for cell in cells] if labels is None else list(labels)
    if len(labels) != len(cells):
        raise ValueError(f"{len(labels)} labels for {len(cells)} cells")
    for cell in cells:
        if len(cell) != sweep.logit_diff.ndim - 1 or any(
            not 0 <= int(i) < size for i, size in zip(cell, sweep.logit_diff.shape)
        ):
            raise IndexError(
                f"cell {tuple(cell)} is not an index of the sweep's axes {sweep.axes} {tuple(sweep.logit_diff.shape[:-1])}"
            )
    rows = []
    for group in sorted(set(groups)):
        idx = torch.tensor([i for i, g in enumerate(groups) if g == group])
        corrupted = sweep.corrupted_logit_diff[idx]
        row = {"group": group, "n": len(idx), "gap": float((sweep.clean_logit_diff[idx] - corrupted).mean())}
        for label, cell in zip(labels, cells):
            row[label] = float((sweep.logit_diff[tuple(int(i) for i in cell)][idx] - corrupted).mean())
        rows.append(row)
    return pd.DataFrame(rows).set_index("group")
