"""Restorations: run a prompt with its subject noised and chosen states copied back from the clean run.

This is the one generic function of causal tracing, :func:`run_with_restorations`; everything in
:mod:`mechfin_utils.methods.tracing.causal_trace` is a thin wrapper around it, as in TransformerLens's
``patching.py``. A :class:`Restoration` names a set of ``(hook_name, position)`` sites; each is overwritten,
in the corrupted run (subject noised, see :mod:`mechfin_utils.methods.tracing.noise`), by its value in the
clean run. The empty restoration is the plain corrupted run, the baseline every indirect effect is measured
against. Every restoration is scored under every noise sample.

Two backends compute the same numbers (tested equal to float rounding):

* **engine** (:mod:`mechfin_utils.core.engine`, GPT-2 and Llama families): the corrupted run is recorded once
  per noise sample; a restoration at layer ``l`` and token ``p`` continues it from there, recomputing only layers
  ``>= l`` at positions ``>= p`` (nothing below or before can differ);
* **bridge** (the reference, any architecture the bridge supports): a full forward pass per batch of rows,
  noise added at ``hook_embed`` and clean values written by hooks (the clean values from
  :func:`clean_activations`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.methods.tracing.prepared import (
    EMBED_HOOK,
    KIND_HOOKS,
    Backend,
    PreparedTrace,
    choose_backend,
    engine_site,
    final_logits_with_hooks,
    hook_layer,
    score_final_logits,
    score_final_normed,
)

if TYPE_CHECKING:  # pragma: no cover
    from mechfin_utils.core.engine import ReplaceSite
    from mechfin_utils.core.functional import FunctionalTransformer
    from mechfin_utils.core.models import LoadedModel


@dataclass(frozen=True)
class Restoration:
    """A set of ``(hook_name, position)`` sites copied from the clean run into the corrupted run.

    An empty set is the plain corrupted run.
    """

    sites: tuple[tuple[str, int], ...]
    label: str = ""

    @classmethod
    def of(cls, kind: str, layers: Iterable[int], positions: Iterable[int], label: str = "") -> Restoration:
        if kind not in KIND_HOOKS:
            raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KIND_HOOKS)}")
        template = KIND_HOOKS[kind]
        return cls(tuple((template.format(layer=l), p) for l in layers for p in positions), label)


def _noise_hook(subject: Tensor, noise_rows: Tensor) -> Callable:
    def add_noise(act: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        act = act.clone()
        act[:, subject, :] += noise_rows.to(act.dtype)
        return act

    return add_noise


def _restore_hook(rows_at: Tensor, pos_at: Tensor, values: Tensor) -> Callable:
    def restore(act: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        act = act.clone()
        act[rows_at, pos_at] = values.to(act.dtype)
        return act

    return restore


@torch.no_grad()
def clean_activations(
    model: LoadedModel, prepared: PreparedTrace, hook_names: Iterable[str]
) -> tuple[dict[str, Float[Tensor, "pos d_model"]], Float[Tensor, " d_vocab"]]:
    """One clean forward: the named activations (batch dim dropped) and the last position's logits."""
    names = sorted(set(hook_names))
    store: dict[str | None, Tensor] = {}  # by HookPoint.name (typed Optional; every bridge hook has one)

    def keep(act: Tensor, hook) -> Tensor:
        store[hook.name] = act[0].detach().clone()
        return act

    logits = final_logits_with_hooks(model, prepared.tokens[None], [(n, keep) for n in names])
    canonical = {name: store[model.bridge.hook_dict[name].name] for name in names}
    return canonical, logits[0]


@torch.no_grad()
def run_with_restorations(
    model: LoadedModel,
    prepared: PreparedTrace,
    noise: Float[Tensor, "sample subject_pos d_model"],
    restorations: Sequence[Restoration],
    clean: Mapping[str, Float[Tensor, "pos d_model"]] | None = None,
    batch_size: int = 256,
    backend: Backend = "auto",
) -> Float[Tensor, "sample restoration"]:
    """Score every restoration under every noise sample.

    Each (noise sample, restoration) pair is one corrupted run (that sample's noise on the subject's input
    embeddings) with each site of the restoration overwritten by its clean value. Two backends compute it:

    ``"engine"``
        :func:`mechfin_utils.core.engine.run`: the corrupted run is recorded once per noise sample; a
        restoration whose earliest site is in block ``l`` at position ``p`` continues that record from
        block ``l`` and position ``p`` (nothing below or before can differ from it), with its sites as
        :class:`~mechfin_utils.core.engine.Replace` interventions. GPT-2 and Llama families.
    ``"bridge"``
        The reference: a full forward pass through the bridge per batch of rows, noise added at
        ``hook_embed`` and clean values written by hooks (any architecture the bridge supports).

    ``"auto"`` (default) uses the engine where it can. Both agree to float rounding (tested).

    Args:
        noise: from :func:`~mechfin_utils.methods.tracing.noise.sample_subject_noise`, one slice per sample,
            ``subject_pos`` = number of subject tokens.
        restorations: what to restore; ``Restoration(())`` gives the corrupted baseline.
        clean: the bridge backend's clean activations for every hook named (computed when omitted).
        batch_size: rows per forward pass (engine: full-prompt rows' worth of recomputed positions).

    Returns:
        The task score (see :func:`~mechfin_utils.methods.tracing.prepared.score_final_logits`) per noise sample
        and restoration.
    """
    n_subject = prepared.subject_span[1] - prepared.subject_span[0]
    if noise.ndim != 3 or noise.shape[1] != n_subject or noise.shape[2] != model.cfg.d_model:
        raise ValueError(
            f"{prepared.task.label}: noise must be [sample, {n_subject} subject tokens, {model.cfg.d_model}], "
            f"got {tuple(noise.shape)}"
        )
    hook_names = sorted({name for r in restorations for name, _ in r.sites})
    for r in restorations:
        for name, pos in r.sites:
            if not 0 <= pos < prepared.n_tokens:
                raise ValueError(
                    f"{prepared.task.label}: restoration {r.label!r} names position {pos}, outside the prompt"
                )
            if name != EMBED_HOOK and hook_layer(name) is None:
                raise ValueError(f"{prepared.task.label}: restoration site {name!r} is not a hook inside a block")
    noise = noise.to(device=prepared.tokens.device, dtype=torch.float32)
    fm = choose_backend(model, backend, hook_names)
    if fm is not None:
        return _restorations_on_engine(fm, prepared, noise, restorations, batch_size)
    return _restorations_through_hooks(model, prepared, noise, restorations, clean, hook_names, batch_size)


