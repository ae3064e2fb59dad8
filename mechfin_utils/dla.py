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
the last position of the few activations it needs (:func:`run_with_final_position_cache`): what is stored
is O(batch x layers x d_model), not O(batch x pos x ...) as with a full ``run_with_cache``.

Public functions:

* :func:`logit_lens` -- the accumulated residual stream entering each layer (and after the last), read
  through the final norm onto the answer direction: ``[batch, n_layers + 1]``.
* the token-level logit lens (top tokens, the answers' ranks, probabilities) is
  :func:`mechfin_utils.projection.logit_lens_tokens`.
* :func:`layer_decomposition` -- embeddings, each attention layer, each MLP (+ the unembedding bias):
  ``(labels, [batch, n_components])``, summing to the logit difference.
* :func:`head_attribution` -- per-head DLA ``[batch, n_layers, n_heads]`` plus every non-head term.
* :func:`top_heads` -- the k largest heads as ``("L.H", value)``.
* :func:`over_batches` -- run any of the above over a task set's batches, clean and corrupted separately,
  concatenating per-prompt values (for bootstrap confidence intervals).
* :func:`layer_totals` -- a head attribution regrouped into :func:`layer_decomposition`'s components.
* :func:`term_groups` -- a head attribution summed into heads, MLPs, embeddings and biases.
* :func:`accumulated_from_components` -- the cached-scale logit lens as a running sum of those components.

Summaries over a task set (means with bootstrap intervals, resampling prompts):

* :func:`ci_table` -- the generic one: per component, mean, interval and the sign the interval supports;
* :func:`paired_ci_table` -- clean, corrupted and their per-pair gap side by side;
* :func:`head_table` -- chosen or top heads of a ``[batch, n_layers, n_heads]`` array, with ranks;
* :func:`grouped_ci_table` -- the same within groups of prompts (e.g. per prohibited basis);
* :func:`compare_with_paper` -- the paper's claimed signs (:mod:`mechfin_utils.paper_claims`, GPT-2 Small
  only) next to this run's intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

from mechfin_utils.inputs import check_tokens
from mechfin_utils.models import LoadedModel
from mechfin_utils.paper_claims import Sign

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
# The one forward pass every analysis shares
# ---------------------------------------------------------------------------------------------------------


def _position_axis(hook_name: str) -> int:
    """Which axis of a hook's activation is the (query) position."""
    if hook_name.endswith("hook_pattern") or hook_name.endswith("hook_attn_scores"):
        return 2  # [batch, head, query_pos, key_pos]
    return 1  # [batch, pos, ...]


def run_with_final_position_cache(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"], hook_names: Sequence[str]
) -> tuple[Float[Tensor, "batch d_vocab"], ActivationCache]:
    """Run the model once and keep only the final position of each named hook.

    This is ``run_with_cache(names_filter=...)`` with the position axis cut down to the last position as
    soon as each activation is produced, so nothing of size ``pos`` is stored. The returned
    :class:`ActivationCache` holds each activation with a position axis of length 1 (``[batch, 1, ...]``;
    ``[batch, head, 1, key_pos]`` for attention patterns), which is what TransformerLens's cache methods
    such as ``apply_ln_to_stack`` expect. Returns the final-position logits too.

    Every name must be a hook of the model (TransformerLens names work: ``blocks.3.hook_attn_out``).
    """
    tokens = check_tokens(tokens, model.cfg.d_vocab, model_name=model.name).to(model.cfg.device)
    hook_dict = model.bridge.hook_dict
    missing = [name for name in hook_names if name not in hook_dict]
    if missing:
        raise KeyError(f"{model.name} has no hook named {missing[0]!r} (asked for {len(missing)} unknown hooks)")
    batch, pos = tokens.shape
    store: dict[str, Tensor] = {}

    def keeper(requested_name: str) -> Callable:
        # The bridge fires aliased hooks under their canonical name, so key by the name we asked for.
        axis = _position_axis(requested_name)

        def keep_final_position(activation: Tensor, hook) -> None:
            if activation.ndim <= axis or activation.shape[axis] != pos:
                raise RuntimeError(
                    f"hook {requested_name!r} gave shape {tuple(activation.shape)}; expected position axis "
                    f"{axis} of length {pos}"
                )
            final = activation.narrow(axis, pos - 1, 1).detach().clone()
            if final.shape[0] != batch:  # e.g. a positional embedding broadcast over the batch
                if final.shape[0] != 1:
                    raise RuntimeError(f"hook {requested_name!r} has batch size {final.shape[0]}, not {batch}")
                final = final.expand(batch, *final.shape[1:]).clone()
            store[requested_name] = final

        return keep_final_position

    with torch.no_grad():
        logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[(name, keeper(name)) for name in hook_names])
    not_fired = [name for name in hook_names if name not in store]
    if not_fired:
        raise RuntimeError(f"hooks {not_fired} did not fire during the forward pass of {model.name}")
    return logits[:, -1, :].detach(), ActivationCache(store, model.bridge)


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


