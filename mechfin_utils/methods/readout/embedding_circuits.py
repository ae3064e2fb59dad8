"""Attention heads' weights read in embedding space (Dar et al. 2023): OV and QK circuits as token-to-token maps.

A head's OV circuit ``W_E W_V W_O W_U`` says, for a source token s and an output token t, how much the head
raises t's logit if it attends fully to a position holding s; its QK circuit ``W_E W_Q W_K^T W_E^T`` says how
much a query token wants to attend to a key token. Both are vocab x vocab matrices, never materialised here:
each is kept as two thin factors (:func:`ov_circuit_factors`, :func:`qk_circuit_factors`) whose product is
searched blockwise for its largest entries (:func:`factored_top_pairs`), restricted to vocabulary subsets
(:mod:`mechfin_utils.methods.readout.vocabulary`).

* :func:`ov_circuit_top_pairs` / :func:`qk_circuit_top_pairs` -- the largest (source, output) or (query, key)
  pairs;
* :func:`ov_top_outputs` -- for chosen source tokens, the outputs the head raises most;
* :func:`ov_answer_scores` / :func:`ov_answer_push_by_group` -- which source words a head's OV circuit turns into
  " Yes" rather than " No", per word and per group of words with a bootstrap interval.

The simplifications (the source position holds only its token embedding, biases and the final norm's 1/scale
left out, positions ignored) are spelled out in :func:`ov_circuit_top_pairs` and :func:`qk_circuit_top_pairs`.
With grouped-query attention a query head reads its key/value head's ``W_K``/``W_V`` (:func:`kv_head_of`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.stats import grouped_bootstrap
from mechfin_utils.methods.readout.heads import head_label, parse_head
from mechfin_utils.methods.readout.unembedding import (
    check_index,
    checked_token_ids,
    decode_each,
    single_token_ids,
    unembedding,
)

# ---------------------------------------------------------------------------------------------------------
# The largest entries of a product never formed
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The circuits' factors
# ---------------------------------------------------------------------------------------------------------


def kv_head_of(model: LoadedModel, head: int) -> int:
    """The key/value head a query head reads (grouped-query attention); the head itself without GQA.

    Hugging Face repeats each key/value head for ``n_heads // n_kv_heads`` consecutive query heads
    (``repeat_kv``), so query head ``h`` uses key/value head ``h // (n_heads // n_kv_heads)``.
    """
    cfg = model.cfg
    head = check_index("head", head, cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    if cfg.n_heads % n_kv:
        raise ValueError(f"{model.name}: n_heads={cfg.n_heads} is not a multiple of n_key_value_heads={n_kv}")
    return head // (cfg.n_heads // n_kv)


def _embeddings(model: LoadedModel, layer: int, ids: Tensor, normalise: bool) -> Float[Tensor, "n d_model"]:
    E = model.bridge.W_E.detach()[ids.to(model.bridge.W_E.device)]
    if normalise:
        # The block's input norm (weight folded into W_Q/W_K/W_V) as if the residual held only this token.
        E = model.bridge.blocks[layer].ln1(E)
    return E


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
    layer = check_index("layer", layer, model.cfg.n_layers)
    head = check_index("head", head, model.cfg.n_heads)
    src, out = checked_token_ids(model, source_ids, "source_ids"), checked_token_ids(model, output_ids, "output_ids")
    attn = model.bridge.blocks[layer].attn
    with torch.no_grad():
        W_V = attn.W_V.detach()[kv_head_of(model, head)]  # [d_model, d_head]
        W_O = attn.W_O.detach()[head]  # [d_head, d_model]
        W_U = unembedding(model, through_final_norm_gain)
        left = _embeddings(model, layer, src, normalise_source) @ W_V
        right = W_O @ W_U[:, out.to(W_U.device)]
    return left, right


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
    layer = check_index("layer", layer, model.cfg.n_layers)
    head = check_index("head", head, model.cfg.n_heads)
    q_ids, k_ids = checked_token_ids(model, query_ids, "query_ids"), checked_token_ids(model, key_ids, "key_ids")
    attn = model.bridge.blocks[layer].attn
    with torch.no_grad():
        W_Q = attn.W_Q.detach()[head]
        W_K = attn.W_K.detach()[kv_head_of(model, head)]
        left = _embeddings(model, layer, q_ids, normalise) @ W_Q / math.sqrt(model.cfg.d_head)
        right = (_embeddings(model, layer, k_ids, normalise) @ W_K).T
    return left, right


# ---------------------------------------------------------------------------------------------------------
# Tables of token pairs
# ---------------------------------------------------------------------------------------------------------


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
    the table; restrict ``output_ids`` (task tokens,
    :func:`~mechfin_utils.methods.readout.vocabulary.frequent_token_ids`) to see past them.

    Columns: rank, source_token, source_id, output_token, output_id, score (logit units).
    """
    left, right = ov_circuit_factors(
        model, layer, head, source_ids, output_ids, normalise_source, through_final_norm_gain
    )
    with torch.no_grad():
        scores, rows, cols = factored_top_pairs(left, right, k, largest=largest)
    src, out = checked_token_ids(model, source_ids, "source_ids"), checked_token_ids(model, output_ids, "output_ids")
    return _pairs_frame(model, scores, rows, cols, src, out, ("source", "output"))


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
    q_ids, k_ids = checked_token_ids(model, query_ids, "query_ids"), checked_token_ids(model, key_ids, "key_ids")
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
    src, out = checked_token_ids(model, source_ids, "source_ids"), checked_token_ids(model, output_ids, "output_ids")
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


