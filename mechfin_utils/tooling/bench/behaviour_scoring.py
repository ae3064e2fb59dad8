"""``make bench``'s fourth table: scoring prompts of any length (``screener.behaviour``), padded batches against the
earlier path, on the same model and prompts.

Notebooks 08 and 12 and the screener's card score thousands of fair-lending prompts whose token lengths differ. The
earlier path ran each group of prompts of one exact length through the TransformerLens bridge (full logits at every
position); :class:`~mechfin_utils.screener.behaviour.BridgeScorer` now sorts prompts by length, pads each batch on
the right and reads two logits at each prompt's last token through the functional forward pass. The row gives both
times, the speed-up, and the largest difference of a logit difference between the two paths (float rounding only:
causal attention keeps the padding out of every real token).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from mechfin_utils.reporting.tables import markdown_table
from mechfin_utils.screener.behaviour import BridgeScorer
from mechfin_utils.tasks import screener_sets


@dataclass
class BehaviourBenchRow:
    model: str
    prompts: int
    lengths: str
    length_groups: int
    earlier_seconds: float
    padded_seconds: float
    speedup: float
    max_abs_diff: float
    largest_logit: float  # the scale of the rounding: the largest |logit| at a last position


@torch.no_grad()
def exact_length_logit_diffs(model, prompts: list[str], batch_size: int = 32) -> tuple[np.ndarray, float]:
    """The earlier path: prompts grouped by exact token length, each group through the bridge, full logits. Returns
    the logit differences and the largest |logit| at a last position."""
    rows = [model.token_ids(p) for p in prompts]
    yes, no = model.single_token_id(" Yes"), model.single_token_id(" No")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[len(row)].append(i)
    out, largest = np.empty(len(prompts)), 0.0
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            final = model.bridge(torch.tensor([rows[i] for i in chunk]))[:, -1]
            out[chunk] = (final[:, yes] - final[:, no]).double().numpy()
            largest = max(largest, float(final.abs().max()))
    return out, largest


def bench_behaviour_scoring(model, *, model_label: str, split: str = "mention_test_templates") -> BehaviourBenchRow:
    """Both paths on every prompt of a held-out split (both sides of every pair)."""
    prompts = [text for pair in screener_sets.load_split(split) for text in pair.texts]
    lengths = [len(model.token_ids(p)) for p in prompts]
    started = time.perf_counter()
    earlier, largest_logit = exact_length_logit_diffs(model, prompts)
    earlier_seconds = time.perf_counter() - started
    started = time.perf_counter()
    padded = BridgeScorer(model).logit_diffs(prompts)
    padded_seconds = time.perf_counter() - started
    return BehaviourBenchRow(
        model=model_label,
        prompts=len(prompts),
        lengths=f"{min(lengths)}-{max(lengths)}",
        length_groups=len(set(lengths)),
        earlier_seconds=earlier_seconds,
        padded_seconds=padded_seconds,
        speedup=earlier_seconds / padded_seconds,
        max_abs_diff=float(np.abs(padded - earlier).max()),
        largest_logit=largest_logit,
    )


BEHAVIOUR_COLUMNS = (
    ("model", "{model}"),
    ("prompts (tokens)", "{prompts} ({lengths})"),
    ("length groups", "{length_groups}"),
    ("earlier path s", "{earlier_seconds:.1f}"),
    ("padded batches s", "{padded_seconds:.1f}"),
    ("speed-up", "{speedup:.1f}x"),
    ("max |diff|", "{max_abs_diff:.1e}"),
    ("largest |logit|", "{largest_logit:.1f}"),
)


def format_behaviour_table(rows: list[BehaviourBenchRow]) -> str:
    """A Markdown table of the behaviour-scoring results."""
    return markdown_table(rows, BEHAVIOUR_COLUMNS)
