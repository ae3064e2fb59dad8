"""Indirect-object identification (Wang et al. 2022): a known-answer task for circuit methods.

"When Mary and John went to the store, John gave a drink to" -> " Mary". GPT-2 Small solves it with a circuit that
Wang et al. mapped head by head: *name movers* at the end position attend to the indirect object (IO) and copy its
name into the logits; *S-inhibition* heads tell their queries to avoid the repeated subject (S); induction and
duplicate-token heads find the repetition. Because that answer is known, IOI is where a circuit method shows it
can find a real mechanism before it is trusted on a task without one (fair lending).

* :func:`load_ioi` reads ``data/ioi.csv`` (``data/build_ioi.py``, data card in ``data/README.md``), naming the file,
  line, id and field of every bad row at once.
* :func:`ioi_task` makes the :class:`~mechfin_utils.tasks.circuit_tasks.CircuitTask` (metric ``logit(IO) - logit(S)``;
  the corrupted prompt has three unrelated names), listing rows the model's tokenizer cannot use, and keeps where IO
  and the first S sit in each prompt (:class:`IOITask`).
* :func:`logit_differences` is each prompt's clean and corrupted logit difference.

Reading the heads on this task (name movers, S-inhibition, the comparison with the paper) is a method, in
:mod:`mechfin_utils.methods.circuits.ioi_heads`.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.paths import DATA_DIR
from mechfin_utils.tasks.batching import commonest_length
from mechfin_utils.tasks.circuit_tasks import AnswerBatch, CircuitTask, task_from_answer_batches

IOI_CSV = DATA_DIR / "ioi.csv"
IOI_COLUMNS = ("prompt_id", "template_id", "order", "io", "s", "place", "object", "clean_prompt", "corrupted_prompt")


class IOIDataError(ValueError):
    """Malformed rows of the IOI CSV; the message names the file, line, prompt_id and field of each."""


@dataclass(frozen=True)
class IOIPrompt:
    prompt_id: str
    template_id: str
    order: str
    io: str
    s: str
    clean_prompt: str
    corrupted_prompt: str


def load_ioi(path: str | Path | None = None) -> list[IOIPrompt]:
    """Every row of ``data/ioi.csv`` (or ``path``), checked; all bad rows are reported together."""
    path = Path(path or IOI_CSV)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != IOI_COLUMNS:
            raise IOIDataError(f"{path}: columns {reader.fieldnames} are not {list(IOI_COLUMNS)}")
        rows = list(reader)
    problems, prompts, seen = [], [], set()
    for line, row in enumerate(rows, start=2):
        where = f"{path}:{line} ({row.get('prompt_id') or '?'})"
        empty = [c for c in IOI_COLUMNS if not (row.get(c) or "").strip()]
        if empty:
            problems.append(f"{where}: empty field(s) {empty}")
            continue
        if row["prompt_id"] in seen:
            problems.append(f"{where}: prompt_id: duplicate")
        seen.add(row["prompt_id"])
        if row["order"] not in ("ABBA", "BABA"):
            problems.append(f"{where}: order: {row['order']!r} is not ABBA or BABA")
        words = row["clean_prompt"].replace(",", " ").replace(".", " ").split()
        if words.count(row["io"]) != 1 or words.count(row["s"]) != 2 or row["io"] == row["s"]:
            problems.append(
                f"{where}: clean_prompt: must name io once and s twice ({row['io']!r} x {words.count(row['io'])}, "
                f"{row['s']!r} x {words.count(row['s'])})"
            )
        corrupted = row["corrupted_prompt"].replace(",", " ").replace(".", " ").split()
        if row["io"] in corrupted or row["s"] in corrupted or len(corrupted) != len(words):
            problems.append(f"{where}: corrupted_prompt: must have the clean prompt's words with other names")
        prompts.append(
            IOIPrompt(
                row["prompt_id"],
                row["template_id"],
                row["order"],
                row["io"],
                row["s"],
                row["clean_prompt"],
                row["corrupted_prompt"],
            )
        )
    if problems:
        raise IOIDataError(f"{len(problems)} bad row(s):\n" + "\n".join(problems))
    return prompts


@dataclass
class IOITask:
    """The circuit task plus, per kept prompt, where IO and the first S sit (for attention readings)."""

    task: CircuitTask
    answer_batches: list[AnswerBatch]  # the task's batches with their answer pairs [IO, S]
    prompts: list[IOIPrompt]
    io_positions: list[int]
    s_positions: list[int]


def ioi_task(
    model: LoadedModel,
    *,
    n_prompts: int | None = None,
    seed: int = 0,
    max_batch: int | None = None,
    token_length: int | Literal["most_common"] | None = None,
) -> IOITask:
    """IOI for ``model``: clean and ABC-corrupted prompts, metric ``logit(IO) - logit(S)`` at the last position.

    A row is excluded, and listed in ``task.excluded``, when a name is not one token (with its leading space) or the
    clean and corrupted prompts differ in token length. ``token_length`` optionally draws only from usable rows of
    one token length (``"most_common"``: the commonest), so that the task is one batch (one pass per evaluation);
    ``task.notes`` says how many were eligible. ``n_prompts`` draws that many (seeded); rows are batched by length.
    """
    import random

    usable, excluded = [], []
    for prompt in load_ioi():
        io_ids, s_ids = model.token_ids(" " + prompt.io), model.token_ids(" " + prompt.s)
        bos = 1 if getattr(model, "prepend_bos", False) else 0
        if len(io_ids) != 1 + bos or len(s_ids) != 1 + bos:
            excluded.append((prompt.prompt_id, f"a name is not one token: {prompt.io!r}, {prompt.s!r}"))
            continue
        clean, corrupted = model.token_ids(prompt.clean_prompt), model.token_ids(prompt.corrupted_prompt)
        if len(clean) != len(corrupted):
            excluded.append((prompt.prompt_id, f"clean {len(clean)} vs corrupted {len(corrupted)} tokens"))
            continue
        usable.append((prompt, clean, corrupted, io_ids[-1], s_ids[-1]))
    if not usable:
        raise ValueError(f"no IOI prompt is usable with {model.name}; first exclusions: {excluded[:3]}")
    eligible = f"{len(usable)} usable rows"
    if token_length is not None:
        counts = Counter(len(item[1]) for item in usable)
        if token_length == "most_common":
            token_length = commonest_length(counts)
        if token_length not in counts:
            raise ValueError(f"no usable IOI row has {token_length} tokens under {model.name}; lengths: {dict(counts)}")
        usable = [item for item in usable if len(item[1]) == token_length]
        eligible += f", {len(usable)} of {token_length} tokens"
    if n_prompts is not None:
        if not 1 <= n_prompts <= len(usable):
            raise ValueError(f"n_prompts must be in [1, {len(usable)}] (usable rows), got {n_prompts}")
        usable = [usable[i] for i in sorted(random.Random(seed).sample(range(len(usable)), n_prompts))]
    by_length = defaultdict(list)
    for item in usable:
        by_length[len(item[1])].append(item)
    batches, kept, io_pos, s_pos = [], [], [], []
    for length in sorted(by_length):
        group = by_length[length]
        step = max_batch or len(group)
        for start in range(0, len(group), step):
            chunk = group[start : start + step]
            batches.append(
                AnswerBatch(
                    clean_tokens=torch.tensor([c for _, c, _, _, _ in chunk]),
                    corrupted_tokens=torch.tensor([c for _, _, c, _, _ in chunk]),
                    answer_tokens=torch.tensor([[io, s] for _, _, _, io, s in chunk]),
                    ids=[p.prompt_id for p, _, _, _, _ in chunk],
                )
            )
            for prompt, clean, _, io, s in chunk:
                kept.append(prompt)
                io_pos.append(clean.index(io))
                s_pos.append(clean.index(s))
    task = task_from_answer_batches("IOI", batches, excluded=excluded, metric_name="logit(IO) - logit(S)")
    task.notes = f"{eligible}; {len(kept)} used; corrupted prompts replace the three names by unrelated ones (ABC)"
    return IOITask(task, batches, kept, io_pos, s_pos)


def logit_differences(model: LoadedModel, ioi: IOITask) -> pd.DataFrame:
    """Per prompt: the clean and corrupted ``logit(IO) - logit(S)`` (a plain forward pass each)."""
    rows = []
    with torch.no_grad():
        for batch in ioi.task.batches:
            for which, tokens in (("clean", batch.clean_tokens), ("corrupted", batch.corrupted_tokens)):
                scores = batch.score(model.hf_model(tokens).logits[:, -1:])
                rows += [{"prompt_id": i, "run": which, "logit_diff": float(v)} for i, v in zip(batch.ids, scores)]
    table = pd.DataFrame(rows).pivot(index="prompt_id", columns="run", values="logit_diff")
    templates = {p.prompt_id: p.template_id for p in ioi.prompts}
    orders = {p.prompt_id: p.order for p in ioi.prompts}
    return table.assign(template=table.index.map(templates), order=table.index.map(orders)).reset_index()
