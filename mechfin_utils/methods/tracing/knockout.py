"""Attention knockout (Geva et al. 2023, "Dissecting recall of factual associations"), on the intervention engine.

Causal tracing (:mod:`mechfin_utils.methods.tracing.causal_trace`) asks *where* an answer's information sits;
knockout asks how it *moves*. At the last position, the attention scores towards a set of key positions (the
subject's tokens, say) are set to ``-inf`` before the softmax in a window of layers, so nothing flows along those
edges there; the relative change of the answer's score measures how much the prediction needed that flow. It
shares tracing's prepared prompts, scores, windows and backends (:mod:`mechfin_utils.methods.tracing.prepared`).

* **Window**: ``round(n_layers * 9 / 48)`` layers around each layer (Geva et al. used 9 of GPT-2 XL's 48): 6 for
  SmolLM2, 2 for GPT-2 Small (:func:`~mechfin_utils.methods.tracing.prepared.default_knockout_window`).
* **Groups**: ``subject`` (the subject's tokens), ``non_subject`` (every other position except the last and a
  prepended BOS, which is an attention sink rather than content) and ``last`` (the last position attending to
  itself).
* **Effect**: the relative change of the score, ``(score_knockout - score_clean) / score_clean``.
* **Engine**: each knockout is one :class:`~mechfin_utils.core.engine.BlockAttention` per layer, continuing the clean
  run from the window's first layer and from the query's position (nothing else can change); the bridge's hook
  on ``blocks.{l}.attn.hook_attn_scores`` is the reference backend (``backend="bridge"``; tested equal, and
  against Hugging Face's own attention mask edited by hand).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.methods.tracing.prepared import (
    SCORES_HOOK,
    Backend,
    PreparedTrace,
    choose_backend,
    default_knockout_window,
    final_logits_with_hooks,
    layer_window,
    prepare_trace,
    score_final_logits,
    score_final_normed,
)
from mechfin_utils.tasks.facts import TraceTask

if TYPE_CHECKING:  # pragma: no cover
    from mechfin_utils.core.models import LoadedModel

KNOCKOUT_GROUPS: tuple[str, ...] = ("subject", "non_subject", "last")


@dataclass(frozen=True)
class Knockout:
    """Block attention from ``query`` to each of ``keys`` in every head of ``layers``. Empty = no block."""

    layers: tuple[int, ...]
    query: int
    keys: tuple[int, ...]
    label: str = ""


@torch.no_grad()
def run_with_knockouts(
    model: LoadedModel,
    prepared: PreparedTrace,
    knockouts: Sequence[Knockout],
    batch_size: int = 256,
    backend: Backend = "auto",
) -> Float[Tensor, " knockout"]:
    """Score the clean prompt under each knockout.

    The blocked ``(query, key)`` attention scores are set to ``-inf`` before the softmax, so they carry
    exactly zero weight and the other keys share the attention. A knockout that would leave its query no key
    at all is an error (the softmax would be undefined). Backends as in :func:`run_with_restorations`: on the
    engine each knockout is a :class:`~mechfin_utils.core.engine.BlockAttention` per layer, continuing the
    clean run from its first layer and from its query position (only the query's row can change); through
    the bridge, a hook on ``blocks.{l}.attn.hook_attn_scores`` (pre-softmax, causal mask applied).
    """
    n_layers, n_tokens = model.cfg.n_layers, prepared.n_tokens
    for ko in knockouts:
        if any(not 0 <= l < n_layers for l in ko.layers):
            raise ValueError(f"{prepared.task.label}: knockout {ko.label!r} names layers outside [0, {n_layers})")
        if not 0 <= ko.query < n_tokens:
            raise ValueError(f"{prepared.task.label}: knockout {ko.label!r} query {ko.query} outside the prompt")
        if any(not 0 <= k <= ko.query for k in ko.keys):
            raise ValueError(
                f"{prepared.task.label}: knockout {ko.label!r} keys {ko.keys} must lie in [0, query={ko.query}]"
            )
        if ko.layers and len(set(ko.keys)) == ko.query + 1:
            raise ValueError(f"{prepared.task.label}: knockout {ko.label!r} blocks every key of query {ko.query}")
    fm = choose_backend(model, backend, ())
    if fm is None:
        return _knockouts_through_hooks(model, prepared, knockouts, batch_size)
    from mechfin_utils.core import engine

    clean = fm.record(prepared.tokens[None], keep=("resid_pre", "k", "v"))
    scores = torch.empty(len(knockouts))
    scores[:] = float(score_final_normed(fm, prepared, clean.final_normed)[0])
    active = [i for i, ko in enumerate(knockouts) if ko.layers and ko.keys]
    for begin in range(0, len(active), batch_size):
        chunk = active[begin : begin + batch_size]
        segments = []
        for i in chunk:
            ko = knockouts[i]
            start = min(ko.layers)
            blocks = [engine.BlockAttention(layer, (ko.query,), tuple(ko.keys)) for layer in sorted(set(ko.layers))]
            segments.append(
                engine.Segment(
                    start,
                    ko.query,
                    clean.kept("resid_pre")[start][:, ko.query :],
                    torch.zeros(1, dtype=torch.long),
                    blocks,
                )
            )
        normed = torch.cat([out[:, -1] for out in engine.run(fm, segments, clean)])
        scores[chunk] = score_final_normed(fm, prepared, normed)
    return scores


def _knockouts_through_hooks(
    model: LoadedModel, prepared: PreparedTrace, knockouts: Sequence[Knockout], batch_size: int
) -> Float[Tensor, " knockout"]:
    n_tokens, device = prepared.n_tokens, prepared.tokens.device

    def make_block(mask: Tensor) -> Callable:
        def block(scores_: Float[Tensor, "batch head q k"], hook) -> Tensor:
            return scores_.masked_fill(mask[:, None, :, :], float("-inf"))

        return block

    scores = torch.empty(len(knockouts))
    for begin in range(0, len(knockouts), batch_size):
        chunk = list(range(begin, min(begin + batch_size, len(knockouts))))
        masks: dict[int, Tensor] = {}
        for row, i in enumerate(chunk):
            ko = knockouts[i]
            if not ko.keys:
                continue
            for layer in ko.layers:
                mask = masks.setdefault(layer, torch.zeros(len(chunk), n_tokens, n_tokens, dtype=torch.bool))
                mask[row, ko.query, list(ko.keys)] = True
        hooks = [(SCORES_HOOK.format(layer=layer), make_block(mask.to(device))) for layer, mask in masks.items()]
        final = final_logits_with_hooks(model, prepared.tokens[None].expand(len(chunk), -1), hooks)
        scores[chunk] = score_final_logits(prepared, final).cpu()
    return scores


def knockout_groups(prepared: PreparedTrace) -> dict[str, list[int]]:
    """Key positions per knockout group (see the module docstring): subject, non_subject, last."""
    last = prepared.last_position
    subject = [p for p in prepared.subject_positions if p != last]
    skip = set(prepared.subject_positions) | {last}
    if prepared.bos_position is not None:
        skip.add(prepared.bos_position)
    return {
        "subject": subject,
        "non_subject": [p for p in range(prepared.n_tokens) if p not in skip],
        "last": [last],
    }


@dataclass
class KnockoutResult:
    """Relative change of the score when the last position cannot attend to a group, per window centre.

    ``relative_change[group, layer] = (score_knockout - score_clean) / score_clean`` with the window of
    layers around ``layer``. For a probability score, -0.4 means the answer lost 40% of its probability.
    """

    label: str
    model_name: str
    window: int
    groups: tuple[str, ...]
    group_positions: dict[str, list[int]]
    score_name: str
    clean_score: float
    knocked_out: Float[np.ndarray, "group layer"]
    seconds: float = 0.0

    @property
    def relative_change(self) -> Float[np.ndarray, "group layer"]:
        return (self.knocked_out - self.clean_score) / self.clean_score


def attention_knockout(
    model: LoadedModel,
    task: TraceTask | PreparedTrace,
    window: int | None = None,
    groups: Sequence[str] = KNOCKOUT_GROUPS,
    batch_size: int = 256,
    backend: Backend = "auto",
) -> KnockoutResult:
    """Geva et al.'s attention knockout of one prompt: for each group and each layer ``l``, block the last
    position's attention to the group in the window around ``l``; score relative to the clean run."""
    prepared = task if isinstance(task, PreparedTrace) else prepare_trace(model, task)
    n_layers = model.cfg.n_layers
    window = default_knockout_window(n_layers) if window is None else int(window)
    positions = knockout_groups(prepared)
    unknown = [g for g in groups if g not in positions]
    if unknown:
        raise ValueError(f"unknown knockout group(s) {unknown}; choose from {list(positions)}")
    empty = [g for g in groups if not positions[g]]
    if empty:
        raise ValueError(f"{prepared.task.label}: knockout group(s) {empty} have no positions in this prompt")
    t0 = time.perf_counter()
    last = prepared.last_position
    knockouts = [Knockout((), last, (), "clean")]
    for g in groups:
        for layer in range(n_layers):
            knockouts.append(Knockout(layer_window(layer, window, n_layers), last, tuple(positions[g]), f"{g}@{layer}"))
    scores = run_with_knockouts(model, prepared, knockouts, batch_size, backend)
    return KnockoutResult(
        label=prepared.task.label,
        model_name=model.name,
        window=window,
        groups=tuple(groups),
        group_positions={g: positions[g] for g in groups},
        score_name=prepared.task.score_name,
        clean_score=float(scores[0]),
        knocked_out=scores[1:].reshape(len(groups), n_layers).numpy(),
        seconds=time.perf_counter() - t0,
    )


def average_knockout(results: Sequence[KnockoutResult]) -> Float[np.ndarray, "group layer"]:
    """Mean relative change over prompts (all results must share model, groups and window)."""
    if not results:
        raise ValueError("no knockout results to average")
    keys = {(r.model_name, r.groups, r.window, r.knocked_out.shape) for r in results}
    if len(keys) > 1:
        raise ValueError(f"knockout results differ in model/groups/window/shape: {keys}")
    return np.mean([r.relative_change for r in results], axis=0)
