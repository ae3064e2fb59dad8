"""Causal tracing (Meng et al. 2022, "ROME"), on the intervention engine.

Causal tracing asks *where* in the network, and *at which token*, the information that produces an answer
is carried. Three runs of the same prompt are compared:

1. **clean**: the ordinary forward pass; it gives the answer with high probability;
2. **corrupted**: Gaussian noise is added to the input embeddings of the *subject* tokens (e.g. "Eiffel
   Tower" in "The Eiffel Tower is located in the city of"), which usually destroys the answer;
3. **corrupted-with-restoration**: the corrupted run again, except that one internal state (the residual
   stream after layer ``l`` at token ``t``; or the MLP output; or the attention output; for MLP and
   attention usually a *window* of layers around ``l``) is overwritten with its value from the clean run.

The *indirect effect* of the restored state is ``score(restored) - score(corrupted)``: how much of the
answer that single state brings back. Averaged over noise samples and over a set of facts, ROME found a
peak at the last subject token in early-middle MLP layers, and a second one at the last token in late
layers.

Attention knockout (Geva et al. 2023), which asks how that information *moves*, is :mod:`mechfin_utils.knockout`;
it shares this module's inputs, windows and scores.

Structure (one function per stage; data and plots in their own modules):

* inputs:      :class:`TraceTask` (what to trace) -> :func:`prepare_trace` -> :class:`PreparedTrace`
               (tokens, subject positions via tokenizer offsets, answer ids); :func:`locate_subject`.
* noise:       :func:`embedding_noise_std`, :func:`sample_subject_noise`.
* clean run:   :func:`clean_activations`.
* generic:     :func:`run_with_restorations` (any batch of restorations, all noise samples); everything else
               is a thin wrapper around it, as in TransformerLens's ``patching.py``. It runs on
               :mod:`mechfin_utils.engine` (a restoration at layer ``l`` and token ``p`` recomputes only
               layers ``>= l`` at positions ``>= p``), with the bridge's hooks as the reference backend
               (``backend="bridge"``; tested equal).
* wrappers:    :func:`causal_trace` (heat maps ``[pos, layer]`` for hidden / mlp / attn),
               :func:`trace_hidden_states`, :func:`trace_mlp_outputs`, :func:`trace_attention_outputs`.
* summaries:   :func:`position_categories`, :func:`average_by_position_category`, :func:`trace_dataset`
               (traces and knockouts of a set of prompts).
* data:        in :mod:`mechfin_utils.trace_data` (the factual prompts, filtered per model with a report of
               what was dropped; the fair-lending pairs as trace tasks).
* plots:       in :mod:`mechfin_utils.trace_plots`.

Choices (documented once here, referred to elsewhere):

* **Noise**: ``noise_multiplier`` (3, as ROME) times the standard deviation of *all entries of the model's
  input embedding matrix* (the table ``hook_embed`` looks up), by default. :func:`embedding_noise_std`
  can instead use a reference set of texts (ROME used the embeddings of its subjects). Noise is added at
  ``hook_embed`` -- the token embedding, before GPT-2 adds its position embedding -- to the subject
  tokens only, with a fixed seed; every restoration of a prompt sees the *same* noise samples, so
  restorations are compared on equal terms.
* **Restored states**: ``hidden`` = ``blocks.{l}.hook_resid_post`` (the block's output), ``mlp`` =
  ``blocks.{l}.hook_mlp_out``, ``attn`` = ``blocks.{l}.hook_attn_out``. A window of ``w`` layers around
  ``l`` is ``range(max(0, l - w // 2), min(n_layers, l + ceil(w / 2)))`` (truncated at the ends).
  ROME used window 10 for MLP/attention in the 48-layer GPT-2 XL; mlp/attn default here to the same
  proportion, ``round(n_layers * 10 / 48)``: 6 for SmolLM2's 30 layers, 3 for GPT-2 Small's 12. Hidden
  states are restored one layer at a time (window 1), as in ROME.
* **Knockout windows**: ``round(n_layers * 9 / 48)`` layers (Geva et al. used 9 of GPT-2 XL's 48), defined
  here beside the tracing window; the rest of knockout's choices are in :mod:`mechfin_utils.knockout`.
* **Score**: probability of the answer token at the last position (facts). For the fair-lending prompts
  the protected-attribute phrase plays the subject and the score is ``logit(" Yes") - logit(" No")``
  (the paper's metric: the log-odds between the two answers, insensitive to probability mass on other
  tokens); a probability-of-" Yes" variant is one argument away (``contrast=None``).
* **Positions**: restorations run from the first subject token on. Earlier positions cannot carry any
  effect -- the noise is added later in the sequence and attention is causal, so their corrupted states
  *equal* their clean ones -- and are left NaN ("not run") unless ``positions="all"`` asks for them.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from mechfin_utils.functional import FunctionalTransformer
    from mechfin_utils.knockout import KnockoutResult
    from mechfin_utils.models import LoadedModel

TraceKind = Literal["hidden", "mlp", "attn"]
KIND_HOOKS: dict[str, str] = {
    "hidden": "blocks.{layer}.hook_resid_post",
    "mlp": "blocks.{layer}.hook_mlp_out",
    "attn": "blocks.{layer}.hook_attn_out",
}
KIND_LABELS = {"hidden": "hidden state (resid_post)", "mlp": "MLP output", "attn": "attention output"}
EMBED_HOOK = "hook_embed"
SCORES_HOOK = "blocks.{layer}.attn.hook_attn_scores"
POSITION_CATEGORIES: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
KNOCKOUT_GROUPS: tuple[str, ...] = ("subject", "non_subject", "last")
ROME_WINDOW_FRACTION = 10 / 48  # window 10 in the 48-layer GPT-2 XL
GEVA_WINDOW_FRACTION = 9 / 48  # window 9 in the 48-layer GPT-2 XL
DEFAULT_NOISE_MULTIPLIER = 3.0
DEFAULT_SEED = 1


# ---------------------------------------------------------------------------------------------------------
# Inputs: what to trace, and where its subject sits
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceTask:
    """One prompt to trace.

    label:    names the row in every error message and figure (e.g. ``"fact 12"``).
    prompt:   the text fed to the model (the model's BOS decision is applied on top).
    subject:  a substring of ``prompt`` whose tokens are corrupted (for facts the subject, for the
              fair-lending prompts the protected-attribute phrase). It must occur exactly once.
    answer:   the token the score is about, one token with its leading space (``" Paris"``, ``" Yes"``).
    contrast: ``None`` -> score = probability of ``answer`` at the last position; a token (``" No"``) ->
              score = ``logit(answer) - logit(contrast)``.
    """

    label: str
    prompt: str
    subject: str
    answer: str
    contrast: str | None = None

    @property
    def score_name(self) -> str:
        if self.contrast is None:
            return f"p({self.answer.strip()})"
        return f"logit({self.answer.strip()}) - logit({self.contrast.strip()})"


@dataclass(frozen=True)
class PreparedTrace:
    """A :class:`TraceTask` tokenised for one model."""

    task: TraceTask
    tokens: Int[Tensor, " pos"]
    str_tokens: tuple[str, ...]
    subject_span: tuple[int, int]  # token positions [start, stop) of the subject (BOS counted)
    answer_id: int
    contrast_id: int | None
    bos_position: int | None  # 0 when the model prepends a BOS token, else None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def subject_positions(self) -> list[int]:
        return list(range(*self.subject_span))

    @property
    def last_position(self) -> int:
        return self.n_tokens - 1


def locate_subject(model: LoadedModel, prompt: str, subject: str, label: str = "prompt") -> tuple[int, int]:
    """Token span ``[start, stop)`` of ``subject`` inside ``prompt``, BOS included in the counting.

    Found from the tokenizer's character offsets: every token whose characters overlap the subject's
    characters belongs to the span (a token like ``" Eiffel"`` carries its leading space, so it overlaps a
    subject that starts at ``E``). The subject must occur exactly once in the prompt; otherwise the error
    names ``label``.
    """
    if not subject:
        raise ValueError(f"{label}: the subject is empty")
    start_char = prompt.find(subject)
    if start_char < 0:
        raise ValueError(f"{label}: subject {subject!r} is not a substring of the prompt {prompt!r}")
    if prompt.find(subject, start_char + 1) >= 0:
        raise ValueError(f"{label}: subject {subject!r} occurs more than once in the prompt {prompt!r}")
    stop_char = start_char + len(subject)
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    expected = model.token_ids(prompt)
    shift = len(expected) - len(ids)
    if expected[shift:] != ids or shift not in (0, 1):
        raise RuntimeError(f"{label}: tokenizer offsets do not match {model.name}'s token_ids for {prompt!r}")
    inside = [i for i, (a, b) in enumerate(offsets) if a < stop_char and b > start_char]
    if not inside:
        raise ValueError(f"{label}: no token of the prompt overlaps subject {subject!r}")
    return inside[0] + shift, inside[-1] + 1 + shift


def prepare_trace(model: LoadedModel, task: TraceTask) -> PreparedTrace:
    """Tokenise a task with the model's BOS decision and locate its subject and answer tokens."""
    start, stop = locate_subject(model, task.prompt, task.subject, task.label)
    ids = model.token_ids(task.prompt)

    def one_token(text: str, what: str) -> int:
        try:
            return model.single_token_id(text)
        except ValueError as err:
            raise ValueError(f"{task.label}: {what} {err}") from None

    answer_id = one_token(task.answer, "answer")
    contrast_id = None if task.contrast is None else one_token(task.contrast, "contrast")
    return PreparedTrace(
        task=task,
        tokens=torch.tensor(ids, dtype=torch.long, device=model.cfg.device),
        str_tokens=tuple(model.tokenizer.decode([i]) for i in ids),
        subject_span=(start, stop),
        answer_id=answer_id,
        contrast_id=contrast_id,
        bos_position=0 if model.prepend_bos else None,
    )


def score_final_logits(
    prepared: PreparedTrace, final_logits: Float[Tensor, "batch d_vocab"]
) -> Float[Tensor, " batch"]:
    """The task's score from last-position logits: p(answer), or logit(answer) - logit(contrast)."""
    final_logits = final_logits.float()
    if prepared.contrast_id is None:
        return final_logits.softmax(dim=-1)[:, prepared.answer_id]
    return final_logits[:, prepared.answer_id] - final_logits[:, prepared.contrast_id]


# ---------------------------------------------------------------------------------------------------------
# Windows and hooks
# ---------------------------------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_trace_window(n_layers: int) -> int:
    """ROME's MLP/attention window (10 of 48 layers) scaled to ``n_layers``: 6 for 30 layers, 3 for 12."""
    return max(1, _round_half_up(n_layers * ROME_WINDOW_FRACTION))


def default_knockout_window(n_layers: int) -> int:
    """Geva et al.'s knockout window (9 of 48 layers) scaled to ``n_layers``: 6 for 30 layers, 2 for 12."""
    return max(1, _round_half_up(n_layers * GEVA_WINDOW_FRACTION))


def layer_window(center: int, window: int, n_layers: int) -> tuple[int, ...]:
    """Layers ``[center - window // 2, center + ceil(window / 2))``, clipped to ``[0, n_layers)``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 <= center < n_layers:
        raise ValueError(f"layer {center} is outside [0, {n_layers})")
    return tuple(range(max(0, center - window // 2), min(n_layers, center + (window + 1) // 2)))


def required_hooks(n_layers: int) -> list[str]:
    """Every hook name this module uses, for :func:`check_trace_hooks`."""
    names = [EMBED_HOOK]
    for layer in range(n_layers):
        names += [template.format(layer=layer) for template in KIND_HOOKS.values()]
        names.append(SCORES_HOOK.format(layer=layer))
    return names


def check_trace_hooks(model: LoadedModel) -> None:
    """Raise, naming them, if the bridge lacks any hook causal tracing or knockout needs."""
    missing = [n for n in required_hooks(model.cfg.n_layers) if n not in model.bridge.hook_dict]
    if missing:
        raise RuntimeError(f"{model.name}: the bridge has no hook(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def _accepts_logits_to_keep(model: LoadedModel) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.hf_model.forward).parameters
    except (TypeError, ValueError):
        return False


def final_logits_with_hooks(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"], fwd_hooks: list[tuple[str, Callable]]
) -> Float[Tensor, "batch d_vocab"]:
    """Run the bridge with hooks and return the last position's logits.

    When the Hugging Face model supports ``logits_to_keep`` only the last position is unembedded (the
    unembedding of a 49k vocabulary is a fifth of SmolLM2's compute); the result is the same.
    """
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    logits = model.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **kwargs)
    return logits[:, -1, :]


# ---------------------------------------------------------------------------------------------------------
# Noise and the clean run
# ---------------------------------------------------------------------------------------------------------


def input_embedding_matrix(model: LoadedModel) -> Float[Tensor, "d_vocab d_model"]:
    """The table ``hook_embed`` looks up (checked against ``hook_embed`` in the tests).

    It is the bridge's (compatibility-mode) weight: for LayerNorm models such as GPT-2 the bridge has
    centred each embedding, which changes nothing downstream (LayerNorm removes the mean) but is the space
    the noise is added in, so its standard deviation is taken here too.
    """
    return model.hf_model.get_input_embeddings().weight


@torch.no_grad()
def embedding_noise_std(model: LoadedModel, reference_texts: Sequence[str] | None = None) -> float:
    """Standard deviation of the input embeddings, the unit of the corrupting noise.

    ``reference_texts=None`` (default): over all entries of the input embedding matrix. Otherwise: over
    the embeddings of the tokens of ``reference_texts`` (e.g. the subjects, as ROME did), each token
    occurrence counted once, BOS excluded.
    """
    table = input_embedding_matrix(model).float()
    if reference_texts is None:
        return float(table.std())
    ids = [i for text in reference_texts for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError("reference_texts produced no tokens")
    return float(table[torch.tensor(ids)].std())


def sample_subject_noise(
    n_samples: int, n_subject_tokens: int, d_model: int, std: float, seed: int = DEFAULT_SEED
) -> Float[Tensor, "sample subject_pos d_model"]:
    """``n_samples`` Gaussian noise draws of standard deviation ``std``, reproducible from ``seed``."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, n_subject_tokens, d_model, generator=generator) * std


@torch.no_grad()
def clean_activations(
    model: LoadedModel, prepared: PreparedTrace, hook_names: Iterable[str]
) -> tuple[dict[str, Float[Tensor, "pos d_model"]], Float[Tensor, " d_vocab"]]:
    """One clean forward: the named activations (batch dim dropped) and the last position's logits."""
    names = sorted(set(hook_names))
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> Tensor:
        store[hook.name] = act[0].detach().clone()
        return act

    logits = final_logits_with_hooks(model, prepared.tokens[None], [(n, keep) for n in names])
    canonical = {name: store[model.bridge.hook_dict[name].name] for name in names}
    return canonical, logits[0]


# ---------------------------------------------------------------------------------------------------------
# The generic restoration run
# ---------------------------------------------------------------------------------------------------------


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


def hook_layer(name: str) -> int | None:
    """The block index of a ``blocks.{l}....`` hook name (None for hooks outside the blocks)."""
    if not name.startswith("blocks."):
        return None
    return int(name.split(".")[1])


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


Backend = Literal["auto", "engine", "bridge"]
ENGINE_SITES: dict[str, tuple[str, int]] = {
    "hook_resid_post": ("resid_pre", 1),
    "hook_resid_pre": ("resid_pre", 0),
    "hook_mlp_out": ("mlp_out", 0),
    "hook_attn_out": ("attn_out", 0),
}
"""Bridge hook -> (engine site, layer offset): ``blocks.l.hook_resid_post`` is the stream entering block l + 1."""


def _engine_site(name: str) -> tuple[str, int] | None:
    """The engine's (site, layer) for a restoration hook name (``hook_embed`` = the stream entering block 0)."""
    if name == EMBED_HOOK:
        return "resid_pre", 0
    layer = hook_layer(name)
    suffix = name.split(".", 2)[-1] if layer is not None else ""
    if layer is None or suffix not in ENGINE_SITES:
        return None
    site, offset = ENGINE_SITES[suffix]
    return site, layer + offset


def _choose_backend(model: LoadedModel, backend: Backend, sites: Iterable[str]) -> FunctionalTransformer | None:
    """The functional model when the engine can run this (``"auto"``/``"engine"``), else None (bridge hooks)."""
    if backend not in ("auto", "engine", "bridge"):
        raise ValueError(f"backend must be 'auto', 'engine' or 'bridge', got {backend!r}")
    if backend == "bridge":
        return None
    from mechfin_utils.functional import UnsupportedArchitecture
    from mechfin_utils.patching import functional_model

    unsupported = sorted({name for name in sites if _engine_site(name) is None})
    try:
        if unsupported:
            raise UnsupportedArchitecture(
                f"the engine restores {sorted(ENGINE_SITES)} and hook_embed, not {unsupported[:3]}"
            )
        return functional_model(model)
    except UnsupportedArchitecture:
        if backend == "engine":
            raise
        return None


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
        :func:`mechfin_utils.engine.run`: the corrupted run is recorded once per noise sample; a
        restoration whose earliest site is in block ``l`` at position ``p`` continues that record from
        block ``l`` and position ``p`` (nothing below or before can differ from it), with its sites as
        :class:`~mechfin_utils.engine.Replace` interventions. GPT-2 and Llama families.
    ``"bridge"``
        The reference: a full forward pass through the bridge per batch of rows, noise added at
        ``hook_embed`` and clean values written by hooks (any architecture the bridge supports).

    ``"auto"`` (default) uses the engine where it can. Both agree to float rounding (tested).

    Args:
        noise: from :func:`sample_subject_noise`, one slice per sample, ``subject_pos`` = number of
            subject tokens.
        restorations: what to restore; ``Restoration(())`` gives the corrupted baseline.
        clean: the bridge backend's clean activations for every hook named (computed when omitted).
        batch_size: rows per forward pass (engine: full-prompt rows' worth of recomputed positions).

    Returns:
        The task score (see :func:`score_final_logits`) per noise sample and restoration.
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
    fm = _choose_backend(model, backend, hook_names)
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
    from mechfin_utils import engine

    # 1. The clean run (the values restored) and the corrupted run per noise sample (the reference that
    #    every restoration continues), from noised input embeddings.
    n_samples, n_pos = noise.shape[0], prepared.n_tokens
    tokens = prepared.tokens[None]
    clean = fm.record(tokens, keep=("resid_pre", "attn_out", "mlp_out"))
    noised = fm.embed(tokens).repeat(n_samples, 1, 1)
    noised[:, prepared.subject_span[0] : prepared.subject_span[1]] += noise.to(noised.dtype)
    corrupted = fm.record(tokens.expand(n_samples, -1), keep=("resid_pre", "k", "v"), embeddings=noised)
    clean_value = {"resid_pre": clean.resid_pre, "attn_out": clean.attn_out, "mlp_out": clean.mlp_out}

    def score(normed: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
        return _score_normed(fm, prepared, normed)

    scores = torch.empty(n_samples, len(restorations))
    scores[:] = score(corrupted.final_normed)[:, None]  # the baseline, and what an empty restoration gives
    # 2. One segment per restoration: from its earliest layer and position, its sites replaced.
    segments, owners = [], []
    for r, restoration in enumerate(restorations):
        if not restoration.sites:
            continue
        by_site: dict[tuple[str, int], list[int]] = {}
        for name, pos in restoration.sites:
            by_site.setdefault(_engine_site(name), []).append(pos)  # type: ignore[arg-type]
        start = min(layer for _, layer in by_site)
        first = min(pos for _, pos in restoration.sites)
        interventions = [
            engine.Replace(
                site, layer, tuple(sorted(set(positions))), clean_value[site][layer][:, sorted(set(positions))]
            )
            for (site, layer), positions in by_site.items()
        ]
        segments.append(
            engine.Segment(start, first, corrupted.resid_pre[start][:, first:], torch.arange(n_samples), interventions)
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


def _score_normed(
    fm: FunctionalTransformer, prepared: PreparedTrace, normed: Float[Tensor, "n d_model"]
) -> Float[Tensor, " n"]:
    """:func:`score_final_logits` from final-normed residuals: a logit difference needs two columns of the
    unembedding, a probability all of them (once for all rows: reading the unembedding is the cost)."""
    if prepared.contrast_id is not None:
        return fm.logit_diff(normed, torch.tensor([[prepared.answer_id, prepared.contrast_id]])).float().cpu()
    return score_final_logits(prepared, fm.unembed(normed)).cpu()


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


# ---------------------------------------------------------------------------------------------------------
# Causal tracing: heat maps [pos, layer]
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TraceResult:
    """One prompt's causal trace for one kind of state.

    ``restored[pos, layer]`` is the score with the state(s) restored at that token and layer (window
    around ``layer`` for mlp/attn), averaged over noise samples; NaN where not run (positions before the
    subject by default, see the module docstring). ``indirect_effect`` subtracts the corrupted score.
    """

    label: str
    model_name: str
    kind: str
    window: int
    str_tokens: tuple[str, ...]
    subject_span: tuple[int, int]
    score_name: str
    clean_score: float
    corrupted_score: float
    restored: Float[np.ndarray, "pos layer"]
    n_samples: int
    noise_std: float
    seconds: float = 0.0

    @property
    def indirect_effect(self) -> Float[np.ndarray, "pos layer"]:
        return self.restored - self.corrupted_score

    @property
    def n_layers(self) -> int:
        return self.restored.shape[1]

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (position, layer) with token, restored score and indirect effect."""
        import pandas as pd

        pos, layer = np.meshgrid(np.arange(self.restored.shape[0]), np.arange(self.n_layers), indexing="ij")
        return pd.DataFrame(
            {
                "label": self.label,
                "kind": self.kind,
                "position": pos.ravel(),
                "token": [self.str_tokens[p] for p in pos.ravel()],
                "layer": layer.ravel(),
                "restored": self.restored.ravel(),
                "indirect_effect": self.indirect_effect.ravel(),
            }
        )


def _trace_positions(prepared: PreparedTrace, positions: str | Sequence[int]) -> list[int]:
    if isinstance(positions, str):
        if positions == "from_subject":
            return list(range(prepared.subject_span[0], prepared.n_tokens))
        if positions == "all":
            return list(range(prepared.n_tokens))
        raise ValueError(f"positions must be 'from_subject', 'all' or a list of ints, got {positions!r}")
    out = sorted(set(int(p) for p in positions))
    bad = [p for p in out if not 0 <= p < prepared.n_tokens]
    if bad:
        raise ValueError(f"{prepared.task.label}: positions {bad} are outside [0, {prepared.n_tokens})")
    return out


def causal_trace(
    model: LoadedModel,
    task: TraceTask | PreparedTrace,
    kinds: Sequence[TraceKind] = ("hidden", "mlp", "attn"),
    windows: Mapping[str, int] | None = None,
    n_samples: int = 10,
    noise_std: float | None = None,
    noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
    seed: int = DEFAULT_SEED,
    positions: str | Sequence[int] = "from_subject",
    batch_size: int = 256,
    backend: Backend = "auto",
) -> dict[str, TraceResult]:
    """ROME's causal trace of one prompt: a ``[pos, layer]`` heat map per kind of state.

    All kinds share one corrupted baseline and one set of noise samples and run in the same batches.

    Args:
        kinds: any of ``"hidden"``, ``"mlp"``, ``"attn"``.
        windows: layers restored together per kind; default 1 for hidden, :func:`default_trace_window`
            for mlp and attn.
        n_samples: noise samples averaged (ROME: 10).
        noise_std: the embedding standard deviation (default :func:`embedding_noise_std` of the model);
            the noise is ``noise_multiplier * noise_std``.
        positions: ``"from_subject"`` (default), ``"all"``, or explicit token positions.
        batch_size, backend: see :func:`run_with_restorations`.
    """
    prepared = task if isinstance(task, PreparedTrace) else prepare_trace(model, task)
    n_layers = model.cfg.n_layers
    unknown = [k for k in kinds if k not in KIND_HOOKS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {sorted(KIND_HOOKS)}, got {list(kinds)}")
    win = {k: (1 if k == "hidden" else default_trace_window(n_layers)) for k in kinds}
    win.update({k: int(v) for k, v in (windows or {}).items() if k in kinds})
    if noise_std is None:
        noise_std = embedding_noise_std(model)
    run_positions = _trace_positions(prepared, positions)

    t0 = time.perf_counter()
    noise = sample_subject_noise(
        n_samples, len(prepared.subject_positions), model.cfg.d_model, noise_multiplier * noise_std, seed
    )
    restorations = [Restoration(())]
    index: list[tuple[str, int, int]] = []
    for kind in kinds:
        for pos in run_positions:
            for layer in range(n_layers):
                restorations.append(Restoration.of(kind, layer_window(layer, win[kind], n_layers), [pos]))
                index.append((kind, pos, layer))
    clean_score = float(clean_scores(model, prepared, backend)[0])
    scores = run_with_restorations(model, prepared, noise, restorations, None, batch_size, backend).mean(dim=0)
    seconds = time.perf_counter() - t0

    corrupted = float(scores[0])
    grids = {k: np.full((prepared.n_tokens, n_layers), np.nan) for k in kinds}
    for (kind, pos, layer), value in zip(index, scores[1:].tolist()):
        grids[kind][pos, layer] = value
    return {
        kind: TraceResult(
            label=prepared.task.label,
            model_name=model.name,
            kind=kind,
            window=win[kind],
            str_tokens=prepared.str_tokens,
            subject_span=prepared.subject_span,
            score_name=prepared.task.score_name,
            clean_score=clean_score,
            corrupted_score=corrupted,
            restored=grids[kind],
            n_samples=n_samples,
            noise_std=noise_multiplier * noise_std,
            seconds=seconds,
        )
        for kind in kinds
    }


def trace_hidden_states(model: LoadedModel, task: TraceTask | PreparedTrace, **kwargs) -> TraceResult:
    """Restore the residual stream after each layer at each token (window 1 unless ``windows`` says)."""
    return causal_trace(model, task, kinds=("hidden",), **kwargs)["hidden"]


def trace_mlp_outputs(model: LoadedModel, task: TraceTask | PreparedTrace, **kwargs) -> TraceResult:
    """Restore the MLP outputs in a window of layers around each layer, at each token."""
    return causal_trace(model, task, kinds=("mlp",), **kwargs)["mlp"]


def trace_attention_outputs(model: LoadedModel, task: TraceTask | PreparedTrace, **kwargs) -> TraceResult:
    """Restore the attention outputs in a window of layers around each layer, at each token."""
    return causal_trace(model, task, kinds=("attn",), **kwargs)["attn"]


# ---------------------------------------------------------------------------------------------------------
# Averaging by position category
# ---------------------------------------------------------------------------------------------------------


def position_categories(subject_span: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    """ROME's six token categories for a prompt (a category may be empty).

    first / middle / last subject token; first subsequent token (right after the subject); further
    tokens (between that one and the last); last token. A one-token subject is both the first and the
    last subject token; when the subject ends the prompt, its last token is also the "last token".
    """
    start, stop = subject_span
    if not 0 <= start < stop <= n_tokens:
        raise ValueError(f"subject span {subject_span} does not fit a prompt of {n_tokens} tokens")
    last = n_tokens - 1
    after = [p for p in range(stop, last)]
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, stop - 1)),
        "last subject token": [stop - 1],
        "first subsequent token": after[:1],
        "further tokens": after[1:],
        "last token": [last],
    }


@dataclass
class CategoryAverage:
    """Indirect effect averaged per position category over prompts: ``mean[category, layer]``.

    A prompt contributes to a category when it has tokens there (its own mean over them); ``counts``
    says how many prompts each row averages. Rows with no prompt are NaN.
    """

    kind: str
    model_name: str
    score_name: str
    mean: Float[np.ndarray, "6 layer"]
    counts: Int[np.ndarray, " 6"]
    categories: tuple[str, ...] = POSITION_CATEGORIES
    mean_clean: float = float("nan")
    mean_corrupted: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the categories that hold at least one prompt, their counts and ``[category, layer]`` means
        (empty categories are left out rather than written as NaN)."""
        kept = [i for i, n in enumerate(self.counts) if n > 0]
        return {
            "kind": self.kind,
            "score": self.score_name,
            "categories": [self.categories[i] for i in kept],
            "counts": [int(self.counts[i]) for i in kept],
            "mean": self.mean[kept].tolist(),
            "mean_clean": self.mean_clean,
            "mean_corrupted": self.mean_corrupted,
        }

    def peak(self) -> tuple[str, int, float]:
        """``(category, layer, value)`` of the largest average indirect effect."""
        flat = np.nanargmax(self.mean)
        c, l = np.unravel_index(flat, self.mean.shape)
        return self.categories[c], int(l), float(self.mean[c, l])


def average_by_position_category(results: Sequence[TraceResult]) -> CategoryAverage:
    """Average indirect effects over prompts by position category (all results of one kind and model)."""
    if not results:
        raise ValueError("no trace results to average")
    kinds = {r.kind for r in results}
    models = {r.model_name for r in results}
    layers = {r.n_layers for r in results}
    if len(kinds) > 1 or len(models) > 1 or len(layers) > 1:
        raise ValueError(f"results mix kinds {kinds} / models {models} / layer counts {layers}")
    n_layers = layers.pop()
    sums = np.zeros((len(POSITION_CATEGORIES), n_layers))
    counts = np.zeros(len(POSITION_CATEGORIES), dtype=int)
    for r in results:
        cats = position_categories(r.subject_span, len(r.str_tokens))
        ie = r.indirect_effect
        for c, name in enumerate(POSITION_CATEGORIES):
            pos = cats[name]
            if not pos:
                continue
            block = ie[pos]
            if np.isnan(block).any():
                raise ValueError(f"{r.label}: category {name!r} has positions {pos} that were not traced")
            sums[c] += block.mean(axis=0)
            counts[c] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts[:, None]
    mean[counts == 0] = np.nan
    return CategoryAverage(
        kind=results[0].kind,
        model_name=results[0].model_name,
        score_name=results[0].score_name,
        mean=mean,
        counts=counts,
        mean_clean=float(np.mean([r.clean_score for r in results])),
        mean_corrupted=float(np.mean([r.corrupted_score for r in results])),
    )


@torch.no_grad()
def clean_scores(model: LoadedModel, prepared: PreparedTrace, backend: Backend = "auto") -> Float[Tensor, " 1"]:
    """The task's score on the clean prompt, computed by the same backend as the runs it is compared with."""
    fm = _choose_backend(model, backend, ())
    if fm is None:
        return score_final_logits(prepared, final_logits_with_hooks(model, prepared.tokens[None], [])).cpu()
    return _score_normed(fm, prepared, fm.record(prepared.tokens[None], keep=()).final_normed)


# ---------------------------------------------------------------------------------------------------------
# A whole set
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DatasetTrace:
    """Causal traces and knockouts of a set of prompts, with their averages and timings."""

    model_name: str
    traces: dict[str, list[TraceResult]]
    averages: dict[str, CategoryAverage]
    knockouts: list[KnockoutResult]
    knockout_mean: Float[np.ndarray, "group layer"] | None
    trace_seconds: float
    knockout_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def trace_dataset(
    model: LoadedModel,
    tasks: Sequence[TraceTask | PreparedTrace],
    kinds: Sequence[str] = ("hidden", "mlp", "attn"),
    n_samples: int = 10,
    knockout: bool = True,
    noise_std: float | None = None,
    progress: bool = False,
    **trace_kwargs,
) -> DatasetTrace:
    """Trace every task (and knock out attention), then average by position category.

    Every prompt is prepared first, so a bad row (subject not found, multi-token answer) raises before
    any compute is spent.
    """
    prepared = [t if isinstance(t, PreparedTrace) else prepare_trace(model, t) for t in tasks]
    if noise_std is None:
        noise_std = embedding_noise_std(model)
    traces: dict[str, list[TraceResult]] = {k: [] for k in kinds}
    from mechfin_utils.knockout import attention_knockout, average_knockout

    kos: list[KnockoutResult] = []
    t_trace = t_ko = 0.0
    iterator: Iterable = prepared
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(prepared, desc=f"causal trace ({model.name})")
    for p in iterator:
        t0 = time.perf_counter()
        results = causal_trace(model, p, kinds=kinds, n_samples=n_samples, noise_std=noise_std, **trace_kwargs)
        for kind, result in results.items():
            traces[kind].append(result)
        t_trace += time.perf_counter() - t0
        if knockout:
            t0 = time.perf_counter()
            kos.append(attention_knockout(model, p))
            t_ko += time.perf_counter() - t0
    return DatasetTrace(
        model_name=model.name,
        traces=traces,
        averages={k: average_by_position_category(v) for k, v in traces.items()},
        knockouts=kos,
        knockout_mean=average_knockout(kos) if kos else None,
        trace_seconds=t_trace,
        knockout_seconds=t_ko,
        settings={"n_samples": n_samples, "noise_std": noise_std, "kinds": tuple(kinds), **trace_kwargs},
    )
