"""Knowledge circuits (Yao et al. 2024): the circuit that recalls one fact, compared across edits and contexts.

A fact's circuit is found with the node-level pruning of :mod:`mechfin_utils.methods.circuits.nodes` on a one-prompt task: the
clean prompt ("The capital of France is") against a corrupted prompt of the same relation and token length ("The
capital of Spain is"), scored by ``logit(answer) − logit(corrupted prompt's answer)``. Yao et al. then ask

* how the circuit changes when the fact is **edited** (after ROME the answer to score is the new object), and
  whether circuits of **unrelated facts** move too;
* how it changes with **in-context demonstrations** of the relation before the prompt.

:func:`circuit_change` states a comparison as nodes kept in both, only before, only after, and their Jaccard
overlap. Circuits here are sets of heads and MLPs; their edges come with edge-level discovery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechfin_utils.core.hook_points import target_token_ids
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.methods.circuits.pruning import Circuit
from mechfin_utils.tasks.circuit_tasks import CircuitTask, task_from_answer_batches


@dataclass(frozen=True)
class _OnePair:
    clean_tokens: torch.Tensor
    corrupted_tokens: torch.Tensor
    answer_tokens: torch.Tensor
    ids: list[str]


def first_token_id(model: LoadedModel, answer: str, label: str) -> int:
    """The answer's first token (an empty answer is an error naming ``label``)."""
    return target_token_ids(model, answer, label)[0]


def fact_task(
    model: LoadedModel,
    name: str,
    clean: tuple[str, str],
    corrupted: tuple[str, str],
) -> CircuitTask:
    """A one-prompt circuit task: ``clean = (prompt, answer)`` against ``corrupted = (prompt, answer)``.

    The two prompts must tokenise to the same length (resample ablation swaps activations position by position);
    the error names both and their lengths.
    """
    clean_ids, corrupted_ids = model.token_ids(clean[0]), model.token_ids(corrupted[0])
    if len(clean_ids) != len(corrupted_ids):
        raise ValueError(
            f"{name}: {clean[0]!r} has {len(clean_ids)} tokens and {corrupted[0]!r} {len(corrupted_ids)}; "
            "a circuit task needs prompts of one length"
        )
    answers = [first_token_id(model, clean[1], name), first_token_id(model, corrupted[1], name)]
    if answers[0] == answers[1]:
        raise ValueError(f"{name}: clean and corrupted answers are the same token {clean[1]!r}")
    pair = _OnePair(torch.tensor([clean_ids]), torch.tensor([corrupted_ids]), torch.tensor([answers]), [name])
    return task_from_answer_batches(name, [pair], metric_name=f"logit({clean[1]!r}) − logit({corrupted[1]!r})")


def matched_corruption(
    model: LoadedModel, prompt: str, candidates: Sequence[tuple[str, str]], avoid: Sequence[str]
) -> tuple[str, str] | None:
    """The first ``(prompt, answer)`` of ``candidates`` with ``prompt``'s token length and an answer not in
    ``avoid`` (None when there is none)."""
    length = len(model.token_ids(prompt))
    avoid_ids = {first_token_id(model, a, prompt) for a in avoid}
    for candidate_prompt, answer in candidates:
        same_length = len(model.token_ids(candidate_prompt)) == length
        if same_length and first_token_id(model, answer, candidate_prompt) not in avoid_ids:
            return candidate_prompt, answer
    return None


def with_demonstrations(prompt: str, demonstrations: Sequence[tuple[str, str]]) -> str:
    """``"The capital of Spain is Madrid. The capital of Japan is Tokyo. " + prompt``: in-context examples."""
    return "".join(f"{p}{a}. " for p, a in demonstrations) + prompt


def circuit_change(before: Circuit, after: Circuit) -> dict:
    """Nodes in both circuits, only in the first, only in the second, and the Jaccard overlap of the node sets."""
    first, second = {n.name for n in before.nodes}, {n.name for n in after.nodes}
    union = first | second
    return {
        "n_before": len(first),
        "n_after": len(second),
        "kept_in_both": sorted(first & second),
        "only_before": sorted(first - second),
        "only_after": sorted(second - first),
        "jaccard": len(first & second) / len(union) if union else 1.0,
        "faithfulness_before": before.faithfulness,
        "faithfulness_after": after.faithfulness,
    }
