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

:func:`pair_batches` serves the analyses that read only the final position (direct logit attribution, say): they
need no position alignment, only batches whose clean prompts share a length and whose corrupted prompts share another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from mechfin_utils.methods.readout.attention import phrase_token_positions
from mechfin_utils.tasks.batching import Exclusion
from mechfin_utils.tasks.fair_lending import FairLendingPair

SEGMENTS = ("prefix", "phrase", "rest", "final")
"""The segments of every aligned pair; named spans (:func:`segment_pair`'s ``spans``) are carved out of prefix and
rest, and take their place in reading order."""
STRADDLES = "token_straddles_phrase_boundary"
OUTSIDE_DIFFERS = "tokens_outside_phrase_differ"


@dataclass(frozen=True)
class SegmentedPrompt:
    """One prompt's token ids and, per segment, its positions (increasing; possibly empty for ``prefix``), the
    segments in reading order."""

    ids: tuple[int, ...]
    positions: dict[str, tuple[int, ...]]

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.positions)


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


def _span_positions(model, text: str, span: str, avoid: tuple[int, int]) -> list[int]:
    """Token positions of the one occurrence of ``span`` outside the character range ``avoid`` (the phrase)."""
    starts = [i for i in range(len(text)) if text.startswith(span, i)]
    outside = [i for i, start in enumerate(starts) if start + len(span) <= avoid[0] or start >= avoid[1]]
    if len(outside) != 1:
        raise ValueError(f"span {span!r} occurs {len(outside)} times outside the phrase in {text!r}, not once")
    return phrase_token_positions(model, text, span, occurrence=outside[0])


def _segment_prompt(model, text: str, phrase: str, spans: Mapping[str, str]) -> SegmentedPrompt | str:
    """Positions per segment of one prompt (named ``spans`` carved out of prefix and rest), or the reason it cannot
    be segmented."""
    if text.count(phrase) != 1:
        raise ValueError(f"phrase {phrase!r} must occur exactly once in {text!r}")
    begin = text.index(phrase)
    try:
        phrase_positions = phrase_token_positions(model, text, phrase)  # the tokenizer's character offsets
        named = {name: _span_positions(model, text, span, (begin, begin + len(phrase))) for name, span in spans.items()}
    except ValueError as error:
        if "cuts through token" in str(error):
            return STRADDLES
        raise
    ids = tuple(model.token_ids(text))
    last = len(ids) - 1
    first_phrase, last_phrase = phrase_positions[0], phrase_positions[-1]
    if last_phrase >= last:
        return STRADDLES  # the phrase reaches the answer position: nothing left to align after it
    taken = {p: name for name, found in named.items() for p in found if p != last}  # the answer stays "final"
    if set(taken) & set(phrase_positions):
        raise ValueError(f"a named span overlaps the phrase {phrase!r} in {text!r}")
    owner = {
        p: taken.get(p, "prefix" if p < first_phrase else "rest") for p in range(last) if p not in phrase_positions
    }
    owner.update({p: "phrase" for p in phrase_positions})
    positions: dict[str, tuple[int, ...]] = {"prefix": ()}  # in reading order; prefix may be empty
    for position in range(last):
        positions[owner[position]] = (*positions.get(owner[position], ()), position)
    positions.setdefault("rest", ())
    positions["final"] = (last,)
    return SegmentedPrompt(ids, positions)


def segment_pair(model, pair: FairLendingPair, spans: Mapping[str, str] | None = None) -> SegmentedPair | Exclusion:
    """Align one pair by segment (any token lengths), or an :class:`~mechfin_utils.tasks.batching.Exclusion` saying
    why not. ``spans`` names further segments carved out of prefix and rest: text that occurs once in each prompt
    outside the phrase (``{"mention": "is Hindu", "question": " Is this ...? Answer:"}``); a span that ends at the
    answer position leaves that position to ``final``."""
    spans = dict(spans or {})
    clean = _segment_prompt(model, pair.clean_prompt, pair.protected_phrase, spans)
    corrupted = _segment_prompt(model, pair.corrupted_prompt, pair.legitimate_phrase, spans)
    if isinstance(clean, str):
        return Exclusion(pair, clean, "in the clean prompt a token crosses the phrase's boundary")
    if isinstance(corrupted, str):
        return Exclusion(pair, corrupted, "in the corrupted prompt a token crosses the phrase's boundary")
    if clean.segments != corrupted.segments:
        return Exclusion(pair, OUTSIDE_DIFFERS, "the named spans fall in a different order in the two prompts")
    for segment in (s for s in clean.segments if s != "phrase"):
        clean_ids = [clean.ids[p] for p in clean.positions[segment]]
        corrupted_ids = [corrupted.ids[p] for p in corrupted.positions[segment]]
        if clean_ids != corrupted_ids:
            return Exclusion(pair, OUTSIDE_DIFFERS, f"the {segment} tokenises differently in the two prompts")
    return SegmentedPair(pair, clean, corrupted)