def top_heads(
    values: Float[Tensor, "n_layers n_heads"],
    k: int = 10,
    *,
    order: Literal["abs", "positive", "negative"] = "abs",
) -> list[tuple[str, float]]:
    """The k heads with the largest values, as ``("L.H", value)`` pairs, sorted.

    ``values`` is one number per head (e.g. ``head_attribution(...).heads.mean(0)``). ``order="abs"``
    ranks by magnitude (either sign; the value keeps its sign), ``"positive"`` by largest value
    (pushing toward the first answer), ``"negative"`` by most negative.
    """
    if not isinstance(values, Tensor) or values.ndim != 2:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"values must be [n_layers, n_heads] (average over the batch first, e.g. .mean(0)); got {shape}"
        )
    if order not in ("abs", "positive", "negative"):
        raise ValueError(f"order must be 'abs', 'positive' or 'negative', got {order!r}")
    n_heads = values.shape[1]
    if not isinstance(k, int) or not 1 <= k <= values.numel():
        raise ValueError(f"k must be an integer in [1, {values.numel()}] (the number of heads), got {k!r}")
    flat = values.detach().flatten().float().cpu()
    key = {"abs": flat.abs(), "positive": flat, "negative": -flat}[order]
    chosen = torch.argsort(key, descending=True, stable=True)[:k]
    return [(f"{int(i) // n_heads}.{int(i) % n_heads}", float(flat[i])) for i in chosen]


# ---------------------------------------------------------------------------------------------------------
# Over a whole task set
# ---------------------------------------------------------------------------------------------------------


class PromptBatch(Protocol):
    """What :func:`over_batches` reads from a batch (``mechfin_utils.tasks.TaskBatch`` has these)."""

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
    name = getattr(analysis, "__name__", None) or getattr(getattr(analysis, "func", None), "__name__", repr(analysis))
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
# Summaries over a task set: intervals per component or head, per group, and the paper's claims
# ---------------------------------------------------------------------------------------------------------
#
# Everything above returns one number per prompt and component. The notebooks report averages over the task
# set with percentile-bootstrap intervals (mechfin_utils.stats), resampling *prompts*: all components of a
# prompt stay together, so intervals of different components come from the same resamples.

HeadOrder = Literal["abs", "positive", "negative", "extremes"]


