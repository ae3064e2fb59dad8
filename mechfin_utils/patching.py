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
   query, attention and MLP there only; with :class:`~mechfin_utils.metrics.NormalisedLogitDiff` the
   unembedding computes just the two answer logits instead of the whole vocabulary.
4. **A patched head is a known change.** Patching head ``h``'s output moves the attention output by
   ``(z_clean - z_corrupted) @ W_O[h]``; the patched layer's attention is not recomputed. Queries, keys,
   values and patterns are patched the same way: the new head outputs of that one layer are computed
   directly from the cached pieces, then the rest of the block (MLP) and the later layers run.
5. **Many patches share one batched pass.** Every patch that starts at the same layer and position (all
   heads x all prompts, typically) is one batch, bounded by ``batch_size`` sequences.

The forward pass behind this is :mod:`mechfin_utils.functional` (GPT-2 and Llama families). For any other
architecture the sweep falls back, with a warning, to the *bridge path*: the same hooks TransformerLens
uses, with many patched copies stacked into one full forward pass. It is exact but gains only the batching.

Usage
-----
``clean_tokens`` and ``corrupted_tokens`` are ``[batch, pos]`` (equal shapes: no padding, ever). Arguments
are in :mod:`mechfin_utils.attribution`'s order, so exact and approximate results line up::

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

Output layout (identical to ``transformer_lens.patching.get_act_patch_<key>``)
------------------------------------------------------------------------------
=================================  ==================================  ========================================
key                                TransformerLens hook                shape
=================================  ==================================  ========================================
``resid_pre``                      hook_resid_pre                      [layer, pos]
``resid_mid``                      hook_resid_mid                      [layer, pos]
``attn_out``                       hook_attn_out                       [layer, pos]
``mlp_out``                        hook_mlp_out                        [layer, pos]
``attn_head_out_by_pos``           attn.hook_z                         [layer, pos, head]
``attn_head_q_by_pos``             attn.hook_q                         [layer, pos, head]
``attn_head_k_by_pos``             attn.hook_k                         [layer, pos, kv_head]
``attn_head_v_by_pos``             attn.hook_v                         [layer, pos, kv_head]
``attn_head_pattern_by_pos``       attn.hook_pattern                   [layer, head, dest_pos]
``attn_head_pattern_dest_src_pos`` attn.hook_pattern                   [layer, head, dest_pos, src_pos]
``attn_head_out_all_pos``          attn.hook_z                         [layer, head]
``attn_head_q_all_pos``            attn.hook_q                         [layer, head]
``attn_head_k_all_pos``            attn.hook_k                         [layer, kv_head]
``attn_head_v_all_pos``            attn.hook_v                         [layer, kv_head]
``attn_head_pattern_all_pos``      attn.hook_pattern                   [layer, head]
``resid_pre_all_pos`` (and         the whole residual stream / output  [layer] (mechfin only: no TransformerLens
``resid_mid``/``attn_out``/        at one layer, every position        counterpart; patching the whole
``mlp_out`` ``_all_pos``)                                              residual stream gives the clean run, 1)
=================================  ==================================  ========================================