# ---------------------------------------------------------------------------------------------------------
# Which source words a head turns into the first answer
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ov_answer_scores(
    model: LoadedModel,
    layer: int,
    head: int,
    source_ids: Sequence[int] | Tensor,
    answers: Sequence[str],
    normalise_source: bool = True,
) -> pd.DataFrame:
    """For each source token, how much head ``layer.head``'s OV circuit raises logit(a) - logit(b) if the head
    attends fully to a position holding that token (``answers = (a, b)``, e.g. ``(" Yes", " No")``).

    This is one column difference of the OV circuit ``E W_V W_O W_U`` (:func:`ov_circuit_factors`), with the
    same simplifications: the source position holds only its token embedding, biases and the final norm's
    1/scale are left out. Columns: source_token, source_id, score; rows in the order of ``source_ids``.
    """
    answer_ids = single_token_ids(model, answers)
    if len(answer_ids) != 2:
        raise ValueError(f"answers must be two strings (a, b); got {answers!r}")
    left, right = ov_circuit_factors(model, layer, head, source_ids, answer_ids, normalise_source)
    scores = left @ (right[:, 0] - right[:, 1])
    src = checked_token_ids(model, source_ids, "source_ids").tolist()
    return pd.DataFrame({"source_token": decode_each(model, src), "source_id": src, "score": scores.tolist()})


def ov_answer_push_by_group(
    model: LoadedModel,
    heads: Sequence[str],
    token_groups: dict[str, Sequence[int]],
    answers: Sequence[str],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per head and token group, the mean :func:`ov_answer_scores` over the group's tokens, with a bootstrap
    interval over tokens (how a typical word of the group pushes the answer if the head attends to it).

    Columns: head, group, n, estimate, low, high; heads in the given order, groups in the given order.
    """
    if not token_groups:
        raise ValueError("token_groups is empty")
    frames = []
    for head in heads:
        layer, index = parse_head(head, model.cfg.n_layers, model.cfg.n_heads)
        for group, ids in token_groups.items():
            if len(ids) < 2:
                raise ValueError(f"token group {group!r} has {len(ids)} token(s); an interval needs at least 2")
            scores = ov_answer_scores(model, layer, index, ids, answers)
            frames.append(scores.assign(head=head_label(layer, index), group=group))
    scores = pd.concat(frames, ignore_index=True)
    table = grouped_bootstrap(scores, ["head", "group"], "score", n_boot=n_boot, ci=ci, seed=seed)
    order = {
        "head": {head_label(*parse_head(h, model.cfg.n_layers, model.cfg.n_heads)): i for i, h in enumerate(heads)},
        "group": {g: i for i, g in enumerate(token_groups)},
    }
    table = table.sort_values(["head", "group"], key=lambda column: column.map(order[column.name]))
    return table.reset_index(drop=True)
