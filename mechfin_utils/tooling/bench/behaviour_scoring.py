"""``make bench``'s fourth table: scoring prompts of any length (``screener.behaviour``), padded batches against the
earlier path, on the same model and prompts; plain, and with components held at the answer position.

Notebooks 08 and 12 and the screener's card score thousands of fair-lending prompts whose token lengths differ. The
earlier path ran each group of prompts of one exact length through the TransformerLens bridge (full logits at every
position); :class:`~mechfin_utils.screener.behaviour.BridgeScorer` now sorts prompts by length, pads each batch on
the right and reads two logits at each prompt's last token through the functional forward pass. The row gives both
times, the speed-up, and the largest difference of a logit difference between the two paths (float rounding only:
causal attention keeps the padding out of every real token).

The second row scores the same prompts with components' outputs at the last position held at their means (notebook
12's mean ablation). The earlier path ran the bridge whole with hooks that overwrite ``[:, -1]``
(:func:`held_through_bridge_hooks`, kept as the reference the tests compare with); the engine recomputes only the
last position from the earliest held layer (``BridgeScorer(held_at_last=...)``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from mechfin_utils.core.head_labels import Node
from mechfin_utils.methods.patching.final_position import mean_outputs_at_final_position
from mechfin_utils.reporting.tables import markdown_table
from mechfin_utils.screener.behaviour import BridgeScorer
from mechfin_utils.tasks import screener_sets


@dataclass
class BehaviourBenchRow:
    model: str
    scoring: str  # "plain" or the components held at the answer position
    prompts: int
    lengths: str
    length_groups: int
    earlier_seconds: float
    padded_seconds: float
    speedup: float
    max_abs_diff: float
    largest_logit: float  # the scale of the rounding: the largest |logit| at a last position


def held_through_bridge_hooks(model, values: dict[Node, torch.Tensor]) -> AbstractContextManager:
    """The earlier path of a component held at the last position: bridge hooks that overwrite its output at
    ``[:, -1]`` (``hook_z`` for a head, ``hook_mlp_out`` for an MLP) in every forward pass while active. Exact only
    for unpadded batches (every row ends at the last column)."""
    by_hook: dict[str, list[tuple[Node, torch.Tensor]]] = defaultdict(list)
    for component, value in values.items():
        hook_name = (
            f"blocks.{component.layer}.hook_mlp_out"
            if component.head is None
            else f"blocks.{component.layer}.attn.hook_z"
        )
        by_hook[hook_name].append((component, value))

    def hook_for(entries: list[tuple[Node, torch.Tensor]]):
        def hook(activation: torch.Tensor, hook) -> torch.Tensor:
            activation = activation.clone()
            for component, value in entries:
                if component.head is None:
                    activation[:, -1] = value
                else:
                    activation[:, -1, component.head] = value
            return activation

        return hook

    return model.bridge.hooks(fwd_hooks=[(name, hook_for(entries)) for name, entries in by_hook.items()])


@torch.no_grad()
def exact_length_logit_diffs(
    model, prompts: list[str], batch_size: int = 32, held: dict[Node, torch.Tensor] | None = None
) -> tuple[np.ndarray, float]:
    """The earlier path: prompts grouped by exact token length, each group through the bridge, full logits (with
    ``held`` components written by bridge hooks). Returns the logit differences and the largest |logit| at a last
    position."""
    rows = [model.token_ids(p) for p in prompts]
    yes, no = model.single_token_id(" Yes"), model.single_token_id(" No")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[len(row)].append(i)
    out, largest = np.empty(len(prompts)), 0.0
    with held_through_bridge_hooks(model, held) if held else nullcontext():
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                final = model.bridge(torch.tensor([rows[i] for i in chunk]))[:, -1]
                out[chunk] = (final[:, yes] - final[:, no]).double().numpy()
                largest = max(largest, float(final.abs().max()))
    return out, largest


def bench_behaviour_scoring(
    model, *, model_label: str, split: str = "mention_test_templates"
) -> list[BehaviourBenchRow]:
    """Both paths on every prompt of a held-out split (both sides of every pair): plain, and with two heads and an
    MLP of the last three layers held at their mean output over the split's first 16 prompts."""
    prompts = [text for pair in screener_sets.load_split(split) for text in pair.texts]
    lengths = [len(model.token_ids(p)) for p in prompts]
    n_layers = model.cfg.n_layers
    components = [Node(max(0, n_layers - 3), 0), Node(max(0, n_layers - 2), 1), Node(n_layers - 1)]
    means = mean_outputs_at_final_position(model, prompts[:16], components)
    rows = []
    for scoring, held in (("plain", None), (", ".join(c.name for c in components) + " held at their mean", means)):
        started = time.perf_counter()
        earlier, largest_logit = exact_length_logit_diffs(model, prompts, held=held)
        earlier_seconds = time.perf_counter() - started
        started = time.perf_counter()
        padded = BridgeScorer(model, held_at_last=held).logit_diffs(prompts)
        padded_seconds = time.perf_counter() - started
        rows.append(
            BehaviourBenchRow(
                model=model_label,
                scoring=scoring,
                prompts=len(prompts),
                lengths=f"{min(lengths)}-{max(lengths)}",
                length_groups=len(set(lengths)),
                earlier_seconds=earlier_seconds,
                padded_seconds=padded_seconds,
                speedup=earlier_seconds / padded_seconds,
                max_abs_diff=float(np.abs(padded - earlier).max()),
                largest_logit=largest_logit,
            )
        )
    return rows


BEHAVIOUR_COLUMNS = (
    ("model", "{model}"),
    ("scoring", "{scoring}"),
    ("prompts (tokens)", "{prompts} ({lengths})"),
    ("length groups", "{length_groups}"),
    ("earlier path s", "{earlier_seconds:.1f}"),
    ("mechfin s (padded, or the engine)", "{padded_seconds:.1f}"),
    ("speed-up", "{speedup:.1f}x"),
    ("max |diff|", "{max_abs_diff:.1e}"),
    ("largest |logit|", "{largest_logit:.1f}"),
)


def format_behaviour_table(rows: list[BehaviourBenchRow]) -> str:
    """A Markdown table of the behaviour-scoring results."""
    return markdown_table(rows, BEHAVIOUR_COLUMNS)
