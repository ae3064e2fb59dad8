"""Attention patterns: where each head reads from, and how much the answer position reads from a phrase.

An attention head at query position q mixes the value vectors of key positions k <= q with weights
``pattern[q, k]`` (softmax over k, so each row sums to 1; causal, so ``k > q`` is 0). The task's answer is
produced at the final position, so the row that matters most is the last one: how much the final position
attends to, say, the protected-attribute phrase of the prompt versus everything else.

Attention shows where information *could* flow, not what the model uses: a head can attend strongly to a
token and write nothing useful. Read these patterns next to direct logit attribution and patching.

Public functions:

* :func:`attention_patterns` -- full patterns ``[batch, layer, head, query, key]`` (or chosen heads).
* :func:`attention_to_positions` -- the final position's attention to a set of positions vs the rest,
  ``[batch, layer, head]`` each.
* :func:`phrase_token_positions` / :func:`phrase_position_mask` -- which token positions of a prompt
  spell a phrase (from the tokenizer's character offsets, with the model's BOS decision applied).
* :func:`circuitsvis_html` -- an offline interactive view of one layer's heads, as HTML.
* :func:`final_position_attention_by_token` -- one prompt of any length: the answer position's attention per
  token, averaged over the heads of chosen layers.
* :func:`phrase_attention` -- over a task set's batches: how much the final position attends to each
  pair's protected-attribute phrase (clean prompts) or legitimate-reason phrase (corrupted prompts).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechfin_utils.core.head_labels import head_label
from mechfin_utils.core.inputs import check_tokens
from mechfin_utils.core.models import LoadedModel


def _check_layer(model: LoadedModel, layer: int, argument: str = "layer") -> int:
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"{argument}={layer!r} is not a layer of {model.name} (0..{n_layers - 1})")
    return layer


def _check_head(model: LoadedModel, head: int, argument: str = "head") -> int:
    n_heads = model.cfg.n_heads
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads:
        raise ValueError(f"{argument}={head!r} is not a head of {model.name} (0..{n_heads - 1})")
    return head


def _capture_patterns(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    layers: Sequence[int],
    final_query_only: bool,
) -> dict[int, Float[Tensor, "batch head query key"]]:
    """One forward pass that keeps ``blocks.L.attn.hook_pattern`` for the given layers.

    With ``final_query_only`` only the last query row is kept (``[batch, head, 1, key]``). The pass stops
    after the last layer needed: later layers cannot change earlier patterns.
    """
    store: dict[int, Tensor] = {}

    def keeper(layer: int) -> Callable:
        def keep(pattern: Tensor, hook) -> None:
            kept = pattern[:, :, -1:, :] if final_query_only else pattern
            store[layer] = kept.detach().clone()

        return keep

    wanted = sorted(set(layers))
    stop = wanted[-1] + 1
    with torch.no_grad():
        model.bridge.run_with_hooks(
            tokens,
            fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", keeper(layer)) for layer in wanted],
            stop_at_layer=stop if stop < model.cfg.n_layers else None,
        )
    missing = [layer for layer in wanted if layer not in store]
    if missing:
        raise RuntimeError(f"{model.name}: attention patterns of layers {missing} were not produced")
    return store


def attention_patterns(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    layer_heads: Sequence[tuple[int, int]] | None = None,
) -> Float[Tensor, "batch layer head query key"] | Float[Tensor, "batch n_selected query key"]:
    """Attention patterns (softmax weights) of every head, or of chosen heads.

    Args:
        tokens: ``[batch, pos]`` (from ``model.to_tokens``).
        layer_heads: ``None`` for all heads, or a list of ``(layer, head)`` pairs.

    Returns:
        ``[batch, n_layers, n_heads, query, key]`` when ``layer_heads`` is None, else
        ``[batch, len(layer_heads), query, key]`` in the order given. Each query row sums to 1 and is 0
        above the diagonal (a position cannot attend to later ones).
    """
    tokens = check_tokens(tokens, model.cfg.d_vocab, model_name=model.name).to(model.cfg.device)
    if layer_heads is None:
        store = _capture_patterns(model, tokens, range(model.cfg.n_layers), final_query_only=False)
        return torch.stack([store[layer] for layer in range(model.cfg.n_layers)], dim=1)
    pairs = list(layer_heads)
    if not pairs:
        raise ValueError("layer_heads is empty: pass None for all heads, or at least one (layer, head) pair")
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"layer_heads[{index}] = {pair!r} is not a (layer, head) pair")
        _check_layer(model, pair[0], f"layer_heads[{index}] layer")
        _check_head(model, pair[1], f"layer_heads[{index}] head")
    store = _capture_patterns(model, tokens, [layer for layer, _ in pairs], final_query_only=False)
    return torch.stack([store[layer][:, head] for layer, head in pairs], dim=1)


class FinalPositionAttention(NamedTuple):
    """How the final position splits its attention, per prompt, layer and head.

    to_positions: ``[batch, n_layers, n_heads]`` total weight on the chosen positions.
    to_rest:      ``[batch, n_layers, n_heads]`` total weight on all other positions (BOS included, if
                  any: many heads park attention there). ``to_positions + to_rest == 1``.
    """

    to_positions: Float[Tensor, "batch layer head"]
    to_rest: Float[Tensor, "batch layer head"]


def attention_to_positions(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    position_mask: Bool[Tensor, "batch pos"],
) -> FinalPositionAttention:
    """How much the final position of each prompt attends to the masked positions, in every head.

    ``position_mask[i, k]`` marks the positions of interest in prompt i (e.g. the protected-attribute
    tokens, from :func:`phrase_position_mask`). Only the final query row of each pattern is kept, so this
    is cheap in memory for long prompts.
    """
    tokens = check_tokens(tokens, model.cfg.d_vocab, model_name=model.name).to(model.cfg.device)
    if not isinstance(position_mask, Tensor) or position_mask.dtype != torch.bool:
        raise TypeError("position_mask must be a boolean tensor [batch, pos]")
    if position_mask.shape != tokens.shape:
        raise ValueError(
            f"position_mask has shape {tuple(position_mask.shape)} but tokens are {tuple(tokens.shape)}; "
            "they must match"
        )
    empty = (~position_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"position_mask marks no position in row(s) {empty}")
    n_layers = model.cfg.n_layers
    store = _capture_patterns(model, tokens, range(n_layers), final_query_only=True)
    final_row = torch.stack([store[layer][:, :, 0, :] for layer in range(n_layers)], dim=1)  # [b, L, H, key]
    mask = position_mask.to(final_row.device)[:, None, None, :]
    to_positions = (final_row * mask).sum(dim=-1)
    to_rest = (final_row * ~mask).sum(dim=-1)
    return FinalPositionAttention(to_positions=to_positions, to_rest=to_rest)


# ---------------------------------------------------------------------------------------------------------
# Where a phrase sits in a prompt
# ---------------------------------------------------------------------------------------------------------


def final_position_attention_by_layer(
    model: LoadedModel, tokens: Int[Tensor, "1 pos"], layers: Sequence[int]
) -> Float[Tensor, "layer pos"]:
    """Where the answer position looks in each of ``layers``: the final query row of every head, averaged over the
    heads, for one prompt of any length (one forward pass). Each row sums to 1 (an average of softmax rows)."""
    tokens = check_tokens(tokens, model.cfg.d_vocab, model_name=model.name).to(model.cfg.device)
    if tokens.shape[0] != 1:
        raise ValueError(f"tokens must hold one prompt ([1, pos]); got shape {tuple(tokens.shape)}")
    wanted = [_check_layer(model, layer, "layers") for layer in layers]
    if not wanted:
        raise ValueError("layers is empty: give at least one layer")
    store = _capture_patterns(model, tokens, wanted, final_query_only=True)
    return torch.stack([store[layer][0, :, -1, :].mean(dim=0) for layer in wanted])


def final_position_attention_by_token(
    model: LoadedModel, prompt: str, layers: Sequence[int]
) -> tuple[list[str], Float[Tensor, " pos"]]:
    """Where the answer position looks, token by token: :func:`final_position_attention_by_layer` averaged over
    ``layers``, for one prompt of any length.

    Returns ``(str_tokens, weights)``; ``weights`` sums to 1. Position 0 often collects attention that carries no
    information (an "attention sink"); it is included, not hidden.
    """
    weights = final_position_attention_by_layer(model, model.to_tokens(prompt), layers).mean(dim=0)
    return model.to_str_tokens(prompt), weights


def top_attended_tokens(
    model: LoadedModel, prompt: str, layers: Sequence[int], k: int = 3
) -> list[tuple[int, str, float]]:
    """The ``k`` tokens the answer position attends to most (:func:`final_position_attention_by_token`), as
    ``(position, token, weight)``, largest first, among the positions between the first (the usual attention
    sink) and the answer position itself (which mostly attends to itself): the content it reads from."""
    tokens, weights = final_position_attention_by_token(model, prompt, layers)
    if len(tokens) < 3:
        raise ValueError(f"prompt {prompt!r} has {len(tokens)} tokens: nothing between the first and the last")
    order = (weights[1:-1].argsort(descending=True)[:k] + 1).tolist()
    return [(i, tokens[i], float(weights[i])) for i in order]


def _occurrences(text: str, phrase: str) -> list[int]:
    starts, start = [], text.find(phrase)
    while start != -1:
        starts.append(start)
        start = text.find(phrase, start + 1)
    return starts


def phrase_token_positions(
    model: LoadedModel,
    prompt: str,
    phrase: str,
    *,
    occurrence: int | None = None,
    allow_partial_tokens: bool = False,
) -> list[int]:
    """The token positions (as in ``model.to_tokens(prompt)``) that spell ``phrase`` inside ``prompt``.

    The phrase is located as characters in the prompt, then mapped to tokens with the tokenizer's
    character offsets: every token overlapping the phrase is returned. A prepended BOS token (GPT-2)
    shifts all positions by one; this is applied, so the result indexes ``model.to_tokens`` directly.

    Args:
        occurrence: which occurrence to take (0-based) when the phrase appears several times; required
            then, because guessing would silently pick the wrong tokens.
        allow_partial_tokens: by default a token that reaches outside the phrase with anything but
            whitespace (the phrase cuts through a token, e.g. ``"Black"`` in ``"Blackstone"``) is an
            error; set True to accept such tokens.

    Raises:
        ValueError naming the prompt and phrase when the phrase is absent, ambiguous, or cuts a token.
    """
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"phrase must be a non-empty string, got {phrase!r} (prompt {prompt!r})")
    starts = _occurrences(prompt, phrase)
    if not starts:
        raise ValueError(f"phrase {phrase!r} does not occur in prompt {prompt!r}")
    if occurrence is None:
        if len(starts) > 1:
            raise ValueError(
                f"phrase {phrase!r} occurs {len(starts)} times in prompt {prompt!r}; "
                f"pass occurrence=0..{len(starts) - 1}"
            )
        occurrence = 0
    if not 0 <= occurrence < len(starts):
        raise ValueError(
            f"occurrence={occurrence} but phrase {phrase!r} occurs {len(starts)} time(s) in prompt {prompt!r}"
        )
    begin = starts[occurrence]
    end = begin + len(phrase)

    encoding = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    model_ids = model.token_ids(prompt)
    shift = len(model_ids) - len(ids)
    if shift not in (0, 1) or model_ids[shift:] != ids:
        raise RuntimeError(
            f"{model.name}: the tokenizer's offsets tokenisation of prompt {prompt!r} does not match "
            "model.token_ids; cannot map characters to positions"
        )
    positions = []
    for index, (token_begin, token_end) in enumerate(offsets):
        if token_end <= token_begin or token_end <= begin or token_begin >= end:
            continue
        outside = prompt[token_begin : max(token_begin, begin)] + prompt[min(token_end, end) : token_end]
        if outside.strip() and not allow_partial_tokens:
            raise ValueError(
                f"phrase {phrase!r} in prompt {prompt!r} cuts through token {index + shift} "
                f"({prompt[token_begin:token_end]!r}); pass allow_partial_tokens=True to include it anyway"
            )
        positions.append(index + shift)
    if not positions:
        raise ValueError(f"no token of prompt {prompt!r} covers phrase {phrase!r}")
    return positions


def phrase_position_mask(
    model: LoadedModel,
    prompts: Sequence[str],
    phrases: str | Sequence[str],
    *,
    allow_partial_tokens: bool = False,
) -> Bool[Tensor, "batch pos"]:
    """A ``[batch, pos]`` mask of the positions of ``phrases[i]`` in ``prompts[i]`` (for
    :func:`attention_to_positions`). One phrase string applies to every prompt. Prompts must have equal
    token length (as for ``model.to_tokens``); each phrase must occur exactly once in its prompt."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts = list(prompts)
    phrase_list = [phrases] * len(prompts) if isinstance(phrases, str) else list(phrases)
    if len(phrase_list) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(phrase_list)} phrases")
    tokens = model.to_tokens(prompts)  # raises, naming rows, on unequal lengths
    mask = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    for row, (prompt, phrase) in enumerate(zip(prompts, phrase_list)):
        try:
            positions = phrase_token_positions(model, prompt, phrase, allow_partial_tokens=allow_partial_tokens)
        except ValueError as error:
            raise ValueError(f"row {row}: {error}") from error
        mask[row, positions] = True
    return mask


