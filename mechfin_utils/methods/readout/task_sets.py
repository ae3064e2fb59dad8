"""Readings over a task set: a per-prompt analysis run on every batch, clean and corrupted prompts apart, joined.

The readouts of this subpackage return one value per prompt (a tensor ``[batch, ...]``, or a NamedTuple of them).
A task set comes as batches of prompt pairs of equal token length; :func:`collect_over_batches` runs any
analysis over all of them and joins the results along the batch axis, so row i of ``"clean"`` and of
``"corrupted"`` are the two prompts of pair i, ready for a bootstrap over pairs. (For the DLA analyses, whose
signature is fixed, :func:`mechfin_utils.methods.readout.dla.over_batches` does the same.)

:func:`lens_and_mlp_readout` is notebook 07's task-set pass: the logit lens's answer ranks
(:mod:`~mechfin_utils.methods.readout.token_lens`) and the MLP layers' pushes on the answer direction
(:mod:`~mechfin_utils.methods.readout.ffn_updates`) from one forward pass. :func:`pair_value_frame` lays per-pair
values out as ``screener.baseline.pair_scores`` does, so its per-basis tables apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.models import LoadedModel
from mechfin_utils.methods.readout.ffn_updates import (
    AnswerProjection,
    mlp_answer_contributions_from_cache,
    mlp_answer_hooks,
)
from mechfin_utils.methods.readout.final_position import run_last_position
from mechfin_utils.methods.readout.token_lens import (
    LensTrajectories,
    logit_lens_trajectories_from_cache,
    residual_stream_names,
)
from mechfin_utils.methods.readout.unembedding import checked_answer_pairs

# ---------------------------------------------------------------------------------------------------------
# Any analysis over the batches of a task set
# ---------------------------------------------------------------------------------------------------------


def _concatenate(parts: list, what: str):
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # a NamedTuple: tensors joined field by field
        joined = []
        for name in first._fields:
            values = [getattr(part, name) for part in parts]
            if isinstance(values[0], Tensor):
                joined.append(torch.cat(values, dim=0))
            elif isinstance(values[0], tuple) and hasattr(values[0], "_fields"):  # nested NamedTuple
                joined.append(_concatenate(values, f"{what}.{name}"))
            elif all(v == values[0] for v in values):
                joined.append(values[0])
            else:
                raise ValueError(f"{what}: field {name!r} differs between batches ({values[0]!r}, ...); cannot join")
        return type(first)(*joined)
    concat = getattr(type(first), "concat", None)
    if callable(concat):  # e.g. mechfin_utils.methods.readout.dla.HeadAttribution
        return concat(parts)
    raise TypeError(f"{what} returned {type(first).__name__}; collect_over_batches cannot concatenate that")


def collect_over_batches(
    analysis,
    model: LoadedModel,
    batches,
    runs: Sequence[Literal["clean", "corrupted"]] = ("clean", "corrupted"),
    *,
    pass_answer_tokens: bool = True,
    **kwargs,
) -> dict[str, object]:
    """Run a per-prompt analysis on every batch, clean and corrupted prompts separately, and join the prompts.

    ``analysis(model, tokens, answer_tokens=batch.answer_tokens, **kwargs)`` is called for each batch and run
    (``answer_tokens`` left out when ``pass_answer_tokens`` is False). It may return a tensor ``[batch, ...]``, a
    NamedTuple of such tensors or of such NamedTuples (:class:`LensTrajectories`, :class:`AnswerProjection`,
    :class:`~mechfin_utils.methods.readout.token_lens.LensAgreement`, :class:`LensAndMLP`),
    or an object with a ``concat`` classmethod (``dla.HeadAttribution``); results are joined along the batch
    axis in batch order, so row i of ``"clean"`` and of ``"corrupted"`` are the two prompts of one pair, and
    row i belongs to the i-th pair of ``[p for b in batches for p in b.pairs]``.
    (``mechfin_utils.methods.readout.dla.over_batches`` does the same for the DLA analyses, whose signature it fixes.)
    """
    for run in runs:
        if run not in ("clean", "corrupted"):
            raise ValueError(f"runs may contain 'clean' and 'corrupted'; got {run!r}")
    name = str(
        getattr(analysis, "__name__", None) or getattr(getattr(analysis, "func", None), "__name__", repr(analysis))
    )
    collected: dict[str, list] = {run: [] for run in runs}
    for index, batch in enumerate(batches):
        for run in runs:
            tokens = getattr(batch, f"{run}_tokens", None)
            if tokens is None:
                raise ValueError(f"batch {index} has no {run}_tokens")
            extra = dict(kwargs)
            if pass_answer_tokens:
                if getattr(batch, "answer_tokens", None) is None:
                    raise ValueError(f"batch {index} has no answer_tokens")
                extra["answer_tokens"] = batch.answer_tokens
            collected[run].append(analysis(model, tokens, **extra))
    if not collected[runs[0]]:
        raise ValueError("collect_over_batches got no batches")
    return {run: _concatenate(parts, name) for run, parts in collected.items()}


# ---------------------------------------------------------------------------------------------------------
# Notebook 07's pass: the logit lens and the MLP layers from one forward pass
# ---------------------------------------------------------------------------------------------------------


class LensAndMLP(NamedTuple):
    """:func:`~mechfin_utils.methods.readout.token_lens.logit_lens_trajectories` and
    :func:`~mechfin_utils.methods.readout.ffn_updates.mlp_answer_contributions` of the same prompts."""

    lens: LensTrajectories
    mlp: AnswerProjection


@torch.no_grad()
def lens_and_mlp_readout(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
) -> LensAndMLP:
    """Both per-prompt readings of notebook 07's task-set pass from *one* forward pass: the logit lens's answer
    ranks per layer and each MLP layer's push on the answer direction. Identical to calling the two functions
    separately, at half the cost (the forward pass dominates both)."""
    answers = checked_answer_pairs(model, tokens, answer_tokens)
    cached = run_last_position(model, tokens, residual_stream_names(model) + mlp_answer_hooks(model))
    return LensAndMLP(
        lens=logit_lens_trajectories_from_cache(model, cached, answers),
        mlp=mlp_answer_contributions_from_cache(model, cached, answers),
    )


# ---------------------------------------------------------------------------------------------------------
# Per-pair values in the layout of the per-basis tables
# ---------------------------------------------------------------------------------------------------------


def pair_value_frame(pairs: Sequence, clean: Float[Tensor, " n"], corrupted: Float[Tensor, " n"]) -> pd.DataFrame:
    """Per-pair values (e.g. a component's share of the logit difference) in the layout of
    ``baseline.pair_scores``, so ``baseline.per_group_table`` gives per-basis means with intervals.

    Columns: pair_id, basis, template_id, clean_logit_diff, corrupted_logit_diff, gap (clean - corrupted).
    Row i is ``pairs[i]`` (the order :func:`collect_over_batches` joins prompts in).
    """
    clean_t = torch.as_tensor(clean, dtype=torch.float64).flatten()
    corrupted_t = torch.as_tensor(corrupted, dtype=torch.float64).flatten()
    if not (len(pairs) == clean_t.numel() == corrupted_t.numel()):
        raise ValueError(f"{len(pairs)} pairs but {clean_t.numel()} clean and {corrupted_t.numel()} corrupted values")
    return pd.DataFrame(
        {
            "pair_id": [p.id for p in pairs],
            "basis": [p.basis for p in pairs],
            "template_id": [p.template_id for p in pairs],
            "clean_logit_diff": clean_t.tolist(),
            "corrupted_logit_diff": corrupted_t.tolist(),
            "gap": (clean_t - corrupted_t).tolist(),
        }
    )