def segment_pairs(
    model, pairs: Sequence[FairLendingPair], spans_of: Callable[[FairLendingPair], Mapping[str, str]] | None = None
) -> tuple[list[SegmentedPair], list[Exclusion]]:
    """Align every pair (``spans_of(pair)``: its named spans, see :func:`segment_pair`); returns (aligned, excluded
    with reasons), nothing dropped silently."""
    aligned: list[SegmentedPair] = []
    excluded: list[Exclusion] = []
    for pair in pairs:
        result = segment_pair(model, pair, spans_of(pair) if spans_of is not None else None)
        if isinstance(result, Exclusion):
            excluded.append(result)
        else:
            aligned.append(result)
    return aligned, excluded


@dataclass(frozen=True)
class PairBatch:
    """Pairs whose clean prompts share one token length and whose corrupted prompts share another (the two
    lengths may differ): what analyses that read only the final position take (``dla.over_batches``,
    ``reporting.readout_tables.dla_gap_components``), row ``i`` of each tensor being pair ``ids[i]``."""

    clean_tokens: Tensor
    corrupted_tokens: Tensor
    answer_tokens: Tensor
    ids: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return len(self.ids)


def pair_batches(model, pairs: Sequence[SegmentedPair], max_batch: int = 16) -> list[PairBatch]:
    """Aligned pairs of any token lengths batched for final-position analyses: grouped by (clean length, corrupted
    length), in order of first appearance, at most ``max_batch`` pairs each. Nothing is padded: at the final
    position, the only one these analyses read, each prompt is whole."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    groups: dict[tuple[int, int], list[SegmentedPair]] = {}
    for item in pairs:
        groups.setdefault((len(item.clean.ids), len(item.corrupted.ids)), []).append(item)
    batches = []
    for group in groups.values():
        for begin in range(0, len(group), max_batch):
            chunk = group[begin : begin + max_batch]
            batches.append(
                PairBatch(
                    clean_tokens=torch.tensor([item.clean.ids for item in chunk]),
                    corrupted_tokens=torch.tensor([item.corrupted.ids for item in chunk]),
                    answer_tokens=torch.tensor(
                        [[model.single_token_id(a) for a in item.pair.answers] for item in chunk]
                    ),
                    ids=tuple(item.pair.id for item in chunk),
                )
            )
    return batches


def attention_by_segment(model, pairs: Sequence[SegmentedPair], layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Where the answer position looks, by segment, in both prompts of each pair (any token lengths): per layer, the
    final query row of every head averaged over the heads (``attention.final_position_attention_by_layer``), summed
    over each segment's positions (the whole phrase here, every one of its tokens). Per prompt and layer the four
    segments' weights sum to 1.

    Returns one row per (pair, run, layer, segment): ``pair_id, basis, run, layer, segment, weight``.
    """
    from mechfin_utils.methods.readout.attention import final_position_attention_by_layer

    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    rows = []
    for item in pairs:
        for run, prompt in (("clean", item.clean), ("corrupted", item.corrupted)):
            weights = final_position_attention_by_layer(model, torch.tensor([prompt.ids]), layers)  # [layer, pos]
            for row, layer in enumerate(layers):
                for segment in prompt.segments:
                    positions = list(prompt.positions[segment])
                    rows.append(
                        {
                            "pair_id": item.pair.id,
                            "basis": item.pair.basis,
                            "run": run,
                            "layer": layer,
                            "segment": segment,
                            "weight": float(weights[row, positions].sum()) if positions else 0.0,
                        }
                    )
    return pd.DataFrame(rows)


