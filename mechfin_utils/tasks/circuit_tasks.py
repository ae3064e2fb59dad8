"""Circuit tasks: batches of clean and corrupted prompts with a per-prompt score, for circuit discovery.

A :class:`CircuitTask` is what :class:`mechfin_utils.methods.circuits.nodes.NodeAblator` runs: :class:`CircuitBatch` objects of
one token length each (clean tokens, the paired corrupted tokens, and a score of the logits at the last
``read_positions`` positions). Two tasks are built here:

* **greater-than** (Hanna et al. 2023; ``data/greater_than.csv``, see ``data/README.md``): "The war lasted from
  the year 17YY to the year 17" -- the score is the probability mass on years greater than YY minus the mass on
  years up to YY; the corrupted prompt uses the year ``1701``. :func:`year_scheme` decides, per model, whether years
  tokenise as two-digit tokens (GPT-2) or digit by digit (SmolLM2), and :func:`greater_than_score` reads them so.
* **fair lending** (the paper's task, via :mod:`mechfin_utils.tasks.fair_lending`): the logit difference ``logit(" Yes") -
  logit(" No")`` on the pairs of the largest same-length groups (:func:`fair_lending_task`).

Any other task is :func:`task_from_answer_batches` or a hand-made :class:`CircuitTask`.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.metrics import logit_diff
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.paths import DATA_DIR
from mechfin_utils.tasks.batching import align_pairs, chunks, commonest_length, make_batches
from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs

GREATER_THAN_CSV = DATA_DIR / "greater_than.csv"

YearScheme = Literal["two-digit", "single-digit"]
ScoreFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, " batch"]]


@dataclass
class CircuitBatch:
    """Prompts of one token length: clean and paired corrupted tokens, and the per-prompt task score.

    ``score(logits)`` maps the logits of a run on ``clean_tokens`` (possibly with nodes ablated) to one number
    per prompt; larger means more of the clean behaviour. It is given the logits of the last
    ``read_positions`` positions only, ``[batch, read_positions, d_vocab]``, so it must index positions from
    the end (``logits[:, -1]``).
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    score: ScoreFn
    ids: list[str]
    read_positions: int = 1

    def __post_init__(self) -> None:
        if self.clean_tokens.ndim != 2 or self.clean_tokens.shape != self.corrupted_tokens.shape:
            raise ValueError(
                f"clean_tokens {tuple(self.clean_tokens.shape)} and corrupted_tokens "
                f"{tuple(self.corrupted_tokens.shape)} must both be [batch, pos] and equal"
            )
        if len(self.ids) != self.clean_tokens.shape[0]:
            raise ValueError(f"{len(self.ids)} ids for a batch of {self.clean_tokens.shape[0]} prompts")
        if not 1 <= self.read_positions <= self.clean_tokens.shape[1]:
            raise ValueError(
                f"read_positions must be in 1..{self.clean_tokens.shape[1]} (the prompt length), "
                f"got {self.read_positions}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.clean_tokens.shape[0])


@dataclass
class CircuitTask:
    """A task for circuit discovery: its batches, what its metric is, and what was left out (and why)."""

    name: str
    metric_name: str
    batches: list[CircuitBatch]
    excluded: list[tuple[str, str]] = field(default_factory=list)
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.batches:
            raise ValueError(f"task {self.name!r} has no batches")

    @property
    def n_prompts(self) -> int:
        return sum(b.batch_size for b in self.batches)

    @property
    def ids(self) -> list[str]:
        """Every prompt's id, in batch order (the order of :meth:`NodeAblator.prompt_scores`)."""
        return [i for b in self.batches for i in b.ids]

    def __repr__(self) -> str:
        lengths = sorted({int(b.clean_tokens.shape[1]) for b in self.batches})
        return (
            f"CircuitTask({self.name}: {self.n_prompts} prompts in {len(self.batches)} batches, token lengths "
            f"{lengths}, metric {self.metric_name}, {len(self.excluded)} excluded)"
        )


# --- greater-than ----------------------------------------------------------------------------------------


class GreaterThanDataError(ValueError):
    """A malformed row of the greater-than CSV; the message names the file, line, prompt_id and field."""


GREATER_THAN_COLUMNS = ("prompt_id", "noun", "century", "yy", "clean_prompt", "corrupted_prompt")
BASELINE_YY = 1


@dataclass(frozen=True)
class GreaterThanPrompt:
    """One row of ``data/greater_than.csv``: "The {noun} lasted from the year {century}{yy} to the year {century}"."""

    prompt_id: str
    noun: str
    century: str
    yy: int
    clean_prompt: str
    corrupted_prompt: str
    line: int = 0


def load_greater_than(path: str | Path | None = None) -> list[GreaterThanPrompt]:
    """Read and validate the greater-than prompts (default ``data/greater_than.csv``).

    Every rule raises :class:`GreaterThanDataError` naming the row: exact columns; no empty field; unique
    ``prompt_id``; ``yy`` an integer in 2..98 (01 is the corrupted baseline, 99 has no later two-digit year);
    ``century`` two digits; the clean prompt ends with the century and contains ``{century}{yy:02d}`` exactly
    once; the corrupted prompt is the clean one with that year replaced by ``{century}01``.
    """
    path = Path(path) if path is not None else GREATER_THAN_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run python data/build_greater_than.py)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != GREATER_THAN_COLUMNS:
            raise GreaterThanDataError(
                f"{path}: columns are {reader.fieldnames}, expected exactly {list(GREATER_THAN_COLUMNS)}"
            )
        prompts: list[GreaterThanPrompt] = []
        seen: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            where = f"{path.name} line {line} ({row.get('prompt_id') or 'no prompt_id'})"
            if None in row or any(v is None for v in row.values()):
                raise GreaterThanDataError(f"{where}: wrong number of fields")
            for column in GREATER_THAN_COLUMNS:
                if not row[column].strip():
                    raise GreaterThanDataError(f"{where}: field {column!r} is empty")
            if row["prompt_id"] in seen:
                raise GreaterThanDataError(f"{where}: duplicate prompt_id (first on line {seen[row['prompt_id']]})")
            seen[row["prompt_id"]] = line
            century = row["century"]
            if not re.fullmatch(r"\d\d", century):
                raise GreaterThanDataError(f"{where}: field 'century' must be two digits, got {century!r}")
            try:
                yy = int(row["yy"])
            except ValueError:
                raise GreaterThanDataError(f"{where}: field 'yy' must be an integer, got {row['yy']!r}") from None
            if not 2 <= yy <= 98:
                raise GreaterThanDataError(f"{where}: field 'yy' must be in 2..98, got {yy}")
            clean, corrupted = row["clean_prompt"], row["corrupted_prompt"]
            year = f"{century}{yy:02d}"
            if not clean.endswith(f" {century}") or clean.count(year) != 1:
                raise GreaterThanDataError(
                    f"{where}: field 'clean_prompt' must contain the year {year} once and end with ' {century}', "
                    f"got {clean!r}"
                )
            expected = clean.replace(year, f"{century}{BASELINE_YY:02d}")
            if corrupted != expected:
                raise GreaterThanDataError(
                    f"{where}: field 'corrupted_prompt' must be the clean prompt with {year} -> "
                    f"{century}{BASELINE_YY:02d}, i.e. {expected!r}; got {corrupted!r}"
                )
            prompts.append(GreaterThanPrompt(row["prompt_id"], row["noun"], century, yy, clean, corrupted, line))
    if not prompts:
        raise GreaterThanDataError(f"{path}: no rows")
    return prompts