def _restorations_on_engine(
    fm: FunctionalTransformer,
    prepared: PreparedTrace,
    noise: Float[Tensor, "sample subject_pos d_model"],
    restorations: Sequence[Restoration],
    batch_size: int,
) -> Float[Tensor, "sample restoration"]:
    from mechfin_utils.core import engine

    # 1. The clean run (the values restored) and the corrupted run per noise sample (the reference that
    #    every restoration continues), from noised input embeddings.
    n_samples, n_pos = noise.shape[0], prepared.n_tokens
    tokens = prepared.tokens[None]
    clean = fm.record(tokens, keep=("resid_pre", "attn_out", "mlp_out"))
    noised = fm.embed(tokens).repeat(n_samples, 1, 1)
    noised[:, prepared.subject_span[0] : prepared.subject_span[1]] += noise.to(noised.dtype)
    corrupted = fm.record(tokens.expand(n_samples, -1), keep=("resid_pre", "k", "v"), embeddings=noised)
    clean_value = {site: clean.kept(site) for site in ("resid_pre", "attn_out", "mlp_out")}

    def score(normed: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
        return score_final_normed(fm, prepared, normed)

    scores = torch.empty(n_samples, len(restorations))
    scores[:] = score(corrupted.final_normed)[:, None]  # the baseline, and what an empty restoration gives
    # 2. One segment per restoration: from its earliest layer and position, its sites replaced.
    segments, owners = [], []
    for r, restoration in enumerate(restorations):
        if not restoration.sites:
            continue
        by_site: dict[tuple[ReplaceSite, int], list[int]] = {}
        for name, pos in restoration.sites:
            site_and_layer = engine_site(name)
            assert site_and_layer is not None  # choose_backend sends only what the engine restores
            by_site.setdefault(site_and_layer, []).append(pos)
        start = min(layer for _, layer in by_site)
        first = min(pos for _, pos in restoration.sites)
        interventions = [
            engine.Replace(
                site, layer, tuple(sorted(set(positions))), clean_value[site][layer][:, sorted(set(positions))]
            )
            for (site, layer), positions in by_site.items()
        ]
        segments.append(
            engine.Segment(
                start, first, corrupted.kept("resid_pre")[start][:, first:], torch.arange(n_samples), interventions
            )
        )
        owners.append(r)
    # 3. Run them in packs of at most batch_size full prompts' worth of recomputed rows.
    packs = engine.chunk_by_rows(
        list(zip(segments, owners)), lambda item: item[0].n * (n_pos - item[0].first_pos), batch_size * n_pos
    )
    for pack in packs:
        outputs = engine.run(fm, [segment for segment, _ in pack], corrupted)
        pack_scores = score(torch.cat([normed[:, -1] for normed in outputs]))  # one unembedding per pack
        for (_, r), values in zip(pack, pack_scores.split(n_samples)):
            scores[:, r] = values
    return scores


def _restorations_through_hooks(
    model: LoadedModel,
    prepared: PreparedTrace,
    noise: Float[Tensor, "sample subject_pos d_model"],
    restorations: Sequence[Restoration],
    clean: Mapping[str, Float[Tensor, "pos d_model"]] | None,
    hook_names: Sequence[str],
    batch_size: int,
) -> Float[Tensor, "sample restoration"]:
    if clean is None:
        clean, _ = clean_activations(model, prepared, hook_names)
    missing = [n for n in hook_names if n not in clean]
    if missing:
        raise ValueError(f"clean activations are missing for {missing[:4]}")
    device = prepared.tokens.device
    subject = torch.arange(*prepared.subject_span, device=device)
    n_samples, n_restorations = noise.shape[0], len(restorations)
    rows = [(r, s) for r in range(n_restorations) for s in range(n_samples)]
    scores = torch.empty(n_samples, n_restorations)
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        row_sample = torch.tensor([s for _, s in chunk], device=device)
        sites: dict[str, tuple[list[int], list[int]]] = {}
        for row, (r, _) in enumerate(chunk):
            for name, pos in restorations[r].sites:
                rows_at, pos_at = sites.setdefault(name, ([], []))
                rows_at.append(row)
                pos_at.append(pos)
        hooks = [(EMBED_HOOK, _noise_hook(subject, noise[row_sample]))]
        hooks += [
            (name, _restore_hook(torch.tensor(ra, device=device), torch.tensor(pa, device=device), clean[name][pa]))
            for name, (ra, pa) in sites.items()
        ]
        final = final_logits_with_hooks(model, prepared.tokens[None].expand(len(chunk), -1), hooks)
        chunk_scores = score_final_logits(prepared, final).cpu()
        for row, (r, s) in enumerate(chunk):
            scores[s, r] = chunk_scores[row]
    return scores
