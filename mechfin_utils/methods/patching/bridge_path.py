"""The bridge path of exact activation patching: TransformerLens's own hooks, many patches per forward pass.

For an architecture that :class:`~mechfin_utils.core.functional.FunctionalTransformer` does not implement,
:func:`mechfin_utils.methods.patching.activation.activation_patch` falls back (with a warning) to
:func:`bridge_sweep`. It caches the clean run's activations at the hooks a sweep patches, stacks many copies of the
corrupted prompts into one batch, and patches each copy at its own cell with the setters TransformerLens uses
(:func:`_bridge_index`). Exact, but every patch is a full forward pass: it gains only the batching.

:func:`bridge_of` is the one place that finds the TransformerLens bridge of a model argument (a mechfin
``LoadedModel`` or a bridge itself); attribution patching uses it too.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechfin_utils.methods.patching.components import PatchCell, PatchComponent
from mechfin_utils.methods.patching.results import MetricReadout, store_values


def bridge_of(model):
    """The TransformerLens bridge of a mechfin ``LoadedModel``, or ``model`` itself when it is a bridge."""
    bridge = model.bridge if hasattr(model, "bridge") and hasattr(model, "spec") else model
    for attribute in ("run_with_hooks", "run_with_cache", "cfg"):
        if not hasattr(bridge, attribute):
            raise TypeError(
                f"model must be a mechfin LoadedModel or a TransformerBridge; {type(model).__name__} has no "
                f"{attribute!r}"
            )
    return bridge


def bridge_sweep(
    bridge,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    component: PatchComponent,
    cells: list[PatchCell],
    readout: MetricReadout,
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
    by_layer: dict[int, list[PatchCell]] = {}
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
            store_values(chunk, values, diffs, store, store_diffs)
            bar.update(len(chunk))
    bar.close()


def _bridge_index(component: PatchComponent, cell: PatchCell) -> tuple:
    """TransformerLens's patch setters, as an index into one patched copy's activation."""
    every = slice(None)
    if component.site == "pattern":  # [batch, head, dest, src]
        if component.scope == "dest_src":
            return (every, cell.head, cell.pos, cell.src)
        return (every, cell.head) if cell.pos is None else (every, cell.head, cell.pos)
    if component.per_head:  # [batch, pos, head, d_head]
        return (every, every, cell.head) if cell.pos is None else (every, cell.pos, cell.head)
    return (every, every) if cell.pos is None else (every, cell.pos)  # [batch, pos, d_model]
