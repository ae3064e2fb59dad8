"""FFN neurons as key-value memories (Geva et al. 2020): which neurons matter, and what each one writes, as tokens.

An MLP layer's output is ``sum_n act_n * W_out[n]``: each neuron adds its fixed *value vector* ``W_out[n]``
scaled by its activation. For GPT-2 ``act`` is ``GELU(x @ W_in + b_in)``; for the Llama-architecture embedded
model the MLP is gated and ``act`` is ``SiLU(x @ W_gate) * (x @ W_in)``, the product the bridge exposes as
``blocks.L.mlp.hook_post``; in both cases the value vectors are the rows of ``W_out`` (``down_proj``/``c_proj``
in Hugging Face naming).

* :func:`neuron_scores` scores every neuron on every prompt (the size of what it writes, or its direct effect
  on the answer's logit difference) and :func:`top_neurons` ranks them;
* :func:`neuron_value_tokens` reads a neuron's value vector through ``W_U`` (its top and bottom tokens);
* :func:`neuron_token_coherence` is a simple polysemanticity proxy (how related a neuron's top tokens are),
  read against random neurons (:func:`random_neuron_coherence`) and random tokens
  (:func:`random_token_coherence`) with :func:`coherence_against_baseline`.

What a whole layer's update promotes is :mod:`mechfin_utils.methods.readout.ffn_updates`; which ``W_U`` is used
(``through_final_norm_gain``) is explained in :mod:`mechfin_utils.methods.readout.unembedding`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.inputs import check_tokens
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.methods.readout.final_position import run_last_position
from mechfin_utils.methods.readout.unembedding import (
    answer_pairs,
    centre_if_layernorm,
    check_index,
    decode_each,
    logit_diff_direction,
    top_and_bottom_tokens,
    unembedding,
)

NeuronScoreMethod = Literal["activation_x_weight_norm", "direct_effect"]


# ---------------------------------------------------------------------------------------------------------
# Which neurons: activations and scores at the last position
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def mlp_activations_last(model: LoadedModel, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch layer d_mlp"]:
    """Every neuron's activation (``blocks.L.mlp.hook_post``) at the last position of every prompt."""
    names = [f"blocks.{L}.mlp.hook_post" for L in range(model.cfg.n_layers)]
    acts = run_last_position(model, tokens, names)
    return torch.stack([acts[name] for name in names], dim=1)


def _d_mlp(model: LoadedModel) -> int:
    """Neurons per MLP layer; a ValueError for a model without MLPs."""
    if model.cfg.d_mlp is None:
        raise ValueError(f"{model.name} has no MLP layers (cfg.d_mlp is None)")
    return model.cfg.d_mlp


def _value_vectors(model: LoadedModel, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """The rows of ``W_out`` of one layer (centred for LayerNorm models: the part the final norm keeps)."""
    return centre_if_layernorm(model, model.bridge.blocks[layer].mlp.W_out.detach())


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
    cached = run_last_position(model, tokens, names)
    acts = torch.stack([cached[n] for n in names[:-1]], dim=1)  # [batch, layer, d_mlp]
    if method == "activation_x_weight_norm":
        if answer_tokens is not None or divide_by_final_norm_scale:
            raise ValueError("activation_x_weight_norm uses neither answer_tokens nor the final norm scale")
        norms = torch.stack([_value_vectors(model, L).norm(dim=-1) for L in range(n_layers)])  # [layer, d_mlp]
        return acts.abs() * norms
    if answer_tokens is None:
        raise ValueError("method 'direct_effect' needs answer_tokens ([batch, 2] or [2])")
    direction = logit_diff_direction(model, answer_pairs(answer_tokens, tokens.shape[0]))  # [batch, d_model]
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


# ---------------------------------------------------------------------------------------------------------
# What a neuron writes, read as tokens
# ---------------------------------------------------------------------------------------------------------


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
        layer = check_index(f"neurons[{i}] layer", item[0], model.cfg.n_layers)
        n = check_index(f"neurons[{i}] neuron", item[1], _d_mlp(model))
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


# ---------------------------------------------------------------------------------------------------------
# How unified a neuron's tokens are, against baselines
# ---------------------------------------------------------------------------------------------------------


def mean_pairwise_cosine(vectors: Float[Tensor, "k d"]) -> float:
    """Average cosine similarity over all distinct pairs of rows (1: all parallel, ~0: unrelated)."""
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(f"need a [k >= 2, d] tensor; got {tuple(vectors.shape)}")
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    sims = unit @ unit.T
    k = vectors.shape[0]
    return float((sims.sum() - sims.diagonal().sum()) / (k * (k - 1)))


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
    n_layers, d_mlp = model.cfg.n_layers, _d_mlp(model)
    if layers is None:
        chosen = list(range(n_layers))
    else:
        chosen = [check_index(f"layers[{i}]", L, n_layers) for i, L in enumerate(layers)]
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


def coherence_against_baseline(
    coherence: pd.DataFrame, baseline: Float[Tensor, " n_samples"], name: str = "random"
) -> pd.DataFrame:
    """:func:`neuron_token_coherence`'s table with where each neuron falls in a baseline distribution.

    Adds ``{name}_percentile`` (percentage of baseline draws with a lower coherence; ties count one half),
    ``above_{name}_95`` (coherence above the baseline's 95th percentile) and ``{name}_95th`` (that percentile,
    the same in every row). Call it once per baseline (:func:`random_token_coherence`,
    :func:`random_neuron_coherence`) with different names.
    """
    if "coherence" not in coherence.columns:
        raise ValueError("coherence lacks a 'coherence' column (expected neuron_token_coherence's table)")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"name must be an identifier-like word; got {name!r}")
    base = torch.as_tensor(baseline, dtype=torch.float64).flatten()
    if base.numel() < 2 or not torch.isfinite(base).all():
        raise ValueError(f"baseline must hold at least 2 finite values; got {base.numel()}")
    values = torch.tensor(coherence["coherence"].to_numpy(dtype=np.float64))
    lower = (base[None, :] < values[:, None]).double().sum(1)
    tied = (base[None, :] == values[:, None]).double().sum(1)
    below = lower + 0.5 * tied
    q95 = float(torch.quantile(base, 0.95))
    return coherence.assign(
        **{
            f"{name}_percentile": (100.0 * below / base.numel()).tolist(),
            f"above_{name}_95": (values > q95).tolist(),
            f"{name}_95th": q95,
        }
    )
