"""Projection to the vocabulary over a task set: what notebook 07 calls, built on :mod:`mechfin_utils.projection`.

:func:`logit_lens_trajectories` keeps every prompt's answer ranks and top token per layer (:func:`lens_and_mlp_readout`:
the same plus the MLP layers' pushes on the answer direction, from one forward pass);
:func:`~mechfin_utils.projection.logit_lens_agreement_by_prompt` the lens's agreement with the final output per
prompt; :func:`collect_over_batches` runs any of them (or ``projection.mlp_answer_contributions``,
``projection.neuron_scores``, ``dla.head_attribution``) over a task set's batches, clean and corrupted prompts apart.
Summaries: :func:`geometric_mean_ci` (ranks are heavy-tailed), :func:`named_heads_table`, :func:`ov_answer_scores` /
:func:`ov_answer_push_by_group` (which source words a head's OV circuit turns into " Yes" rather than " No"),
:func:`phrase_vocabulary`, :func:`coherence_against_baseline`, :func:`pair_value_frame`; :func:`token_table` /
:func:`lens_table` print tokens with visible whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.dla import parse_head
from mechfin_utils.inputs import check_tokens
from mechfin_utils.models import LoadedModel
from mechfin_utils.projection import (
    AnswerProjection,
    LogitLensTokens,
    _answer_pairs,
    _ids_tensor,
    _mlp_projection_from,
    _mlp_projection_hooks,
    _run_last_position,
    answer_token_ids,
    decode_each,
    lens_logits,
    ov_circuit_factors,
    residual_stream_names,
)
from mechfin_utils.stats import BootstrapResult, bootstrap_ci, grouped_bootstrap

WORD_TOKEN_PATTERN = r"^ ?[A-Za-z]{2,}$"
"""A token that is a word (or a word piece) of letters, with or without its leading space."""


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
    answers = _checked_answer_pairs(model, tokens, answer_tokens)
    cached = _run_last_position(model, tokens, residual_stream_names(model))
    return _lens_trajectories_from(model, cached, answers)


def _checked_answer_pairs(model: LoadedModel, tokens: Tensor, answer_tokens) -> Int[Tensor, "batch 2"]:
    check_tokens(tokens, model.cfg.d_vocab, model_name=model.name)
    answers = _answer_pairs(torch.as_tensor(answer_tokens, dtype=torch.long), tokens.shape[0])
    _ids_tensor(model, answers, "answer_tokens")  # every id in the vocabulary, or a ValueError naming it
    return answers


def _lens_trajectories_from(
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


class LensAndMLP(NamedTuple):
    """:func:`logit_lens_trajectories` and :func:`mlp_answer_contributions` of the same prompts."""

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
    answers = _checked_answer_pairs(model, tokens, answer_tokens)
    cached = _run_last_position(model, tokens, residual_stream_names(model) + _mlp_projection_hooks(model))
    return LensAndMLP(
        lens=_lens_trajectories_from(model, cached, answers), mlp=_mlp_projection_from(model, cached, answers)
    )


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
    if callable(concat):  # e.g. mechfin_utils.dla.HeadAttribution
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
    :class:`LensAgreement`, :class:`LensAndMLP`),
    or an object with a ``concat`` classmethod (``dla.HeadAttribution``); results are joined along the batch
    axis in batch order, so row i of ``"clean"`` and of ``"corrupted"`` are the two prompts of one pair, and
    row i belongs to the i-th pair of ``[p for b in batches for p in b.pairs]``.
    (``mechfin_utils.dla.over_batches`` does the same for the DLA analyses, whose signature it fixes.)
    """
    for run in runs:
        if run not in ("clean", "corrupted"):
            raise ValueError(f"runs may contain 'clean' and 'corrupted'; got {run!r}")
    name = getattr(analysis, "__name__", None) or getattr(getattr(analysis, "func", None), "__name__", repr(analysis))
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
    with :func:`mechfin_utils.stats.bootstrap_ci` and transformed back, so the interval is that of the
    geometric mean. Zero or negative values raise a ValueError naming the first.
    """
    if isinstance(values, Tensor):
        array = values.detach().double().cpu().numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
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

    ``trajectories`` maps run names to :class:`LensTrajectories` (as :func:`collect_over_batches` returns);
    ``answers`` names the two answer columns, e.g. ``(" Yes", " No")``. Keys read ``"Yes · clean"``; each
    value's arrays run over layers.
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


def readable_token(text: str) -> str:
    """A token's text with its whitespace made visible for tables: `` Yes`` -> ``␣Yes``, ``"\\n"`` -> ``\\n``."""
    if not isinstance(text, str):
        raise ValueError(f"token text must be a string; got {type(text).__name__} {text!r}")
    if text == "":
        return "''"
    return "".join(_VISIBLE_WHITESPACE.get(ch, ch) for ch in text)


