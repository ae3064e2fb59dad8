"""From the residual stream to the vocabulary: the matrix, the answer direction, and the checks every projection shares.

The residual stream of a transformer ends in ``logits = final_norm(resid) @ W_U``. Anything that lives in the
residual stream (the stream itself after some layer, one MLP layer's update, one neuron's output vector, one
head's output) can be pushed through the same map and read as "which tokens would this promote if it were all
the model had". The modules beside this one do that (:mod:`~mechfin_utils.methods.readout.token_lens`,
:mod:`~mechfin_utils.methods.readout.ffn_neurons`, :mod:`~mechfin_utils.methods.readout.ffn_updates`,
:mod:`~mechfin_utils.methods.readout.embedding_circuits`); this one holds what they share: which matrix
(:func:`unembedding`), the answer direction ``W_U[:, a] - W_U[:, b]`` (:func:`logit_diff_direction`), the final
norm and ``b_U``, the top and bottom tokens of a vector (:func:`top_and_bottom_tokens`), and the checks of
answer strings, answer pairs and token ids.

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
embedded model has 9 query heads sharing 3 key/value heads), ``W_O [n_heads, d_head, d_model]``,
``W_out [d_mlp, d_model]``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.inputs import check_tokens
from mechfin_utils.core.models import LoadedModel

# ---------------------------------------------------------------------------------------------------------
# The matrix and the final norm
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


def apply_final_norm(model: LoadedModel, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The model's final norm applied with the vector's *own* scale (the bridge's, weight already folded)."""
    return model.bridge.ln_final(resid)


def unembed_bias(model: LoadedModel) -> Float[Tensor, " d_vocab"] | float:
    """``b_U`` (with the final LayerNorm's bias folded in, for GPT-2); 0.0 for a model without one."""
    b_U = getattr(model.bridge, "b_U", None)
    return 0.0 if b_U is None else b_U.detach()


def centre_if_layernorm(model: LoadedModel, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The part of ``x`` a LayerNorm keeps (it subtracts the mean over d_model first); ``x`` for RMSNorm.

    The bridge already centres every writing weight of LayerNorm models, so this is a no-op there in
    practice; it keeps the projections exact for anything else passed in.
    """
    if str(model.cfg.normalization_type).startswith("LN"):
        return x - x.mean(-1, keepdim=True)
    return x


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


# ---------------------------------------------------------------------------------------------------------
# Answers and their direction
# ---------------------------------------------------------------------------------------------------------


def single_token_ids(model: LoadedModel, answers: Sequence[str]) -> list[int]:
    """Token ids of answer strings, each of which must be exactly one token (else a ValueError naming it)."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty sequence of strings such as (' Yes', ' No'); got {answers!r}")
    return [model.single_token_id(a) for a in answers]


def answer_pairs(answer_tokens: Tensor, batch: int) -> Int[Tensor, "batch 2"]:
    """Answer pairs ``[batch, 2]`` (correct, incorrect), ``[2]`` broadcast over the batch; a ValueError otherwise."""
    if answer_tokens.ndim == 1 and answer_tokens.shape[0] == 2:
        answer_tokens = answer_tokens.expand(batch, 2)
    if answer_tokens.ndim != 2 or answer_tokens.shape != (batch, 2):
        raise ValueError(
            f"answer_tokens must be [batch={batch}, 2] (correct, incorrect) or [2]; got {tuple(answer_tokens.shape)}"
        )
    return answer_tokens


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


def checked_answer_pairs(model: LoadedModel, tokens: Tensor, answer_tokens) -> Int[Tensor, "batch 2"]:
    """:func:`answer_pairs` for these prompts, after checking the prompts' tokens and every answer id."""
    check_tokens(tokens, model.cfg.d_vocab, model_name=model.name)
    answers = answer_pairs(torch.as_tensor(answer_tokens, dtype=torch.long), tokens.shape[0])
    checked_token_ids(model, answers, "answer_tokens")  # every id in the vocabulary, or a ValueError naming it
    return answers


# ---------------------------------------------------------------------------------------------------------
# Token ids and indices
# ---------------------------------------------------------------------------------------------------------


def decode_each(model: LoadedModel, token_ids: Sequence[int] | Tensor) -> list[str]:
    """Each token id decoded on its own (the string a table shows for that token)."""
    ids = token_ids.tolist() if isinstance(token_ids, Tensor) else list(token_ids)
    return [model.tokenizer.decode([int(i)]) for i in ids]


def checked_token_ids(model: LoadedModel, ids: Sequence[int] | Tensor | None, what: str) -> Int[Tensor, " n"]:
    """``ids`` as a 1-D long tensor, each a token id of the model (a ValueError naming the first that is not);
    ``None`` is the whole vocabulary. ``what`` names the argument in the error."""
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


def check_index(what: str, value: int, size: int) -> int:
    """``value`` as an int when it is an integer in ``[0, size)``; a ValueError naming ``what`` otherwise."""
    try:
        index = operator.index(value)  # accepts numpy/torch integer scalars, refuses floats and strings
    except TypeError:
        index = None
    if index is None or isinstance(value, bool) or not 0 <= index < size:
        raise ValueError(f"{what} must be an integer in [0, {size}); got {value!r}")
    return index