Grouped-query attention (the embedded SmolLM2: 9 query heads share 3 key/value heads). TransformerLens's
bridge hooks ``hook_k``/``hook_v`` *before* the key/value heads are repeated, ``[batch, pos, 3, d_head]``,
and its k/v sweeps index that axis, so their results have ``n_key_value_heads`` entries; patching key/value
head ``g`` changes the attention of every query head that reads it (query heads ``g*3 ... g*3+2``, Hugging
Face's ``repeat_kv`` order). Queries, head outputs and patterns have one entry per query head. This module
does exactly the same. Queries and keys are patched after the rotary embedding here and before it in
TransformerLens; for a clean vector moved to the same position these are the same patch.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechfin_utils import engine
from mechfin_utils.functional import ForwardRecord, FunctionalTransformer, UnsupportedArchitecture
from mechfin_utils.inputs import check_token_pairs
from mechfin_utils.metrics import NormalisedLogitDiff, logit_diff, normalised_patching_metric

Reduce = Literal["scalar", "mean", "none"]
Engine = Literal["auto", "functional", "bridge"]
Site = Literal["resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]
Scope = Literal["pos", "all", "dest_src"]

DEFAULT_BATCH_SIZE = 128


# -----------------------------------------------------------------------------------------------------------
# What can be patched
# -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchComponent:
    """One kind of patching sweep.

    key:   the TransformerLens function with the same result is ``get_act_patch_<key>`` (``*_all_pos`` keys
           of the four residual-stream sites are mechfin's own).
    site:  which activation is patched (TransformerLens activation name: ``z`` is the head output).
    scope: ``"pos"``: one position at a time (``dest_pos`` for patterns); ``"all"``: every position at
           once; ``"dest_src"``: one pattern entry at a time.
    axes:  the result's axes.
    """

    key: str
    site: Site
    scope: Scope
    axes: tuple[str, ...]

    @property
    def per_head(self) -> bool:
        return self.site in ("z", "q", "k", "v", "pattern")

    def hook_name(self, layer: int) -> str:
        """The bridge hook of this sweep's activation at ``layer``."""
        return f"blocks.{layer}.{self.hook_suffix}"

    @property
    def reduction(self) -> str:
        """The einops pattern that sums one layer's per-feature products into this sweep's cells, batch kept
        (what attribution patching, :mod:`mechfin_utils.attribution`, needs)."""
        if self.site == "pattern":
            kept = {"pos": "batch head dest_pos", "dest_src": "batch head dest_pos src_pos", "all": "batch head"}
            return f"batch head dest_pos src_pos -> {kept[self.scope]}"
        if self.per_head:
            return "batch pos head d_head -> " + ("batch pos head" if self.scope == "pos" else "batch head")
        return "batch pos d_model -> " + ("batch pos" if self.scope == "pos" else "batch")

    @property
    def hook_suffix(self) -> str:
        """The bridge hook, relative to ``blocks.{layer}.``."""
        return {
            "resid_pre": "hook_resid_pre",
            "resid_mid": "hook_resid_mid",
            "attn_out": "hook_attn_out",
            "mlp_out": "hook_mlp_out",
        }.get(self.site, f"attn.hook_{self.site}")


COMPONENTS: dict[str, PatchComponent] = {
    c.key: c
    for c in (
        PatchComponent("resid_pre", "resid_pre", "pos", ("layer", "pos")),
        PatchComponent("resid_mid", "resid_mid", "pos", ("layer", "pos")),
        PatchComponent("attn_out", "attn_out", "pos", ("layer", "pos")),
        PatchComponent("mlp_out", "mlp_out", "pos", ("layer", "pos")),
        PatchComponent("attn_head_out_by_pos", "z", "pos", ("layer", "pos", "head")),
        PatchComponent("attn_head_q_by_pos", "q", "pos", ("layer", "pos", "head")),
        PatchComponent("attn_head_k_by_pos", "k", "pos", ("layer", "pos", "head")),
        PatchComponent("attn_head_v_by_pos", "v", "pos", ("layer", "pos", "head")),
        PatchComponent("attn_head_pattern_by_pos", "pattern", "pos", ("layer", "head", "dest_pos")),
        PatchComponent(
            "attn_head_pattern_dest_src_pos", "pattern", "dest_src", ("layer", "head", "dest_pos", "src_pos")
        ),
        PatchComponent("attn_head_out_all_pos", "z", "all", ("layer", "head")),
        PatchComponent("attn_head_q_all_pos", "q", "all", ("layer", "head")),
        PatchComponent("attn_head_k_all_pos", "k", "all", ("layer", "head")),
        PatchComponent("attn_head_v_all_pos", "v", "all", ("layer", "head")),
        PatchComponent("attn_head_pattern_all_pos", "pattern", "all", ("layer", "head")),
        PatchComponent("resid_pre_all_pos", "resid_pre", "all", ("layer",)),
        PatchComponent("resid_mid_all_pos", "resid_mid", "all", ("layer",)),
        PatchComponent("attn_out_all_pos", "attn_out", "all", ("layer",)),
        PatchComponent("mlp_out_all_pos", "mlp_out", "all", ("layer",)),
    )
}


@dataclass(frozen=True)
class _Cell:
    """One patch: ``layer``; ``pos`` (first patched position; ``dest_pos`` for patterns; None = all);
    ``head`` (query head, or key/value head for k/v; None for residual sites); ``src`` (pattern entries)."""

    layer: int
    pos: int | None
    head: int | None
    src: int | None
    out_index: tuple[int, ...]

    @property
    def first_pos(self) -> int:
        return 0 if self.pos is None else self.pos


def _cells(component: PatchComponent, n_layers: int, n_pos: int, n_heads: int, n_kv_heads: int) -> list[_Cell]:
    """Every patch of a sweep, each with its index into the result tensor."""
    heads = n_kv_heads if component.site in ("k", "v") else n_heads
    cells = []
    for layer in range(n_layers):
        if component.scope == "dest_src":
            cells += [
                _Cell(layer, d, h, s, (layer, h, d, s))
                for d in range(n_pos)
                for h in range(heads)
                for s in range(n_pos)
            ]
        elif component.scope == "pos" and component.site == "pattern":
            cells += [_Cell(layer, d, h, None, (layer, h, d)) for d in range(n_pos) for h in range(heads)]
        elif component.scope == "pos" and component.per_head:
            cells += [_Cell(layer, p, h, None, (layer, p, h)) for p in range(n_pos) for h in range(heads)]
        elif component.scope == "pos":
            cells += [_Cell(layer, p, None, None, (layer, p)) for p in range(n_pos)]
        elif component.per_head:
            cells += [_Cell(layer, None, h, None, (layer, h)) for h in range(heads)]
        else:
            cells += [_Cell(layer, None, None, None, (layer,))]
    return cells


_INDEX_COLUMN_ALIASES = {"head_index": "head"}


def _cells_from_index_df(component: PatchComponent, index_df, full_shape: tuple[int, ...]) -> list[_Cell]:
    """Cells for the rows of a TransformerLens-style ``index_df`` (columns = the result's axes, in order;
    ``head_index`` is accepted for ``head``). Cell ``i`` is stored at position ``i`` of a flat result."""
    columns = [_INDEX_COLUMN_ALIASES.get(str(c), str(c)) for c in index_df.columns]
    if columns != list(component.axes):
        raise ValueError(
            f"index_df columns {list(index_df.columns)} must be the axes of {component.key}, in order: {list(component.axes)}"
        )
    cells = []
    for i, row in enumerate(index_df.itertuples(index=False)):
        values = [int(v) for v in row]
        for axis, value, size in zip(component.axes, values, full_shape):
            if not 0 <= value < size:
                raise IndexError(f"index_df row {i}: {axis}={value} is outside 0..{size - 1}")
        named = dict(zip(component.axes, values))
        pos = named.get("pos", named.get("dest_pos"))
        cells.append(_Cell(named["layer"], pos, named.get("head"), named.get("src_pos"), (i,)))
    return cells


def _result_shape(
    component: PatchComponent, n_layers: int, n_pos: int, n_heads: int, n_kv_heads: int
) -> tuple[int, ...]:
    heads = n_kv_heads if component.site in ("k", "v") else n_heads
    size = {"layer": n_layers, "pos": n_pos, "dest_pos": n_pos, "src_pos": n_pos, "head": heads}
    return tuple(size[a] for a in component.axes)


# -----------------------------------------------------------------------------------------------------------
# Results
# -----------------------------------------------------------------------------------------------------------


@dataclass
class PatchSweep:
    """A sweep's TransformerLens-equal result with the per-prompt logit differences behind it.

    values:             ``[*axes]``, the normalised metric of the batch mean (what TransformerLens returns).
    logit_diff:         ``[*axes, batch]``, each prompt's patched ``logit(answer 0) - logit(answer 1)``.
    clean_logit_diff:   ``[batch]``, each prompt's clean-run logit difference.
    corrupted_logit_diff: ``[batch]``, each prompt's corrupted-run logit difference.
    axes, key, model_name: what was swept, on which model.
    """

    values: Tensor
    logit_diff: Tensor
    clean_logit_diff: Tensor
    corrupted_logit_diff: Tensor
    axes: tuple[str, ...]
    key: str
    model_name: str

    def normalised(self, prompts: Sequence[int] | Tensor | None = None) -> Tensor:
        """``(mean patched - mean corrupted) / (mean clean - mean corrupted)`` over ``prompts`` (indices,
        repeats allowed, e.g. a bootstrap resample; default all, which reproduces ``values``)."""
        if prompts is None:
            idx = torch.arange(self.clean_logit_diff.shape[0])
        else:
            idx = torch.as_tensor(prompts, dtype=torch.long)
            if idx.ndim != 1 or idx.numel() == 0:
                raise ValueError(
                    f"prompts must be a non-empty 1-D list of prompt indices, got shape {tuple(idx.shape)}"
                )
            batch = self.clean_logit_diff.shape[0]
            if bool(((idx < 0) | (idx >= batch)).any()):
                raise IndexError(f"prompts holds indices outside 0..{batch - 1}")
        return normalised_patching_metric(
            self.logit_diff[..., idx].mean(-1), self.clean_logit_diff[idx].mean(), self.corrupted_logit_diff[idx].mean()
        )


# -----------------------------------------------------------------------------------------------------------
# Reading the metric
# -----------------------------------------------------------------------------------------------------------


class _Readout:
    """Turns final-position states of ``[variants, batch]`` patched sequences into metric values.

    NormalisedLogitDiff: computes the two answer logits only; returns per-variant normalised values and
    per-prompt logit differences. Any other callable: full final-position logits, one metric call per variant.
    """

    def __init__(self, metric, reduce: Reduce, batch: int, per_prompt: bool):
        if reduce not in ("scalar", "mean", "none"):
            raise ValueError(f"reduce must be 'scalar', 'mean' or 'none', got {reduce!r}")
        self.metric, self.reduce, self.batch = metric, reduce, batch
        self.logit_diff = isinstance(metric, NormalisedLogitDiff)
        if self.logit_diff:
            if reduce != "scalar":
                raise ValueError(
                    "NormalisedLogitDiff returns the normalised batch mean (a scalar), so reduce must be 'scalar'; "
                    "for per-prompt values pass return_per_prompt=True"
                )
            answers = metric.answer_tokens
            if answers.ndim == 1:
                answers = answers.expand(batch, 2)
            if answers.shape != (batch, 2):
                raise ValueError(
                    f"metric.answer_tokens has shape {tuple(metric.answer_tokens.shape)}; the batch needs [{batch}, 2]"
                )
            self.answers = answers.cpu().long()
        elif per_prompt:
            raise ValueError(
                "return_per_prompt=True needs metric=NormalisedLogitDiff (per-prompt logit differences); for another "
                "metric return one value per prompt from it and pass reduce='none'"
            )
        elif not callable(metric):
            raise TypeError(f"metric must be NormalisedLogitDiff or a callable on logits, got {type(metric).__name__}")

    def tail(self) -> tuple[int, ...]:
        return (self.batch,) if self.reduce == "none" else ()

    def from_normed(
        self, fm: FunctionalTransformer, normed: Float[Tensor, "v batch d_model"]
    ) -> tuple[Tensor, Tensor | None]:
        if self.logit_diff:
            n_var = normed.shape[0]
            answers = self.answers.to(normed.device).repeat(n_var, 1)
            pair = fm.answer_logits(normed.reshape(-1, normed.shape[-1]), answers).view(n_var, self.batch, 2)
            return self._from_logit_diff(pair[..., 0] - pair[..., 1])
        return self.from_logits(fm.unembed(normed))

    def from_logits(self, logits: Float[Tensor, "v batch d_vocab"]) -> tuple[Tensor, Tensor | None]:
        if self.logit_diff:
            answers = self.answers.to(logits.device)
            diffs = torch.stack([logit_diff(logits[v], answers) for v in range(logits.shape[0])])
            return self._from_logit_diff(diffs)
        values = [self._call(logits[v][:, None, :]) for v in range(logits.shape[0])]
        return torch.stack(values), None

    def _from_logit_diff(self, diffs: Float[Tensor, "v batch"]) -> tuple[Tensor, Tensor]:
        values = normalised_patching_metric(diffs.mean(-1), self.metric.clean, self.metric.corrupted)
        return values, diffs

    def _call(self, logits: Float[Tensor, "batch 1 d_vocab"]) -> Tensor:
        out = torch.as_tensor(self.metric(logits)).detach().float()
        if self.reduce == "scalar":
            if out.ndim != 0:
                raise ValueError(
                    f"metric must return a scalar under reduce='scalar', got shape {tuple(out.shape)}; return one value "
                    "per prompt and pass reduce='mean' or reduce='none'"
                )
            return out
        if out.shape != (self.batch,):
            raise ValueError(
                f"metric must return a [batch={self.batch}] tensor under reduce={self.reduce!r}, got {tuple(out.shape)}"
            )
        return out.mean() if self.reduce == "mean" else out


# -----------------------------------------------------------------------------------------------------------
# The functional engine: entry states for each group of patches, then the shared suffix run
# -----------------------------------------------------------------------------------------------------------


def _entry_rows(
    fm: FunctionalTransformer,
    C: ForwardRecord,
    K: ForwardRecord,
    component: PatchComponent,
    layer: int,
    first: int,
    cells: Sequence[_Cell],
) -> tuple[int, Float[Tensor, "v batch rows d_model"]]:
    """The residual stream (positions ``first ...``) entering the first layer that must be recomputed, for
    each patch in ``cells``, and that layer's index. C/K: the corrupted/clean runs."""
    n_var, n_pos = len(cells), C.tokens.shape[1]
    site, all_pos = component.site, component.scope == "all"

    def with_rows(base: Tensor, new: Tensor) -> Tensor:
        """``base[:, first:]`` per variant, with its first ``new.shape[2]`` rows replaced by ``new``."""
        rows = base[:, first:].unsqueeze(0).repeat(n_var, 1, 1, 1)
        rows[:, :, : new.shape[2]] = new
        return rows

    span = slice(first, n_pos) if all_pos else slice(first, first + 1)
    if site == "resid_pre":
        return layer, with_rows(C.resid_pre[layer], K.resid_pre[layer][:, span].unsqueeze(0))
    if site == "resid_mid":
        # The MLP is position-wise: a patched resid_mid row becomes the clean resid_post row, others are unchanged.
        return layer + 1, with_rows(C.resid_post[layer], K.resid_post[layer][:, span].unsqueeze(0))
    if site == "attn_out":
        mid = C.resid_pre[layer][:, span] + K.attn_out[layer][:, span]
        return layer + 1, with_rows(C.resid_post[layer], (mid + fm.mlp(layer, mid)).unsqueeze(0))
    if site == "mlp_out":
        return layer + 1, with_rows(
            C.resid_post[layer], (C.resid_mid[layer][:, span] + K.mlp_out[layer][:, span]).unsqueeze(0)
        )

    # Attention sites: compute the patched layer's new head outputs z' for the rows that change.
    z_new, rows = _patched_head_outputs(fm, C, K, component, layer, first, cells)
    dz = z_new - C.z[layer][:, rows].unsqueeze(0)  # exactly zero for heads the patch does not touch
    mid = C.resid_mid[layer][:, rows].unsqueeze(0) + fm.head_write(layer, dz)
    return layer + 1, with_rows(C.resid_post[layer], mid + fm.mlp(layer, mid))


def _patched_head_outputs(
    fm: FunctionalTransformer,
    C: ForwardRecord,
    K: ForwardRecord,
    component: PatchComponent,
    layer: int,
    first: int,
    cells: Sequence[_Cell],
) -> tuple[Float[Tensor, "v batch rows head d_head"], slice]:
    """New head outputs of ``layer`` under each patch, for the query rows the patch can change."""
    site, scope = component.site, component.scope
    batch, n_pos = C.tokens.shape
    heads = torch.tensor([c.head for c in cells])
    n_var = len(cells)
    # Query rows whose output can change: the patched row (z, q, pattern by position), every row from the
    # patched key/value position on (k, v by position), or all rows (all positions).
    rows = slice(first, n_pos) if (scope == "all" or site in ("k", "v")) else slice(first, first + 1)
    corr_z = C.z[layer][:, rows].unsqueeze(0)  # [1, batch, rows, head, d_head]

    def query_head_mask(kv_level: bool) -> Tensor:
        """[v, 1, 1, head, 1]: which query heads each patch touches."""
        query_heads = torch.arange(fm.n_heads)
        touched = (query_heads // fm.n_rep)[None] == heads[:, None] if kv_level else query_heads[None] == heads[:, None]
        return touched[:, None, None, :, None]

    if site == "z":
        return torch.where(query_head_mask(False), K.z[layer][:, rows].unsqueeze(0), corr_z), rows
    if site == "pattern":
        v_per_query_head = C.v[layer].repeat_interleave(fm.n_rep, dim=2)  # [batch, src, head, d_head]
        if scope == "dest_src":
            src = torch.tensor([c.src for c in cells])
            d_pattern = (K.pattern[layer] - C.pattern[layer])[:, :, first, :]  # [batch, head, src]
            # One entry moves: z[dest, h] += d_pattern[h, src] * v[src, h]
            picked = d_pattern[:, heads, src]  # [batch, v]
            v_src = v_per_query_head[:, src, heads]  # [batch, v, d_head]
            delta = (picked[..., None] * v_src).permute(1, 0, 2)  # [v, batch, d_head]
            z_new = corr_z.repeat(n_var, 1, 1, 1, 1)
            z_new[torch.arange(n_var), :, 0, heads] += delta
            return z_new, rows
        z_from_clean_pattern = torch.einsum("bhqs,bshd->bqhd", K.pattern[layer][:, :, rows], v_per_query_head)
        return torch.where(query_head_mask(False), z_from_clean_pattern.unsqueeze(0), corr_z), rows

    # q, k, v: recompute the attention of the affected rows with the patched queries / keys / values.
    q = C.q[layer][:, rows].unsqueeze(0)
    k = C.k[layer][:, : rows.stop].unsqueeze(0)
    v = C.v[layer][:, : rows.stop].unsqueeze(0)
    if site == "q":
        q = torch.where(query_head_mask(False), K.q[layer][:, rows].unsqueeze(0), q)
    else:
        kv_mask = (torch.arange(fm.n_kv_heads)[None] == heads[:, None])[:, None, None, :, None]  # [v,1,1,kv,1]
        if scope != "all":
            kv_mask = kv_mask & (torch.arange(rows.stop) == first)[None, None, :, None, None]
        clean = (K.k if site == "k" else K.v)[layer][:, : rows.stop].unsqueeze(0)
        if site == "k":
            k = torch.where(kv_mask, clean, k)
        else:
            v = torch.where(kv_mask, clean, v)
    q, k, v = (t.expand(n_var, *t.shape[1:]).reshape(n_var * batch, *t.shape[2:]) for t in (q, k, v))
    z, _ = fm.attend(layer, q, k, v, rows.start)
    z = z.view(n_var, batch, *z.shape[1:])
    return torch.where(query_head_mask(site != "q"), z, corr_z), rows


def divergence_positions(
    clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"]
) -> Int[Tensor, " batch"]:
    """Per prompt, the first position where the clean and corrupted tokens differ (``pos`` if they never do).

    Before it, the two runs see the same tokens, so (the model being causal) every activation there is the
    same in both: patching it cannot change anything.
    """
    differs = clean_tokens != corrupted_tokens
    n_pos = clean_tokens.shape[1]
    first = torch.where(
        differs.any(1), differs.float().argmax(1), torch.full_like(differs[:, 0], n_pos, dtype=torch.long)
    )
    return first.long()


def sequence_starts(
    component: PatchComponent, cell: _Cell, divergence: Int[Tensor, " batch"], n_pos: int
) -> Int[Tensor, " batch"]:
    """Per prompt, the first position a patch can change (``n_pos``: it changes nothing for that prompt).

    By position, prompt ``b`` is changed from the cell's position on, provided that is at or after the prompt's
    divergence (before it the clean and corrupted activations are the same); all positions at once, from the
    divergence on. A pattern entry above the diagonal is 0 in both runs: never a change.
    """
    if component.scope == "all":
        return divergence.clone()
    if component.scope == "dest_src" and cell.src > cell.first_pos:
        return torch.full_like(divergence, n_pos)
    first = torch.full_like(divergence, cell.first_pos)
    return torch.where(divergence <= cell.first_pos, first, torch.full_like(divergence, n_pos))


def _functional_sweep(
    fm: FunctionalTransformer,
    C: ForwardRecord,
    K: ForwardRecord,
    component: PatchComponent,
    cells: list[_Cell],
    readout: _Readout,
    store: Tensor,
    store_diffs: Tensor | None,
    batch_size: int,
    progress: bool,
    desc: str,
) -> None:
    """Run every cell. Per layer, all patched sequences (cell x prompt) are packed into passes of at most
    ``batch_size`` full-length sequences' worth of rows, each one :func:`mechfin_utils.engine.run`.
    Sequences that provably cannot change (see :func:`divergence_positions`; pattern entries above the
    diagonal) are not run: their final state is the corrupted run's."""
    batch, n_pos = C.tokens.shape
    divergence = divergence_positions(K.tokens, C.tokens)
    row_budget = batch_size * n_pos
    by_layer: dict[int, list[_Cell]] = {}
    for cell in sorted(cells, key=lambda c: (c.layer, c.first_pos)):
        by_layer.setdefault(cell.layer, []).append(cell)

    bar = tqdm(total=len(cells), desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        for layer, layer_cells in by_layer.items():
            planned = [(cell, sequence_starts(component, cell, divergence, n_pos)) for cell in layer_cells]
            for chunk in engine.chunk_by_rows(planned, lambda item: int((n_pos - item[1]).sum()), row_budget):
                by_first: dict[int, list[tuple[_Cell, Tensor]]] = {}
                for cell, cell_starts in chunk:
                    by_first.setdefault(cell.first_pos, []).append((cell, cell_starts))
                normed = C.final_normed.unsqueeze(0).repeat(len(chunk), 1, 1)  # [cells, batch, d]: no-op default
                segments, owners, start_layer, offset = [], [], None, 0
                for first, group in by_first.items():
                    group_starts = torch.stack([st for _, st in group])  # [v, batch]
                    if bool((group_starts < n_pos).any()):
                        start_layer, rows = _entry_rows(fm, C, K, component, layer, first, [c for c, _ in group])
                        for begin in group_starts[group_starts < n_pos].unique().tolist():
                            v_idx, b_idx = (group_starts == begin).nonzero(as_tuple=True)
                            segments.append(
                                engine.Segment(start_layer, begin, rows[v_idx, b_idx, begin - first :], b_idx)
                            )
                            owners.append((offset + v_idx, b_idx))
                    offset += len(group)
                if segments:
                    for (v_idx, b_idx), out in zip(owners, engine.run(fm, segments, C)):
                        normed[v_idx, b_idx] = out[:, -1]
                values, diffs = readout.from_normed(fm, normed)
                _store([c for group in by_first.values() for c, _ in group], values, diffs, store, store_diffs)
                bar.update(len(chunk))
    bar.close()


def _store(
    cells: Sequence[_Cell], values: Tensor, diffs: Tensor | None, store: Tensor, store_diffs: Tensor | None
) -> None:
    for i, cell in enumerate(cells):
        store[cell.out_index] = values[i]
        if store_diffs is not None and diffs is not None:
            store_diffs[cell.out_index] = diffs[i]


# -----------------------------------------------------------------------------------------------------------
# The bridge engine (any architecture the bridge supports): TransformerLens's hooks, many patches per pass
# -----------------------------------------------------------------------------------------------------------


def _bridge_sweep(
    bridge,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    component: PatchComponent,
    cells: list[_Cell],
    readout: _Readout,
    store: Tensor,
    store_diffs: Tensor | None,
    batch_size: int,
    progress: bool,
    desc: str,
) -> None:
    batch = corrupted_tokens.shape[0]
    names = sorted({f"blocks.{c.layer}.{component.hook_suffix}" for c in cells})
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean_tokens, names_filter=lambda name: name in names)
    per_chunk = max(1, batch_size // batch)
    by_layer: dict[int, list[_Cell]] = {}
    for cell in cells:
        by_layer.setdefault(cell.layer, []).append(cell)
    bar = tqdm(total=len(cells), desc=desc, disable=not progress, leave=False)
    for layer, group in by_layer.items():
        name = f"blocks.{layer}.{component.hook_suffix}"
        clean = clean_cache[name]
        for start in range(0, len(group), per_chunk):
            chunk = group[start : start + per_chunk]

            def hook(activation: Tensor, hook, chunk=chunk, clean=clean) -> Tensor:
                patched = activation.clone().view(len(chunk), batch, *activation.shape[1:])
                for i, cell in enumerate(chunk):
                    where = _bridge_index(component, cell)
                    patched[i][where] = clean[where]
                return patched.view(activation.shape)

            with torch.no_grad():
                logits = bridge.run_with_hooks(corrupted_tokens.repeat(len(chunk), 1), fwd_hooks=[(name, hook)])
            values, diffs = readout.from_logits(logits[:, -1].reshape(len(chunk), batch, -1))
            _store(chunk, values, diffs, store, store_diffs)
            bar.update(len(chunk))
    bar.close()


def _bridge_index(component: PatchComponent, cell: _Cell) -> tuple:
    """TransformerLens's patch setters, as an index into one patched copy's activation."""
    every = slice(None)
    if component.site == "pattern":  # [batch, head, dest, src]
        if component.scope == "dest_src":
            return (every, cell.head, cell.pos, cell.src)
        return (every, cell.head) if cell.pos is None else (every, cell.head, cell.pos)
    if component.per_head:  # [batch, pos, head, d_head]
        return (every, every, cell.head) if cell.pos is None else (every, cell.pos, cell.head)
    return (every, every) if cell.pos is None else (every, cell.pos)  # [batch, pos, d_model]


# -----------------------------------------------------------------------------------------------------------
# The generic function
# -----------------------------------------------------------------------------------------------------------

_FUNCTIONAL_MODELS: weakref.WeakKeyDictionary[torch.nn.Module, FunctionalTransformer] = weakref.WeakKeyDictionary()


def functional_model(model) -> FunctionalTransformer:
    """The (cached) :class:`~mechfin_utils.functional.FunctionalTransformer` of a LoadedModel or bridge."""
    hf = model.hf_model if hasattr(model, "spec") else getattr(model, "original_model", model)
    if hf not in _FUNCTIONAL_MODELS:
        _FUNCTIONAL_MODELS[hf] = FunctionalTransformer.from_model(model)
    return _FUNCTIONAL_MODELS[hf]


def _bridge_of(model):
    if hasattr(model, "bridge") and hasattr(model, "spec"):
        return model.bridge
    if hasattr(model, "run_with_hooks") and hasattr(model, "cfg"):
        return model
    raise TypeError(f"model must be a mechfin LoadedModel or a TransformerLens bridge, got {type(model).__name__}")


def _record_fields(spec: PatchComponent) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Which activations of the corrupted and the clean run a sweep reads (the rest is not kept)."""
    corrupted = {"resid_pre", "k", "v"}  # entry/continuation states and the key/value prefix
    clean = set()
    if spec.site in ("resid_pre", "resid_mid"):
        clean.add("resid_pre")
    elif spec.site in ("attn_out", "mlp_out"):
        clean.add(spec.site)
        corrupted.add("resid_mid")
    else:
        corrupted |= {"resid_mid", "z"} | ({"q"} if spec.site in ("q", "k", "v") else set())
        corrupted |= {"pattern"} if spec.site == "pattern" else set()
        clean.add(spec.site)
    return tuple(sorted(corrupted)), tuple(sorted(clean))


def _check_metric_matches(readout: _Readout, clean_diff: Tensor, corrupted_diff: Tensor) -> None:
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


def activation_patch(
    model,
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
        model: a :class:`~mechfin_utils.models.LoadedModel` (or a TransformerLens bridge).
        clean_tokens: ``[batch, pos]`` clean prompts (the source of patched activations).
        corrupted_tokens: ``[batch, pos]`` corrupted prompts (the run being patched); same shape.
        metric: :class:`~mechfin_utils.metrics.NormalisedLogitDiff` (fast path; normalised with the clean and
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
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {sorted(COMPONENTS)}, got {component!r}")
    spec = COMPONENTS[component]
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (sequences per pass), got {batch_size!r}")
    if engine not in ("auto", "functional", "bridge"):
        raise ValueError(f"engine must be 'auto', 'functional' or 'bridge', got {engine!r}")
    bridge = _bridge_of(model)
    if bridge.training:
        raise ValueError(
            "the model is in training mode (dropout would randomise every patch): call model.bridge.eval()"
        )
    model_name = getattr(model, "name", None) or str(getattr(bridge.cfg, "model_name", "model"))
    check_token_pairs(clean_tokens, corrupted_tokens, bridge.cfg.d_vocab, model_name=model_name)
    batch, n_pos = corrupted_tokens.shape
    readout = _Readout(metric, reduce, batch, return_per_prompt)

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
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    n_kv_heads = getattr(bridge.cfg, "n_key_value_heads", None) or n_heads
    shape = _result_shape(spec, n_layers, n_pos, n_heads, n_kv_heads)
    if index_df is None:
        cells = _cells(spec, n_layers, n_pos, n_heads, n_kv_heads)
    else:
        cells = _cells_from_index_df(spec, index_df, shape)
        shape = (len(cells),)
    store = torch.zeros(shape + readout.tail())
    store_diffs = torch.zeros(shape + (batch,)) if readout.logit_diff else None
    desc = f"{component} patching ({model_name})"

    with torch.no_grad():
        if fm is not None:
            keep_corrupted, keep_clean = _record_fields(spec)
            C, K = fm.record(corrupted_tokens, keep_corrupted), fm.record(clean_tokens, keep_clean)
            _functional_sweep(fm, C, K, spec, cells, readout, store, store_diffs, batch_size, progress, desc)
            if readout.logit_diff:
                clean_diff = readout.from_normed(fm, K.final_normed.unsqueeze(0))[1][0]
                corrupted_diff = readout.from_normed(fm, C.final_normed.unsqueeze(0))[1][0]
        else:
            _bridge_sweep(
                bridge,
                clean_tokens,
                corrupted_tokens,
                spec,
                cells,
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
    if readout.logit_diff:
        _check_metric_matches(readout, clean_diff, corrupted_diff)
    if not return_per_prompt:
        return store
    return PatchSweep(
        values=store,
        logit_diff=store_diffs,
        clean_logit_diff=clean_diff,
        corrupted_logit_diff=corrupted_diff,
        axes=("row",) if index_df is not None else spec.axes,
        key=component,
        model_name=model_name,
    )