@torch.no_grad()
def segment_patching(model, pairs: Sequence[SegmentedPair], layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Patch each segment of the clean run's residual stream (entering a layer) into the corrupted run.

    Stages, per pair, on the intervention engine (:mod:`mechfin_utils.core.engine`):
        1. the clean and corrupted runs, recorded;
        2. per (layer, segment) one :class:`~mechfin_utils.core.engine.Replace` of ``resid_pre`` at the segment's
           corrupted positions with the clean values at the mapped positions (:meth:`SegmentedPair.mapping`),
           continuing the corrupted run from that layer and the segment's first position; all in one packed run.
           A patch whose clean values are bit for bit the corrupted run's own (the tokens before the first
           difference, which both prompts share, at layers where nothing later has reached them) writes what is
           already there: it is not run, and its patched logit difference is the corrupted run's (restoration 0).
           On notebook 12's pairs that is about 40% of the work (the earliest positions, which cost most).

    Returns one row per (pair, layer, segment): ``pair_id, basis, layer, segment, ld_clean, ld_corrupted,
    ld_patched, restoration``. A segment with no tokens (``prefix`` of a sentence that opens with the phrase) is
    left out for that pair.
    """
    from mechfin_utils.core import engine
    from mechfin_utils.methods.patching.activation import functional_model

    fm = functional_model(model)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < fm.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside [0, {fm.n_layers}) for {model.name}")
    rows = []
    for item in pairs:
        answers = torch.tensor([[model.single_token_id(a) for a in item.pair.answers]])

        # 1. reference runs
        clean = fm.record(torch.tensor([item.clean.ids]), keep=("resid_pre",))
        corrupted = fm.record(torch.tensor([item.corrupted.ids]), keep=("resid_pre", "k", "v"))
        ld_clean, ld_corrupted = (
            float(fm.logit_diff(clean.final_normed, answers)[0]),
            float(fm.logit_diff(corrupted.final_normed, answers)[0]),
        )
        # 2. every (layer, segment) patch in one packed run
        order, patches, runs, unchanged = [], [], [], []
        for layer in layers:
            for segment in item.clean.segments:
                clean_positions, corrupted_positions = item.mapping(segment)
                if not clean_positions:
                    continue
                order.append((layer, segment))
                first = corrupted_positions[0]
                values = clean.kept("resid_pre")[layer][:, list(clean_positions)]
                if torch.equal(values, corrupted.kept("resid_pre")[layer][:, list(corrupted_positions)]):
                    unchanged.append((layer, segment))  # writes what is there: the corrupted run itself
                    continue
                replace = engine.Replace("resid_pre", layer, tuple(corrupted_positions), values)
                runs.append(
                    engine.Segment(
                        layer, first, corrupted.kept("resid_pre")[layer][:, first:], torch.tensor([0]), [replace]
                    )
                )
                patches.append((layer, segment))
        patched = (
            fm.logit_diff(torch.cat([out[:, -1] for out in engine.run(fm, runs, corrupted)]), answers).tolist()
            if runs
            else []
        )
        done = dict(zip(patches, patched)) | {key: ld_corrupted for key in unchanged}
        for layer, segment in order:
            value = done[(layer, segment)]
            rows.append(
                {
                    "pair_id": item.pair.id,
                    "basis": item.pair.basis,
                    "layer": layer,
                    "segment": segment,
                    "ld_clean": ld_clean,
                    "ld_corrupted": ld_corrupted,
                    "ld_patched": value,
                    "restoration": (value - ld_corrupted) / (ld_clean - ld_corrupted),
                }
            )
    return pd.DataFrame(rows)


def restoration_grid(results: pd.DataFrame) -> pd.DataFrame:
    """Mean restoration per ``[segment x layer]``, segments in reading order: ``prefix`` first, ``final`` last, the
    others in the order they first appear (:func:`segment_patching` writes them in reading order)."""
    grid = results.pivot_table(index="segment", columns="layer", values="restoration", aggfunc="mean")
    middle = [s for s in dict.fromkeys(results["segment"]) if s not in ("prefix", "final")]
    return grid.reindex([s for s in ("prefix", *middle, "final") if s in grid.index])


def segment_lengths(pairs: Sequence[SegmentedPair]) -> pd.DataFrame:
    """Tokens per segment in each prompt, and whether the pair has equal lengths overall."""
    rows = []
    for item in pairs:
        row = {"pair_id": item.pair.id, "equal_length": len(item.clean.ids) == len(item.corrupted.ids)}
        for segment in item.clean.segments:
            row[f"clean_{segment}"] = len(item.clean.positions[segment])
            row[f"corrupted_{segment}"] = len(item.corrupted.positions[segment])
        rows.append(row)
    return pd.DataFrame(rows)
