"""The fast path of exact activation patching: each patch recomputes only what it can change.

:func:`functional_sweep` runs every cell of a sweep on the intervention engine, :mod:`mechfin_utils.core.engine`,
over :class:`~mechfin_utils.core.functional.FunctionalTransformer` (GPT-2 and Llama families). It starts from two
recorded runs, the corrupted one (the run being patched) and the clean one (the source of the patched values);
:func:`record_fields` says which of their activations a sweep needs. Then, per patched layer:

1. **Entry states.** :func:`_entry_rows` computes, for every patch, the residual stream entering the first layer
   that must be recomputed. Residual-stream patches are a copy of clean rows; attention/MLP output patches add
   the clean output and run the (position-wise) MLP; head patches compute the patched layer's new head outputs
   directly from the cached queries, keys, values and patterns (:func:`_patched_head_outputs`), since patching
   head ``h`` moves the attention output by ``(z_clean - z_corrupted) @ W_O[h]``.
2. **What cannot change is not run.** Attention is causal, so a patch at position ``p`` is invisible before ``p``,
   and before the first position where the prompts differ (:func:`divergence_positions`) the clean and corrupted
   activations are equal. :func:`sequence_starts` gives, per prompt, the first position a patch can change
   (``n_pos``: none, and the sequence is not run at all).
3. **Shared passes.** Patches of one layer are packed into passes of at most ``batch_size`` full-length sequences'
   worth of rows (:func:`mechfin_utils.core.engine.chunk_by_rows`); each pass is one
   :func:`mechfin_utils.core.engine.run` from the entry layer, reading only the final position, and the metric
   is read from it by :class:`~mechfin_utils.methods.patching.results.MetricReadout`.

The generic entry point, with the checks and the choice between this path and the bridge path, is
:func:`mechfin_utils.methods.patching.activation.activation_patch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechfin_utils.core import engine
from mechfin_utils.core.functional import ForwardRecord, FunctionalTransformer
from mechfin_utils.methods.patching.components import PatchCell, PatchComponent
from mechfin_utils.methods.patching.results import MetricReadout, store_values

# -----------------------------------------------------------------------------------------------------------
# Entry states for each group of patches: what the patched layer hands to the layers above it
# -----------------------------------------------------------------------------------------------------------


def _entry_rows(
    fm: FunctionalTransformer,
    corrupted_run: ForwardRecord,
    clean_run: ForwardRecord,
    component: PatchComponent,
    layer: int,
    first: int,
    cells: Sequence[PatchCell],
) -> tuple[int, Float[Tensor, "v batch rows d_model"]]:
    """The residual stream (positions ``first ...``) entering the first layer that must be recomputed, for
    each patch in ``cells``, and that layer's index."""
    n_var, n_pos = len(cells), corrupted_run.tokens.shape[1]
    site, all_pos = component.site, component.scope == "all"

    def with_rows(base: Tensor, new: Tensor) -> Tensor:
        """``base[:, first:]`` per variant, with its first ``new.shape[2]`` rows replaced by ``new``."""
        rows = base[:, first:].unsqueeze(0).repeat(n_var, 1, 1, 1)
        rows[:, :, : new.shape[2]] = new
        return rows

    span = slice(first, n_pos) if all_pos else slice(first, first + 1)
    if site == "resid_pre":
        return layer, with_rows(
            corrupted_run.kept("resid_pre")[layer], clean_run.kept("resid_pre")[layer][:, span].unsqueeze(0)
        )
    if site == "resid_mid":
        # The MLP is position-wise: a patched resid_mid row becomes the clean resid_post row, others are unchanged.
        return layer + 1, with_rows(corrupted_run.resid_post[layer], clean_run.resid_post[layer][:, span].unsqueeze(0))
    if site == "attn_out":
        mid = corrupted_run.kept("resid_pre")[layer][:, span] + clean_run.kept("attn_out")[layer][:, span]
        return layer + 1, with_rows(corrupted_run.resid_post[layer], (mid + fm.mlp(layer, mid)).unsqueeze(0))
    if site == "mlp_out":
        return layer + 1, with_rows(
            corrupted_run.resid_post[layer],
            (corrupted_run.kept("resid_mid")[layer][:, span] + clean_run.kept("mlp_out")[layer][:, span]).unsqueeze(0),
        )

    # Attention sites: compute the patched layer's new head outputs z' for the rows that change.
    z_new, rows = _patched_head_outputs(fm, corrupted_run, clean_run, component, layer, first, cells)
    dz = z_new - corrupted_run.kept("z")[layer][:, rows].unsqueeze(0)  # exactly zero for heads the patch does not touch
    mid = corrupted_run.kept("resid_mid")[layer][:, rows].unsqueeze(0) + fm.head_write(layer, dz)
    return layer + 1, with_rows(corrupted_run.resid_post[layer], mid + fm.mlp(layer, mid))


