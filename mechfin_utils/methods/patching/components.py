"""What activation patching can patch: the component registry, and every patch ("cell") of a sweep.

A *component* is one kind of patching sweep: which activation is patched (the *site*: a residual-stream state, an
attention or MLP output, or a head's query, key, value, output or pattern) and how finely (the *scope*: one position
at a time, every position at once, or one attention-pattern entry). :data:`COMPONENTS` holds all of them, keyed as
TransformerLens's ``get_act_patch_<key>`` functions are, and records the axes of each result. Exact patching
(:mod:`mechfin_utils.methods.patching.activation`) and attribution patching
(:mod:`mechfin_utils.methods.patching.attribution`) share this one registry, so their results line up cell for cell.

A sweep is a list of *cells* (:class:`PatchCell`), one patch each: a layer, a position (or all), a head (or none)
and, for pattern entries, a source position; :func:`cells` lists every cell of a sweep and
:func:`cells_from_index_df` only the rows of a TransformerLens-style ``index_df``. :func:`result_shape` is the shape
of the result tensor that the cells' ``out_index`` point into.

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
Face's ``repeat_kv`` order). Queries, head outputs and patterns have one entry per query head. The registry
and the patching here do exactly the same. Queries and keys are patched after the rotary embedding here and before it in
TransformerLens; for a clean vector moved to the same position these are the same patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Site = Literal["resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]
Scope = Literal["pos", "all", "dest_src"]


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
        (what attribution patching, :mod:`mechfin_utils.methods.patching.attribution`, needs)."""
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
class PatchCell:
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


def cells(component: PatchComponent, n_layers: int, n_pos: int, n_heads: int, n_kv_heads: int) -> list[PatchCell]:
    """Every patch of a sweep, each with its index into the result tensor (:func:`result_shape`)."""
    heads = n_kv_heads if component.site in ("k", "v") else n_heads
    every = []
    for layer in range(n_layers):
        if component.scope == "dest_src":
            every += [
                PatchCell(layer, dest, head, src, (layer, head, dest, src))
                for dest in range(n_pos)
                for head in range(heads)
                for src in range(n_pos)
            ]
        elif component.scope == "pos" and component.site == "pattern":
            every += [
                PatchCell(layer, dest, head, None, (layer, head, dest))
                for dest in range(n_pos)
                for head in range(heads)
            ]
        elif component.scope == "pos" and component.per_head:
            every += [
                PatchCell(layer, pos, head, None, (layer, pos, head)) for pos in range(n_pos) for head in range(heads)
            ]
        elif component.scope == "pos":
            every += [PatchCell(layer, pos, None, None, (layer, pos)) for pos in range(n_pos)]
        elif component.per_head:
            every += [PatchCell(layer, None, head, None, (layer, head)) for head in range(heads)]
        else:
            every += [PatchCell(layer, None, None, None, (layer,))]
    return every


_INDEX_COLUMN_ALIASES = {"head_index": "head"}


def cells_from_index_df(component: PatchComponent, index_df, full_shape: tuple[int, ...]) -> list[PatchCell]:
    """Cells for the rows of a TransformerLens-style ``index_df`` (columns = the result's axes, in order;
    ``head_index`` is accepted for ``head``). Cell ``i`` is stored at position ``i`` of a flat result."""
    columns = [_INDEX_COLUMN_ALIASES.get(str(c), str(c)) for c in index_df.columns]
    if columns != list(component.axes):
        raise ValueError(
            f"index_df columns {list(index_df.columns)} must be the axes of {component.key}, in order: {list(component.axes)}"
        )
    selected = []
    for i, row in enumerate(index_df.itertuples(index=False)):
        values = [int(v) for v in row]
        for axis, value, size in zip(component.axes, values, full_shape):
            if not 0 <= value < size:
                raise IndexError(f"index_df row {i}: {axis}={value} is outside 0..{size - 1}")
        named = dict(zip(component.axes, values))
        pos = named.get("pos", named.get("dest_pos"))
        selected.append(PatchCell(named["layer"], pos, named.get("head"), named.get("src_pos"), (i,)))
    return selected


def result_shape(
    component: PatchComponent, n_layers: int, n_pos: int, n_heads: int, n_kv_heads: int
) -> tuple[int, ...]:
    """The shape of a full sweep's result: one size per axis of ``component`` (k/v heads count key/value heads)."""
    heads = n_kv_heads if component.site in ("k", "v") else n_heads
    size = {"layer": n_layers, "pos": n_pos, "dest_pos": n_pos, "src_pos": n_pos, "head": heads}
    return tuple(size[a] for a in component.axes)
