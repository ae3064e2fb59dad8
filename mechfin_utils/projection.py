"""Projection to the unembedding space: reading activations *and weights* as distributions over tokens.

The residual stream of a transformer ends in ``logits = final_norm(resid) @ W_U``. Anything that lives in
the residual stream (the stream itself after some layer, one MLP layer's update, one neuron's output
vector, one head's output) can be pushed through the same map and read as "which tokens would this
promote if it were all the model had". This module does that at the token level:

1. **Logit lens, token level** (nostalgebraist 2020). The accumulated residual stream after each block,
   normalised by the final norm *with its own scale* and multiplied by ``W_U``: the top-k tokens at the last
   position, and the rank and probability of the answer tokens at every layer
   (:func:`logit_lens_tokens`). How far to trust it is measured, not assumed: :func:`logit_lens_agreement`
   gives, per layer, how often the lens's top-1 equals the model's final top-1 (it is poor in early layers).
   (The logit-difference-per-layer curve of the logit lens lives in ``mechfin_utils.dla``.)
2. **FFN value vectors** (Geva et al. 2020, 2022). An MLP layer's output is ``sum_n act_n * W_out[n]``: each
   neuron adds its fixed *value vector* ``W_out[n]`` scaled by its activation. For GPT-2 ``act`` is
   ``GELU(x @ W_in + b_in)``; for the Llama-architecture embedded model the MLP is gated and ``act`` is
   ``SiLU(x @ W_gate) * (x @ W_in)``, the product the bridge exposes as ``blocks.L.mlp.hook_post``; in both
   cases the value vectors are the rows of ``W_out`` (``down_proj``/``c_proj`` in Hugging Face naming).
   :func:`neuron_scores` ranks neurons, :func:`neuron_value_tokens` reads a neuron's value vector through
   ``W_U`` (top and bottom tokens), :func:`neuron_token_coherence` is a simple polysemanticity proxy, read
   against random neurons (:func:`random_neuron_coherence`), not only random tokens.
3. **What each FFN update promotes.** Per layer, the MLP output at the last position projected on the
   answer direction ``W_U[:, yes] - W_U[:, no]`` (:func:`mlp_answer_contributions`), and Geva et al. (2022)'s
   view: the top-k tokens the update promotes (:func:`mlp_update_top_tokens`) and the fraction of them that
   belong to a chosen token set (:func:`fraction_in_token_set`).
4. **Parameters in embedding space** (Dar et al. 2023). A head's OV circuit ``W_E W_V W_O W_U`` and QK circuit
   ``W_E W_Q W_K^T W_E^T`` read as token-to-token maps, restricted to vocabulary subsets and searched
   blockwise for their largest entries (:func:`ov_circuit_top_pairs`, :func:`qk_circuit_top_pairs`);
   a vocab x vocab matrix is never materialised.
5. **Over a task set** (what notebook 07 calls): in :mod:`mechfin_utils.projection_sets`.

Which ``W_U``? The bridge runs in TransformerLens's compatibility mode, which *folds* the final norm's
per-dimension gain (and, for LayerNorm, its bias into ``b_U``) into ``W_U`` and centres ``W_U`` over the
vocabulary; the norm itself is left with weight 1. So ``bridge.W_U`` already applies the final norm's weight:
projecting through it shows what the model would actually do with a (normalised) vector. Centring only adds
the same constant to every token's logit, which changes no ranking, difference or softmax. What is *not* in
``W_U`` is the final norm's data-dependent scale ``1 / RMS(resid)`` (or ``1/std``): a positive number per
position, which changes no ranking but does change magnitudes; functions that report magnitudes say whether
they divide by it. Every projection takes ``through_final_norm_gain`` (default True, the bridge's ``W_U``);
False projects through the token embedding matrix ``W_E^T`` instead, which is the model's own output
embedding *before* the gain was folded in when the model ties its embeddings (GPT-2 and SmolLM2 both do; an
untied model raises). That is the matrix Geva et al. and Dar et al. used for GPT-2. (For LayerNorm models the
bridge also centres ``W_E`` over ``d_model``; this changes nothing for the vectors projected here, whose
d_model mean is zero because the bridge centres every writing weight too.)

Shapes follow TransformerLens: ``W_U [d_model, d_vocab]``, ``W_E [d_vocab, d_model]``, per block
``W_Q [n_heads, d_model, d_head]``, ``W_K``/``W_V [n_kv_heads, d_model, d_head]`` (grouped-query attention: the
embedded model has 9 query heads sharing 3 key/value heads, see :func:`kv_head_of`),
``W_O [n_heads, d_head, d_model]``, ``W_out [d_mlp, d_model]``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.dla import run_with_final_position_cache
from mechfin_utils.inputs import check_tokens
from mechfin_utils.models import LoadedModel

# ---------------------------------------------------------------------------------------------------------
# Shared pieces: which matrices, which tokens, input checks
# ---------------------------------------------------------------------------------------------------------


def unembedding(model: LoadedModel, through_final_norm_gain: bool = True) -> Float[Tensor, "d_model d_vocab"]:
    """The matrix that maps a residual-stream vector to token scores (see the module docstring).

    ``through_final_norm_gain=True``: the bridge's ``W_U``, with the final norm's weight folded in (what the
    model applies). False: ``W_E^T``, the tied output embedding without that weight; raises for a model whose
    input and output embeddings are not tied.
    """
    if through_final_norm_gain:
        return model.bridge.W_U.detach()
    tied = getattr(model.hf_model.config, "tie_word_embeddings", False)
    if not tied:
        raise ValueError(
            f"{model.name} does not tie its input and output embeddings, so W_E^T is not its output embedding "
            "and the final norm's weight cannot be left out this way; use through_final_norm_gain=True"
        )
    return model.bridge.W_E.detach().T


def answer_token_ids(model: LoadedModel, answers: Sequence[str]) -> list[int]:
    """Token ids of answer strings, each of which must be exactly one token (else a ValueError naming it)."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty sequence of strings such as (' Yes', ' No'); got {answers!r}")
    return [model.single_token_id(a) for a in answers]