def year_scheme(model: LoadedModel, prompt: GreaterThanPrompt) -> YearScheme | None:
    """How ``model``'s tokenizer continues this prompt with its two-digit year, or None if neither way.

    ``"two-digit"``: appending "YY" to the prompt adds exactly one token, the token "YY" (GPT-2: "17" + "32").
    ``"single-digit"``: it adds exactly the two digit tokens "Y", "Y" (SmolLM2 splits every digit).
    The check is on the prompt's own tokens, so a tokenizer that would merge the year with what precedes it
    is caught too.
    """
    base = model.token_ids(prompt.clean_prompt)
    text = f"{prompt.yy:02d}"
    full = model.token_ids(prompt.clean_prompt + text)
    added = full[len(base) :]
    if full[: len(base)] != base:
        return None
    pieces = [model.tokenizer.decode([i]) for i in added]
    if pieces == [text]:
        return "two-digit"
    if pieces == [text[0], text[1]]:
        return "single-digit"
    return None


def _year_token_ids(model: LoadedModel, scheme: YearScheme) -> Int[Tensor, " n_years"]:
    """Token ids of "00".."99" (two-digit) or "0".."9" (single-digit); each must be one token."""
    texts = [f"{y:02d}" for y in range(100)] if scheme == "two-digit" else [str(d) for d in range(10)]
    ids = []
    for text in texts:
        try:
            ids.append(model.single_token_id(text))
        except ValueError as err:
            raise ValueError(f"the greater-than metric ({scheme} years) needs {text!r} as one token: {err}") from None
    return torch.tensor(ids, dtype=torch.long)


