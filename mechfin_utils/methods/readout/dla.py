"""Direct logit attribution (DLA) and the logit lens, read at the final position of each prompt.

The task metric is the logit difference ``logit(" Yes") - logit(" No")`` at the final position. The final
residual stream there is a *sum* of what every component wrote into it::

    resid_final = embed + pos_embed + sum_L (attn_out_L + mlp_out_L)
    attn_out_L  = sum_h z_{L,h} @ W_O[L, h]  +  b_O[L]

and the logits are ``final_norm(resid_final) @ W_U + b_U``. The final norm (LayerNorm for GPT-2, RMSNorm for
Llama-style models) is not linear, but once its *scale* is frozen at the value the model actually used for
that prompt (``ln_final.hook_scale`` in the cache), it is: LayerNorm then subtracts the mean over d_model and
divides by the scale, RMSNorm only divides. So each component gets an exact share of the logit difference::

    share(c) = norm_frozen(c) . (W_U[:, yes] - W_U[:, no])

and, with the constant ``b_U[yes] - b_U[no]`` labelled as its own term, the shares add up *exactly* to the
model's logit difference. That is direct logit attribution: it says what each component writes straight
into the answer direction, not what it causes downstream (activation patching answers that).

Conventions carried over from TransformerLens's compatibility mode (``enable_compatibility_mode()`` folds
the norm weights into the following matrices, centres the writing weights and the unembedding, and folds
the value bias into ``b_O``):

* the final norm's own weight and bias live inside ``W_U`` and ``b_U``;
* a head's constant value offset -- its value bias ``b_V`` plus the block's LayerNorm bias read through
  ``W_V`` -- is counted in the layer's attention-bias term, not in the head: every value vector carries
  it and attention weights sum to 1, so it reaches the residual stream whatever the head attends to
  (GPT-2 has it; Llama-style models have none);
* models without biases (SmolLM2, Llama) have a zero attention-bias term and a zero ``b_U``: they are still
  reported, as zeros, so the decomposition has the same shape for every model.

Every analysis here reads only the final position, so it runs the model once with hooks that keep just
the last position of the few activations it needs
(:func:`~mechfin_utils.methods.readout.final_position.run_with_final_position_cache`).

Public functions:

* :func:`logit_lens` -- the accumulated residual stream entering each layer (and after the last), read
  through the final norm onto the answer direction: ``[batch, n_layers + 1]``.
* the token-level logit lens (top tokens, the answers' ranks, probabilities) is
  :func:`mechfin_utils.methods.readout.token_lens.logit_lens_tokens`.
* :func:`layer_decomposition` -- embeddings, each attention layer, each MLP (+ the unembedding bias):
  ``(labels, [batch, n_components])``, summing to the logit difference.
* :func:`head_attribution` -- per-head DLA ``[batch, n_layers, n_heads]`` plus every non-head term (rank the
  heads with :func:`mechfin_utils.methods.readout.heads.top_heads`).
* :func:`over_batches` -- run any of the above over a task set's batches, clean and corrupted separately,
  concatenating per-prompt values (for bootstrap confidence intervals).
* :func:`layer_totals` -- a head attribution regrouped into :func:`layer_decomposition`'s components.
* :func:`term_groups` -- a head attribution summed into heads, MLPs, embeddings and biases.
* :func:`accumulated_from_components` -- the cached-scale logit lens as a running sum of those components.

The summaries over a task set (means with bootstrap intervals per component, per head, per group, and the
paper's claimed signs beside them) are tables for the notebooks: :mod:`mechfin_utils.reporting.readout_tables`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

from mechfin_utils.core.arrays import as_checked_tensor
from mechfin_utils.core.inputs import check_tokens
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.methods.readout.final_position import run_with_final_position_cache

LnMode = Literal["cached", "recompute"]
LabelledValues = tuple[list[str], Float[Tensor, "batch n_components"]]

UNEMBED_BIAS_LABEL = "unembed_bias"
# Residual streams that should be equal are compared with this relative tolerance (float32 sums over
# dozens of components differ from the model's own sum by ~1e-6 relative).
_RECONSTRUCTION_RTOL = 1e-4

# ---------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------


def _check_answer_tokens(
    model: LoadedModel, answer_tokens: Tensor, batch: int, argument: str = "answer_tokens"
) -> Int[Tensor, "batch 2"]:
    """Accept ``[batch, 2]`` or ``[2]`` (broadcast): column 0 counts positive, column 1 negative."""
    if not isinstance(answer_tokens, Tensor):
        answer_tokens = torch.as_tensor(answer_tokens)
    if answer_tokens.ndim == 1 and answer_tokens.shape[0] == 2:
        answer_tokens = answer_tokens.unsqueeze(0).expand(batch, 2)
    if answer_tokens.ndim != 2 or answer_tokens.shape != (batch, 2):
        raise ValueError(
            f"{argument} must be [batch={batch}, 2] (first answer, second answer) or [2]; "
            f"got shape {tuple(answer_tokens.shape)}"
        )
    d_vocab = model.cfg.d_vocab_out if getattr(model.cfg, "d_vocab_out", -1) > 0 else model.cfg.d_vocab
    bad = (answer_tokens < 0) | (answer_tokens >= d_vocab)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{argument}[{row}, {col}] = {int(answer_tokens[row, col])} is outside the vocabulary")
    return answer_tokens.to(device=model.cfg.device, dtype=torch.long)


def _check_ln_mode(ln_mode: str) -> None:
    if ln_mode not in ("cached", "recompute"):
        raise ValueError(f"ln_mode must be 'cached' or 'recompute', got {ln_mode!r}")


# ---------------------------------------------------------------------------------------------------------
# From residual-stream pieces to shares of the logit difference
# ---------------------------------------------------------------------------------------------------------


def answer_direction(model: LoadedModel, answer_tokens: Int[Tensor, "batch 2"]) -> Float[Tensor, "batch d_model"]:
    """The residual direction whose dot product with the normalised stream is the logit difference:
    ``W_U[:, first] - W_U[:, second]`` (one per prompt)."""
    W_U = model.bridge.W_U
    return (W_U[:, answer_tokens[:, 0]] - W_U[:, answer_tokens[:, 1]]).T


def unembed_bias_difference(model: LoadedModel, answer_tokens: Int[Tensor, "batch 2"]) -> Float[Tensor, " batch"]:
    """``b_U[first] - b_U[second]``: the constant part of the logit difference (zeros when there is no b_U).

    With TransformerLens's weight processing this also carries the final norm's bias (GPT-2's ``ln_f.b``
    folded into ``b_U``), so it is not zero for real GPT-2 even though GPT-2's ``lm_head`` has no bias.
    """
    try:
        b_U = model.bridge.b_U
    except AttributeError:
        b_U = None
    if b_U is None:
        return torch.zeros(answer_tokens.shape[0], device=answer_tokens.device)
    return b_U[answer_tokens[:, 0]] - b_U[answer_tokens[:, 1]]


def project_on_answer_direction(
    cache: ActivationCache,
    stack: Float[Tensor, "n_components batch 1 d_model"],
    direction: Float[Tensor, "batch d_model"],
    ln_mode: LnMode = "cached",
) -> Float[Tensor, "batch n_components"]:
    """Put a stack of final-position residual pieces through the final norm and onto the answer direction.

    ``ln_mode="cached"`` freezes the norm at the scale the model used on the full residual stream
    (TransformerLens's ``apply_ln_to_stack``): linear, so the shares of a decomposition add up. Use it for
    DLA and for the layer-by-layer logit difference. ``ln_mode="recompute"`` normalises each piece with
    its own statistics, which is what the model would do if that piece *were* the whole residual stream:
    the classic logit lens, not additive.
    """
    _check_ln_mode(ln_mode)
    normalised = cache.apply_ln_to_stack(stack, layer=None, recompute_ln=(ln_mode == "recompute"))
    return torch.einsum("nbd,bd->bn", normalised[:, :, -1, :], direction)


def _embedding_hooks(model: LoadedModel) -> list[tuple[str, str]]:
    """(label, hook) of the embeddings that are added into the residual stream.

    Only a learned absolute positional embedding (``positional_embedding_type == "standard"``, GPT-2) is
    added to the residual stream; rotary models (SmolLM2) rotate queries and keys instead, and the
    bridge's ``hook_pos_embed`` exists there but never fires.
    """
    hooks = [("embed", "hook_embed")]
    if getattr(model.cfg, "positional_embedding_type", "standard") == "standard":
        hooks.append(("pos_embed", "hook_pos_embed"))
    return hooks


def _check_reconstruction(model: LoadedModel, what: str, parts: Tensor, whole: Tensor) -> None:
    """Raise when a sum of residual pieces is not the residual stream the model actually had."""
    error = (parts - whole).abs().max().item()
    size = whole.abs().max().item()
    if error > _RECONSTRUCTION_RTOL * max(size, 1.0):
        raise RuntimeError(
            f"{model.name}: {what} do not add up to the residual stream (max error {error:.3g} vs size "
            f"{size:.3g}). The architecture writes to the residual stream in a way this decomposition does "
            "not model (e.g. an embedding multiplier or post-norm blocks); its numbers would be wrong."
        )


# ---------------------------------------------------------------------------------------------------------
# The logit lens
# ---------------------------------------------------------------------------------------------------------


def _accumulated_resid(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"]
) -> tuple[list[str], Float[Tensor, "n_layers_plus_1 batch 1 d_model"], ActivationCache, Tensor]:
    n_layers = model.cfg.n_layers
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    hooks += [f"blocks.{n_layers - 1}.hook_resid_post", "ln_final.hook_scale"]
    final_logits, cache = run_with_final_position_cache(model, tokens, hooks)
    labels = [f"{layer}_pre" for layer in range(n_layers)] + ["final_post"]
    stack = torch.stack([cache[name] for name in hooks[:-1]], dim=0)
    return labels, stack, cache, final_logits


@torch.no_grad()
def logit_lens(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
    *,
    ln_mode: LnMode = "cached",
    include_unembed_bias: bool = True,
) -> LabelledValues:
    """The logit difference the residual stream already encodes before each layer (and after the last).

    For each layer L, the residual stream entering it (``blocks.L.hook_resid_pre``), and finally the
    stream after the last layer, is read as if it went straight to the unembedding: final norm, then
    onto ``W_U[:, first] - W_U[:, second]``, plus ``b_U[first] - b_U[second]`` when
    ``include_unembed_bias``. The last column is then exactly the model's logit difference.

    Args:
        ln_mode: ``"cached"`` (default) uses the final norm's scale from the real final residual stream,
            as in TransformerLens tutorials: the columns are then additive (column L+1 minus column L is
            the direct effect of layer L), but early layers look small because the final stream is
            larger than theirs. ``"recompute"`` normalises each layer's stream by its own size, the
            classic logit lens ("what would the model answer if it stopped here").
        include_unembed_bias: add the constant ``b_U`` difference to every column.

    Returns:
        ``(labels, values)``: labels ``["0_pre", ..., f"{n_layers-1}_pre", "final_post"]`` and values
        ``[batch, n_layers + 1]``.
    """
    _check_ln_mode(ln_mode)
    tokens = check_tokens(tokens, model.cfg.d_vocab, model_name=model.name).to(model.cfg.device)
    answers = _check_answer_tokens(model, answer_tokens, tokens.shape[0])
    labels, stack, cache, _ = _accumulated_resid(model, tokens)
    values = project_on_answer_direction(cache, stack, answer_direction(model, answers), ln_mode)
    if include_unembed_bias:
        values = values + unembed_bias_difference(model, answers)[:, None]
    return labels, values


# ---------------------------------------------------------------------------------------------------------
# Direct logit attribution
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def layer_decomposition(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
) -> LabelledValues:
    """Direct logit attribution per layer: each residual-stream writer's share of the logit difference.

    Components (``decompose_resid`` style): ``embed``, ``pos_embed`` (only for models with a learned
    positional embedding), then for each layer ``{L}_attn_out`` (all heads plus the attention bias) and
    ``{L}_mlp_out``, and finally ``unembed_bias`` (``b_U[first] - b_U[second]``, a constant). Each is put
    through the final norm with the scale frozen at the real one (see the module docstring), so::

        values.sum(-1) == the model's logit difference at the final position

    up to float error. Before projecting, the pieces are checked to add up to the model's actual final
    residual stream; an architecture where they do not raises instead of returning wrong numbers.

    Returns:
        ``(labels, values)`` with values ``[batch, n_components]``.
    """
    tokens = check_tokens(tokens, model.cfg.d_vocab, model_name=model.name).to(model.cfg.device)
    answers = _check_answer_tokens(model, answer_tokens, tokens.shape[0])
    n_layers = model.cfg.n_layers
    with_mlp = not model.cfg.attn_only
    embeds = _embedding_hooks(model)
    labelled_hooks = list(embeds)
    for layer in range(n_layers):
        labelled_hooks.append((f"{layer}_attn_out", f"blocks.{layer}.hook_attn_out"))
        if with_mlp:
            labelled_hooks.append((f"{layer}_mlp_out", f"blocks.{layer}.hook_mlp_out"))
    check_hooks = ["blocks.0.hook_resid_pre", f"blocks.{n_layers - 1}.hook_resid_post", "ln_final.hook_scale"]
    _, cache = run_with_final_position_cache(model, tokens, [h for _, h in labelled_hooks] + check_hooks)

    stack = torch.stack([cache[hook] for _, hook in labelled_hooks], dim=0)
    n_embeds = len(embeds)
    _check_reconstruction(model, "the embeddings", stack[:n_embeds].sum(0), cache["blocks.0.hook_resid_pre"])
    _check_reconstruction(
        model, "embeddings + attention + MLP outputs", stack.sum(0), cache[f"blocks.{n_layers - 1}.hook_resid_post"]
    )
    values = project_on_answer_direction(cache, stack, answer_direction(model, answers))
    values = torch.cat([values, unembed_bias_difference(model, answers)[:, None]], dim=1)
    return [label for label, _ in labelled_hooks] + [UNEMBED_BIAS_LABEL], values


@dataclass
class HeadAttribution:
    """Per-head direct logit attribution plus every non-head term, for a batch of prompts.

    heads:        ``[batch, n_layers, n_heads]``: ``norm_frozen(z_{L,h} @ W_O[L, h]) . answer_direction``.
    other_labels: names of the other terms: ``embed``, ``pos_embed`` (if any), then per layer
                  ``{L}_attn_bias`` (``b_O``, which in TransformerLens's processing includes every
                  head's folded value offset; zero for bias-free models) and ``{L}_mlp_out``, then
                  ``unembed_bias``.
    other:        ``[batch, n_other]`` in that order.
    logit_diff:   ``[batch]`` the model's actual logit difference, for checking: ``total`` equals it.
    model_name:   display name of the model the numbers came from.
    """

    heads: Float[Tensor, "batch n_layers n_heads"]
    other_labels: list[str]
    other: Float[Tensor, "batch n_other"]
    logit_diff: Float[Tensor, " batch"]
    model_name: str

    @property
    def total(self) -> Float[Tensor, " batch"]:
        """Sum of all head and non-head terms: equals ``logit_diff`` up to float error."""
        return self.heads.sum(dim=(1, 2)) + self.other.sum(dim=1)

    def __len__(self) -> int:
        return self.heads.shape[0]

    @classmethod
    def concat(cls, parts: Sequence[HeadAttribution]) -> HeadAttribution:
        """Join attributions of several batches along the batch axis (same model, same terms)."""
        if not parts:
            raise ValueError("HeadAttribution.concat needs at least one part")
        for index, part in enumerate(parts):
            if part.other_labels != parts[0].other_labels or part.model_name != parts[0].model_name:
                raise ValueError(f"part {index} has different terms or model than part 0; cannot concatenate")
        return cls(
            heads=torch.cat([p.heads for p in parts]),
            other_labels=list(parts[0].other_labels),
            other=torch.cat([p.other for p in parts]),
            logit_diff=torch.cat([p.logit_diff for p in parts]),
            model_name=parts[0].model_name,
        )


def _attention_bias(model: LoadedModel, layer: int) -> Float[Tensor, " d_model"]:
    """``b_O`` of a layer; zeros for bias-free attention (the bridge exposes None or raises there)."""
    try:
        bias = model.bridge.blocks[layer].attn.b_O
    except AttributeError:
        bias = None
    if bias is None:
        return torch.zeros(model.cfg.d_model, device=model.cfg.device)
    return bias.detach()


def head_results(
    model: LoadedModel, z: Float[Tensor, "batch pos n_heads d_head"], layer: int
) -> Float[Tensor, "batch pos n_heads d_model"]:
    """What each head writes into the residual stream: ``z_h @ W_O[layer, h]``.

    ``z`` is per *query* head. With grouped-query attention (SmolLM2: 9 query heads sharing 3 key/value
    heads) each query head still has its own z and its own slice of ``W_O``; the sharing happens upstream
    (keys and values), so nothing is regrouped here. TransformerLens's bridge does not cache
    ``hook_result`` by default, hence this computation from ``hook_z``. Architectures whose blocks scale
    the attention output (``_result_contribution_scale``) get that scale applied, as the bridge does.
    """
    W_O = model.bridge.blocks[layer].attn.W_O  # [n_heads, d_head, d_model]
    if z.shape[-2:] != W_O.shape[:2]:
        raise RuntimeError(
            f"{model.name} layer {layer}: z has heads x d_head = {tuple(z.shape[-2:])} but W_O is "
            f"{tuple(W_O.shape)}; cannot pair query heads with output weights"
        )
    result = torch.einsum("...hd,hdm->...hm", z, W_O.detach().to(z.dtype))
    scale = getattr(model.bridge.blocks[layer].attn, "_result_contribution_scale", 1.0)
    return result if scale == 1.0 else result * scale


@torch.no_grad()
def head_attribution(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
) -> HeadAttribution:
    """Direct logit attribution per attention head, with every other term kept so the total is exact.

    Each head's output at the final position (from ``hook_z`` and ``W_O``, see :func:`head_results`) goes
    through the final norm with the frozen scale and onto the answer direction. The attention output
    that no head accounts for is the layer's bias ``b_O``; it is computed as ``attn_out - sum(heads)``
    and checked against ``b_O`` (zeros for bias-free models), so a model whose heads do not reproduce its
    attention output raises instead of silently misattributing. Then::

        result.heads.sum((1, 2)) + result.other.sum(1) == result.logit_diff
    """
    tokens = check_tokens(tokens, model.cfg.d_vocab, model_name=model.name).to(model.cfg.device)
    answers = _check_answer_tokens(model, answer_tokens, tokens.shape[0])
    n_layers = model.cfg.n_layers
    with_mlp = not model.cfg.attn_only
    embeds = _embedding_hooks(model)
    hooks = [hook for _, hook in embeds] + ["ln_final.hook_scale"]
    for layer in range(n_layers):
        hooks += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"]
        if with_mlp:
            hooks.append(f"blocks.{layer}.hook_mlp_out")
    hooks.append(f"blocks.{n_layers - 1}.hook_resid_post")
    final_logits, cache = run_with_final_position_cache(model, tokens, hooks)
    direction = answer_direction(model, answers)

    head_stacks, other_labels, other_pieces = [], [label for label, _ in embeds], [cache[h] for _, h in embeds]
    for layer in range(n_layers):
        per_head = head_results(model, cache[f"blocks.{layer}.attn.hook_z"], layer)  # [batch, 1, heads, d_model]
        bias_term = cache[f"blocks.{layer}.hook_attn_out"] - per_head.sum(dim=-2)
        _check_reconstruction(
            model,
            f"layer {layer}'s head outputs + b_O",
            per_head.sum(dim=-2) + _attention_bias(model, layer),
            cache[f"blocks.{layer}.hook_attn_out"],
        )
        head_stacks.append(per_head)
        other_labels.append(f"{layer}_attn_bias")
        other_pieces.append(bias_term)
        if with_mlp:
            other_labels.append(f"{layer}_mlp_out")
            other_pieces.append(cache[f"blocks.{layer}.hook_mlp_out"])

    heads = torch.stack(head_stacks, dim=0)  # [layers, batch, 1, heads, d_model]
    batch, n_heads = heads.shape[1], heads.shape[3]
    flat_heads = heads.permute(0, 3, 1, 2, 4).reshape(n_layers * n_heads, batch, 1, -1)
    head_values = project_on_answer_direction(cache, flat_heads, direction).reshape(batch, n_layers, n_heads)
    other_stack = torch.stack(other_pieces, dim=0)
    _check_reconstruction(
        model,
        "embeddings + heads + attention biases + MLP outputs",
        other_stack.sum(0) + flat_heads.sum(0),
        cache[f"blocks.{n_layers - 1}.hook_resid_post"],
    )
    other_values = project_on_answer_direction(cache, other_stack, direction)
    other_values = torch.cat([other_values, unembed_bias_difference(model, answers)[:, None]], dim=1)
    actual = final_logits.gather(1, answers)
    return HeadAttribution(
        heads=head_values,
        other_labels=other_labels + [UNEMBED_BIAS_LABEL],
        other=other_values,
        logit_diff=actual[:, 0] - actual[:, 1],
        model_name=model.name,
    )


# ---------------------------------------------------------------------------------------------------------
# Over a whole task set
# ---------------------------------------------------------------------------------------------------------


class PromptBatch(Protocol):
    """What :func:`over_batches` reads from a batch (``mechfin_utils.tasks.fair_lending.TaskBatch`` has these)."""

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_tokens: Int[Tensor, "batch 2"]


Result = TypeVar("Result", Tensor, tuple, HeadAttribution)


def _concat_results(results: list, analysis_name: str):
    first = results[0]
    if isinstance(first, HeadAttribution):
        return HeadAttribution.concat(results)
    if isinstance(first, Tensor):
        return torch.cat(results, dim=0)
    if isinstance(first, tuple) and len(first) == 2 and isinstance(first[1], Tensor):
        for index, (labels, _) in enumerate(results):
            if list(labels) != list(first[0]):
                raise ValueError(f"{analysis_name}: batch {index} returned different labels than batch 0")
        return list(first[0]), torch.cat([values for _, values in results], dim=0)
    raise TypeError(f"{analysis_name} returned {type(first).__name__}; over_batches cannot concatenate that")


def over_batches(
    analysis: Callable[[LoadedModel, Tensor, Tensor], Result],
    model: LoadedModel,
    batches: Iterable[PromptBatch],
    runs: Sequence[Literal["clean", "corrupted"]] = ("clean", "corrupted"),
) -> dict[str, Result]:
    """Run one analysis over every batch, clean and corrupted prompts separately, and join per prompt.

    ``analysis`` is any of :func:`logit_lens`, :func:`layer_decomposition`, :func:`head_attribution` (or a
    ``functools.partial`` of one). Batches may have different prompt lengths; results are concatenated
    along the batch axis, in batch order, so row i of ``"clean"`` and of ``"corrupted"`` are the two
    versions of the same prompt pair. The same ``answer_tokens`` (first answer counts positive) are used
    for both runs, so a corrupted prompt that flips the answer shows a negative logit difference.

    Returns:
        ``{"clean": ..., "corrupted": ...}`` (the keys named in ``runs``), each of the analysis's type.
    """
    for run in runs:
        if run not in ("clean", "corrupted"):
            raise ValueError(f"runs may contain 'clean' and 'corrupted', got {run!r}")
    name = str(
        getattr(analysis, "__name__", None) or getattr(getattr(analysis, "func", None), "__name__", repr(analysis))
    )
    collected: dict[str, list] = {run: [] for run in runs}
    for index, batch in enumerate(batches):
        for attribute in ["answer_tokens"] + [f"{run}_tokens" for run in runs]:
            if getattr(batch, attribute, None) is None:
                raise ValueError(f"batch {index} has no {attribute!r}")
        for run in runs:
            collected[run].append(analysis(model, getattr(batch, f"{run}_tokens"), batch.answer_tokens))
    if not collected[runs[0]]:
        raise ValueError("over_batches got no batches")
    return {run: _concat_results(results, name) for run, results in collected.items()}


# ---------------------------------------------------------------------------------------------------------
# Regrouping an attribution: per layer, per kind of term, accumulated
# ---------------------------------------------------------------------------------------------------------


def layer_totals(attribution: HeadAttribution) -> LabelledValues:
    """A :class:`HeadAttribution` regrouped into :func:`layer_decomposition`'s components.

    ``{L}_attn_out`` is the sum of layer L's heads plus its attention-bias term; every other term is
    carried over. Same labels, same order, same values as :func:`layer_decomposition` on the same prompts,
    without a second forward pass; ``values.sum(-1)`` equals ``attribution.logit_diff``.
    """
    by_label = dict(zip(attribution.other_labels, attribution.other.unbind(dim=1)))
    labels, columns = [], []
    for label in attribution.other_labels:
        if label.endswith("_attn_bias"):
            layer = int(label.split("_")[0])
            labels.append(f"{layer}_attn_out")
            columns.append(attribution.heads[:, layer].sum(dim=-1) + by_label[label])
        else:
            labels.append(label)
            columns.append(by_label[label])
    return labels, torch.stack(columns, dim=1)


def term_groups(attribution: HeadAttribution) -> LabelledValues:
    """A :class:`HeadAttribution` summed into five kinds of term, which add up to the logit difference.

    Labels: ``all_heads`` (every head), ``all_mlps`` (every MLP output), ``embeddings`` (token and, if any,
    learned positional embedding), ``attention_biases`` (every layer's ``b_O`` term) and ``unembed_bias``.
    ``values.sum(-1) == attribution.total``: how much of the logit difference the heads carry directly,
    and how much is left to everything else.
    """
    kinds: dict[str, list[int]] = {"all_mlps": [], "embeddings": [], "attention_biases": [], UNEMBED_BIAS_LABEL: []}
    for index, label in enumerate(attribution.other_labels):
        if label.endswith("_mlp_out"):
            kinds["all_mlps"].append(index)
        elif label.endswith("_attn_bias"):
            kinds["attention_biases"].append(index)
        elif label in ("embed", "pos_embed"):
            kinds["embeddings"].append(index)
        elif label == UNEMBED_BIAS_LABEL:
            kinds[UNEMBED_BIAS_LABEL].append(index)
        else:
            raise ValueError(f"term_groups does not know the term {label!r}")
    columns = [attribution.heads.sum(dim=(1, 2))]
    for indices in kinds.values():
        columns.append(attribution.other[:, indices].sum(dim=1) if indices else torch.zeros_like(columns[0]))
    return ["all_heads", *kinds], torch.stack(columns, dim=1)


def accumulated_from_components(labels: Sequence[str], values: Float[Tensor, "batch n_components"]) -> LabelledValues:
    """The cached-scale logit lens as a running sum of :func:`layer_decomposition`'s components.

    With the final norm's scale frozen, the residual stream entering layer L reads as the embeddings, plus
    every attention and MLP output before layer L, plus the constant unembedding bias. So the columns of
    ``logit_lens(..., ln_mode="cached")`` follow from a decomposition without another forward pass.
    Labels and values then match :func:`logit_lens` exactly (``"0_pre"`` ... ``"final_post"``).
    """
    labels = list(labels)
    dtype = values.dtype if isinstance(values, Tensor) and values.is_floating_point() else torch.float32
    values = as_checked_tensor(values, "values", ndim=2, allow_nan=True).to(dtype)  # same dtype as logit_lens returns
    if len(labels) != values.shape[1]:
        raise ValueError(f"got {len(labels)} labels for {values.shape[1]} columns of values")
    if UNEMBED_BIAS_LABEL not in labels or "embed" not in labels:
        raise ValueError("labels must be layer_decomposition's (with 'embed' and 'unembed_bias')")
    column = {label: index for index, label in enumerate(labels)}
    n_layers = sum(label.endswith("_attn_out") for label in labels)
    start = values[:, column["embed"]] + values[:, column[UNEMBED_BIAS_LABEL]]
    if "pos_embed" in column:
        start = start + values[:, column["pos_embed"]]
    running, columns = start, [start]
    for layer in range(n_layers):
        for kind in ("attn_out", "mlp_out"):
            label = f"{layer}_{kind}"
            if label in column:
                running = running + values[:, column[label]]
            elif kind == "attn_out":
                raise ValueError(f"labels have no {label!r}; they must be layer_decomposition's")
        columns.append(running)
    lens_labels = [f"{layer}_pre" for layer in range(n_layers)] + ["final_post"]
    return lens_labels, torch.stack(columns, dim=1)
