"""Causal tracing (Meng et al. 2022, "ROME") and attention knockout (Geva et al. 2023), through the bridge's hooks.

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

Attention knockout asks how information *moves*: at the last position, the attention scores towards a set
of key positions (the subject tokens, say) are set to ``-inf`` before the softmax in a window of layers, so
nothing flows along those edges there; the relative change of the answer probability measures how much
the prediction needed that flow.

Structure (one function per stage; plotting apart, at the end):

* inputs:      :class:`TraceTask` (what to trace) -> :func:`prepare_trace` -> :class:`PreparedTrace`
               (tokens, subject positions via tokenizer offsets, answer ids); :func:`locate_subject`.
* noise:       :func:`embedding_noise_std`, :func:`sample_subject_noise`.
* clean run:   :func:`clean_activations`.
* generic:     :func:`run_with_restorations` (any batch of restorations, all noise samples) and
               :func:`run_with_knockouts` (any batch of attention knockouts). Everything else is a thin
               wrapper around these two, as in TransformerLens's ``patching.py``.
* wrappers:    :func:`causal_trace` (heat maps ``[pos, layer]`` for hidden / mlp / attn),
               :func:`trace_hidden_states`, :func:`trace_mlp_outputs`, :func:`trace_attention_outputs`,
               :func:`attention_knockout`.
* summaries:   :func:`position_categories`, :func:`average_by_position_category`,
               :func:`average_knockout`, :func:`trace_dataset`.
* data:        :func:`load_factual_prompts` (``data/factual_prompts.csv``, filtered for any model with a
               report of what was dropped), :func:`factual_tasks`, :func:`fair_lending_tasks`.
* plots:       :func:`plot_trace_heatmap`, :func:`plot_category_average`, :func:`plot_knockout`.

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
* **Knockout**: scores set to ``-inf`` at ``blocks.{l}.attn.hook_attn_scores`` (pre-softmax, after the
  causal mask), query = last position, all heads, in a window of ``round(n_layers * 9 / 48)`` layers
  (Geva et al. used 9 of GPT-2 XL's 48): 6 for SmolLM2, 2 for GPT-2 Small. Effect = relative change of
  the score, ``(p_knockout - p_clean) / p_clean``. Groups: ``subject`` (the subject tokens),
  ``non_subject`` (every other position except the last and a prepended BOS, which is an attention
  sink rather than content) and ``last`` (the last position attending to itself).
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import plotly.graph_objects as go

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
REPO_ROOT = Path(__file__).resolve().parent.parent
FACTUAL_PROMPTS_CSV = REPO_ROOT / "data" / "factual_prompts.csv"


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
    tokens: Int[Tensor, "pos"]
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


def locate_subject(model: "LoadedModel", prompt: str, subject: str, label: str = "prompt") -> tuple[int, int]:
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


def prepare_trace(model: "LoadedModel", task: TraceTask) -> PreparedTrace:
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


def score_final_logits(prepared: PreparedTrace, final_logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, "batch"]:
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


def check_trace_hooks(model: "LoadedModel") -> None:
    """Raise, naming them, if the bridge lacks any hook causal tracing or knockout needs."""
    missing = [n for n in required_hooks(model.cfg.n_layers) if n not in model.bridge.hook_dict]
    if missing:
        raise RuntimeError(f"{model.name}: the bridge has no hook(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def _accepts_logits_to_keep(model: "LoadedModel") -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.hf_model.forward).parameters
    except (TypeError, ValueError):
        return False


def final_logits_with_hooks(
    model: "LoadedModel", tokens: Int[Tensor, "batch pos"], fwd_hooks: list[tuple[str, Callable]]
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


def input_embedding_matrix(model: "LoadedModel") -> Float[Tensor, "d_vocab d_model"]:
    """The table ``hook_embed`` looks up (checked against ``hook_embed`` in the tests).

    It is the bridge's (compatibility-mode) weight: for LayerNorm models such as GPT-2 the bridge has
    centred each embedding, which changes nothing downstream (LayerNorm removes the mean) but is the space
    the noise is added in, so its standard deviation is taken here too.
    """
    return model.hf_model.get_input_embeddings().weight


@torch.no_grad()
def embedding_noise_std(model: "LoadedModel", reference_texts: Sequence[str] | None = None) -> float:
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
    model: "LoadedModel", prepared: PreparedTrace, hook_names: Iterable[str]
) -> tuple[dict[str, Float[Tensor, "pos d_model"]], Float[Tensor, "d_vocab"]]:
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
    def of(cls, kind: str, layers: Iterable[int], positions: Iterable[int], label: str = "") -> "Restoration":
        if kind not in KIND_HOOKS:
            raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KIND_HOOKS)}")
        template = KIND_HOOKS[kind]
        return cls(tuple((template.format(layer=l), p) for l in layers for p in positions), label)


def hook_layer(name: str) -> int | None:
    """The block index of a ``blocks.{l}....`` hook name (None for hooks outside the blocks)."""
    if not name.startswith("blocks."):
        return None
    return int(name.split(".")[1])


class _ReplayResidual(torch.nn.Module):
    """Stands in for a skipped block: ignores its input and hands on a precomputed residual stream."""

    def __init__(self, residual: Float[Tensor, "batch pos d_model"]):
        super().__init__()
        self.residual = residual
        self.calls = 0

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not isinstance(hidden_states, Tensor) or hidden_states.shape != self.residual.shape:
            raise RuntimeError(
                "layer skipping: a block received an unexpected input "
                f"({type(hidden_states).__name__} {getattr(hidden_states, 'shape', None)}, expected "
                f"{tuple(self.residual.shape)}); run with skip_unchanged_layers=False"
            )
        self.calls += 1
        return self.residual.to(hidden_states.dtype)


@torch.no_grad()
def forward_from_layer(
    model: "LoadedModel",
    tokens: Int[Tensor, "batch pos"],
    start_layer: int,
    resid_pre: Float[Tensor, "batch pos d_model"] | None,
    fwd_hooks: list[tuple[str, Callable]],
) -> Float[Tensor, "batch d_vocab"]:
    """Last-position logits of a forward pass that *starts* at block ``start_layer``.

    Blocks ``0 .. start_layer - 1`` are temporarily replaced by a module that hands on ``resid_pre``
    (the residual stream entering block ``start_layer``, taken from an earlier run) without computing
    anything, so a restoration at layer ``l`` costs ``n_layers - l`` blocks instead of ``n_layers``. The
    blocks are put back afterwards whatever happens. Hooks on skipped blocks do not fire, so none may be
    passed. ``start_layer=0`` is an ordinary forward pass.
    """
    if start_layer == 0:
        return final_logits_with_hooks(model, tokens, fwd_hooks)
    early = [name for name, _ in fwd_hooks if (hook_layer(name) is not None and hook_layer(name) < start_layer)]
    if early:
        raise ValueError(f"hooks {early[:3]} sit in blocks below start_layer={start_layer} and would never fire")
    if resid_pre is None or resid_pre.shape[:2] != tokens.shape:
        raise ValueError(f"resid_pre must be [batch, pos, d_model] matching tokens {tuple(tokens.shape)}")
    blocks = model.bridge.blocks
    originals = [blocks[i] for i in range(start_layer)]
    replays = [_ReplayResidual(resid_pre) for _ in range(start_layer)]
    try:
        for i, replay in enumerate(replays):
            blocks[i] = replay
        logits = final_logits_with_hooks(model, tokens, fwd_hooks)
    finally:
        for i, original in enumerate(originals):
            blocks[i] = original
    if replays[-1].calls != 1:
        raise RuntimeError("layer skipping: the model did not run its blocks through bridge.blocks")
    return logits


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
def run_with_restorations(
    model: "LoadedModel",
    prepared: PreparedTrace,
    noise: Float[Tensor, "sample subject_pos d_model"],
    restorations: Sequence[Restoration],
    clean: Mapping[str, Float[Tensor, "pos d_model"]] | None = None,
    batch_size: int = 256,
    skip_unchanged_layers: bool = True,
) -> Float[Tensor, "sample restoration"]:
    """Score every restoration under every noise sample, many restored copies per forward pass.

    Each row of a batch is one (noise sample, restoration) pair: ``hook_embed`` adds that sample's noise
    to the subject tokens, and each site of the restoration is overwritten with the clean activation.
    Rows are independent (attention never mixes batch rows), so batching changes nothing but speed.

    With ``skip_unchanged_layers`` the corrupted run is first computed once per noise sample, and a
    restoration whose earliest site is in block ``l`` starts from that run's residual stream entering
    block ``l`` (:func:`forward_from_layer`): below ``l`` the row *is* the corrupted run, so recomputing
    it would change nothing. Results equal the plain path up to float rounding (tested).

    Args:
        noise: from :func:`sample_subject_noise`, one slice per sample, ``subject_pos`` = number of
            subject tokens.
        restorations: what to restore per row-group; ``Restoration(())`` gives the corrupted baseline.
        clean: the clean activations for every hook named in the restorations (computed when omitted).
        batch_size: rows per forward pass.

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
    if clean is None:
        clean, _ = clean_activations(model, prepared, hook_names)
    missing = [n for n in hook_names if n not in clean]
    if missing:
        raise ValueError(f"clean activations are missing for {missing[:4]}")

    device = prepared.tokens.device
    noise = noise.to(device=device, dtype=torch.float32)
    subject = torch.arange(*prepared.subject_span, device=device)
    n_samples, n_restorations = noise.shape[0], len(restorations)

    def start_layer(r: Restoration) -> int:
        if not skip_unchanged_layers or not r.sites or any(name == EMBED_HOOK for name, _ in r.sites):
            return 0
        return min(hook_layer(name) for name, _ in r.sites)

    # Rows sorted by the block they may start at; each chunk starts at the earliest block among its rows
    # (a row whose own restoration starts later just recomputes a few corrupted-run blocks).
    starts = [start_layer(r) for r in restorations]
    rows = sorted(
        ((starts[r], r, s) for r, restoration in enumerate(restorations) if restoration.sites for s in range(n_samples))
    )
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    needed = sorted({chunk[0][0] for chunk in chunks if chunk[0][0] > 0})

    # The corrupted run, once per sample: its score and (for skipping) its residual stream per block.
    corrupted_scores = torch.empty(n_samples)
    corrupted_resid: dict[int, Tensor] = {}
    for begin in range(0, n_samples, batch_size):
        samples = torch.arange(begin, min(begin + batch_size, n_samples), device=device)
        store: dict[int, Tensor] = {}

        def keeper(layer: int) -> Callable:
            def keep(act: Tensor, hook) -> Tensor:
                store[layer] = act.detach().clone()
                return act

            return keep

        hooks = [(EMBED_HOOK, _noise_hook(subject, noise[samples]))]
        hooks += [(f"blocks.{layer}.hook_resid_pre", keeper(layer)) for layer in needed]
        final = final_logits_with_hooks(model, prepared.tokens[None].expand(len(samples), -1), hooks)
        corrupted_scores[samples.cpu()] = score_final_logits(prepared, final).cpu()
        for layer, act in store.items():
            corrupted_resid.setdefault(layer, []).append(act)  # type: ignore[attr-defined]
    corrupted_resid = {layer: torch.cat(parts) for layer, parts in corrupted_resid.items()}  # type: ignore[arg-type]

    scores = torch.empty(n_samples, n_restorations)
    for r, restoration in enumerate(restorations):
        if not restoration.sites:
            scores[:, r] = corrupted_scores
    for chunk in chunks:
        first_block = chunk[0][0]
        row_sample = torch.tensor([s for _, _, s in chunk], device=device)
        sites: dict[str, tuple[list[int], list[int]]] = {}
        for row, (_, r, _) in enumerate(chunk):
            for name, pos in restorations[r].sites:
                rows_at, pos_at = sites.setdefault(name, ([], []))
                rows_at.append(row)
                pos_at.append(pos)
        hooks = [
            (name, _restore_hook(torch.tensor(ra, device=device), torch.tensor(pa, device=device), clean[name][pa]))
            for name, (ra, pa) in sites.items()
        ]
        tokens = prepared.tokens[None].expand(len(chunk), -1)
        if first_block == 0:
            noise_hook = (EMBED_HOOK, _noise_hook(subject, noise[row_sample]))
            final = final_logits_with_hooks(model, tokens, [noise_hook] + hooks)
        else:
            final = forward_from_layer(model, tokens, first_block, corrupted_resid[first_block][row_sample], hooks)
        chunk_scores = score_final_logits(prepared, final).cpu()
        for row, (_, r, s) in enumerate(chunk):
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

    def to_frame(self) -> "pd.DataFrame":
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
    model: "LoadedModel",
    task: TraceTask | PreparedTrace,
    kinds: Sequence[TraceKind] = ("hidden", "mlp", "attn"),
    windows: Mapping[str, int] | None = None,
    n_samples: int = 10,
    noise_std: float | None = None,
    noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
    seed: int = DEFAULT_SEED,
    positions: str | Sequence[int] = "from_subject",
    batch_size: int = 256,
    skip_unchanged_layers: bool = True,
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
        batch_size, skip_unchanged_layers: see :func:`run_with_restorations`.
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
    hook_names = {name for r in restorations for name, _ in r.sites}
    clean, clean_logits = clean_activations(model, prepared, hook_names)
    clean_score = float(score_final_logits(prepared, clean_logits[None])[0])
    scores = run_with_restorations(
        model, prepared, noise, restorations, clean, batch_size, skip_unchanged_layers
    ).mean(dim=0)
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


