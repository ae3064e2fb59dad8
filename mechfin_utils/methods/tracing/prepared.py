"""What every trace and knockout shares: the prompt prepared for one model, its score, windows and backend.

Causal tracing (:mod:`mechfin_utils.methods.tracing.causal_trace`) and attention knockout
(:mod:`mechfin_utils.methods.tracing.knockout`) run on the same inputs and measure the same thing. This module
holds that common ground, so both import it and neither imports the other:

* **the prepared prompt**: a :class:`~mechfin_utils.tasks.facts.TraceTask` (what to trace: prompt, subject,
  answer) becomes a :class:`PreparedTrace` for one model through :func:`prepare_trace` -- tokens with the model's
  BOS decision, the subject's token span found from the tokenizer's character offsets, the answer's token id;
* **the score**: :func:`score_final_logits` -- the probability of the answer at the last position, or
  ``logit(answer) - logit(contrast)`` when the task names a contrast (for the fair-lending prompts the paper's
  metric, the log-odds between " Yes" and " No", insensitive to probability mass on other tokens; a
  probability-of-" Yes" variant is one argument away, ``contrast=None``); :func:`score_final_normed` computes
  the same from final-normed residuals on the engine; :func:`clean_scores` scores the clean prompt;
* **the states restored** (``KIND_HOOKS``): ``hidden`` = ``blocks.{l}.hook_resid_post`` (the block's output),
  ``mlp`` = ``blocks.{l}.hook_mlp_out``, ``attn`` = ``blocks.{l}.hook_attn_out``; :func:`check_trace_hooks`
  says which hooks a bridge lacks;
* **windows**: a window of ``w`` layers around ``l`` is ``range(max(0, l - w // 2), min(n_layers, l +
  ceil(w / 2)))`` (:func:`layer_window`, truncated at the ends). ROME used window 10 for MLP/attention in the
  48-layer GPT-2 XL; mlp/attn default here to the same proportion, ``round(n_layers * 10 / 48)``
  (:func:`default_trace_window`: 6 for SmolLM2's 30 layers, 3 for GPT-2 Small's 12). Geva et al. knocked out
  9 of GPT-2 XL's 48 layers; :func:`default_knockout_window` scales that the same way (6 and 2);
* **the backend**: :func:`choose_backend` picks the intervention engine (:mod:`mechfin_utils.core.engine`,
  over the functional model) where it can run the request, else the bridge's hooks (the reference,
  ``backend="bridge"``; both are tested equal). :func:`final_logits_with_hooks` is the bridge's forward pass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.tasks.facts import TraceTask, locate_subject

if TYPE_CHECKING:  # pragma: no cover
    from mechfin_utils.core.engine import ReplaceSite
    from mechfin_utils.core.functional import FunctionalTransformer
    from mechfin_utils.core.models import LoadedModel

TraceKind = Literal["hidden", "mlp", "attn"]
KIND_HOOKS: dict[str, str] = {
    "hidden": "blocks.{layer}.hook_resid_post",
    "mlp": "blocks.{layer}.hook_mlp_out",
    "attn": "blocks.{layer}.hook_attn_out",
}
KIND_LABELS = {"hidden": "hidden state (resid_post)", "mlp": "MLP output", "attn": "attention output"}
EMBED_HOOK = "hook_embed"
SCORES_HOOK = "blocks.{layer}.attn.hook_attn_scores"
ROME_WINDOW_FRACTION = 10 / 48  # window 10 in the 48-layer GPT-2 XL
GEVA_WINDOW_FRACTION = 9 / 48  # window 9 in the 48-layer GPT-2 XL


# ---------------------------------------------------------------------------------------------------------
# The prepared prompt and its score
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedTrace:
    """A :class:`~mechfin_utils.tasks.facts.TraceTask` tokenised for one model."""

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


def score_final_normed(
    fm: FunctionalTransformer, prepared: PreparedTrace, normed: Float[Tensor, "n d_model"]
) -> Float[Tensor, " n"]:
    """:func:`score_final_logits` from final-normed residuals: a logit difference needs two columns of the
    unembedding, a probability all of them (once for all rows: reading the unembedding is the cost)."""
    if prepared.contrast_id is not None:
        return fm.logit_diff(normed, torch.tensor([[prepared.answer_id, prepared.contrast_id]])).float().cpu()
    return score_final_logits(prepared, fm.unembed(normed)).cpu()


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
    """Every hook name tracing and knockout use, for :func:`check_trace_hooks`."""
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


def hook_layer(name: str) -> int | None:
    """The block index of a ``blocks.{l}....`` hook name (None for hooks outside the blocks)."""
    if not name.startswith("blocks."):
        return None
    return int(name.split(".")[1])


# ---------------------------------------------------------------------------------------------------------
# Backends: the engine where it can, the bridge's hooks as the reference
# ---------------------------------------------------------------------------------------------------------


Backend = Literal["auto", "engine", "bridge"]
ENGINE_SITES: dict[str, tuple[ReplaceSite, int]] = {
    "hook_resid_post": ("resid_pre", 1),
    "hook_resid_pre": ("resid_pre", 0),
    "hook_mlp_out": ("mlp_out", 0),
    "hook_attn_out": ("attn_out", 0),
}
"""Bridge hook -> (engine site, layer offset): ``blocks.l.hook_resid_post`` is the stream entering block l + 1."""


def engine_site(name: str) -> tuple[ReplaceSite, int] | None:
    """The engine's (site, layer) for a restoration hook name (``hook_embed`` = the stream entering block 0)."""
    if name == EMBED_HOOK:
        return "resid_pre", 0
    layer = hook_layer(name)
    suffix = name.split(".", 2)[-1] if layer is not None else ""
    if layer is None or suffix not in ENGINE_SITES:
        return None
    site, offset = ENGINE_SITES[suffix]
    return site, layer + offset


def choose_backend(model: LoadedModel, backend: Backend, sites: Iterable[str]) -> FunctionalTransformer | None:
    """The functional model when the engine can run this (``"auto"``/``"engine"``), else None (bridge hooks)."""
    if backend not in ("auto", "engine", "bridge"):
        raise ValueError(f"backend must be 'auto', 'engine' or 'bridge', got {backend!r}")
    if backend == "bridge":
        return None
    from mechfin_utils.core.functional import UnsupportedArchitecture, functional_model

    unsupported = sorted({name for name in sites if engine_site(name) is None})
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


def _accepts_logits_to_keep(model: LoadedModel) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.hf_model.forward).parameters
    except (TypeError, ValueError):
        return False


def final_logits_with_hooks(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[tuple[str, Callable]]
) -> Float[Tensor, "batch d_vocab"]:
    """Run the bridge with hooks and return the last position's logits.

    When the Hugging Face model supports ``logits_to_keep`` only the last position is unembedded (the
    unembedding of a 49k vocabulary is a fifth of SmolLM2's compute); the result is the same.
    """
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    logits = model.bridge.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **kwargs)
    return logits[:, -1, :]


@torch.no_grad()
def clean_scores(model: LoadedModel, prepared: PreparedTrace, backend: Backend = "auto") -> Float[Tensor, " 1"]:
    """The task's score on the clean prompt, computed by the same backend as the runs it is compared with."""
    fm = choose_backend(model, backend, ())
    if fm is None:
        return score_final_logits(prepared, final_logits_with_hooks(model, prepared.tokens[None], [])).cpu()
    return score_final_normed(fm, prepared, fm.record(prepared.tokens[None], keep=()).final_normed)
