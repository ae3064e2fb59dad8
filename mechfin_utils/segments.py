"""Pairs of unequal token length: align them by named segment, and patch the residual stream segment by segment.

Position-by-position patching needs both prompts of a pair to have the same number of tokens. Real pairs rarely do:
"because she is Black" and "because her credit score is 540" differ in length, and only about a third of differently
worded pairs tokenise to equal lengths. Both prompts of a pair, however, share everything but the phrase, so they
can be aligned by **segment**:

==========  ======================================================================================
``prefix``  the tokens before the protected / legitimate phrase (identical text in both prompts)
``phrase``  the phrase itself: the protected basis in the clean prompt, the legitimate reason in the corrupted one
``rest``    the tokens after the phrase, up to but not including the last one (identical text)
``final``   the last position, where the answer is read
==========  ======================================================================================

:func:`segment_pair` finds the phrase's token positions from the tokenizer's character offsets
(``attention.phrase_token_positions``, the one place that maps characters to tokens); the other segments follow (a BOS
token, when the model prepends one, belongs to ``prefix``). A pair is *excluded, with its reason*, only when it cannot be aligned:
a token straddles the phrase's boundary, or the text outside the phrase tokenises differently in the two prompts.

:func:`segment_patching` then runs the corrupted prompt and, at one layer's residual stream, writes in the clean
run's activations of one segment: position by position for ``prefix``, ``rest`` and ``final`` (same tokens, shifted
by the difference in phrase length), and for ``phrase`` its **last token** (the phrase lengths differ, so only its
end has a counterpart; ROME's causal tracing likewise finds the subject's last token decisive). The score is the
usual restoration ``(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)``: 1 when the segment carries the whole
difference at that layer, 0 when it carries none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from .attention import phrase_token_positions
from .tasks import Exclusion, FairLendingPair

SEGMENTS = ("prefix", "phrase", "rest", "final")
STRADDLES = "token_straddles_phrase_boundary"
OUTSIDE_DIFFERS = "tokens_outside_phrase_differ"


@dataclass(frozen=True)
class SegmentedPrompt:
    """One prompt's token ids and, per segment, its positions (increasing; possibly empty for ``prefix``)."""

    ids: tuple[int, ...]
    positions: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class SegmentedPair:
    pair: FairLendingPair
    clean: SegmentedPrompt
    corrupted: SegmentedPrompt

    def mapping(self, segment: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(clean positions, corrupted positions) patched for ``segment``: equal-length tuples."""
        clean, corrupted = self.clean.positions[segment], self.corrupted.positions[segment]
        if segment == "phrase":
            return clean[-1:], corrupted[-1:]
        return clean, corrupted


def _segment_prompt(model, text: str, phrase: str) -> SegmentedPrompt | str:
    """Positions per segment of one prompt, or the reason it cannot be segmented."""
    if text.count(phrase) != 1:
        raise ValueError(f"phrase {phrase!r} must occur exactly once in {text!r}")
    try:
        phrase_positions = phrase_token_positions(model, text, phrase)  # the tokenizer's character offsets
    except ValueError as error:
        if "cuts through token" in str(error):
            return STRADDLES
        raise
    ids = tuple(model.token_ids(text))
    last = len(ids) - 1
    first_phrase, last_phrase = phrase_positions[0], phrase_positions[-1]
    if last_phrase >= last:
        return STRADDLES  # the phrase reaches the answer position: nothing left to align after it
    positions = {
        "prefix": tuple(range(first_phrase)),  # a BOS token, when prepended, is position 0
        "phrase": tuple(phrase_positions),
        "rest": tuple(range(last_phrase + 1, last)),
        "final": (last,),
    }
    return SegmentedPrompt(ids, positions)


def segment_pair(model, pair: FairLendingPair) -> SegmentedPair | Exclusion:
    """Align one pair by segment (any token lengths), or an :class:`~mechfin_utils.tasks.Exclusion` saying why not."""
    clean = _segment_prompt(model, pair.clean_prompt, pair.protected_phrase)
    corrupted = _segment_prompt(model, pair.corrupted_prompt, pair.legitimate_phrase)
    for prompt, which in ((clean, "clean"), (corrupted, "corrupted")):
        if isinstance(prompt, str):
            return Exclusion(pair, prompt, f"in the {which} prompt a token crosses the phrase's boundary")
    for segment in ("prefix", "rest", "final"):
        clean_ids = [clean.ids[p] for p in clean.positions[segment]]
        corrupted_ids = [corrupted.ids[p] for p in corrupted.positions[segment]]
        if clean_ids != corrupted_ids:
            return Exclusion(pair, OUTSIDE_DIFFERS, f"the {segment} tokenises differently in the two prompts")
    return SegmentedPair(pair, clean, corrupted)


def segment_pairs(model, pairs: Sequence[FairLendingPair]) -> tuple[list[SegmentedPair], list[Exclusion]]:
    """Align every pair; returns (aligned, excluded with reasons), nothing dropped silently."""
    aligned, excluded = [], []
    for pair in pairs:
        result = segment_pair(model, pair)
        (excluded if isinstance(result, Exclusion) else aligned).append(result)
    return aligned, excluded


@torch.no_grad()
def segment_patching(model, pairs: Sequence[SegmentedPair], layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Patch each segment of the clean run's residual stream (``hook_resid_pre``) into the corrupted run.

    Stages, per pair:
        1. the clean run, caching ``blocks.{L}.hook_resid_pre`` at every layer, and the corrupted run;
        2. per layer, one batched corrupted run, a row per segment, each row's segment overwritten with the clean
           activations at the mapped positions (:meth:`SegmentedPair.mapping`).

    Returns one row per (pair, layer, segment): ``pair_id, basis, layer, segment, ld_clean, ld_corrupted,
    ld_patched, restoration``. A segment with no tokens (``prefix`` of a sentence that opens with the phrase) is
    left out for that pair.
    """
    from .metrics import logit_diff

    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    rows = []
    for item in pairs:
        answers = torch.tensor([[model.single_token_id(a) for a in item.pair.answers]])
        clean_tokens = torch.tensor([item.clean.ids])
        corrupted_tokens = torch.tensor([item.corrupted.ids])
        # 1. reference runs
        clean_logits, cache = model.bridge.run_with_cache(clean_tokens, names_filter=lambda name: name in hooks)
        ld_clean = float(logit_diff(clean_logits, answers))
        ld_corrupted = float(logit_diff(model.bridge(corrupted_tokens), answers))
        segments = [s for s in SEGMENTS if item.mapping(s)[0]]
        batch = corrupted_tokens.expand(len(segments), -1)
        # 2. one batched patched run per layer
        for layer, hook in zip(layers, hooks):
            source = cache[hook][0]

            def patch(activation: Tensor, hook=None, source=source) -> Tensor:
                activation = activation.clone()
                for row, segment in enumerate(segments):
                    clean_positions, corrupted_positions = item.mapping(segment)
                    activation[row, list(corrupted_positions)] = source[list(clean_positions)]
                return activation

            patched = logit_diff(model.bridge.run_with_hooks(batch, fwd_hooks=[(hook, patch)]), answers.expand(len(segments), 2))
            for row, segment in enumerate(segments):
                rows.append({"pair_id": item.pair.id, "basis": item.pair.basis, "layer": layer, "segment": segment,
                             "ld_clean": ld_clean, "ld_corrupted": ld_corrupted, "ld_patched": float(patched[row]),
                             "restoration": (float(patched[row]) - ld_corrupted) / (ld_clean - ld_corrupted)})
    return pd.DataFrame(rows)


def restoration_grid(results: pd.DataFrame) -> pd.DataFrame:
    """Mean restoration per ``[segment x layer]``, segments in reading order."""
    grid = results.pivot_table(index="segment", columns="layer", values="restoration", aggfunc="mean")
    return grid.reindex([s for s in SEGMENTS if s in grid.index])


def segment_lengths(pairs: Sequence[SegmentedPair]) -> pd.DataFrame:
    """Tokens per segment in each prompt, and whether the pair has equal lengths overall."""
    rows = []
    for item in pairs:
        row = {"pair_id": item.pair.id, "equal_length": len(item.clean.ids) == len(item.corrupted.ids)}
        for segment in SEGMENTS:
            row[f"clean_{segment}"] = len(item.clean.positions[segment])
            row[f"corrupted_{segment}"] = len(item.corrupted.positions[segment])
        rows.append(row)
    return pd.DataFrame(rows)

