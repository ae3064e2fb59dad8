"""Tokenizer alignment and batching of prompt pairs: from validated pairs to padding-free token batches.

Patching swaps activations position by position between the two prompts of a pair, so both must have the same
number of tokens, and batches are never padded (a pad token would be one more position to patch). This module
turns the pairs of :mod:`mechfin_utils.tasks.fair_lending` (fair-lending or counterfactual, one family at a time)
into batches for one model's tokenizer:

1. :func:`align_pairs` checks them against one tokenizer (with the model's BOS decision): the answers must be
   single tokens (else an error), and the two prompts of a pair must have the same number of tokens. Pairs that
   fail are *excluded and reported* in the :class:`AlignmentReport` (each as an :class:`Exclusion` with the two
   lengths), never dropped silently.
2. :func:`make_batches` groups the kept pairs by token length into :class:`TaskBatch` objects (tokens for both
   prompts, answer tokens ``[batch, 2]`` with the expected clean answer first), at most ``max_batch`` pairs each
   (:func:`chunks`).
3. :func:`largest_template_batch` picks the biggest group that also shares a template, so that every position
   means the same thing in every row (what a position-resolved heat map needs).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from mechfin_utils.tasks.fair_lending import P, Pair
from mechfin_utils.tasks.task_tables import TaskDataError

# ---------------------------------------------------------------------------------------------------------
# Tokenizer alignment
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TokenizerView:
    """How one model (or bare tokenizer + BOS decision) turns text into ids: the only thing alignment needs."""

    name: str
    prepend_bos: bool
    token_ids: Callable[[str], list[int]]
    decode_one: Callable[[int], str]
    device: Any
    n_ctx: int | None = None  # the model's context; None for a bare tokenizer

    @property
    def key(self) -> tuple[str, bool]:
        return (self.name, self.prepend_bos)


def _tokenizer_view(model_or_tokenizer: Any, prepend_bos: bool | None) -> _TokenizerView:
    """A LoadedModel brings its own BOS decision; a bare tokenizer needs ``prepend_bos`` stated explicitly."""
    if hasattr(model_or_tokenizer, "token_ids") and hasattr(model_or_tokenizer, "spec"):
        model = model_or_tokenizer
        if prepend_bos is not None and prepend_bos != model.prepend_bos:
            raise ValueError(
                f"prepend_bos={prepend_bos} contradicts {model.name}'s own decision ({model.prepend_bos}); "
                "leave it out when passing a model"
            )
        tok = model.tokenizer
        return _TokenizerView(
            model.name,
            model.prepend_bos,
            model.token_ids,
            lambda i: tok.decode([i]),
            model.cfg.device,
            int(model.cfg.n_ctx),
        )
    tok = model_or_tokenizer
    if not callable(tok) or not hasattr(tok, "decode"):
        raise TypeError(f"expected a LoadedModel or a Hugging Face tokenizer, got {type(tok).__name__}")
    if not isinstance(prepend_bos, bool):
        raise ValueError(
            "with a bare tokenizer, say whether a BOS token is prepended: prepend_bos=True (GPT-2) or False "
            "(SmolLM2-135M-Instruct); a LoadedModel carries this decision itself"
        )
    bos = tok.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError(f"prepend_bos=True but tokenizer {tok.name_or_path!r} has no BOS token")

    def token_ids(text: str) -> list[int]:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        return [bos] + ids if prepend_bos else ids

    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    return _TokenizerView(name, prepend_bos, token_ids, lambda i: tok.decode([i]), "cpu")


class Exclusion(NamedTuple):
    """A pair left out of batching: ``reason`` is a short category, ``detail`` the numbers behind it."""

    pair: Pair
    reason: str
    detail: str


UNEQUAL_LENGTH = "unequal_token_length"


@dataclass
class AlignmentReport:
    """Which pairs a tokenizer can batch without padding, and why the others cannot.

    ``kept``: pairs whose two prompts have equal token length, in file order. ``excluded``: the others, as
    :class:`Exclusion` ``(pair, reason, detail)``. ``answer_ids``: each answer string's single token id.
    ``lengths``: token length (BOS included) of each kept pair, by id.
    """

    tokenizer_name: str
    prepend_bos: bool
    kept: list
    excluded: list[Exclusion]
    answer_ids: dict[str, int]
    lengths: dict[str, int]
    _view: _TokenizerView = field(repr=False, compare=False)

    @property
    def n_total(self) -> int:
        return len(self.kept) + len(self.excluded)

    def summary(self) -> pd.DataFrame:
        """Counts per basis: total, kept, and one column per exclusion reason (plus an ``all`` row)."""
        reasons = sorted({e.reason for e in self.excluded})
        counts: dict[str, Counter] = defaultdict(Counter)
        for pair in self.kept:
            counts[pair.basis]["total"] += 1
            counts[pair.basis]["kept"] += 1
        for exclusion in self.excluded:
            counts[exclusion.pair.basis]["total"] += 1
            counts[exclusion.pair.basis][exclusion.reason] += 1
        columns = ["total", "kept", *reasons]
        table = pd.DataFrame(
            [[counts[b][c] for c in columns] for b in sorted(counts)], index=sorted(counts), columns=columns
        )
        table.index.name = "basis"
        table.loc["all"] = table.sum()
        return table

    def __str__(self) -> str:
        head = (
            f"{self.tokenizer_name} (prepend_bos={self.prepend_bos}): kept {len(self.kept)} of {self.n_total} "
            f"pairs, excluded {len(self.excluded)}"
        )
        lines = [head, self.summary().to_string()]
        lines += [f"  excluded {e.pair.id}: {e.reason} ({e.detail})" for e in self.excluded]
        return "\n".join(lines)


def _check_homogeneous(pairs: Sequence[Pair]) -> None:
    if len(pairs) == 0:
        raise ValueError("no pairs given")
    kinds = {type(p).__name__ for p in pairs}
    unknown = kinds - {"FairLendingPair", "CounterfactualPair"}
    if unknown:
        raise TypeError(f"expected FairLendingPair or CounterfactualPair objects, got {sorted(unknown)}")
    if len(kinds) > 1:
        raise TypeError(f"pairs mix kinds {sorted(kinds)}; align and batch each family separately")
    ids = Counter(p.id for p in pairs)
    repeated = sorted(i for i, n in ids.items() if n > 1)
    if repeated:
        raise TaskDataError(f"pair id(s) {repeated[:10]} given more than once")


def _answer_ids(view: _TokenizerView, pairs: Sequence[Pair]) -> dict[str, int]:
    """Every answer string must be exactly one token (no BOS): a TaskDataError names the first that is not."""
    ids: dict[str, int] = {}
    for pair in pairs:
        for answer in pair.answers:
            if answer in ids:
                continue
            raw = view.token_ids(answer)[1 if view.prepend_bos else 0 :]
            if len(raw) != 1:
                pieces = [view.decode_one(i) for i in raw]
                raise TaskDataError(
                    f"answer {answer!r} (pair {pair.id}) is {len(raw)} tokens for {view.name}: {pieces}; "
                    "answers must be single tokens"
                )
            ids[answer] = raw[0]
    return ids


def align_pairs(model_or_tokenizer: Any, pairs: Sequence[P], *, prepend_bos: bool | None = None) -> AlignmentReport:
    """Check pairs against one tokenizer: answers single tokens, both prompts of a pair equally long.

    Args:
        model_or_tokenizer: a :class:`~mechfin_utils.core.models.LoadedModel` (its BOS decision is used), or a bare
            Hugging Face tokenizer together with an explicit ``prepend_bos``.
        pairs: fair-lending pairs or counterfactual pairs (one family per call).
        prepend_bos: only with a bare tokenizer.

    Returns:
        An :class:`AlignmentReport`; pairs of unequal token length are in ``excluded`` with the two lengths.

    Raises:
        TaskDataError: an answer string is not a single token (the message names it and its pieces), or a prompt
            is longer than the model's context (every such pair is named, with its line and length).
    """
    view = _tokenizer_view(model_or_tokenizer, prepend_bos)
    _check_homogeneous(pairs)
    answer_ids = _answer_ids(view, pairs)
    kept, excluded, lengths, too_long = [], [], {}, []
    for pair in pairs:
        first, second = (len(view.token_ids(t)) for t in pair.texts)
        if view.n_ctx is not None and max(first, second) > view.n_ctx:
            too_long.append(f"{pair.id} (line {pair.line}): {max(first, second)} tokens")
        elif first == second:
            kept.append(pair)
            lengths[pair.id] = first
        else:
            excluded.append(Exclusion(pair, UNEQUAL_LENGTH, f"{first} vs {second} tokens"))
    if too_long:
        raise TaskDataError(
            f"{len(too_long)} pair(s) exceed {view.name}'s context of {view.n_ctx} tokens, refused before any "
            "forward pass: " + "; ".join(too_long)
        )
    return AlignmentReport(view.name, view.prepend_bos, kept, excluded, answer_ids, lengths, view)


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TaskBatch:
    """Pairs of one token length, tokenised, ready for ``run_with_cache`` / patching.

    For fair-lending pairs ``clean_tokens`` holds the clean prompts and ``corrupted_tokens`` the corrupted
    ones; for counterfactual pairs they hold prompt A and prompt B (also reachable as ``tokens_a`` /
    ``tokens_b``). ``answer_tokens[:, 0]`` is the answer expected for the clean prompt (`` Yes``; for
    counterfactual pairs `` approved``) and ``[:, 1]`` the other (`` No``; `` denied``), so
    ``metrics.logit_diff(logits, batch.answer_tokens)`` is the task metric. ``str_tokens`` labels the
    positions of the *first* clean prompt (exact for every row only when the batch shares a template, see
    :func:`largest_template_batch`).
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_tokens: Int[Tensor, "batch 2"]
    pairs: list
    str_tokens: list[str]

    @property
    def tokens_a(self) -> Int[Tensor, "batch pos"]:
        return self.clean_tokens

    @property
    def tokens_b(self) -> Int[Tensor, "batch pos"]:
        return self.corrupted_tokens

    def head(self, n: int) -> TaskBatch:
        """The first ``n`` pairs of this batch (all of them when it has fewer), e.g. to bound a sweep's cost."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        return TaskBatch(
            self.clean_tokens[:n], self.corrupted_tokens[:n], self.answer_tokens[:n], self.pairs[:n], self.str_tokens
        )

    @property
    def batch_size(self) -> int:
        return int(self.clean_tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean_tokens.shape[1])

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.pairs]

    @property
    def template_ids(self) -> list[str]:
        return sorted({p.template_id for p in self.pairs})

    def differing_positions(self, row: int = 0) -> list[int]:
        """Positions where the two prompts of ``row`` have different tokens (the swapped phrase)."""
        return torch.nonzero(self.clean_tokens[row] != self.corrupted_tokens[row]).flatten().tolist()

    def __repr__(self) -> str:
        return (
            f"TaskBatch({self.batch_size} pairs x {self.seq_len} tokens, templates {self.template_ids}, "
            f"first {self.ids[0]})"
        )


def _kept_pairs(
    model_or_tokenizer: Any, pairs_or_report: Sequence[P] | AlignmentReport, prepend_bos: bool | None
) -> tuple[_TokenizerView, AlignmentReport]:
    """The view and the kept pairs; raw pairs that would need excluding are an error, never a silent drop."""
    view = _tokenizer_view(model_or_tokenizer, prepend_bos)
    if isinstance(pairs_or_report, AlignmentReport):
        report = pairs_or_report
        if report._view.key != view.key:
            raise ValueError(
                f"the AlignmentReport was made for {report.tokenizer_name} (prepend_bos={report.prepend_bos}), "
                f"not {view.name} (prepend_bos={view.prepend_bos})"
            )
        if not report.kept:
            raise TaskDataError(f"the AlignmentReport keeps no pairs for {report.tokenizer_name}")
    else:
        report = align_pairs(model_or_tokenizer, pairs_or_report, prepend_bos=prepend_bos)
        if report.excluded:
            listed = "; ".join(f"{e.pair.id} line {e.pair.line}: {e.detail}" for e in report.excluded[:5])
            more = f" and {len(report.excluded) - 5} more" if len(report.excluded) > 5 else ""
            raise TaskDataError(
                f"{len(report.excluded)} pair(s) cannot be batched with {view.name} ({listed}{more}); call "
                "align_pairs first and pass its report, which excludes them explicitly"
            )
    return view, report


def _build_batch(view: _TokenizerView, report: AlignmentReport, pairs: Sequence[Pair]) -> TaskBatch:
    clean = torch.tensor([view.token_ids(p.texts[0]) for p in pairs], dtype=torch.long, device=view.device)
    corrupted = torch.tensor([view.token_ids(p.texts[1]) for p in pairs], dtype=torch.long, device=view.device)
    answers = torch.tensor(
        [[report.answer_ids[a] for a in p.answers] for p in pairs], dtype=torch.long, device=view.device
    )
    str_tokens = [view.decode_one(int(i)) for i in clean[0]]
    return TaskBatch(clean, corrupted, answers, list(pairs), str_tokens)


def check_max_batch(max_batch: int | None) -> None:
    """``max_batch`` is a positive integer (pairs or prompts per batch) or None (no limit)."""
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")


def chunks(items: list, max_batch: int | None) -> list[list]:
    """``items`` cut, in order, into lists of at most ``max_batch`` (one list when ``max_batch`` is None)."""
    check_max_batch(max_batch)
    if max_batch is None:
        return [items]
    return [items[i : i + max_batch] for i in range(0, len(items), max_batch)]


def commonest_length(counts: Counter[int]) -> int:
    """The token length with the most items (``counts``: items per length), the shortest among equally common ones."""
    return min(counts, key=lambda length: (-counts[length], length))


def make_batches(
    model_or_tokenizer: Any,
    pairs_or_report: Sequence[P] | AlignmentReport,
    max_batch: int | None = None,
    *,
    prepend_bos: bool | None = None,
) -> list[TaskBatch]:
    """Group pairs by token length (no padding, ever) into batches of at most ``max_batch`` pairs.

    Pass the :class:`AlignmentReport` from :func:`align_pairs` to batch its kept pairs; passing pairs
    directly works only when every pair aligns (otherwise a :class:`TaskDataError` lists the ones that do
    not). Batches come shortest first; within a length, pairs keep their file order. Works for both families.
    """
    check_max_batch(max_batch)
    view, report = _kept_pairs(model_or_tokenizer, pairs_or_report, prepend_bos)
    by_length: dict[int, list] = defaultdict(list)
    for pair in report.kept:
        by_length[report.lengths[pair.id]].append(pair)
    return [
        _build_batch(view, report, chunk)
        for length in sorted(by_length)
        for chunk in chunks(by_length[length], max_batch)
    ]


def largest_template_batch(
    model_or_tokenizer: Any,
    pairs_or_report: Sequence[P] | AlignmentReport,
    max_batch: int | None = None,
    *,
    prepend_bos: bool | None = None,
) -> TaskBatch:
    """The biggest group of pairs sharing both template and token length, as one batch.

    Within such a group a position index points at the same part of the sentence in every row, so
    per-position results (patching heat maps, attention patterns) can be averaged and labelled with
    ``str_tokens``. Ties go to the smaller ``template_id``, then the shorter length; ``max_batch`` keeps the
    first pairs (file order) of the group.
    """
    check_max_batch(max_batch)
    view, report = _kept_pairs(model_or_tokenizer, pairs_or_report, prepend_bos)
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for pair in report.kept:
        groups[(pair.template_id, report.lengths[pair.id])].append(pair)
    key = min(groups, key=lambda k: (-len(groups[k]), k[0], k[1]))
    return _build_batch(view, report, chunks(groups[key], max_batch)[0])