_VISIBLE_WHITESPACE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def token_table(
    tidy: pd.DataFrame, index: str | Sequence[str], columns: str = "rank", values: str = "token"
) -> pd.DataFrame:
    """A tidy token table (one row per token) as a wide one for reading, with whitespace made visible.

    E.g. :func:`logit_lens_tokens`' ``top_tokens`` with ``index="layer"`` gives one row per layer and one column
    per rank. Each (index, column) cell must hold exactly one token (else a ValueError naming a duplicate).
    """
    keys = [index] if isinstance(index, str) else list(index)
    missing = set(keys + [columns, values]) - set(tidy.columns)
    if missing:
        raise ValueError(f"table lacks columns {sorted(missing)} (it has {list(tidy.columns)})")
    duplicated = tidy.duplicated(keys + [columns], keep=False)
    if duplicated.any():
        row = tidy[duplicated].iloc[0]
        raise ValueError(f"more than one {values!r} for {dict(row[keys + [columns]])}; give a finer index")
    wide = tidy.assign(**{values: tidy[values].map(readable_token)}).pivot(index=keys, columns=columns, values=values)
    wide.columns.name = columns
    return wide


def lens_table(lens: LogitLensTokens) -> pd.DataFrame:
    """One prompt's logit lens for reading: per layer the top tokens (readable) and each answer's rank."""
    wide = token_table(lens.top_tokens, "layer")
    wide.columns = [f"top {c}" for c in wide.columns]
    for j, answer in enumerate(lens.answers):
        wide[f"rank of {readable_token(answer)}"] = lens.answer_ranks[:, j].tolist()
    return wide


