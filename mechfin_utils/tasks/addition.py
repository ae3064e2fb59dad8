"""Two-digit addition (Yu & Ananiadou 2024): the problems a model is asked, the ones it gets right, and a patching task.

Every problem is ``"a + b = "`` after five solved examples (:data:`PREFIX`), with two-digit ``a`` and ``b`` and a
two-digit sum. The neuron analysis of :mod:`mechfin_utils.methods.neurons.arithmetic` runs on these:

1. **Problems** (:func:`addition_problems`): a seeded draw of problems, each tokenised with its answer's tokens as
   they follow the prompt (:func:`tokenise_problem`). Kept are only the problems the model answers exactly (every
   answer token the top prediction, teacher-forced): analysing a wrong answer explains nothing. The share kept is
   part of the result (:class:`AdditionSet`).
2. **Circuit task** (:func:`addition_task`): each problem against the same with another first operand whose sum has
   another first answer token, for head ablation with :class:`mechfin_utils.methods.circuits.nodes.NodeAblator`.

Prompts of one token length run together in one forward pass without padding (:func:`groups_by_length`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mechfin_utils.core.models import LoadedModel
from mechfin_utils.tasks.circuit_tasks import AnswerBatch, CircuitTask, task_from_answer_batches

FEW_SHOT: tuple[tuple[int, int], ...] = ((12, 35), (31, 24), (40, 17), (23, 52), (61, 14))
"""The solved examples before every problem (none of them is ever a test problem)."""


def _question(a: int, b: int) -> str:
    return f"{a} + {b} = "


PREFIX = "".join(f"{_question(a, b)}{a + b}\n" for a, b in FEW_SHOT)


@dataclass(frozen=True)
class AdditionProblem:
    """One problem ``a + b``: the few-shot prompt, its token ids and the answer's token ids."""

    a: int
    b: int
    prompt: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # the answer's tokens as they follow the prompt

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def id(self) -> str:
        return f"{self.a}+{self.b}"


@dataclass
class AdditionSet:
    """The problems tried, the ones the model gets exactly right, and the share kept."""

    model_name: str
    tried: list[AdditionProblem]
    kept: list[AdditionProblem]

    @property
    def share_kept(self) -> float:
        return len(self.kept) / len(self.tried)

    def summary(self) -> dict:
        return {
            "model": self.model_name,
            "tried": len(self.tried),
            "kept": len(self.kept),
            "share_kept": self.share_kept,
        }


def tokenise_problem(model: LoadedModel, a: int, b: int) -> AdditionProblem:
    """The problem ``a + b`` after the few-shot prefix, with the answer's tokens as they follow the prompt (a
    ValueError when the answer would merge with the prompt's last token)."""
    prompt = PREFIX + _question(a, b)
    prompt_ids = model.token_ids(prompt)
    full = model.token_ids(prompt + str(a + b))
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{model.name}: the answer to {a}+{b} merges with the prompt's last token; cannot score it")
    return AdditionProblem(a, b, prompt, tuple(prompt_ids), tuple(full[len(prompt_ids) :]))


def groups_by_length(items: Sequence, length: Callable[[Any], int]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``length(item)``, in first-seen order: one forward pass per group, no padding."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[length(item)].append(i)
    return list(groups.values())


@torch.no_grad()
def _answered_exactly(model: LoadedModel, problems: Sequence[AdditionProblem]) -> list[bool]:
    """Teacher-forced: is every answer token the model's top prediction? (Batched by length.)"""
    right = [False] * len(problems)
    for indices in groups_by_length(problems, lambda p: len(p.prompt_ids) + len(p.answer_ids)):
        rows = torch.tensor([problems[i].prompt_ids + problems[i].answer_ids for i in indices])
        logits = model.hf_model(rows).logits
        for row, i in enumerate(indices):
            p = problems[i]
            start = len(p.prompt_ids) - 1
            predicted = logits[row, start : start + len(p.answer_ids)].argmax(-1).tolist()
            right[i] = predicted == list(p.answer_ids)
    return right


def addition_problems(model: LoadedModel, n_tried: int = 240, seed: int = 0) -> AdditionSet:
    """``n_tried`` distinct problems ``a + b`` (``a, b >= 10``, ``a + b <= 99``, none a few-shot example), seeded;
    kept are those the model answers exactly."""
    pool = [(a, b) for a in range(10, 90) for b in range(10, 100 - a) if (a, b) not in FEW_SHOT]
    if not 1 <= n_tried <= len(pool):
        raise ValueError(f"n_tried must be in [1, {len(pool)}], got {n_tried}")
    chosen = sorted(random.Random(seed).sample(pool, n_tried))
    tried = [tokenise_problem(model, a, b) for a, b in chosen]
    right = _answered_exactly(model, tried)
    return AdditionSet(model.name, tried, [p for p, ok in zip(tried, right) if ok])


def addition_task(model: LoadedModel, problems: Sequence[AdditionProblem], seed: int = 0) -> CircuitTask:
    """Clean = the problem; corrupted = the same with another first operand ``a'`` whose sum starts with another
    answer token (same token length). Metric: logit(clean first answer token) - logit(corrupted one). A problem with
    no such ``a'`` is listed in ``task.excluded``."""
    rng = random.Random(seed)
    rows, excluded = [], []
    for p in problems:
        options = [a for a in range(10, 100 - p.b) if a != p.a]
        rng.shuffle(options)
        for a in options:
            other = tokenise_problem(model, a, p.b)
            if len(other.prompt_ids) == len(p.prompt_ids) and other.answer_ids[0] != p.answer_ids[0]:
                rows.append((p, other))
                break
        else:
            excluded.append((p.id, "no other first operand changes the first answer token at the same length"))
    groups = [[rows[i] for i in indices] for indices in groups_by_length(rows, lambda row: len(row[0].prompt_ids))]
    batches = [
        AnswerBatch(
            clean_tokens=torch.tensor([p.prompt_ids for p, _ in group]),
            corrupted_tokens=torch.tensor([o.prompt_ids for _, o in group]),
            answer_tokens=torch.tensor([[p.answer_ids[0], o.answer_ids[0]] for p, o in group]),
            ids=[p.id for p, _ in group],
        )
        for group in groups
    ]
    return task_from_answer_batches(
        "two-digit addition", batches, excluded=excluded, metric_name="logit(answer) - logit(corrupted answer)"
    )