def trace_hidden_states(model: "LoadedModel", task: TraceTask | PreparedTrace, **kwargs) -> TraceResult:
    """Restore the residual stream after each layer at each token (window 1 unless ``windows`` says)."""
    return causal_trace(model, task, kinds=("hidden",), **kwargs)["hidden"]


def trace_mlp_outputs(model: "LoadedModel", task: TraceTask | PreparedTrace, **kwargs) -> TraceResult:
    """Restore the MLP outputs in a window of layers around each layer, at each token."""
    return causal_trace(model, task, kinds=("mlp",), **kwargs)["mlp"]


def trace_attention_outputs(model: "LoadedModel", task: TraceTask | PreparedTrace, **kwargs) -> TraceResult:
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
    counts: Int[np.ndarray, "6"]
    categories: tuple[str, ...] = POSITION_CATEGORIES
    mean_clean: float = float("nan")
    mean_corrupted: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the categories that hold at least one prompt, their counts and ``[category, layer]`` means
        (empty categories are left out rather than written as NaN)."""
        kept = [i for i, n in enumerate(self.counts) if n > 0]
        return {
            "kind": self.kind, "score": self.score_name, "categories": [self.categories[i] for i in kept],
            "counts": [int(self.counts[i]) for i in kept], "mean": self.mean[kept].tolist(),
            "mean_clean": self.mean_clean, "mean_corrupted": self.mean_corrupted,
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


# ---------------------------------------------------------------------------------------------------------
# Attention knockout
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knockout:
    """Block attention from ``query`` to each of ``keys`` in every head of ``layers``. Empty = no block."""

    layers: tuple[int, ...]
    query: int
    keys: tuple[int, ...]
    label: str = ""


@torch.no_grad()
def run_with_knockouts(
    model: "LoadedModel",
    prepared: PreparedTrace,
    knockouts: Sequence[Knockout],
    batch_size: int = 256,
    skip_unchanged_layers: bool = True,
) -> Float[Tensor, "knockout"]:
    """Score the clean prompt under each knockout, many knockouts per forward pass.

    At ``blocks.{l}.attn.hook_attn_scores`` (pre-softmax, causal mask already applied) the blocked
    ``(query, key)`` entries are set to ``-inf``, so after the softmax they carry exactly zero weight and
    the other keys share the attention. A knockout that would leave its query no key at all is an error
    (the softmax would be undefined). With ``skip_unchanged_layers`` a knockout starting at block ``l``
    starts from the clean residual stream entering block ``l`` (see :func:`forward_from_layer`).
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
    device = prepared.tokens.device
    starts = [min(ko.layers) if (skip_unchanged_layers and ko.layers and ko.keys) else 0 for ko in knockouts]
    order = sorted(range(len(knockouts)), key=lambda i: starts[i])
    firsts = {starts[order[b]] for b in range(0, len(order), batch_size)} - {0}
    clean_resid: dict[str, Tensor] = {}
    if firsts:
        clean_resid, _ = clean_activations(model, prepared, {f"blocks.{l}.hook_resid_pre" for l in firsts})

    def make_block(mask: Tensor) -> Callable:
        def block(scores_: Float[Tensor, "batch head q k"], hook) -> Tensor:
            return scores_.masked_fill(mask[:, None, :, :], float("-inf"))

        return block

    scores = torch.empty(len(knockouts))
    order = sorted(range(len(knockouts)), key=lambda i: starts[i])
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        first_block = starts[chunk[0]]
        masks: dict[int, Tensor] = {}
        for row, i in enumerate(chunk):
            ko = knockouts[i]
            if not ko.keys:
                continue
            for layer in ko.layers:
                mask = masks.setdefault(layer, torch.zeros(len(chunk), n_tokens, n_tokens, dtype=torch.bool))
                mask[row, ko.query, list(ko.keys)] = True
        hooks = [(SCORES_HOOK.format(layer=layer), make_block(mask.to(device))) for layer, mask in masks.items()]
        tokens = prepared.tokens[None].expand(len(chunk), -1)
        if first_block == 0:
            final = final_logits_with_hooks(model, tokens, hooks)
        else:
            resid = clean_resid[f"blocks.{first_block}.hook_resid_pre"][None].expand(len(chunk), -1, -1)
            final = forward_from_layer(model, tokens, first_block, resid, hooks)
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
    model: "LoadedModel",
    task: TraceTask | PreparedTrace,
    window: int | None = None,
    groups: Sequence[str] = KNOCKOUT_GROUPS,
    batch_size: int = 256,
    skip_unchanged_layers: bool = True,
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
    scores = run_with_knockouts(model, prepared, knockouts, batch_size, skip_unchanged_layers)
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
    model: "LoadedModel",
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