def _patched_head_outputs(
    fm: FunctionalTransformer,
    corrupted_run: ForwardRecord,
    clean_run: ForwardRecord,
    component: PatchComponent,
    layer: int,
    first: int,
    cells: Sequence[PatchCell],
) -> tuple[Float[Tensor, "v batch rows head d_head"], slice]:
    """New head outputs of ``layer`` under each patch, for the query rows the patch can change."""
    site, scope = component.site, component.scope
    batch, n_pos = corrupted_run.tokens.shape
    heads = torch.tensor([c.head for c in cells])
    n_var = len(cells)
    # Query rows whose output can change: the patched row (z, q, pattern by position), every row from the
    # patched key/value position on (k, v by position), or all rows (all positions).
    rows = slice(first, n_pos) if (scope == "all" or site in ("k", "v")) else slice(first, first + 1)
    corr_z = corrupted_run.kept("z")[layer][:, rows].unsqueeze(0)  # [1, batch, rows, head, d_head]

    def query_head_mask(kv_level: bool) -> Tensor:
        """[v, 1, 1, head, 1]: which query heads each patch touches."""
        query_heads = torch.arange(fm.n_heads)
        touched = (query_heads // fm.n_rep)[None] == heads[:, None] if kv_level else query_heads[None] == heads[:, None]
        return touched[:, None, None, :, None]

    if site == "z":
        return torch.where(query_head_mask(False), clean_run.kept("z")[layer][:, rows].unsqueeze(0), corr_z), rows
    if site == "pattern":
        # [batch, src, head, d_head]
        v_per_query_head = corrupted_run.kept("v")[layer].repeat_interleave(fm.n_rep, dim=2)
        if scope == "dest_src":
            src = torch.tensor([c.src for c in cells])
            d_pattern = clean_run.kept("pattern")[layer] - corrupted_run.kept("pattern")[layer]
            d_pattern = d_pattern[:, :, first, :]  # [batch, head, src]
            # One entry moves: z[dest, h] += d_pattern[h, src] * v[src, h]
            picked = d_pattern[:, heads, src]  # [batch, v]
            v_src = v_per_query_head[:, src, heads]  # [batch, v, d_head]
            delta = (picked[..., None] * v_src).permute(1, 0, 2)  # [v, batch, d_head]
            z_new = corr_z.repeat(n_var, 1, 1, 1, 1)
            z_new[torch.arange(n_var), :, 0, heads] += delta
            return z_new, rows
        z_from_clean_pattern = torch.einsum(
            "bhqs,bshd->bqhd", clean_run.kept("pattern")[layer][:, :, rows], v_per_query_head
        )
        return torch.where(query_head_mask(False), z_from_clean_pattern.unsqueeze(0), corr_z), rows

    # q, k, v: recompute the attention of the affected rows with the patched queries / keys / values.
    q = corrupted_run.kept("q")[layer][:, rows].unsqueeze(0)
    k = corrupted_run.kept("k")[layer][:, : rows.stop].unsqueeze(0)
    v = corrupted_run.kept("v")[layer][:, : rows.stop].unsqueeze(0)
    if site == "q":
        q = torch.where(query_head_mask(False), clean_run.kept("q")[layer][:, rows].unsqueeze(0), q)
    else:
        kv_mask = (torch.arange(fm.n_kv_heads)[None] == heads[:, None])[:, None, None, :, None]  # [v,1,1,kv,1]
        if scope != "all":
            kv_mask = kv_mask & (torch.arange(rows.stop) == first)[None, None, :, None, None]
        clean = clean_run.kept(site)[layer][:, : rows.stop].unsqueeze(0)
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
    component: PatchComponent, cell: PatchCell, divergence: Int[Tensor, " batch"], n_pos: int
) -> Int[Tensor, " batch"]:
    """Per prompt, the first position a patch can change (``n_pos``: it changes nothing for that prompt).

    By position, prompt ``b`` is changed from the cell's position on, provided that is at or after the prompt's
    divergence (before it the clean and corrupted activations are the same); all positions at once, from the
    divergence on. A pattern entry above the diagonal is 0 in both runs: never a change.
    """
    if component.scope == "all":
        return divergence.clone()
    if component.scope == "dest_src" and cell.src is not None and cell.src > cell.first_pos:
        return torch.full_like(divergence, n_pos)
    first = torch.full_like(divergence, cell.first_pos)
    return torch.where(divergence <= cell.first_pos, first, torch.full_like(divergence, n_pos))