def named_heads_table(
    head_values: Float[Tensor, "batch n_layers n_heads"],
    heads: Sequence[str],
    model: LoadedModel,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Chosen heads' per-prompt values (e.g. ``dla.head_attribution(...).heads``) summarised with intervals.

    Columns: head, mean (over prompts), low, high (percentile bootstrap over prompts), rank_by_abs (1 = the head
    with the largest |mean| among all the model's heads).
    """
    if not isinstance(head_values, Tensor) or head_values.ndim != 3:
        shape = tuple(head_values.shape) if isinstance(head_values, Tensor) else type(head_values).__name__
        raise ValueError(f"head_values must be [batch, n_layers, n_heads]; got {shape}")
    expected = (model.cfg.n_layers, model.cfg.n_heads)
    if tuple(head_values.shape[1:]) != expected:
        raise ValueError(f"head_values has {tuple(head_values.shape[1:])} layers x heads; {model.name} has {expected}")
    chosen = [parse_head(h, model.cfg.n_layers, model.cfg.n_heads) for h in heads]
    if not chosen:
        raise ValueError("heads is empty")
    interval = bootstrap_ci(head_values.detach().double().cpu().numpy(), n_boot=n_boot, ci=ci, seed=seed)
    mean = torch.as_tensor(interval.estimate)
    order = mean.abs().flatten().argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, order.numel() + 1)
    rank = rank.reshape(mean.shape)
    return pd.DataFrame(
        {
            "head": [f"{L}.{H}" for L, H in chosen],
            "mean": [float(interval.estimate[L, H]) for L, H in chosen],
            "low": [float(interval.low[L, H]) for L, H in chosen],
            "high": [float(interval.high[L, H]) for L, H in chosen],
            "rank_by_abs": [int(rank[L, H]) for L, H in chosen],
        }
    )


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
    answer_ids = answer_token_ids(model, answers)
    if len(answer_ids) != 2:
        raise ValueError(f"answers must be two strings (a, b); got {answers!r}")
    left, right = ov_circuit_factors(model, layer, head, source_ids, answer_ids, normalise_source)
    scores = left @ (right[:, 0] - right[:, 1])
    src = _ids_tensor(model, source_ids, "source_ids").tolist()
    return pd.DataFrame({"source_token": decode_each(model, src), "source_id": src, "score": scores.tolist()})


class PhraseVocabulary(NamedTuple):
    """Word tokens of the task's swapped phrases: only in protected-basis phrases, only in legitimate-reason
    phrases, and in both (template words such as `` because`` or `` his``), each in first-seen order."""

    protected_only: list[int]
    legitimate_only: list[int]
    shared: list[int]


def phrase_vocabulary(model: LoadedModel, pairs: Sequence, pattern: str = WORD_TOKEN_PATTERN) -> PhraseVocabulary:
    """Split the word tokens of the pairs' ``protected_phrase`` / ``legitimate_phrase`` into three sets.

    A phrase is tokenised as it appears mid-sentence (after a space); only tokens whose text matches
    ``pattern`` (default: letters, with or without a leading space) are kept, so punctuation is not a "word".
    """
    regex = re.compile(pattern)
    seen: dict[str, list[int]] = {"protected": [], "legitimate": []}
    for i, pair in enumerate(pairs):
        for side in ("protected", "legitimate"):
            phrase = getattr(pair, f"{side}_phrase", None)
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"pairs[{i}] ({getattr(pair, 'id', '?')}) has no {side}_phrase")
            for tid in model.tokenizer(" " + phrase.strip(), add_special_tokens=False)["input_ids"]:
                if regex.match(model.tokenizer.decode([tid])) and tid not in seen[side]:
                    seen[side].append(int(tid))
    if not seen["protected"] and not seen["legitimate"]:
        raise ValueError("no word tokens in the pairs' phrases")
    protected, legitimate = set(seen["protected"]), set(seen["legitimate"])
    return PhraseVocabulary(
        protected_only=[t for t in seen["protected"] if t not in legitimate],
        legitimate_only=[t for t in seen["legitimate"] if t not in protected],
        shared=[t for t in seen["protected"] if t in legitimate],
    )


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
            frames.append(scores.assign(head=f"{layer}.{index}", group=group))
    scores = pd.concat(frames, ignore_index=True)
    table = grouped_bootstrap(scores, ["head", "group"], "score", n_boot=n_boot, ci=ci, seed=seed)
    order = {
        "head": {
            f"{L}.{H}": i
            for i, (L, H) in enumerate(parse_head(h, model.cfg.n_layers, model.cfg.n_heads) for h in heads)
        },
        "group": {g: i for i, g in enumerate(token_groups)},
    }
    table = table.sort_values(["head", "group"], key=lambda column: column.map(order[column.name]))
    return table.reset_index(drop=True)


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


def readable_columns(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` whose token columns (``token`` and every ``*_token``) show whitespace visibly."""
    columns = [c for c in table.columns if isinstance(c, str) and (c == "token" or c.endswith("_token"))]
    if not columns:
        raise ValueError(f"table has no 'token' or '*_token' column (columns: {list(table.columns)})")
    return table.assign(**{c: table[c].map(readable_token) for c in columns})


def prompt_word_ids(model: LoadedModel, texts: Sequence[str], pattern: str = WORD_TOKEN_PATTERN) -> list[int]:
    """The distinct word tokens of the prompts, in first-seen order: a task vocabulary for circuit tables.

    Tokens whose decoded text does not match ``pattern`` (punctuation, digits, special tokens) are left out.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty sequence of prompts")
    regex = re.compile(pattern)
    special = set(model.tokenizer.all_special_ids)
    out: list[int] = []
    for text in texts:
        for tid in model.tokenizer(text, add_special_tokens=False)["input_ids"]:
            if tid not in special and tid not in out and regex.match(model.tokenizer.decode([tid])):
                out.append(int(tid))
    if not out:
        raise ValueError(f"no token of the prompts matches {pattern!r}")
    return out