# ---------------------------------------------------------------------------------------------------------
# Over a task set
# ---------------------------------------------------------------------------------------------------------

_PHRASE_OF_RUN = {"clean": "protected_phrase", "corrupted": "legitimate_phrase"}


class PhraseAttention(NamedTuple):
    """Attention from the final position to a phrase, one row per prompt pair.

    to_phrase:    ``[n_pairs, n_layers, n_heads]`` total attention weight on the phrase's tokens (the rest,
                  BOS included, gets ``1 - to_phrase``).
    phrase_share: ``[n_pairs]`` the fraction of the prompt's positions the phrase occupies: what a head that
                  spread its attention evenly over the prompt would put on it. A head well above it singles
                  the phrase out.
    pair_ids, bases: per row, the pair's id and prohibited basis (for per-basis breakdowns).
    run:          ``"clean"`` (protected-attribute phrase) or ``"corrupted"`` (legitimate-reason phrase).
    """

    to_phrase: Float[Tensor, "n_pairs layer head"]
    phrase_share: Float[Tensor, " n_pairs"]
    pair_ids: list[str]
    bases: list[str]
    run: str


def phrase_attention(
    model: LoadedModel,
    batches: Iterable,
    run: Literal["clean", "corrupted"] = "clean",
) -> PhraseAttention:
    """How much the final position attends to the phrase that differs between the two prompts of each pair.

    For ``run="clean"`` the prompt is the clean one and the phrase its ``protected_phrase`` (e.g. "because
    she is Black"); for ``"corrupted"``, the corrupted prompt and its ``legitimate_phrase`` ("because of bad
    credit"). Each batch is one forward pass (:func:`attention_to_positions`); rows come in batch order, so
    they line up with :func:`mechfin_utils.methods.readout.dla.over_batches` on the same batches.

    Args:
        batches: task batches (``mechfin_utils.tasks.fair_lending.TaskBatch``: ``clean_tokens``,
            ``corrupted_tokens`` and ``pairs`` with the two phrases).
    """
    if run not in _PHRASE_OF_RUN:
        raise ValueError(f"run must be 'clean' or 'corrupted', got {run!r}")
    phrase_field = _PHRASE_OF_RUN[run]
    to_phrase, shares, pair_ids, bases = [], [], [], []
    for index, batch in enumerate(batches):
        pairs = list(getattr(batch, "pairs", None) or [])
        tokens = getattr(batch, f"{run}_tokens", None)
        if tokens is None or not pairs or len(pairs) != tokens.shape[0]:
            raise ValueError(f"batch {index} needs {run}_tokens and one pair per row (got {len(pairs)} pairs)")
        prompts = [pair.texts[0 if run == "clean" else 1] for pair in pairs]
        found = [getattr(pair, phrase_field, None) for pair in pairs]
        phrases = [phrase for phrase in found if phrase is not None]
        if len(phrases) != len(found):
            row = found.index(None)
            raise ValueError(
                f"batch {index} row {row} (pair {pairs[row].id}) has no {phrase_field}: phrase_attention needs "
                "fair-lending pairs"
            )
        try:
            mask = phrase_position_mask(model, prompts, phrases)
        except ValueError as error:
            raise ValueError(f"batch {index} ({run}): {error}") from error
        if mask.shape != tokens.shape or not torch.equal(model.to_tokens(prompts).cpu(), tokens.cpu()):
            raise ValueError(f"batch {index}: {run}_tokens are not the tokens of its pairs' {run} prompts")
        to_phrase.append(attention_to_positions(model, tokens, mask).to_positions.cpu())
        shares.append(mask.sum(dim=1).float().cpu() / mask.shape[1])
        pair_ids += [pair.id for pair in pairs]
        bases += [pair.basis for pair in pairs]
    if not to_phrase:
        raise ValueError("phrase_attention got no batches")
    return PhraseAttention(torch.cat(to_phrase), torch.cat(shares), pair_ids, bases, run)