def functional_sweep(
    fm: FunctionalTransformer,
    corrupted_run: ForwardRecord,
    clean_run: ForwardRecord,
    component: PatchComponent,
    cells: list[PatchCell],
    readout: MetricReadout,
    store: Tensor,
    store_diffs: Tensor | None,
    batch_size: int,
    progress: bool,
    desc: str,
) -> None:
    """Run every cell. Per layer, all patched sequences (cell x prompt) are packed into passes of at most
    ``batch_size`` full-length sequences' worth of rows, each one :func:`mechfin_utils.core.engine.run`.
    Sequences that provably cannot change (see :func:`divergence_positions`; pattern entries above the
    diagonal) are not run: their final state is the corrupted run's."""
    # 1. Group the cells by patched layer, in position order.
    batch, n_pos = corrupted_run.tokens.shape
    divergence = divergence_positions(clean_run.tokens, corrupted_run.tokens)
    row_budget = batch_size * n_pos
    by_layer: dict[int, list[PatchCell]] = {}
    for cell in sorted(cells, key=lambda c: (c.layer, c.first_pos)):
        by_layer.setdefault(cell.layer, []).append(cell)

    bar = tqdm(total=len(cells), desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        for layer, layer_cells in by_layer.items():
            # 2. Per cell and prompt, the first position the patch can change; pack cells into passes by rows.
            planned = [(cell, sequence_starts(component, cell, divergence, n_pos)) for cell in layer_cells]
            for chunk in engine.chunk_by_rows(planned, lambda item: int((n_pos - item[1]).sum()), row_budget):
                by_first: dict[int, list[tuple[PatchCell, Tensor]]] = {}
                for cell, cell_starts in chunk:
                    by_first.setdefault(cell.first_pos, []).append((cell, cell_starts))
                # 3. Entry states of each group of cells with one first position, as engine segments (one per
                #    start position); sequences that cannot change keep the corrupted run's final state.
                normed = corrupted_run.final_normed.unsqueeze(0).repeat(
                    len(chunk), 1, 1
                )  # [cells, batch, d]: no-op default
                segments, owners, start_layer, offset = [], [], None, 0
                for first, group in by_first.items():
                    group_starts = torch.stack([st for _, st in group])  # [v, batch]
                    if bool((group_starts < n_pos).any()):
                        start_layer, rows = _entry_rows(
                            fm, corrupted_run, clean_run, component, layer, first, [c for c, _ in group]
                        )
                        for begin in group_starts[group_starts < n_pos].unique().tolist():
                            v_idx, b_idx = (group_starts == begin).nonzero(as_tuple=True)
                            segments.append(
                                engine.Segment(start_layer, begin, rows[v_idx, b_idx, begin - first :], b_idx)
                            )
                            owners.append((offset + v_idx, b_idx))
                    offset += len(group)
                # 4. One pass for the whole chunk, then the metric of every patched run.
                if segments:
                    for (v_idx, b_idx), out in zip(owners, engine.run(fm, segments, corrupted_run)):
                        normed[v_idx, b_idx] = out[:, -1]
                values, diffs = readout.from_normed(fm, normed)
                store_values([c for group in by_first.values() for c, _ in group], values, diffs, store, store_diffs)
                bar.update(len(chunk))
    bar.close()


def record_fields(spec: PatchComponent) -> tuple[tuple[str, ...], tuple[str, ...]]:
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
