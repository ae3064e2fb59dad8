"""What each FFN update promotes (Geva et al. 2022): an MLP layer's output at the answer position, read as tokens.

An MLP layer adds one vector, its *update*, to the residual stream at each position. Read at the last position:

* on the answer direction ``W_U[:, yes] - W_U[:, no]``: how much the layer pushes toward the first answer
  (:func:`mlp_answer_contributions`; divided by the final norm's scale, it is the layer's exact direct logit
  attribution, what :mod:`mechfin_utils.methods.readout.dla` reports);
* through the whole of ``W_U``: the top-k tokens the update promotes (:func:`mlp_update_top_tokens`), and the
  fraction of them in a chosen token set (:func:`fraction_in_token_set`; sets from
  :func:`mechfin_utils.methods.readout.vocabulary.token_set_ids`): Geva et al.'s view of an update as the
  promotion of a concept.

Single neurons and their value vectors are :mod:`mechfin_utils.methods.readout.ffn_neurons`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.models import LoadedModel
from mechfin_utils.methods.readout.final_position import run_last_position
from mechfin_utils.methods.readout.unembedding import (
    answer_pairs,
    centre_if_layernorm,
    decode_each,
    logit_diff_direction,
    top_and_bottom_tokens,
    unembedding,
)

# ---------------------------------------------------------------------------------------------------------
# On the answer direction
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
    cached = run_last_position(model, tokens, mlp_answer_hooks(model))
    return mlp_answer_contributions_from_cache(model, cached, answer_pairs(answer_tokens, tokens.shape[0]))


def mlp_answer_hooks(model: LoadedModel) -> list[str]:
    """The hooks :func:`mlp_answer_contributions_from_cache` reads: every layer's ``hook_mlp_out`` and the final
    norm's scale."""
    return [f"blocks.{L}.hook_mlp_out" for L in range(model.cfg.n_layers)] + ["ln_final.hook_scale"]


def mlp_answer_contributions_from_cache(
    model: LoadedModel, cached: dict[str, Tensor], answers: Int[Tensor, "batch 2"]
) -> AnswerProjection:
    """:func:`mlp_answer_contributions` from last-position activations already cached."""
    names = mlp_answer_hooks(model)
    direction = logit_diff_direction(model, answers)  # [batch, d_model]
    outs = centre_if_layernorm(model, torch.stack([cached[n] for n in names[:-1]], dim=1))  # [b, L, d_model]
    unscaled = (outs * direction[:, None, :]).sum(-1)
    return AnswerProjection(
        unscaled=unscaled, final_norm_scaled=unscaled / cached["ln_final.hook_scale"].reshape(-1, 1)
    )


# ---------------------------------------------------------------------------------------------------------
# Through the whole vocabulary
# ---------------------------------------------------------------------------------------------------------


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
    cached = run_last_position(model, tokens, names)
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
