"""The logit lens read as tokens (nostalgebraist 2020): what the residual stream would predict if the model stopped.

The accumulated residual stream after each block is normalised by the final norm *with its own scale* and
multiplied by ``W_U`` (:func:`lens_logits`; applied to the final stream it gives the model's logits exactly). For
one prompt, :func:`logit_lens_tokens` lists the top-k tokens at the last position and the rank and probability of
the answer tokens at every layer. How far to trust the lens is measured, not assumed:
:func:`logit_lens_agreement_by_prompt` gives, per prompt and layer, how often the lens's top-1 equals the model's
final top-1 and the KL divergence between the two (the lens is poor in early layers, whose residual streams are
not yet in the basis the unembedding reads; the tuned lens exists for that reason).

Over a task set, :func:`logit_lens_trajectories` keeps per prompt only what an average needs (the answers' ranks
and probabilities and the top token, per layer), and :func:`answer_rank_bands` summarises the ranks as
geometric means with bootstrap intervals (:func:`geometric_mean_ci`: ranks are heavy-tailed).

(The logit-*difference* lens, additive over layers, is :func:`mechfin_utils.methods.readout.dla.logit_lens`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.arrays import as_checked_array
from mechfin_utils.core.inputs import check_tokens
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.stats import BootstrapResult, bootstrap_ci
from mechfin_utils.methods.readout.final_position import run_last_position
from mechfin_utils.methods.readout.unembedding import (
    apply_final_norm,
    checked_answer_pairs,
    decode_each,
    single_token_ids,
    unembed_bias,
    unembedding,
)

# ---------------------------------------------------------------------------------------------------------
# One prompt: the top tokens and the answers' ranks at every layer
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
    return apply_final_norm(model, resid) @ W_U + unembed_bias(model)


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
    :func:`mechfin_utils.methods.readout.dla.logit_lens`.)

    Args:
        prompt:  the text (tokenised with the model's BOS decision), or its tokens ``[pos]`` / ``[1, pos]``.
        answers: single-token strings to follow, e.g. ``(" Yes", " No")``.
        k:       how many top tokens per layer.
    """
    answer_ids = single_token_ids(model, answers)
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
    cached = run_last_position(model, tokens, names)
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


# ---------------------------------------------------------------------------------------------------------
# How far the lens can be trusted: agreement with the model's output
# ---------------------------------------------------------------------------------------------------------


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
# Many prompts: the answers' trajectories, and their typical rank with an interval
# ---------------------------------------------------------------------------------------------------------


class LensTrajectories(NamedTuple):
    """The token-level logit lens of many prompts at their last position, layer by layer.

    ``layer`` i means "after i blocks" as in :class:`LogitLensTokens`; the last layer is the model's output.

    answer_ranks: ``[batch, layer, 2]`` 1-based rank, over the whole vocabulary, of each prompt's two answers
                  (column 0 the first answer of its pair, e.g. " Yes"; column 1 the second, " No").
    answer_probs: ``[batch, layer, 2]`` their softmax probabilities under the lens.
    top1:         ``[batch, layer]`` the lens's top token id.
    """

    answer_ranks: Int[Tensor, "batch layer 2"]
    answer_probs: Float[Tensor, "batch layer 2"]
    top1: Int[Tensor, "batch layer"]

    @property
    def agrees_with_final(self) -> Float[Tensor, "batch layer"]:
        """1.0 where the lens's top token at that layer is the model's final top token, else 0.0."""
        return (self.top1 == self.top1[:, -1:]).float()

    @property
    def choice_agrees_with_final(self) -> Float[Tensor, "batch layer"]:
        """1.0 where the lens ranks the two answers in the same order as the model's output does, else 0.0
        (does the lens at that layer already pick the answer the model ends up preferring?)."""
        prefers_first = self.answer_ranks[..., 0] < self.answer_ranks[..., 1]
        return (prefers_first == prefers_first[:, -1:]).float()


@torch.no_grad()
def logit_lens_trajectories(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
) -> LensTrajectories:
    """:func:`logit_lens_tokens` for a whole batch at once, keeping per prompt only what a task-set average needs:
    the answers' ranks and probabilities and the top token at every layer (one forward pass, last position).

    ``answer_tokens`` is ``[batch, 2]`` (a task batch's ``answer_tokens``) or ``[2]`` for every prompt.
    """
    answers = checked_answer_pairs(model, tokens, answer_tokens)
    cached = run_last_position(model, tokens, residual_stream_names(model))
    return logit_lens_trajectories_from_cache(model, cached, answers)


def logit_lens_trajectories_from_cache(
    model: LoadedModel, cached: dict[str, Tensor], answers: Int[Tensor, "batch 2"]
) -> LensTrajectories:
    """:func:`logit_lens_trajectories` from last-position residual streams already cached."""
    stack = torch.stack([cached[name] for name in residual_stream_names(model)], dim=1)  # [batch, layer, d_model]
    logits = lens_logits(model, stack)  # [batch, layer, d_vocab]
    index = answers.to(logits.device)[:, None, :].expand(-1, logits.shape[1], -1)  # [batch, layer, 2]
    answer_logits = logits.gather(-1, index)
    ranks = torch.stack([1 + (logits > answer_logits[..., j : j + 1]).sum(-1) for j in range(2)], dim=-1)
    probs = logits.softmax(-1).gather(-1, index)
    return LensTrajectories(answer_ranks=ranks.cpu(), answer_probs=probs.cpu(), top1=logits.argmax(-1).cpu())


def geometric_mean_ci(
    values: Float[Tensor, " n *element"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Geometric mean of positive values (e.g. token ranks) with a percentile-bootstrap interval over rows.

    Ranks are heavy-tailed (1, 3, 40, 20 000): an arithmetic mean is one outlier's number. The geometric mean,
    ``10 ** mean(log10 rank)``, is the typical rank on a log scale. The bootstrap is run on ``log10`` values
    with :func:`mechfin_utils.core.stats.bootstrap_ci` and transformed back, so the interval is that of the
    geometric mean. Zero or negative values raise a ValueError naming the first.
    """
    array = as_checked_array(values, "values", allow_nan=True)  # a NaN is named by the check below
    bad = np.argwhere(~(array > 0))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise ValueError(f"values must be positive for a geometric mean; values{list(where)} = {array[where]}")
    result = bootstrap_ci(np.log10(array), n_boot=n_boot, ci=ci, seed=seed)
    back = (lambda x: 10.0**x) if np.ndim(result.estimate) else (lambda x: float(10.0**x))
    return BootstrapResult(
        back(result.estimate), back(result.low), back(result.high), n=result.n, ci=result.ci, n_boot=result.n_boot
    )


def answer_rank_bands(
    trajectories: dict[str, LensTrajectories],
    answers: Sequence[str],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, BootstrapResult]:
    """Per run and answer, the geometric-mean rank at every layer with its interval (:func:`geometric_mean_ci`).

    ``trajectories`` maps run names to :class:`LensTrajectories` (as
    :func:`~mechfin_utils.methods.readout.task_sets.collect_over_batches` returns); ``answers`` names the two
    answer columns, e.g. ``(" Yes", " No")``. Keys read ``"Yes · clean"``; each value's arrays run over layers.
    """
    if len(answers) != 2:
        raise ValueError(f"answers must name the two answer columns; got {answers!r}")
    if not trajectories:
        raise ValueError("trajectories is empty")
    return {
        f"{answer.strip()} · {run}": geometric_mean_ci(found.answer_ranks[:, :, j], n_boot=n_boot, ci=ci, seed=seed)
        for run, found in trajectories.items()
        for j, answer in enumerate(answers)
    }