# ---------------------------------------------------------------------------------------------------------
# Interactive view
# ---------------------------------------------------------------------------------------------------------


def circuitsvis_html(
    model: LoadedModel,
    prompt: str,
    layer: int,
    heads: Sequence[int] | None = None,
) -> str:
    """An interactive CircuitsVis view of one layer's attention heads, as self-contained offline HTML.

    Uses CircuitsVis's ``attention_heads`` view (one thumbnail per head, labelled like ``"L10H7"``,
    click to enlarge) and its ``local_src``, which inlines the JavaScript bundle. (``str()`` of a
    CircuitsVis object loads the bundle from a CDN, which renders blank offline.) A header names the
    model, the layer and the heads. Display in Jupyter with ``IPython.display.HTML(...)`` or write it to a
    ``.html`` file.
    """
    import circuitsvis.attention

    _check_layer(model, layer)
    chosen = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    if not chosen:
        raise ValueError("heads is empty: pass None for all heads of the layer")
    for index, head in enumerate(chosen):
        _check_head(model, head, f"heads[{index}]")
    tokens = model.to_tokens(prompt)
    patterns = attention_patterns(model, tokens, [(layer, head) for head in chosen])[0]  # [heads, q, k]
    view = circuitsvis.attention.attention_heads(
        attention=patterns.cpu().float(),
        tokens=model.to_str_tokens(prompt),
        attention_head_names=[head_label(layer, head) for head in chosen],
    )
    head_text = "all heads" if heads is None else "heads " + ", ".join(str(h) for h in chosen)
    header = (
        f'<div class="mechfin-attention-header"><h3>{html.escape(model.name)}: attention, layer {layer}, '
        f"{head_text}</h3><p>Prompt: <code>{html.escape(prompt)}</code></p></div>\n"
    )
    return header + view.local_src