# ---------------------------------------------------------------------------------------------------------
# Data: factual prompts and the fair-lending pairs
# ---------------------------------------------------------------------------------------------------------

FACT_COLUMNS = ("fact_id", "category", "relation", "subject", "prompt", "answer", "answer_text")


@dataclass
class FactFilterReport:
    """What :func:`load_factual_prompts` kept and dropped for a model, and why."""

    model_name: str
    n_candidates: int
    n_kept: int
    dropped: "pd.DataFrame"  # fact_id, prompt, answer, reason

    def __str__(self) -> str:
        lines = [f"{self.model_name}: kept {self.n_kept} of {self.n_candidates} candidate facts"]
        for row in self.dropped.itertuples():
            lines.append(f"  dropped {row.fact_id}: {row.reason}")
        return "\n".join(lines)


def read_factual_candidates(path: str | Path | None = None) -> "pd.DataFrame":
    """All candidate facts from the CSV, validated (columns, unique ids, subject inside the prompt)."""
    import pandas as pd

    path = Path(path) if path is not None else FACTUAL_PROMPTS_CSV
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in FACT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    dup = frame["fact_id"][frame["fact_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: duplicated fact_id(s) {dup}")
    for row in frame.itertuples():
        if row.subject not in row.prompt:
            raise ValueError(f"{path}: row {row.fact_id}: subject {row.subject!r} is not in prompt {row.prompt!r}")
        if not row.answer.startswith(" ") or not row.answer_text.startswith(row.answer):
            raise ValueError(
                f"{path}: row {row.fact_id}: answer {row.answer!r} must start with a space and begin answer_text "
                f"{row.answer_text!r}"
            )
    return frame


@torch.no_grad()
def filter_facts_for_model(model: "LoadedModel", candidates: "pd.DataFrame") -> tuple["pd.DataFrame", FactFilterReport]:
    """Keep the facts whose answer is one token for ``model`` and is its top-1 next token.

    Returns the kept rows (with the model's top-1 probability added as ``p_answer``) and a report of
    every dropped row with its reason; nothing is dropped silently.
    """
    import pandas as pd

    kept, dropped, p_answer = [], [], []
    for row in candidates.itertuples(index=False):
        try:
            answer_id = model.single_token_id(row.answer)
        except ValueError as err:
            dropped.append((row.fact_id, row.prompt, row.answer, f"answer is not one token: {err}"))
            continue
        logits = model.bridge(model.to_tokens(row.prompt))[0, -1].float()
        top = int(logits.argmax())
        if top != answer_id:
            dropped.append(
                (row.fact_id, row.prompt, row.answer, f"top-1 is {model.tokenizer.decode([top])!r}, not {row.answer!r}")
            )
            continue
        kept.append(row._asdict())
        p_answer.append(float(logits.softmax(-1)[answer_id]))
    kept_frame = pd.DataFrame(kept, columns=list(candidates.columns))
    kept_frame["p_answer"] = p_answer
    report = FactFilterReport(
        model_name=model.name,
        n_candidates=len(candidates),
        n_kept=len(kept_frame),
        dropped=pd.DataFrame(dropped, columns=["fact_id", "prompt", "answer", "reason"]),
    )
    return kept_frame, report


def load_factual_prompts(
    model: "LoadedModel | None" = None, path: str | Path | None = None, verbose: bool = True
) -> tuple["pd.DataFrame", FactFilterReport | None]:
    """The factual prompts, filtered for a model.

    ``model=None``: the rows marked kept for the embedded model (SmolLM2-135M-Instruct) in the CSV,
    without running anything (report ``None``). With a model: every candidate is re-checked for that
    model (single-token answer, top-1 correct), and the report lists what was dropped and why; it is
    printed when ``verbose``. The set is model-specific: GPT-2 keeps a different subset.
    """
    candidates = read_factual_candidates(path)
    if model is None:
        if "kept_smollm2_135m" not in candidates.columns:
            raise ValueError("the CSV has no kept_smollm2_135m column; pass a model to filter for")
        return candidates[candidates["kept_smollm2_135m"] == "True"].reset_index(drop=True), None
    kept, report = filter_facts_for_model(model, candidates)
    if verbose:
        print(f"{report.model_name}: kept {report.n_kept} of {report.n_candidates} candidate facts "
              f"({len(report.dropped)} dropped; see report.dropped)")
    return kept, report


def factual_tasks(frame: "pd.DataFrame") -> list[TraceTask]:
    """:class:`TraceTask` per fact row (score = probability of the answer token)."""
    return [
        TraceTask(label=f"fact {r.fact_id}", prompt=r.prompt, subject=r.subject, answer=r.answer)
        for r in frame.itertuples(index=False)
    ]


def _field(item: Any, name: str, label: str) -> str:
    if isinstance(item, Mapping):
        value = item.get(name)
    else:
        value = getattr(item, name, None)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{label}: needs a non-empty string field {name!r}, got {value!r}")
    return value


def fair_lending_tasks(
    pairs: Iterable[Any] | "pd.DataFrame", score: Literal["logit_diff", "prob"] = "logit_diff"
) -> list[TraceTask]:
    """:class:`TraceTask` per fair-lending pair: the ``protected_phrase`` is the corrupted "subject".

    ``pairs``: :class:`mechfin_utils.tasks.FairLendingPair` objects (or any objects / mappings / DataFrame
    rows with ``clean_prompt`` and ``protected_phrase``; ``pair_id`` or ``id`` names the row when present).
    The answers are the pair's ``clean_answer`` / ``corrupted_answer`` when it has them, else `` Yes`` /
    `` No``. ``score="logit_diff"`` (default, the paper's metric): ``logit(Yes) - logit(No)``;
    ``score="prob"``: the probability of `` Yes``.
    """
    if score not in ("logit_diff", "prob"):
        raise ValueError(f"score must be 'logit_diff' or 'prob', got {score!r}")
    if hasattr(pairs, "to_dict") and hasattr(pairs, "columns"):
        pairs = pairs.to_dict("records")

    def get(item: Any, name: str) -> Any:
        return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)

    tasks = []
    for i, pair in enumerate(pairs):
        ident = get(pair, "pair_id")
        ident = get(pair, "id") if ident is None else ident
        label = f"pair {ident if ident is not None else i}"
        answer = get(pair, "clean_answer") or " Yes"
        contrast = get(pair, "corrupted_answer") or " No"
        tasks.append(
            TraceTask(
                label=label,
                prompt=_field(pair, "clean_prompt", label),
                subject=_field(pair, "protected_phrase", label),
                answer=answer,
                contrast=contrast if score == "logit_diff" else None,
            )
        )
    return tasks