def decode_each(model: LoadedModel, token_ids: Sequence[int] | Tensor) -> list[str]:
    """Each token id decoded on its own (the string a table shows for that token)."""
    ids = token_ids.tolist() if isinstance(token_ids, Tensor) else list(token_ids)
    return [model.tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def logit_diff_direction(
    model: LoadedModel,
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
    through_final_norm_gain: bool = True,
) -> Float[Tensor, "batch d_model"] | Float[Tensor, " d_model"]:
    """``W_U[:, a] - W_U[:, b]`` for answer pairs ``(a, b)``: dot a residual vector with it to get its logit diff."""
    W_U = unembedding(model, through_final_norm_gain)
    if answer_tokens.shape[-1] != 2 or answer_tokens.ndim not in (1, 2):
        raise ValueError(
            f"answer_tokens must be [batch, 2] or [2] (correct, incorrect); got {tuple(answer_tokens.shape)}"
        )
    answer_tokens = answer_tokens.to(W_U.device)
    return (W_U[:, answer_tokens[..., 0]] - W_U[:, answer_tokens[..., 1]]).T


def kv_head_of(model: LoadedModel, head: int) -> int:
    """The key/value head a query head reads (grouped-query attention); the head itself without GQA.

    Hugging Face repeats each key/value head for ``n_heads // n_kv_heads`` consecutive query heads
    (``repeat_kv``), so query head ``h`` uses key/value head ``h // (n_heads // n_kv_heads)``.
    """
    cfg = model.cfg
    head = _check_index("head", head, cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    if cfg.n_heads % n_kv:
        raise ValueError(f"{model.name}: n_heads={cfg.n_heads} is not a multiple of n_key_value_heads={n_kv}")
    return head // (cfg.n_heads // n_kv)


def _check_index(what: str, value: int, size: int) -> int:
    """``value`` as an int when it is an integer in ``[0, size)``; a ValueError naming ``what`` otherwise."""
    try:
        index = operator.index(value)  # accepts numpy/torch integer scalars, refuses floats and strings
    except TypeError:
        index = None
    if index is None or isinstance(value, bool) or not 0 <= index < size:
        raise ValueError(f"{what} must be an integer in [0, {size}); got {value!r}")
    return index


def _answer_pairs(answer_tokens: Tensor, batch: int) -> Int[Tensor, "batch 2"]:
    if answer_tokens.ndim == 1 and answer_tokens.shape[0] == 2:
        answer_tokens = answer_tokens.expand(batch, 2)
    if answer_tokens.ndim != 2 or answer_tokens.shape != (batch, 2):
        raise ValueError(
            f"answer_tokens must be [batch={batch}, 2] (correct, incorrect) or [2]; got {tuple(answer_tokens.shape)}"
        )
    return answer_tokens


def _final_norm(model: LoadedModel, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The model's final norm applied with the vector's *own* scale (the bridge's, weight already folded)."""
    return model.bridge.ln_final(resid)


def _unembed_bias(model: LoadedModel) -> Float[Tensor, " d_vocab"] | float:
    b_U = getattr(model.bridge, "b_U", None)
    return 0.0 if b_U is None else b_U.detach()


def _centre_if_layernorm(model: LoadedModel, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The part of ``x`` a LayerNorm keeps (it subtracts the mean over d_model first); ``x`` for RMSNorm.

    The bridge already centres every writing weight of LayerNorm models, so this is a no-op there in
    practice; it keeps the projections exact for anything else passed in.
    """
    if str(model.cfg.normalization_type).startswith("LN"):
        return x - x.mean(-1, keepdim=True)
    return x


def _run_last_position(model: LoadedModel, tokens: Tensor, hook_names: Sequence[str]) -> dict[str, Tensor]:
    """One forward pass keeping only the last position of each named hook ([batch, ...] each).

    Uses :func:`mechfin_utils.dla.run_with_final_position_cache`, which never stores other positions.
    """
    check_tokens(tokens, model.cfg.d_vocab, model_name=model.name)
    _, cache = run_with_final_position_cache(model, tokens, list(hook_names))
    return {name: cache[name][:, -1] for name in hook_names}


# ---------------------------------------------------------------------------------------------------------
# Generic machinery on plain tensors (tested against brute force)
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def top_and_bottom_tokens(
    vectors: Float[Tensor, "n d_model"], W_U: Float[Tensor, "d_model d_vocab"], k: int
) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"], Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """Project vectors through ``W_U``; return (top scores, top ids, bottom scores, bottom ids), best first.

    Bottom tokens are listed most negative first.
    """
    if vectors.ndim != 2 or vectors.shape[1] != W_U.shape[0]:
        raise ValueError(f"vectors must be [n, d_model={W_U.shape[0]}]; got {tuple(vectors.shape)}")
    if not 1 <= k <= W_U.shape[1]:
        raise ValueError(f"k must be in [1, d_vocab={W_U.shape[1]}]; got {k}")
    scores = vectors @ W_U
    top = scores.topk(k, dim=-1)
    bottom = scores.topk(k, dim=-1, largest=False)
    return top.values, top.indices, bottom.values, bottom.indices


@torch.no_grad()
def factored_top_pairs(
    left: Float[Tensor, "n_rows rank"],
    right: Float[Tensor, "rank n_cols"],
    k: int,
    largest: bool = True,
    block_rows: int = 256,
) -> tuple[Float[Tensor, " k"], Int[Tensor, " k"], Int[Tensor, " k"]]:
    """The k largest (or smallest) entries of ``left @ right`` without holding the whole product.

    The product is formed ``block_rows`` rows at a time; each block's k best entries are merged into a running
    top-k. Returns (scores, row indices, column indices), best first. Memory is ``block_rows x n_cols``.
    """
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(
            f"left [n_rows, r] and right [r, n_cols] must agree; got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    n_rows, n_cols = left.shape[0], right.shape[1]
    if not 1 <= k <= n_rows * n_cols:
        raise ValueError(f"k must be in [1, n_rows*n_cols={n_rows * n_cols}]; got {k}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1; got {block_rows}")
    best_scores = left.new_empty(0)
    best_flat = torch.empty(0, dtype=torch.long, device=left.device)
    for start in range(0, n_rows, block_rows):
        block = left[start : start + block_rows] @ right
        kb = min(k, block.numel())
        found = block.flatten().topk(kb, largest=largest)
        flat = found.indices + start * n_cols  # index into the full (virtual) product, row-major
        best_scores = torch.cat([best_scores, found.values])
        best_flat = torch.cat([best_flat, flat])
        if best_scores.numel() > k:
            keep = best_scores.topk(k, largest=largest).indices
            best_scores, best_flat = best_scores[keep], best_flat[keep]
    order = best_scores.argsort(descending=largest)
    best_scores, best_flat = best_scores[order], best_flat[order]
    return best_scores, best_flat // n_cols, best_flat % n_cols


def mean_pairwise_cosine(vectors: Float[Tensor, "k d"]) -> float:
    """Average cosine similarity over all distinct pairs of rows (1: all parallel, ~0: unrelated)."""
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(f"need a [k >= 2, d] tensor; got {tuple(vectors.shape)}")
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    sims = unit @ unit.T
    k = vectors.shape[0]
    return float((sims.sum() - sims.diagonal().sum()) / (k * (k - 1)))


# ---------------------------------------------------------------------------------------------------------
# 1. Logit lens, token level
# ---------------------------------------------------------------------------------------------------------


def residual_stream_names(model: LoadedModel) -> list[str]:
    """Hook names of the accumulated residual stream: ``blocks.i.hook_resid_pre`` for i < n_layers, then the
    last block's ``hook_resid_post``. Entry i is the stream after i blocks (entry 0: the embeddings)."""
    n = model.cfg.n_layers
    return [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


@dataclass
class LogitLensTokens:
    """Token-level logit lens of one prompt at its last position.

    ``layer`` i means "after i blocks" (0: embeddings only, n_layers: the final stream, i.e. the model's own
    output). Ranks are 1-based (1 = the top token); probabilities are the softmax over the whole vocabulary
    of the lens logits at that layer.

    top_tokens:   tidy table, one row per (layer, rank): layer, resid (hook name), rank, token, token_id,
                  logit, prob.
    answer_ranks: [n_layers + 1, n_answers] rank of each answer token at each layer.
    answer_probs: [n_layers + 1, n_answers] its probability.
    """

    model_name: str
    prompt: str
    answers: tuple[str, ...]
    answer_ids: tuple[int, ...]
    top_tokens: pd.DataFrame
    answer_ranks: Int[Tensor, "layer n_answers"]
    answer_probs: Float[Tensor, "layer n_answers"]

    def answer_table(self) -> pd.DataFrame:
        """Tidy table of the answers' trajectory: layer, answer, token_id, rank, prob."""
        rows = []
        for layer in range(self.answer_ranks.shape[0]):
            for j, (answer, tid) in enumerate(zip(self.answers, self.answer_ids)):
                rows.append(
                    {
                        "layer": layer,
                        "answer": answer,
                        "token_id": tid,
                        "rank": int(self.answer_ranks[layer, j]),
                        "prob": float(self.answer_probs[layer, j]),
                    }
                )
        return pd.DataFrame(rows)


@torch.no_grad()
def lens_logits(
    model: LoadedModel, resid: Float[Tensor, "... d_model"], through_final_norm_gain: bool = True
) -> Float[Tensor, "... d_vocab"]:
    """Logit lens of residual-stream vectors: final norm (own scale) then ``W_U`` (+ ``b_U``).

    Applied to the final residual stream this is exactly the model's logits.
    """
    W_U = unembedding(model, through_final_norm_gain)
    return _final_norm(model, resid) @ W_U + _unembed_bias(model)


@torch.no_grad()
def logit_lens_tokens(
    model: LoadedModel,
    prompt: str | Int[Tensor, " pos"] | Int[Tensor, "1 pos"],
    answers: Sequence[str],
    k: int = 10,
    through_final_norm_gain: bool = True,
) -> LogitLensTokens:
    """Top-k tokens and the answers' rank/probability at every layer, for one prompt at its last position.

    The classic logit lens: each layer's residual stream is normalised by the final norm with its *own*
    scale (what the model would output if it stopped there), then ``@ W_U + b_U``. At the last layer this is
    the model's output exactly. (The logit-difference lens, additive over layers, is
    :func:`mechfin_utils.dla.logit_lens`.)

    Args:
        prompt:  the text (tokenised with the model's BOS decision), or its tokens ``[pos]`` / ``[1, pos]``.
        answers: single-token strings to follow, e.g. ``(" Yes", " No")``.
        k:       how many top tokens per layer.
    """
    answer_ids = answer_token_ids(model, answers)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        tokens, text = model.to_tokens(prompt), prompt
    else:
        tokens = prompt.unsqueeze(0) if isinstance(prompt, Tensor) and prompt.ndim == 1 else prompt
        check_tokens(tokens, model.cfg.d_vocab, model_name=model.name)
        if tokens.shape[0] != 1:
            raise ValueError(f"logit_lens_tokens reads one prompt; got tokens of shape {tuple(tokens.shape)}")
        text = model.tokenizer.decode(tokens[0])
    d_vocab = model.cfg.d_vocab
    if not 1 <= k <= d_vocab:
        raise ValueError(f"k must be in [1, {d_vocab}]; got {k}")
    names = residual_stream_names(model)
    cached = _run_last_position(model, tokens, names)
    stack = torch.cat([cached[name] for name in names])  # [layer, d_model]
    logits = lens_logits(model, stack, through_final_norm_gain)  # [layer, d_vocab]
    probs = logits.softmax(dim=-1)
    top = logits.topk(k, dim=-1)
    rows = []
    for layer, name in enumerate(names):
        ids = top.indices[layer].tolist()
        for rank, (tid, tok) in enumerate(zip(ids, decode_each(model, ids)), start=1):
            rows.append(
                {
                    "layer": layer,
                    "resid": name,
                    "rank": rank,
                    "token": tok,
                    "token_id": tid,
                    "logit": float(logits[layer, tid]),
                    "prob": float(probs[layer, tid]),
                }
            )
    ids_t = torch.tensor(answer_ids, device=logits.device)
    answer_logits = logits[:, ids_t]  # [layer, n_answers]
    ranks = 1 + (logits.unsqueeze(1) > answer_logits.unsqueeze(-1)).sum(-1)
    return LogitLensTokens(
        model_name=model.name,
        prompt=text,
        answers=tuple(answers),
        answer_ids=tuple(answer_ids),
        top_tokens=pd.DataFrame(rows),
        answer_ranks=ranks.cpu(),
        answer_probs=probs[:, ids_t].cpu(),
    )


class LensAgreement(NamedTuple):
    """Per prompt and layer, how close the logit lens is to the model's final output (see
    :func:`logit_lens_agreement_by_prompt`).

    top1_agreement: ``[batch, layer]`` fraction of the prompt's positions whose lens top-1 token is the
                    model's final top-1 (0 or 1 when only the last position is read).
    kl_to_final:    ``[batch, layer]`` KL(final || lens) in nats, averaged over the prompt's positions.
    n_positions:    ``[batch]`` positions read per prompt.
    """

    top1_agreement: Float[Tensor, "batch layer"]
    kl_to_final: Float[Tensor, "batch layer"]
    n_positions: Int[Tensor, " batch"]


@torch.no_grad()
def logit_lens_agreement_by_prompt(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"], positions: Literal["all", "last"] = "all"
) -> LensAgreement:
    """How far the logit lens can be trusted, per prompt and layer: agreement with the model's final prediction.

    For every position of a prompt (``"all"``; the BOS position is left out when the model prepends one, its
    prediction being degenerate) or its last position only (``"last"``), the lens at each layer is compared
    with the final output, and the comparison is averaged over the prompt's positions. Keeping one number
    per prompt lets a bootstrap over prompts put an interval on it. The last layer is the model itself
    (agreement 1, KL 0). Low early-layer agreement is the caveat: early residual streams are not in the basis
    the unembedding reads (the tuned lens exists for that reason).
    """
    check_tokens(tokens, model.cfg.d_vocab, model_name=model.name)
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last'; got {positions!r}")
    names = residual_stream_names(model)
    wanted = set(names)
    _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    if positions == "last":
        take = slice(tokens.shape[1] - 1, tokens.shape[1])
    else:
        start = 1 if model.prepend_bos else 0
        if tokens.shape[1] <= start:
            raise ValueError("prompts have no position besides BOS")
        take = slice(start, tokens.shape[1])
    final_logprobs = lens_logits(model, cache[names[-1]][:, take]).log_softmax(-1)  # [batch, pos, vocab]
    final_top = final_logprobs.argmax(-1)
    agreement, kl = [], []
    for name in names:  # one layer at a time: [batch, pos, vocab] is the largest thing held
        logprobs = lens_logits(model, cache[name][:, take]).log_softmax(-1)
        agreement.append((logprobs.argmax(-1) == final_top).float().mean(-1))
        kl.append((final_logprobs.exp() * (final_logprobs - logprobs)).sum(-1).mean(-1))
    return LensAgreement(
        top1_agreement=torch.stack(agreement, dim=1).cpu(),
        kl_to_final=torch.stack(kl, dim=1).cpu(),
        n_positions=torch.full((tokens.shape[0],), final_top.shape[1], dtype=torch.long),
    )


@torch.no_grad()
def logit_lens_agreement(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"], positions: Literal["all", "last"] = "all"
) -> pd.DataFrame:
    """:func:`logit_lens_agreement_by_prompt` pooled over the prompts, as a table.

    Columns: layer, resid, top1_agreement (fraction of all positions read whose lens top-1 token is the model's
    final top-1), mean_kl_to_final (KL(final || lens) in nats, averaged), n_positions. The prompts of one call
    share a length, so the pooled fraction is the mean of the per-prompt fractions.
    """
    by_prompt = logit_lens_agreement_by_prompt(model, tokens, positions)
    names = residual_stream_names(model)
    agreement, kl = by_prompt.top1_agreement.mean(0), by_prompt.kl_to_final.mean(0)
    return pd.DataFrame(
        {
            "layer": range(len(names)),
            "resid": names,
            "top1_agreement": agreement.tolist(),
            "mean_kl_to_final": kl.tolist(),
            "n_positions": int(by_prompt.n_positions.sum()),
        }
    )


# ---------------------------------------------------------------------------------------------------------
# 2. FFN neurons and their value vectors
# ---------------------------------------------------------------------------------------------------------

NeuronScoreMethod = Literal["activation_x_weight_norm", "direct_effect"]


@torch.no_grad()
def mlp_activations_last(model: LoadedModel, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch layer d_mlp"]:
    """Every neuron's activation (``blocks.L.mlp.hook_post``) at the last position of every prompt."""
    names = [f"blocks.{L}.mlp.hook_post" for L in range(model.cfg.n_layers)]
    acts = _run_last_position(model, tokens, names)
    return torch.stack([acts[name] for name in names], dim=1)


def _value_vectors(model: LoadedModel, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """The rows of ``W_out`` of one layer (centred for LayerNorm models: the part the final norm keeps)."""
    return _centre_if_layernorm(model, model.bridge.blocks[layer].mlp.W_out.detach())


@torch.no_grad()
def neuron_scores(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    method: NeuronScoreMethod,
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"] | None = None,
    divide_by_final_norm_scale: bool = False,
) -> Float[Tensor, "batch layer d_mlp"]:
    """Score every MLP neuron on every prompt, at the last position (average over prompts to rank them).

    Two ways, both read at the last position:

    ``"activation_x_weight_norm"``: ``|act_n| * ||W_out[n]||``, the size of the vector the neuron writes.
        Task-agnostic: it finds the neurons that are busy on these prompts, whatever they push toward.
    ``"direct_effect"``: ``act_n * (W_out[n] . (W_U[:, a] - W_U[:, b]))`` for the prompt's answer pair
        ``(a, b)``: how much the neuron's write raises logit(a) - logit(b) *directly* (not via later layers).
        Signed; summed over a layer's neurons (plus the layer's output bias, if any) it is exactly that layer's
        MLP output projected on the answer direction. With ``divide_by_final_norm_scale`` it is divided by
        the final norm's scale at that position, which makes it the neuron's exact direct logit attribution
        in the model's actual run; without it (the default) it is the projection Geva et al. use.

    Returns per-prompt scores ``[batch, n_layers, d_mlp]`` so that batches can be concatenated.
    """
    if method not in ("activation_x_weight_norm", "direct_effect"):
        raise ValueError(f"method must be 'activation_x_weight_norm' or 'direct_effect'; got {method!r}")
    check_tokens(tokens, model.cfg.d_vocab, model_name=model.name)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{L}.mlp.hook_post" for L in range(n_layers)] + ["ln_final.hook_scale"]
    cached = _run_last_position(model, tokens, names)
    acts = torch.stack([cached[n] for n in names[:-1]], dim=1)  # [batch, layer, d_mlp]
    if method == "activation_x_weight_norm":
        if answer_tokens is not None or divide_by_final_norm_scale:
            raise ValueError("activation_x_weight_norm uses neither answer_tokens nor the final norm scale")
        norms = torch.stack([_value_vectors(model, L).norm(dim=-1) for L in range(n_layers)])  # [layer, d_mlp]
        return acts.abs() * norms
    if answer_tokens is None:
        raise ValueError("method 'direct_effect' needs answer_tokens ([batch, 2] or [2])")
    direction = logit_diff_direction(model, _answer_pairs(answer_tokens, tokens.shape[0]))  # [batch, d_model]
    along = torch.stack([direction @ _value_vectors(model, L).T for L in range(n_layers)], dim=1)  # [b, L, d_mlp]
    effect = acts * along
    if divide_by_final_norm_scale:
        effect = effect / cached["ln_final.hook_scale"].reshape(-1, 1, 1)
    return effect


def top_neurons(
    scores: Float[Tensor, "layer d_mlp"] | Float[Tensor, "batch layer d_mlp"],
    k: int,
    by: Literal["value", "abs", "negative"] = "value",
    per_layer: bool = False,
) -> pd.DataFrame:
    """The k best neurons (overall, or in each layer) from :func:`neuron_scores` (averaged over prompts first).

    ``by="value"`` largest scores first, ``"negative"`` most negative first, ``"abs"`` largest magnitude.
    Columns: layer, neuron, score (the mean score, signed).
    """
    if scores.ndim == 3:
        scores = scores.mean(0)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [layer, d_mlp] or [batch, layer, d_mlp]; got {tuple(scores.shape)}")
    if by not in ("value", "abs", "negative"):
        raise ValueError(f"by must be 'value', 'abs' or 'negative'; got {by!r}")
    key = {"value": scores, "abs": scores.abs(), "negative": -scores}[by]
    n_layers, d_mlp = scores.shape
    limit = d_mlp if per_layer else n_layers * d_mlp
    if not 1 <= k <= limit:
        raise ValueError(f"k must be in [1, {limit}]; got {k}")
    rows = []
    if per_layer:
        for layer in range(n_layers):
            for n in key[layer].topk(k).indices.tolist():
                rows.append({"layer": layer, "neuron": n, "score": float(scores[layer, n])})
    else:
        for flat in key.flatten().topk(k).indices.tolist():
            layer, n = divmod(flat, d_mlp)
            rows.append({"layer": layer, "neuron": n, "score": float(scores[layer, n])})
    return pd.DataFrame(rows)


def _neuron_list(model: LoadedModel, neurons) -> list[tuple[int, int]]:
    if isinstance(neurons, pd.DataFrame):
        missing = {"layer", "neuron"} - set(neurons.columns)
        if missing:
            raise ValueError(f"neurons table lacks columns {sorted(missing)}")
        neurons = list(zip(neurons["layer"].tolist(), neurons["neuron"].tolist()))
    out = []
    for i, item in enumerate(neurons):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"neurons[{i}] must be (layer, neuron); got {item!r}")
        layer = _check_index(f"neurons[{i}] layer", item[0], model.cfg.n_layers)
        n = _check_index(f"neurons[{i}] neuron", item[1], model.cfg.d_mlp)
        out.append((layer, n))
    if not out:
        raise ValueError("no neurons given")
    return out


@torch.no_grad()
def neuron_value_tokens(
    model: LoadedModel,
    neurons: Sequence[tuple[int, int]] | pd.DataFrame,
    k: int = 10,
    through_final_norm_gain: bool = True,
) -> pd.DataFrame:
    """Read neurons' value vectors ``W_out[L][n]`` as token distributions: their top and bottom k tokens.

    A neuron with positive activation promotes its top tokens and suppresses its bottom ones (reversed when
    the activation is negative, which SiLU/GELU allow a little and the gated product allows freely).
    Scores are ``W_out[L][n] @ W_U`` (see the module docstring for ``through_final_norm_gain``), in logit
    units per unit of activation, before the final norm's 1/scale.

    ``neurons``: (layer, neuron) pairs or a table with those columns (e.g. from :func:`top_neurons`).
    Columns: layer, neuron, side ("top"/"bottom"), rank (1-based), token, token_id, score.
    """
    pairs = _neuron_list(model, neurons)
    W_U = unembedding(model, through_final_norm_gain)
    vectors = torch.stack([_value_vectors(model, L)[n] for L, n in pairs])
    top_v, top_i, bot_v, bot_i = top_and_bottom_tokens(vectors, W_U, k)
    rows = []
    for j, (L, n) in enumerate(pairs):
        for side, vals, ids in (("top", top_v[j], top_i[j]), ("bottom", bot_v[j], bot_i[j])):
            for rank, (tid, tok, val) in enumerate(zip(ids.tolist(), decode_each(model, ids), vals.tolist()), 1):
                rows.append(
                    {"layer": L, "neuron": n, "side": side, "rank": rank, "token": tok, "token_id": tid, "score": val}
                )
    return pd.DataFrame(rows)


@torch.no_grad()
def neuron_token_coherence(
    model: LoadedModel,
    neurons: Sequence[tuple[int, int]] | pd.DataFrame,
    k: int = 20,
    through_final_norm_gain: bool = True,
    sides: Sequence[Literal["top", "bottom"]] | None = None,
) -> pd.DataFrame:
    """A simple polysemanticity proxy: how related a neuron's top-k promoted tokens are to each other.

    ``coherence`` is the mean pairwise cosine similarity of the top-k tokens' unembedding vectors (columns of
    the same matrix used for the projection). It is only a proxy, and it needs the right baseline:

    * against tokens drawn at random (:func:`random_token_coherence`, about 0) almost every neuron looks
      coherent, because the k tokens that score highest on *any* direction share that direction: a selection
      effect, not a concept;
    * against random neurons' value vectors (:func:`random_neuron_coherence`) it asks the fair question: are
      these neurons' token lists more unified than a typical neuron's?

    High coherence can also come from a cluster of odd tokens (rare BPE fragments with similar unembeddings)
    rather than one concept; and a neuron can be coherent in vocabulary space and still fire in unrelated
    contexts.

    ``sides``: per neuron, which list the neuron promotes: ``"top"`` (the default for all; right when its
    activation is positive) or ``"bottom"`` (right when it is negative, which the gated MLP allows freely).
    Columns: layer, neuron, side, coherence, top_tokens (the k tokens of that side, for reading).
    """
    pairs = _neuron_list(model, neurons)
    if k < 2:
        raise ValueError(f"k must be >= 2 to compare tokens; got {k}")
    if sides is None:
        sides = ["top"] * len(pairs)
    sides = list(sides)
    if len(sides) != len(pairs):
        raise ValueError(f"sides has {len(sides)} entries for {len(pairs)} neurons")
    for i, side in enumerate(sides):
        if side not in ("top", "bottom"):
            raise ValueError(f"sides[{i}] must be 'top' or 'bottom'; got {side!r}")
    W_U = unembedding(model, through_final_norm_gain)
    sign = torch.tensor([1.0 if side == "top" else -1.0 for side in sides], device=W_U.device)
    vectors = torch.stack([_value_vectors(model, L)[n] for L, n in pairs]) * sign[:, None]
    _, top_i, _, _ = top_and_bottom_tokens(vectors, W_U, k)
    rows = []
    for j, (L, n) in enumerate(pairs):
        rows.append(
            {
                "layer": L,
                "neuron": n,
                "side": sides[j],
                "coherence": mean_pairwise_cosine(W_U[:, top_i[j]].T),
                "top_tokens": decode_each(model, top_i[j]),
            }
        )
    return pd.DataFrame(rows)


@torch.no_grad()
def random_neuron_coherence(
    model: LoadedModel,
    k: int = 20,
    n_samples: int = 200,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    through_final_norm_gain: bool = True,
) -> Float[Tensor, " n_samples"]:
    """The coherence (:func:`neuron_token_coherence`) of ``n_samples`` neurons drawn at random, with replacement,
    from ``layers`` (default: every layer; layer uniform, then neuron uniform), each read on its top side.

    The fair baseline for a chosen neuron: is its token list more unified than a typical neuron's from the same
    layers? (Drawn neurons are not checked against the chosen ones; with thousands per layer a repeat is rare.)
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1; got {n_samples}")
    if k < 2:
        raise ValueError(f"k must be >= 2 to compare tokens; got {k}")
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    if layers is None:
        chosen = list(range(n_layers))
    else:
        chosen = [_check_index(f"layers[{i}]", L, n_layers) for i, L in enumerate(layers)]
    if not chosen:
        raise ValueError("layers is empty")
    gen = torch.Generator().manual_seed(seed)
    picked_layers = torch.tensor(chosen)[torch.randint(len(chosen), (n_samples,), generator=gen)]
    picked_neurons = torch.randint(d_mlp, (n_samples,), generator=gen)
    W_U = unembedding(model, through_final_norm_gain)
    values = []
    for start in range(0, n_samples, 128):  # [128, d_vocab] scores at a time
        block = zip(picked_layers[start : start + 128].tolist(), picked_neurons[start : start + 128].tolist())
        vectors = torch.stack([_value_vectors(model, L)[n] for L, n in block])
        _, top_i, _, _ = top_and_bottom_tokens(vectors, W_U, k)
        values += [mean_pairwise_cosine(W_U[:, ids].T) for ids in top_i]
    return torch.tensor(values)


@torch.no_grad()
def random_token_coherence(
    model: LoadedModel, k: int = 20, n_samples: int = 200, seed: int = 0, through_final_norm_gain: bool = True
) -> Float[Tensor, " n_samples"]:
    """The coherence of k tokens drawn uniformly at random (no replacement), ``n_samples`` times: the baseline
    :func:`neuron_token_coherence` is read against."""
    W_U = unembedding(model, through_final_norm_gain)
    gen = torch.Generator().manual_seed(seed)
    values = [
        mean_pairwise_cosine(W_U[:, torch.randperm(W_U.shape[1], generator=gen)[:k].to(W_U.device)].T)
        for _ in range(n_samples)
    ]
    return torch.tensor(values)


# ---------------------------------------------------------------------------------------------------------
# 3. What each FFN update promotes
# ---------------------------------------------------------------------------------------------------------


class AnswerProjection(NamedTuple):
    """Per prompt and layer, the MLP output at the last position projected on ``W_U[:, a] - W_U[:, b]``.

    unscaled:          ``mlp_out . direction`` (the final norm's weight is in ``W_U``; its 1/scale is not).
    final_norm_scaled: the same divided by the final norm's scale at that position in the actual run: the
                       layer's exact direct contribution to the logit difference (what DLA reports).
    """

    unscaled: Float[Tensor, "batch layer"]
    final_norm_scaled: Float[Tensor, "batch layer"]


@torch.no_grad()
def mlp_answer_contributions(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
) -> AnswerProjection:
    """How much each layer's FFN update pushes toward answer a over answer b, per prompt (see
    :class:`AnswerProjection` for the two scalings). Positive: promotes the first answer (e.g. " Yes")."""
    cached = _run_last_position(model, tokens, _mlp_projection_hooks(model))
    return _mlp_projection_from(model, cached, _answer_pairs(answer_tokens, tokens.shape[0]))


def _mlp_projection_hooks(model: LoadedModel) -> list[str]:
    return [f"blocks.{L}.hook_mlp_out" for L in range(model.cfg.n_layers)] + ["ln_final.hook_scale"]


def _mlp_projection_from(
    model: LoadedModel, cached: dict[str, Tensor], answers: Int[Tensor, "batch 2"]
) -> AnswerProjection:
    """:func:`mlp_answer_contributions` from last-position activations already cached."""
    names = _mlp_projection_hooks(model)
    direction = logit_diff_direction(model, answers)  # [batch, d_model]
    outs = _centre_if_layernorm(model, torch.stack([cached[n] for n in names[:-1]], dim=1))  # [b, L, d_model]
    unscaled = (outs * direction[:, None, :]).sum(-1)
    return AnswerProjection(
        unscaled=unscaled, final_norm_scaled=unscaled / cached["ln_final.hook_scale"].reshape(-1, 1)
    )


@torch.no_grad()
def mlp_update_top_tokens(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    k: int = 20,
    through_final_norm_gain: bool = True,
) -> pd.DataFrame:
    """The k tokens each layer's FFN update most promotes, at the last position of each prompt.

    Geva et al. (2022): an FFN update, projected through ``W_U``, is read as the set of tokens it promotes.
    Columns: prompt (row in ``tokens``), layer, rank (1-based), token, token_id, score (``mlp_out @ W_U``).
    """
    n_layers = model.cfg.n_layers
    names = [f"blocks.{L}.hook_mlp_out" for L in range(n_layers)]
    cached = _run_last_position(model, tokens, names)
    W_U = unembedding(model, through_final_norm_gain)
    outs = torch.stack([cached[n] for n in names], dim=1)  # [batch, layer, d_model]
    batch = outs.shape[0]
    top_v, top_i, _, _ = top_and_bottom_tokens(outs.reshape(batch * n_layers, -1), W_U, k)
    rows = []
    for flat in range(batch * n_layers):
        prompt, layer = divmod(flat, n_layers)
        ids = top_i[flat]
        for rank, (tid, tok, val) in enumerate(zip(ids.tolist(), decode_each(model, ids), top_v[flat].tolist()), 1):
            rows.append({"prompt": prompt, "layer": layer, "rank": rank, "token": tok, "token_id": tid, "score": val})
    return pd.DataFrame(rows)


def fraction_in_token_set(top_tokens: pd.DataFrame, token_ids: Sequence[int]) -> pd.DataFrame:
    """Per prompt and layer, the fraction of the update's top-k tokens that belong to ``token_ids``.

    ``top_tokens`` is :func:`mlp_update_top_tokens`'s table. Columns: prompt, layer, fraction, k.
    """
    missing = {"prompt", "layer", "token_id"} - set(top_tokens.columns)
    if missing:
        raise ValueError(f"top_tokens lacks columns {sorted(missing)} (expected mlp_update_top_tokens' table)")
    wanted = {int(t) for t in token_ids}
    if not wanted:
        raise ValueError("token_ids is empty")
    marked = top_tokens.assign(in_set=top_tokens["token_id"].isin(wanted))
    grouped = marked.groupby(["prompt", "layer"])["in_set"]
    out = grouped.mean().rename("fraction").to_frame()
    out["k"] = grouped.size()
    return out.reset_index()


def token_set_ids(model: LoadedModel, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids of the strings that are single tokens, and the list of those that are not (reported, not hidden).

    Token sets for :func:`fraction_in_token_set` are usually written as words with variants
    (``" yes"``, ``" Yes"``, ``"Yes"``...); a variant that is several tokens cannot be "a top token" and is
    returned in the second list so the caller can show what was left out.
    """
    ids, multi = [], []
    for w in words:
        pieces = model.tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            ids.append(int(pieces[0]))
        else:
            multi.append(w)
    return ids, multi


# ---------------------------------------------------------------------------------------------------------
# 4. Parameters in embedding space (Dar et al. 2023): OV and QK circuits as token-to-token maps
# ---------------------------------------------------------------------------------------------------------


def frequent_token_ids(model: LoadedModel, n: int = 3000, pattern: str = r"^ [A-Za-z]{2,}$") -> list[int]:
    """The first ``n`` token ids whose decoded text matches ``pattern`` (default: a space then a whole word).

    Vocabulary subset for circuit tables. There is no token-frequency table offline, so *id order stands in
    for frequency*: byte-level BPE vocabularies (GPT-2's and SmolLM2's) list merges in the order they were
    learnt, most frequent pairs first, so low ids are, roughly, common tokens. The word pattern keeps the
    tables readable (no punctuation or special tokens). It cannot tell a whole word from an early merge that
    is usually absorbed into longer tokens (`` strugg``, `` affili`` in SmolLM2): such tokens are rarely the
    next token, have atypical unembeddings, and can dominate circuit tables.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    regex = re.compile(pattern)
    special = set(model.tokenizer.all_special_ids) | set(getattr(model.tokenizer, "added_tokens_decoder", {}) or {})
    out = []
    for tid in range(model.cfg.d_vocab):
        if tid in special:
            continue
        if regex.match(model.tokenizer.decode([tid])):
            out.append(tid)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} tokens of {model.name} match {pattern!r}; asked for n={n}")


def _ids_tensor(model: LoadedModel, ids: Sequence[int] | Tensor | None, what: str) -> Int[Tensor, " n"]:
    d_vocab = model.cfg.d_vocab
    if ids is None:
        return torch.arange(d_vocab)
    t = torch.as_tensor(list(ids) if not isinstance(ids, Tensor) else ids, dtype=torch.long).flatten()
    if t.numel() == 0:
        raise ValueError(f"{what} is empty")
    bad = ((t < 0) | (t >= d_vocab)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{what}[{bad[0]}] = {int(t[bad[0]])} is not a token id of {model.name} (d_vocab {d_vocab})")
    return t


def _embeddings(model: LoadedModel, layer: int, ids: Tensor, normalise: bool) -> Float[Tensor, "n d_model"]:
    E = model.bridge.W_E.detach()[ids.to(model.bridge.W_E.device)]
    if normalise:
        # The block's input norm (weight folded into W_Q/W_K/W_V) as if the residual held only this token.
        E = model.bridge.blocks[layer].ln1(E)
    return E


def _pairs_frame(model: LoadedModel, scores, rows, cols, row_ids, col_ids, names: tuple[str, str]) -> pd.DataFrame:
    r_ids, c_ids = row_ids[rows.cpu()].tolist(), col_ids[cols.cpu()].tolist()
    return pd.DataFrame(
        {
            "rank": range(1, len(r_ids) + 1),
            f"{names[0]}_token": decode_each(model, r_ids),
            f"{names[0]}_id": r_ids,
            f"{names[1]}_token": decode_each(model, c_ids),
            f"{names[1]}_id": c_ids,
            "score": scores.tolist(),
        }
    )


@torch.no_grad()
def ov_circuit_factors(
    model: LoadedModel,
    layer: int,
    head: int,
    source_ids: Sequence[int] | Tensor | None,
    output_ids: Sequence[int] | Tensor | None,
    normalise_source: bool = True,
    through_final_norm_gain: bool = True,
) -> tuple[Float[Tensor, "n_src d_head"], Float[Tensor, "d_head n_out"]]:
    """The two thin factors of head ``layer.head``'s OV circuit in token space: ``left @ right`` is
    ``E[src] W_V W_O W_U[:, out]`` (entry [s, t]: how much attending to token s raises token t's logit).

    ``None`` for an id list means the whole vocabulary (fine for one side; the product is never formed).
    """
    layer = _check_index("layer", layer, model.cfg.n_layers)
    head = _check_index("head", head, model.cfg.n_heads)
    src, out = _ids_tensor(model, source_ids, "source_ids"), _ids_tensor(model, output_ids, "output_ids")
    attn = model.bridge.blocks[layer].attn
    with torch.no_grad():
        W_V = attn.W_V.detach()[kv_head_of(model, head)]  # [d_model, d_head]
        W_O = attn.W_O.detach()[head]  # [d_head, d_model]
        W_U = unembedding(model, through_final_norm_gain)
        left = _embeddings(model, layer, src, normalise_source) @ W_V
        right = W_O @ W_U[:, out.to(W_U.device)]
    return left, right


@torch.no_grad()
def ov_circuit_top_pairs(
    model: LoadedModel,
    layer: int,
    head: int,
    source_ids: Sequence[int] | Tensor | None,
    output_ids: Sequence[int] | Tensor | None,
    k: int = 20,
    largest: bool = True,
    normalise_source: bool = True,
    through_final_norm_gain: bool = True,
) -> pd.DataFrame:
    """The k (source token, output token) pairs with the largest (or most negative) OV-circuit entries.

    The OV circuit read in embedding space (Dar et al. 2023): if the head attends fully to a position holding
    token s, it adds ``E[s] W_V W_O`` to the residual stream, which raises token t's logit by that vector
    ``@ W_U[:, t]``. Assumptions, all of them simplifications: the source position's residual is just the
    token embedding (no positional embedding, nothing written by earlier layers), normalised by the block's
    input norm when ``normalise_source`` (the norm's weight is folded into ``W_V`` by the bridge), value/output
    biases left out, and the final norm's 1/scale left out. For grouped-query attention the query head's
    key/value head supplies ``W_V`` (:func:`kv_head_of`). ``W_U`` is centred over the vocabulary (see the
    module docstring): each source row is shifted by the constant that changes none of its token's logit
    differences, so pairs are compared across sources on what the head *distinguishes*, not on a shared
    offset. Rare tokens with large embeddings (intermediate BPE fragments such as `` strugg``) tend to fill
    the table; restrict ``output_ids`` (task tokens, :func:`frequent_token_ids`) to see past them.

    Columns: rank, source_token, source_id, output_token, output_id, score (logit units).
    """
    left, right = ov_circuit_factors(
        model, layer, head, source_ids, output_ids, normalise_source, through_final_norm_gain
    )
    with torch.no_grad():
        scores, rows, cols = factored_top_pairs(left, right, k, largest=largest)
    src, out = _ids_tensor(model, source_ids, "source_ids"), _ids_tensor(model, output_ids, "output_ids")
    return _pairs_frame(model, scores, rows, cols, src, out, ("source", "output"))


@torch.no_grad()
def qk_circuit_factors(
    model: LoadedModel,
    layer: int,
    head: int,
    query_ids: Sequence[int] | Tensor | None,
    key_ids: Sequence[int] | Tensor | None,
    normalise: bool = True,
) -> tuple[Float[Tensor, "n_query d_head"], Float[Tensor, "d_head n_key"]]:
    """The two thin factors of the QK circuit in token space: ``left @ right`` is
    ``E[q] W_Q W_K^T E[k]^T / sqrt(d_head)``, an attention score (entry [q, k]: how much a query token q
    wants to attend to key token k)."""
    layer = _check_index("layer", layer, model.cfg.n_layers)
    head = _check_index("head", head, model.cfg.n_heads)
    q_ids, k_ids = _ids_tensor(model, query_ids, "query_ids"), _ids_tensor(model, key_ids, "key_ids")
    attn = model.bridge.blocks[layer].attn
    with torch.no_grad():
        W_Q = attn.W_Q.detach()[head]
        W_K = attn.W_K.detach()[kv_head_of(model, head)]
        left = _embeddings(model, layer, q_ids, normalise) @ W_Q / math.sqrt(model.cfg.d_head)
        right = (_embeddings(model, layer, k_ids, normalise) @ W_K).T
    return left, right


@torch.no_grad()
def qk_circuit_top_pairs(
    model: LoadedModel,
    layer: int,
    head: int,
    query_ids: Sequence[int] | Tensor | None,
    key_ids: Sequence[int] | Tensor | None,
    k: int = 20,
    largest: bool = True,
    normalise: bool = True,
) -> pd.DataFrame:
    """The k (query token, key token) pairs with the largest (or smallest) QK-circuit scores.

    Same simplifications as :func:`ov_circuit_top_pairs` (embeddings only, query/key biases left out).
    Positions are ignored entirely. For GPT-2 that means leaving out the positional embeddings. For a rotary
    model (the embedded SmolLM2) queries and keys are rotated by their positions before the dot product; the
    rotations cancel when the two tokens are at the same position, so these scores are the head's scores at
    relative distance 0, and at other distances RoPE changes them (more for the fast-rotating dimensions).
    Columns: rank, query_token, query_id, key_token, key_id, score (attention-score units, pre-softmax).
    """
    left, right = qk_circuit_factors(model, layer, head, query_ids, key_ids, normalise)
    with torch.no_grad():
        scores, rows, cols = factored_top_pairs(left, right, k, largest=largest)
    q_ids, k_ids = _ids_tensor(model, query_ids, "query_ids"), _ids_tensor(model, key_ids, "key_ids")
    return _pairs_frame(model, scores, rows, cols, q_ids, k_ids, ("query", "key"))


@torch.no_grad()
def ov_top_outputs(
    model: LoadedModel,
    layer: int,
    head: int,
    source_ids: Sequence[int] | Tensor,
    output_ids: Sequence[int] | Tensor | None = None,
    k: int = 10,
    normalise_source: bool = True,
    through_final_norm_gain: bool = True,
) -> pd.DataFrame:
    """For each chosen source token (e.g. the task's protected-attribute words), the k output tokens the head's
    OV circuit raises most if it attends to it. Columns: source_token, source_id, rank, output_token,
    output_id, score."""
    left, right = ov_circuit_factors(
        model, layer, head, source_ids, output_ids, normalise_source, through_final_norm_gain
    )
    src, out = _ids_tensor(model, source_ids, "source_ids"), _ids_tensor(model, output_ids, "output_ids")
    if not 1 <= k <= out.numel():
        raise ValueError(f"k must be in [1, {out.numel()}]; got {k}")
    with torch.no_grad():
        top = (left @ right).topk(k, dim=-1)
    rows = []
    for j, sid in enumerate(src.tolist()):
        out_ids = out[top.indices[j].cpu()].tolist()
        for rank, (oid, tok, val) in enumerate(zip(out_ids, decode_each(model, out_ids), top.values[j].tolist()), 1):
            rows.append(
                {
                    "source_token": model.tokenizer.decode([sid]),
                    "source_id": sid,
                    "rank": rank,
                    "output_token": tok,
                    "output_id": oid,
                    "score": val,
                }
            )
    return pd.DataFrame(rows)