def _as_rows(values, argument: str, ndim: int) -> Tensor:
    """A float tensor of ``ndim`` dimensions on the CPU (numpy and lists are accepted too)."""
    tensor = values.detach() if isinstance(values, Tensor) else torch.as_tensor(values)
    if tensor.ndim != ndim:
        raise ValueError(f"{argument} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    return tensor.to(device="cpu", dtype=torch.float64)


def head_labels(n_layers: int, n_heads: int) -> list[str]:
    """``"L.H"`` labels in the order of ``values.reshape(batch, -1)`` for ``values`` ``[batch, n_layers, n_heads]``."""
    return [f"{layer}.{head}" for layer in range(n_layers) for head in range(n_heads)]


def parse_head(
    label: str | tuple[int, int], n_layers: int | None = None, n_heads: int | None = None
) -> tuple[int, int]:
    """``"10.7"`` (or ``(10, 7)``) -> ``(10, 7)``; with ``n_layers``/``n_heads`` the head must exist in that model."""
    if isinstance(label, (tuple, list)) and len(label) == 2 and all(isinstance(v, int) and v >= 0 for v in label):
        layer, head = int(label[0]), int(label[1])
    else:
        parts = label.strip().split(".") if isinstance(label, str) else []
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise ValueError(f"head label {label!r} is not of the form 'layer.head' (e.g. '10.7') or (layer, head)")
        layer, head = int(parts[0]), int(parts[1])
    if n_layers is not None and layer >= n_layers:
        raise ValueError(f"head {label!r}: layer {layer} does not exist (the model has {n_layers} layers)")
    if n_heads is not None and head >= n_heads:
        raise ValueError(f"head {label!r}: head {head} does not exist (the model has {n_heads} heads per layer)")
    return layer, head


def select_heads(
    per_prompt: Float[Tensor, "batch n_layers n_heads"], heads: Sequence[str]
) -> Float[Tensor, "batch n_selected"]:
    """The columns of the named heads (``"L.H"``), in the order given."""
    per_prompt = _as_rows(per_prompt, "per_prompt", 3)
    _, n_layers, n_heads = per_prompt.shape
    if not len(heads):
        raise ValueError("heads is empty: name at least one head as 'layer.head'")
    pairs = [parse_head(label, n_layers, n_heads) for label in heads]
    return torch.stack([per_prompt[:, layer, head] for layer, head in pairs], dim=1)


def ci_table(
    labels: Sequence[str],
    values: Float[Tensor, "batch n_components"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
):
    """Mean over prompts of each component, with its percentile-bootstrap interval.

    This is the one table every summary below builds on. Rows (prompts) are resampled jointly, so the
    resamples are the same for every component (and for every call with the same ``seed`` and row count).

    Returns:
        A DataFrame indexed by ``labels`` (index name ``component``) with columns ``n`` (prompts), ``mean``,
        ``low``, ``high`` and ``sign``: ``"positive"``/``"negative"`` when the interval excludes 0 on that
        side, ``"unclear"`` when it contains 0.
    """
    import pandas as pd

    from .stats import bootstrap_ci

    values = _as_rows(values, "values", 2)
    labels = [str(label) for label in labels]
    if len(labels) != values.shape[1]:
        raise ValueError(f"got {len(labels)} labels for {values.shape[1]} columns of values")
    if len(set(labels)) != len(labels):
        repeated = next(label for label in labels if labels.count(label) > 1)
        raise ValueError(f"labels repeat {repeated!r}; every component needs its own label")
    result = bootstrap_ci(values.numpy(), n_boot=n_boot, ci=ci, seed=seed)
    low, high = result.low, result.high
    sign = ["positive" if lo > 0 else "negative" if hi < 0 else "unclear" for lo, hi in zip(low, high)]
    return pd.DataFrame(
        {"n": result.n, "mean": result.estimate, "low": low, "high": high, "sign": sign},
        index=pd.Index(labels, name="component"),
    )


def paired_ci_table(
    labels: Sequence[str],
    clean: Float[Tensor, "batch n_components"],
    corrupted: Float[Tensor, "batch n_components"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
):
    """:func:`ci_table` for the clean run, the corrupted run and their per-pair difference, side by side.

    Row ``i`` of ``clean`` and ``corrupted`` must be the two prompts of pair ``i`` (as from
    :func:`over_batches`). The difference ``clean - corrupted`` is taken per pair before resampling (a
    paired bootstrap). Columns: ``n``, then ``clean``, ``clean_low``, ``clean_high`` and the same for
    ``corrupted`` and ``gap``.
    """
    import pandas as pd

    clean = _as_rows(clean, "clean", 2)
    corrupted = _as_rows(corrupted, "corrupted", 2)
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must be paired: same shape"
        )
    parts = []
    for name, values in (("clean", clean), ("corrupted", corrupted), ("gap", clean - corrupted)):
        table = ci_table(labels, values, n_boot=n_boot, ci=ci, seed=seed)[["mean", "low", "high"]]
        parts.append(table.rename(columns={"mean": name, "low": f"{name}_low", "high": f"{name}_high"}))
    out = pd.concat(parts, axis=1)
    out.insert(0, "n", clean.shape[0])
    return out


def head_table(
    per_prompt: Float[Tensor, "batch n_layers n_heads"],
    heads: Sequence[str] | None = None,
    *,
    k: int = 10,
    order: HeadOrder = "abs",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
):
    """Chosen heads with their mean over prompts, bootstrap interval and rank among all heads.

    ``per_prompt`` is one value per prompt and head (``head_attribution(...).heads``, or the attention
    from the final position to a phrase). The heads are the ``heads`` given (``"L.H"``), else the top ``k``
    by the mean under ``order`` (see :func:`top_heads`; ``"extremes"`` takes the ``k`` most positive and
    the ``k`` most negative). ``rank`` is each head's place among all heads under ``order`` (for
    ``"extremes"`` and ``"abs"``: by magnitude), 1 being the top.

    Returns:
        A DataFrame indexed by head label with columns ``layer``, ``head_index``, ``rank`` and those of
        :func:`ci_table`, in the order of selection.
    """
    per_prompt = _as_rows(per_prompt, "per_prompt", 3)
    if order not in ("abs", "positive", "negative", "extremes"):
        raise ValueError(f"order must be 'abs', 'positive', 'negative' or 'extremes', got {order!r}")
    batch, n_layers, n_heads = per_prompt.shape
    mean = per_prompt.mean(0)
    if heads is None:
        if order == "extremes":
            if not isinstance(k, int) or not 1 <= 2 * k <= mean.numel():
                raise ValueError(f"k must be an integer in [1, {mean.numel() // 2}] for order='extremes', got {k!r}")
            chosen = [h for h, _ in top_heads(mean, k, order="positive")]
            chosen += [h for h, _ in reversed(top_heads(mean, k, order="negative"))]
        else:
            chosen = [h for h, _ in top_heads(mean, k, order=order)]
    else:
        chosen = [str(h) for h in heads]
    rank_order = "abs" if order == "extremes" else order
    ranking = [h for h, _ in top_heads(mean, mean.numel(), order=rank_order)]
    rank = {h: i + 1 for i, h in enumerate(ranking)}
    table = ci_table(chosen, select_heads(per_prompt, chosen), n_boot=n_boot, ci=ci, seed=seed)
    table.index.name = "head"
    positions = [parse_head(h) for h in chosen]
    table.insert(0, "rank", [rank[h] for h in chosen])
    table.insert(0, "head_index", [h for _, h in positions])
    table.insert(0, "layer", [layer for layer, _ in positions])
    return table


def grouped_ci_table(
    labels: Sequence[str],
    values: Float[Tensor, "batch n_components"],
    groups: Sequence[str],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
):
    """:func:`ci_table` within each group of prompts (e.g. per prohibited basis), as one long table.

    ``groups[i]`` names the group of row ``i``. Groups come in sorted order; group ``g`` is resampled with
    seed ``seed + g``. A group with a single prompt keeps its value as the mean, with no interval (NaN
    ``low``/``high`` and ``sign`` ``"unclear"``): one observation has no spread to resample.

    Returns:
        Columns ``group``, ``component``, ``n``, ``mean``, ``low``, ``high``, ``sign``; use
        ``.pivot(index="group", columns="component", values="mean")`` for a group x component grid.
    """
    import pandas as pd

    values = _as_rows(values, "values", 2)
    groups = [str(group) for group in groups]
    if len(groups) != values.shape[0]:
        raise ValueError(f"got {len(groups)} groups for {values.shape[0]} rows of values")
    labels = [str(label) for label in labels]
    frames = []
    for index, group in enumerate(sorted(set(groups))):
        rows = torch.tensor([i for i, g in enumerate(groups) if g == group])
        if len(rows) == 1:
            table = pd.DataFrame(
                {"n": 1, "mean": values[rows[0]].numpy(), "low": float("nan"), "high": float("nan"), "sign": "unclear"},
                index=pd.Index(labels, name="component"),
            )
        else:
            table = ci_table(labels, values[rows], n_boot=n_boot, ci=ci, seed=seed + index)
        frames.append(table.reset_index().assign(group=group))
    columns = ["group", "component", "n", "mean", "low", "high", "sign"]
    return pd.concat(frames, ignore_index=True)[columns]


def compare_with_paper(table, claims: dict[str, Sign]):
    """The paper's claimed sign for each component next to this run's mean and interval.

    ``table`` is a :func:`ci_table`/:func:`head_table` result (index: labels; columns ``mean``, ``low``,
    ``high``; a ``rank`` column is carried over when present). ``verdict`` is ``"agrees"`` when this run's
    interval lies on the claimed side of 0, ``"opposite"`` when it lies on the other side, and ``"unclear"``
    when it contains 0.
    """
    import pandas as pd

    rows = []
    for label, claimed in claims.items():
        if claimed not in ("positive", "negative"):
            raise ValueError(f"claim for {label!r} must be 'positive' or 'negative', got {claimed!r}")
        if label not in table.index:
            raise KeyError(f"{label!r} is not in the table (first labels: {list(table.index[:5])})")
        row = table.loc[label]
        observed = "positive" if row["low"] > 0 else "negative" if row["high"] < 0 else "unclear"
        verdict = "unclear" if observed == "unclear" else "agrees" if observed == claimed else "opposite"
        entry = {
            "component": label,
            "paper": claimed,
            "this_run": row["mean"],
            "low": row["low"],
            "high": row["high"],
            "verdict": verdict,
        }
        if "rank" in table.columns:
            entry["rank"] = int(row["rank"])
        rows.append(entry)
    return pd.DataFrame(rows).set_index("component")


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


def component_display_name(label: str) -> str:
    """A label of :func:`layer_decomposition` for figures: ``"3_attn_out"`` -> ``"attn 3"``,
    ``"3_mlp_out"`` -> ``"MLP 3"``, ``"unembed_bias"`` -> ``"unembed bias"``, ``"pos_embed"`` -> ``"pos embed"``."""
    parts = label.split("_")
    if len(parts) == 3 and parts[0].isdigit() and parts[2] == "out" and parts[1] in ("attn", "mlp"):
        return f"{'attn' if parts[1] == 'attn' else 'MLP'} {parts[0]}"
    if label in ("embed", "pos_embed", UNEMBED_BIAS_LABEL):
        return label.replace("_", " ")
    raise ValueError(f"{label!r} is not a component label of layer_decomposition")


def term_groups(attribution: HeadAttribution) -> LabelledValues:
    """A :class:`HeadAttribution` summed into five kinds of term, which add up to the logit difference.

    Labels: ``all_heads`` (every head), ``all_mlps`` (every MLP output), ``embeddings`` (token and, if any,
    learned positional embedding), ``attention_biases`` (every layer's ``b_O`` term) and ``unembed_bias``.
    ``values.sum(-1) == attribution.total``: how much of the logit difference the heads carry directly,
    and how much is left to everything else.
    """
    kinds = {"all_mlps": [], "embeddings": [], "attention_biases": [], UNEMBED_BIAS_LABEL: []}
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
    values = _as_rows(values, "values", 2).to(dtype)  # same dtype as logit_lens returns
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