# ---------------------------------------------------------------------------------------------------------
# Plots (plotly figures; every title carries the model's name)
# ---------------------------------------------------------------------------------------------------------


def plot_trace_heatmap(result: TraceResult) -> "go.Figure":
    """ROME-style heat map of one prompt: tokens (subject marked with *) x layers, colour = restored score."""
    import plotly.graph_objects as go

    start, stop = result.subject_span
    labels = [f"{i}: {t!r}{'*' if start <= i < stop else ''}" for i, t in enumerate(result.str_tokens)]
    window = "" if result.window == 1 else f", window {result.window}"
    fig = go.Figure(
        go.Heatmap(
            z=result.restored,
            x=list(range(result.n_layers)),
            y=labels,
            colorscale={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[result.kind],
            colorbar={"title": result.score_name},
            hovertemplate="layer %{x}<br>%{y}<br>restored %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"{result.model_name}: restoring the {KIND_LABELS[result.kind]}{window} - {result.label}<br>"
        f"<sup>clean {result.clean_score:.3f}, corrupted {result.corrupted_score:.3f}; "
        f"{result.n_samples} noise samples, noise std {result.noise_std:.3g}; * = subject (noised)</sup>",
        xaxis_title="layer",
        yaxis={"autorange": "reversed"},
    )
    return fig


def plot_category_average(average: CategoryAverage) -> "go.Figure":
    """Average indirect effect per position category x layer (ROME's summary figure)."""
    import plotly.graph_objects as go

    labels = [f"{c} (n={n})" for c, n in zip(average.categories, average.counts)]
    fig = go.Figure(
        go.Heatmap(
            z=average.mean,
            x=list(range(average.mean.shape[1])),
            y=labels,
            colorscale={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}.get(average.kind, "Viridis"),
            colorbar={"title": "AIE"},
        )
    )
    fig.update_layout(
        title=f"{average.model_name}: average indirect effect of the {KIND_LABELS[average.kind]} "
        f"on {average.score_name}",
        xaxis_title="layer",
        yaxis={"autorange": "reversed"},
    )
    return fig


def plot_knockout(mean_change: Float[np.ndarray, "group layer"], model_name: str, window: int,
                  groups: Sequence[str] = KNOCKOUT_GROUPS) -> "go.Figure":
    """Relative change of the score per knockout group, by window centre (Geva et al.'s figure)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for g, row in zip(groups, np.asarray(mean_change)):
        fig.add_trace(go.Scatter(x=list(range(len(row))), y=100 * row, mode="lines+markers", name=f"last -> {g}"))
    fig.update_layout(
        title=f"{model_name}: attention knockout from the last position (window {window})",
        xaxis_title="window centre layer",
        yaxis_title="% change of the score",
    )
    return fig