def greater_than_score(
    logits: Float[Tensor, "batch pos d_vocab"],
    yy: Int[Tensor, " batch"],
    scheme: YearScheme,
    year_token_ids: Int[Tensor, " n_years"],
) -> Float[Tensor, " batch"]:
    """Hanna et al.'s probability difference: P(year > YY) - P(year <= YY), per prompt.

    ``"two-digit"`` (GPT-2): the next token *is* the two-digit year; ``year_token_ids`` are the tokens
    "00".."99" and the score is ``sum_{y > YY} p(y) - sum_{y <= YY} p(y)`` at the last position. Probability
    on other tokens counts for neither side (as in Hanna et al.).

    ``"single-digit"`` (SmolLM2): the year comes as a tens digit then a units digit. The batch must hold the
    prompt *followed by the tens digit T of YY*: position -2 predicts the tens digit, p(d), and position -1
    predicts the units digit given T, p(u | T) (a causal model's prediction at -2 does not see the appended
    token, so one forward pass gives both). With ``s(u) = p(u | T) / sum_u' p(u' | T)`` (the units
    distribution renormalised over digits), the score is::

        sum_{d > T} p(d) + p(T) * sum_{u > U} s(u)  -  [ sum_{d < T} p(d) + p(T) * sum_{u <= U} s(u) ]

    i.e. the same difference over two-digit years ``q(du) = p(d) * s_d(u)``; only the tie decade d = T needs
    the units digit, because any year in a higher (lower) decade is later (earlier) whatever its units. Both
    scores lie in [-1, 1].
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, pos, d_vocab], got {tuple(logits.shape)}")
    yy = yy.to(logits.device)
    year_token_ids = year_token_ids.to(logits.device)
    if scheme == "two-digit":
        probs = logits[:, -1].softmax(-1)[:, year_token_ids]  # [batch, 100]
        years = torch.arange(100, device=logits.device)
        later = years[None, :] > yy[:, None]
        return (probs * later).sum(-1) - (probs * ~later).sum(-1)
    if scheme == "single-digit":
        if logits.shape[1] < 2:
            raise ValueError("single-digit scoring needs the prompt plus the appended tens digit (>= 2 positions)")
        tens = logits[:, -2].softmax(-1)[:, year_token_ids]  # [batch, 10]: p(d)
        units = logits[:, -1].softmax(-1)[:, year_token_ids]  # [batch, 10]: p(u | T)
        share = units / units.sum(-1, keepdim=True)
        digits = torch.arange(10, device=logits.device)
        t, u = yy // 10, yy % 10
        tie = tens.gather(1, t[:, None]).squeeze(1)
        later = (tens * (digits[None] > t[:, None])).sum(-1) + tie * (share * (digits[None] > u[:, None])).sum(-1)
        earlier = (tens * (digits[None] < t[:, None])).sum(-1) + tie * (share * (digits[None] <= u[:, None])).sum(-1)
        return later - earlier
    raise ValueError(f"scheme must be 'two-digit' or 'single-digit', got {scheme!r}")


def _sample(items: list, n: int | None, seed: int, what: str) -> list:
    """``n`` items drawn without replacement (seeded), kept in their original order; all when n is None."""
    if n is None:
        return list(items)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {n!r}")
    if n > len(items):
        raise ValueError(f"{what}={n} but only {len(items)} usable prompts are available")
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]


def greater_than_task(
    model: LoadedModel,
    prompts: Sequence[GreaterThanPrompt] | None = None,
    *,
    n_prompts: int | None = None,
    seed: int = 0,
    max_batch: int | None = None,
) -> CircuitTask:
    """The greater-than task for ``model``: clean "17YY" prompts, corrupted "1701" prompts, Hanna's metric.

    Each prompt is checked against the model's tokenizer (:func:`year_scheme`); a prompt whose year does not
    tokenise as two-digit or single-digit years, or whose clean and corrupted prompts differ in token length,
    is *excluded and listed* in ``task.excluded`` (never silently). All kept prompts must share one scheme.
    For single-digit tokenizers the tens digit of YY is appended to both prompts (see
    :func:`greater_than_score`). ``n_prompts`` draws that many of the usable prompts (seeded); prompts are
    grouped by token length into batches of at most ``max_batch``.
    """
    prompts = list(load_greater_than() if prompts is None else prompts)
    usable, excluded, schemes = [], [], {}
    for prompt in prompts:
        prompt_scheme = year_scheme(model, prompt)
        if prompt_scheme is None:
            pieces = model.to_str_tokens(prompt.clean_prompt + f"{prompt.yy:02d}")[-4:]
            excluded.append((prompt.prompt_id, f"year not split as two-digit or single-digit tokens: {pieces}"))
            continue
        clean, corrupted = model.token_ids(prompt.clean_prompt), model.token_ids(prompt.corrupted_prompt)
        if len(clean) != len(corrupted):
            excluded.append((prompt.prompt_id, f"clean {len(clean)} vs corrupted {len(corrupted)} tokens"))
            continue
        schemes[prompt.prompt_id] = prompt_scheme
        usable.append((prompt, clean, corrupted))
    if not usable:
        raise ValueError(f"no greater-than prompt is usable with {model.name}; first exclusions: {excluded[:3]}")
    found = sorted(set(schemes.values()))
    if len(found) > 1:
        examples = {s: next(p for p, sc in schemes.items() if sc == s) for s in found}
        raise ValueError(f"{model.name} tokenizes years inconsistently across prompts: {examples}")
    scheme: YearScheme = found[0]
    year_ids = _year_token_ids(model, scheme)
    chosen = _sample(usable, n_prompts, seed, "n_prompts")
    by_length: dict[int, list] = defaultdict(list)
    for prompt, clean, corrupted in chosen:
        if scheme == "single-digit":
            tens = int(year_ids[prompt.yy // 10])
            clean, corrupted = clean + [tens], corrupted + [tens]
        by_length[len(clean)].append((prompt, clean, corrupted))
    device = model.cfg.device
    batches = []
    for length in sorted(by_length):
        for chunk in chunks(by_length[length], max_batch):
            yy = torch.tensor([p.yy for p, _, _ in chunk], dtype=torch.long)

            def score(logits: Tensor, yy: Tensor = yy) -> Tensor:
                return greater_than_score(logits, yy, scheme, year_ids)

            batches.append(
                CircuitBatch(
                    clean_tokens=torch.tensor([c for _, c, _ in chunk], dtype=torch.long, device=device),
                    corrupted_tokens=torch.tensor([c for _, _, c in chunk], dtype=torch.long, device=device),
                    score=score,
                    ids=[p.prompt_id for p, _, _ in chunk],
                    read_positions=2 if scheme == "single-digit" else 1,
                )
            )
    notes = (
        "next token is the two-digit year token"
        if scheme == "two-digit"
        else "years are single-digit tokens: the tens digit of YY is appended and the units share used at the tie"
    )
    return CircuitTask(
        name="greater-than",
        metric_name="P(year > YY) - P(year <= YY)",
        batches=batches,
        excluded=excluded,
        notes=f"{scheme} years ({notes})",
    )


# --- tasks scored by an answer pair ---------------------------------------------------------------------


@dataclass
class AnswerBatch:
    """Prompts of one token length with the answer pair each is scored by (``[batch, 2]``: expected answer first);
    what :func:`task_from_answer_batches` needs, for tasks built outside :mod:`mechfin_utils.tasks.fair_lending` (IOI, addition)."""

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_tokens: Int[Tensor, "batch 2"]
    ids: list[str]


def task_from_answer_batches(
    name: str, batches: Sequence[Any], *, excluded: Sequence[tuple[str, str]] = (), metric_name: str | None = None
) -> CircuitTask:
    """A :class:`CircuitTask` scored by ``logit(answer 0) - logit(answer 1)`` at the last position.

    ``batches`` are :class:`mechfin_utils.tasks.batching.TaskBatch` objects (anything with ``clean_tokens``,
    ``corrupted_tokens`` and ``answer_tokens [batch, 2]``, clean answer first; ``ids`` if it has them).
    """
    out = []
    for i, batch in enumerate(batches):
        answers = batch.answer_tokens
        if answers.ndim != 2 or answers.shape != (batch.clean_tokens.shape[0], 2):
            raise ValueError(f"batch {i}: answer_tokens must be [batch, 2], got {tuple(answers.shape)}")

        def score(logits: Tensor, answers: Tensor = answers) -> Tensor:
            return logit_diff(logits, answers)

        ids = list(getattr(batch, "ids", None) or [f"{name}-{i}-{j}" for j in range(answers.shape[0])])
        out.append(CircuitBatch(batch.clean_tokens, batch.corrupted_tokens, score, ids))
    return CircuitTask(
        name=name,
        metric_name=metric_name or "logit diff (clean answer - corrupted answer)",
        batches=out,
        excluded=list(excluded),
    )


# --- fair lending ----------------------------------------------------------------------------------------


def fair_lending_task(
    model: LoadedModel,
    *,
    n_pairs: int | None = None,
    seed: int = 0,
    max_batch: int | None = None,
    token_length: int | Literal["most_common"] | None = None,
    pairs: Sequence | None = None,
) -> CircuitTask:
    """The paper's task: prohibited-basis prompt (clean, " Yes") vs legitimate-reason prompt (corrupted, " No").

    Pairs come from :func:`mechfin_utils.tasks.fair_lending.load_fair_lending_pairs` (or ``pairs``) and are aligned to the
    model's tokenizer with :func:`~mechfin_utils.tasks.batching.align_pairs` (unequal-length pairs are listed in
    ``task.excluded``). ``token_length`` optionally restricts the draw to aligned pairs of one token length
    (``"most_common"``: the commonest), so that the task is a single batch and each pruning step one forward
    pass; the pairs of other lengths are simply not drawn (``task.notes`` says how many were eligible). Then
    ``n_pairs`` pairs are drawn (seeded) and batched by token length with
    :func:`~mechfin_utils.tasks.batching.make_batches`. Metric: ``logit(" Yes") - logit(" No")``.
    """
    pairs = list(load_fair_lending_pairs() if pairs is None else pairs)
    report = align_pairs(model, pairs)
    excluded = [(e.pair.id, f"{e.reason}: {e.detail}") for e in report.excluded]
    eligible = list(report.kept)
    notes = f"{len(eligible)} aligned pairs"
    if token_length is not None:
        counts = Counter(report.lengths[p.id] for p in eligible)
        if token_length == "most_common":
            token_length = commonest_length(counts)
        if token_length not in counts:
            raise ValueError(f"no aligned pair has {token_length} tokens under {model.name}; lengths: {dict(counts)}")
        eligible = [p for p in eligible if report.lengths[p.id] == token_length]
        notes += f"; drawn from the {len(eligible)} of {token_length} tokens"
    chosen = _sample(eligible, n_pairs, seed, "n_pairs")
    batches = make_batches(model, chosen, max_batch)
    task = task_from_answer_batches(
        "fair-lending", batches, excluded=excluded, metric_name="logit(' Yes') - logit(' No')"
    )
    task.notes = notes
    return task
