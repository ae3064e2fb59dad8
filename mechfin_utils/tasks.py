"""The fair-lending task sets: loading, validation, tokenizer alignment and batching.

Two families of prompt pairs live in ``data/`` (built by ``data/build_task_sets.py``, described in
``data/README.md``):

**Fair-lending pairs** (the paper's task, ``data/fair_lending_pairs.csv``). A *clean* prompt describes an
adverse credit action taken because of a prohibited basis and asks whether it is a fair-lending violation
(expected answer `` Yes``); the *corrupted* prompt is the same text with only that phrase replaced by a
legitimate credit reason (expected answer `` No``). The metric is ``logit(" Yes") - logit(" No")`` at the
last position, and activation patching runs clean -> corrupted.

**Counterfactual decision pairs** (``data/counterfactual_decisions.csv``). Two loan files that differ only in
the applicant's protected attribute (``value_a`` -> ``value_b``); the next token is the decision, scored as
``logit(" approved") - logit(" denied")``. A model that treats the two applicants alike gives both prompts the
same score; the difference between them is the attribute's effect on the decision.

The pipeline is the same for both families:

1. ``load_fair_lending_pairs`` / ``load_counterfactual_pairs`` read the CSV and validate every row. Anything
   malformed raises :class:`TaskDataError` naming the file, the line, the row's id and the field.
2. :func:`align_pairs` checks them against one tokenizer (with the model's BOS decision): the answers must be
   single tokens (else an error), and the two prompts of a pair must have the same number of tokens, because
   patching swaps activations position by position and batches are never padded. Pairs that fail are
   *excluded and reported* in the :class:`AlignmentReport`, never dropped silently.
3. :func:`make_batches` groups the kept pairs by token length into :class:`TaskBatch` objects (tokens for both
   prompts, answer tokens ``[batch, 2]`` with the expected clean answer first). :func:`largest_template_batch`
   picks the biggest group that also shares a template, so that every position means the same thing in
   every row (what a position-resolved heat map needs).
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# The legal categories
# ---------------------------------------------------------------------------------------------------------

ECOA_BASES: dict[str, str] = {
    "race": "ECOA, 15 U.S.C. 1691(a)(1); Regulation B, 12 CFR 1002.2(z)",
    "color": "ECOA, 15 U.S.C. 1691(a)(1); Regulation B, 12 CFR 1002.2(z)",
    "religion": "ECOA, 15 U.S.C. 1691(a)(1); Regulation B, 12 CFR 1002.2(z)",
    "national_origin": "ECOA, 15 U.S.C. 1691(a)(1); Regulation B, 12 CFR 1002.2(z)",
    "sex": "ECOA, 15 U.S.C. 1691(a)(1); Regulation B, 12 CFR 1002.2(z)",
    "marital_status": "ECOA, 15 U.S.C. 1691(a)(1); Regulation B, 12 CFR 1002.2(z)",
    "age": "ECOA, 15 U.S.C. 1691(a)(1) (provided the applicant can contract); Regulation B, 12 CFR 1002.2(z)",
    "public_assistance": (
        "ECOA, 15 U.S.C. 1691(a)(2) (income derived from any public assistance program); Regulation B, 12 CFR 1002.2(z)"
    ),
    "ccpa_rights": (
        "ECOA, 15 U.S.C. 1691(a)(3) (good-faith exercise of any right under the Consumer Credit Protection "
        "Act); Regulation B, 12 CFR 1002.2(z)"
    ),
}
"""ECOA's prohibited bases (Regulation B's list at 12 CFR 1002.2(z)), keyed by the ``basis`` column value."""

FHA_BASES: dict[str, str] = {
    "familial_status": (
        "Fair Housing Act, 42 U.S.C. 3605(a) (residential real-estate-related transactions); "
        "familial status defined at 42 U.S.C. 3602(k)"
    ),
    "disability": (
        "Fair Housing Act, 42 U.S.C. 3605(a) (residential real-estate-related transactions); "
        "'handicap' defined at 42 U.S.C. 3602(h)"
    ),
}
"""The Fair Housing Act's bases that ECOA does not list. (The FHA also covers race, color, religion, sex and
national origin; those rows are labelled ECOA, the statute that covers them for every credit product.)"""

ALL_BASES: dict[str, str] = {**ECOA_BASES, **FHA_BASES}
STATUTE_OF_BASIS: dict[str, str] = {**{b: "ECOA" for b in ECOA_BASES}, **{b: "FHA" for b in FHA_BASES}}

HOUSING_PRODUCTS: frozenset[str] = frozenset({"mortgage", "home equity loan", "refinance"})
"""Products that are residential real-estate-related transactions, the only ones where FHA bases apply."""

LEGITIMATE_REASON_CATEGORIES: dict[str, str] = {
    "credit_score": "a low credit score",
    "debt_to_income": "a high debt-to-income ratio or debt load",
    "income_verification": "income that could not be verified",
    "collateral": "insufficient collateral or a low appraisal",
    "payment_history": "late or missed payments, defaults, bankruptcy",
    "employment_history": "short or unstable employment",
    "credit_history": "too little credit history",
}
"""The ``reason_category`` values: kinds of legitimate, creditworthiness-based reasons."""

FAIR_LENDING_ANSWERS: tuple[str, str] = (" Yes", " No")
"""(clean answer, corrupted answer) of every fair-lending pair."""

COUNTERFACTUAL_ANSWERS: tuple[str, str] = (" approved", " denied")
"""The two decision tokens of every counterfactual pair, scored as logit(first) - logit(second)."""

PROFILES: tuple[str, ...] = ("strong", "borderline", "weak")
"""Credit profile strength of a counterfactual loan file (identical in both prompts of a pair)."""

FAIR_LENDING_COLUMNS: tuple[str, ...] = (
    "pair_id",
    "basis",
    "statute",
    "template_id",
    "product",
    "clean_prompt",
    "corrupted_prompt",
    "clean_answer",
    "corrupted_answer",
    "protected_phrase",
    "legitimate_phrase",
    "reason_category",
)

COUNTERFACTUAL_COLUMNS: tuple[str, ...] = (
    "cf_id",
    "basis",
    "statute",
    "template_id",
    "product",
    "profile",
    "prompt_a",
    "prompt_b",
    "value_a",
    "value_b",
    "answer_tokens",
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
FAIR_LENDING_CSV = DATA_DIR / "fair_lending_pairs.csv"
COUNTERFACTUAL_CSV = DATA_DIR / "counterfactual_decisions.csv"


class TaskDataError(ValueError):
    """A task file or pair is malformed; the message names the file, line, row id and field."""


# ---------------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FairLendingPair:
    """One clean/corrupted pair. ``line`` is where the row starts in its CSV (1 = the header)."""

    pair_id: str
    basis: str
    statute: str
    template_id: str
    product: str
    clean_prompt: str
    corrupted_prompt: str
    clean_answer: str
    corrupted_answer: str
    protected_phrase: str
    legitimate_phrase: str
    reason_category: str
    line: int = field(default=0, compare=False)

    @property
    def id(self) -> str:
        return self.pair_id

    @property
    def texts(self) -> tuple[str, str]:
        """(clean prompt, corrupted prompt): the order in which batches hold them."""
        return (self.clean_prompt, self.corrupted_prompt)

    @property
    def answers(self) -> tuple[str, str]:
        """(clean answer, corrupted answer), i.e. (`` Yes``, `` No``)."""
        return (self.clean_answer, self.corrupted_answer)


@dataclass(frozen=True)
class CounterfactualPair:
    """Two loan files differing only in the protected attribute (``value_a`` in A, ``value_b`` in B).

    ``value_a`` / ``value_b`` are the exact text spans that differ (e.g. ``"a White applicant"`` /
    ``"a Black applicant"``); ``value_a`` is the comparison group, ``value_b`` the protected-class value.
    """

    cf_id: str
    basis: str
    statute: str
    template_id: str
    product: str
    profile: str
    prompt_a: str
    prompt_b: str
    value_a: str
    value_b: str
    answer_tokens: tuple[str, str]
    line: int = field(default=0, compare=False)

    @property
    def id(self) -> str:
        return self.cf_id

    @property
    def texts(self) -> tuple[str, str]:
        """(prompt A, prompt B): batches hold A where fair-lending batches hold the clean prompt."""
        return (self.prompt_a, self.prompt_b)

    @property
    def answers(self) -> tuple[str, str]:
        """(`` approved``, `` denied``): the same for both prompts, so the metric compares like with like."""
        return self.answer_tokens


Pair = FairLendingPair | CounterfactualPair
P = TypeVar("P", FairLendingPair, CounterfactualPair)


# ---------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------


def _where(path: Path, line: int, id_column: str, row_id: str | None) -> str:
    shown = repr(row_id) if row_id else "<missing>"
    return f"{path.name} line {line} ({id_column}={shown})"


Problems = list[tuple[int, str]]
"""(line, message) for every bad row found so far; reported together, in file order."""


def read_task_text(path: Path, id_column: str) -> str:
    """The file's text: UTF-8, with or without a byte-order mark; any other byte is named with its line and row."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        text = raw.split(b"\n")[line - 1].decode("utf-8", errors="replace")
        row_id = text.split(",")[0] if line > 1 else None
        where = _where(path, line, id_column, row_id) if line > 1 else f"{path.name} line 1 (the header)"
        column = error.start - raw.rfind(b"\n", 0, error.start)
        raise TaskDataError(
            f"{where}: byte {raw[error.start]:#04x} at character {column} is not UTF-8; save the file as UTF-8"
        ) from None


def raise_problems(path: Path, problems: Problems) -> None:
    """One problem: its message as it is. Several: all of them, in file order, under a count."""
    if len(problems) == 1:
        raise TaskDataError(problems[0][1])
    if problems:
        listed = "\n  ".join(message for _, message in sorted(problems, key=lambda p: p[0]))
        raise TaskDataError(f"{len(problems)} bad rows in {path.name}:\n  {listed}")


def read_task_rows(
    path: Path, columns: Sequence[str], id_column: str
) -> tuple[list[tuple[int, dict[str, str]]], Problems]:
    """Rows of a task CSV as ``(line, {column: value})`` after the checks every task file shares, and the
    problems of the rows that failed them (those rows are not returned).

    Shared rules: UTF-8 (a byte-order mark is accepted); the header holds exactly ``columns`` (none missing,
    none unknown, none twice); every row has one value per column and no empty (or whitespace-only) value; ids
    are unique. A bad header raises at once; bad rows are collected.
    """
    if not path.is_file():
        raise TaskDataError(f"task file {path} does not exist")
    reader = csv.reader(io.StringIO(read_task_text(path, id_column), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise TaskDataError(f"{path.name} is empty: expected a header with columns {list(columns)}") from None
    repeated = sorted(c for c, n in Counter(header).items() if n > 1)
    if repeated:
        raise TaskDataError(f"{path.name} line 1: column(s) {repeated} appear more than once in the header")
    unknown = [c for c in header if c not in columns]
    if unknown:
        raise TaskDataError(f"{path.name} line 1: unknown column(s) {unknown}; expected exactly {list(columns)}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise TaskDataError(f"{path.name} line 1: missing column(s) {missing}; expected exactly {list(columns)}")

    rows: list[tuple[int, dict[str, str]]] = []
    problems: Problems = []
    first_line_of_id: dict[str, int] = {}
    next_line = reader.line_num + 1
    for values in reader:
        line, next_line = next_line, reader.line_num + 1
        if not values:
            problems.append((line, f"{path.name} line {line}: blank line inside the table"))
            continue
        row_id = values[header.index(id_column)] if len(values) > header.index(id_column) else None
        where = _where(path, line, id_column, row_id)
        if len(values) != len(header):
            problems.append((line, f"{where}: {len(values)} values for {len(header)} columns"))
            continue
        row = dict(zip(header, values))
        empty = [column for column in columns if not row[column].strip()]
        if empty:
            problems.append((line, f"{where}, field {empty[0]!r}: empty value"))
            continue
        if row_id in first_line_of_id:
            problems.append(
                (line, f"{where}, field {id_column!r}: duplicate id, first used on line {first_line_of_id[row_id]}")
            )
            continue
        first_line_of_id[row_id] = line
        rows.append((line, row))
    if not rows and not problems:
        raise TaskDataError(f"{path.name} has a header but no rows")
    return rows, problems


def _check_basis(row: dict[str, str], where: str) -> None:
    basis, statute = row["basis"], row["statute"]
    if basis not in ALL_BASES:
        raise TaskDataError(f"{where}, field 'basis': unknown basis {basis!r}; known: {sorted(ALL_BASES)}")
    if statute != STATUTE_OF_BASIS[basis]:
        raise TaskDataError(
            f"{where}, field 'statute': {statute!r} but basis {basis!r} comes from {STATUTE_OF_BASIS[basis]!r}"
        )
    if statute == "FHA" and row["product"] not in HOUSING_PRODUCTS:
        raise TaskDataError(
            f"{where}, field 'product': {row['product']!r} is not a housing product, so the Fair Housing Act "
            f"basis {basis!r} does not apply; housing products: {sorted(HOUSING_PRODUCTS)}"
        )


def _check_single_substitution(
    where: str,
    first: str,
    second: str,
    first_field: str,
    second_field: str,
    span_a: str,
    span_b: str,
    span_a_field: str,
    span_b_field: str,
) -> None:
    """``second`` must be ``first`` with its one occurrence of ``span_a`` replaced by ``span_b``."""
    if first == second:
        raise TaskDataError(f"{where}, field {second_field!r}: identical to {first_field!r}")
    if span_a == span_b:
        raise TaskDataError(f"{where}, field {span_b_field!r}: identical to {span_a_field!r}")
    for text, text_field, span, span_field in (
        (first, first_field, span_a, span_a_field),
        (second, second_field, span_b, span_b_field),
    ):
        count = text.count(span)
        if count != 1:
            raise TaskDataError(
                f"{where}, field {span_field!r}: {span!r} occurs {count} times in {text_field!r}, not once"
            )
    if first.replace(span_a, span_b) != second:
        raise TaskDataError(
            f"{where}, field {second_field!r}: differs from {first_field!r} by more than replacing "
            f"{span_a_field!r} ({span_a!r}) with {span_b_field!r} ({span_b!r})"
        )


def load_fair_lending_pairs(path: str | Path | None = None) -> list[FairLendingPair]:
    """Read and validate the fair-lending pairs (default ``data/fair_lending_pairs.csv``).

    Rules (a :class:`TaskDataError` names the line, ``pair_id`` and field of *every* bad row, in file order):
    UTF-8, a byte-order mark accepted; exactly the columns :data:`FAIR_LENDING_COLUMNS`; no empty value; unique ``pair_id``; ``basis`` in :data:`ALL_BASES`
    with the matching ``statute``; FHA bases only on housing products; answers exactly `` Yes`` / `` No``;
    a known ``reason_category``; clean and corrupted prompts differ, and only by replacing the one occurrence
    of ``protected_phrase`` with ``legitimate_phrase``.
    """
    path = Path(path) if path is not None else FAIR_LENDING_CSV
    rows, problems = read_task_rows(path, FAIR_LENDING_COLUMNS, "pair_id")
    pairs = []
    for line, row in rows:
        try:
            pairs.append(_fair_lending_pair(path, line, row))
        except TaskDataError as error:
            problems.append((line, str(error)))
    raise_problems(path, problems)
    return pairs


def _fair_lending_pair(path: Path, line: int, row: dict[str, str]) -> FairLendingPair:
    """One validated row (the first problem raises)."""
    where = _where(path, line, "pair_id", row["pair_id"])
    _check_basis(row, where)
    for column, expected in zip(("clean_answer", "corrupted_answer"), FAIR_LENDING_ANSWERS):
        if row[column] != expected:
            raise TaskDataError(f"{where}, field {column!r}: {row[column]!r}, expected {expected!r}")
    if row["reason_category"] not in LEGITIMATE_REASON_CATEGORIES:
        raise TaskDataError(
            f"{where}, field 'reason_category': unknown {row['reason_category']!r}; "
            f"known: {sorted(LEGITIMATE_REASON_CATEGORIES)}"
        )
    _check_single_substitution(
        where,
        row["clean_prompt"],
        row["corrupted_prompt"],
        "clean_prompt",
        "corrupted_prompt",
        row["protected_phrase"],
        row["legitimate_phrase"],
        "protected_phrase",
        "legitimate_phrase",
    )
    return FairLendingPair(**row, line=line)


def load_counterfactual_pairs(path: str | Path | None = None) -> list[CounterfactualPair]:
    """Read and validate the counterfactual decision pairs (default ``data/counterfactual_decisions.csv``).

    Rules (a :class:`TaskDataError` names the line, ``cf_id`` and field of every bad row, in file order): UTF-8,
    a byte-order mark accepted; exactly the columns :data:`COUNTERFACTUAL_COLUMNS`; no empty value; unique ``cf_id``; ``basis``/``statute`` as for the
    fair-lending pairs; ``profile`` in :data:`PROFILES`; ``answer_tokens`` exactly
    ``" approved| denied"``; the prompts differ, and only by replacing the one occurrence of ``value_a`` with
    ``value_b``.
    """
    path = Path(path) if path is not None else COUNTERFACTUAL_CSV
    rows, problems = read_task_rows(path, COUNTERFACTUAL_COLUMNS, "cf_id")
    pairs = []
    for line, row in rows:
        try:
            pairs.append(_counterfactual_pair(path, line, row))
        except TaskDataError as error:
            problems.append((line, str(error)))
    raise_problems(path, problems)
    return pairs


def _counterfactual_pair(path: Path, line: int, row: dict[str, str]) -> CounterfactualPair:
    """One validated row (the first problem raises)."""
    expected_answers = "|".join(COUNTERFACTUAL_ANSWERS)
    where = _where(path, line, "cf_id", row["cf_id"])
    _check_basis(row, where)
    if row["profile"] not in PROFILES:
        raise TaskDataError(f"{where}, field 'profile': unknown {row['profile']!r}; known: {list(PROFILES)}")
    if row["answer_tokens"] != expected_answers:
        raise TaskDataError(f"{where}, field 'answer_tokens': {row['answer_tokens']!r}, expected {expected_answers!r}")
    _check_single_substitution(
        where,
        row["prompt_a"],
        row["prompt_b"],
        "prompt_a",
        "prompt_b",
        row["value_a"],
        row["value_b"],
        "value_a",
        "value_b",
    )
    fields = {k: v for k, v in row.items() if k != "answer_tokens"}
    return CounterfactualPair(**fields, answer_tokens=COUNTERFACTUAL_ANSWERS, line=line)


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
        model_or_tokenizer: a :class:`~mechfin_utils.models.LoadedModel` (its BOS decision is used), or a bare
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


def _kept_pairs(model_or_tokenizer: Any, pairs_or_report: Sequence[P] | AlignmentReport, prepend_bos: bool | None):
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


def _chunks(items: list, max_batch: int | None) -> list[list]:
    if max_batch is None:
        return [items]
    return [items[i : i + max_batch] for i in range(0, len(items), max_batch)]


def _check_max_batch(max_batch: int | None) -> None:
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")


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
    _check_max_batch(max_batch)
    view, report = _kept_pairs(model_or_tokenizer, pairs_or_report, prepend_bos)
    by_length: dict[int, list] = defaultdict(list)
    for pair in report.kept:
        by_length[report.lengths[pair.id]].append(pair)
    return [
        _build_batch(view, report, chunk)
        for length in sorted(by_length)
        for chunk in _chunks(by_length[length], max_batch)
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
    _check_max_batch(max_batch)
    view, report = _kept_pairs(model_or_tokenizer, pairs_or_report, prepend_bos)
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for pair in report.kept:
        groups[(pair.template_id, report.lengths[pair.id])].append(pair)
    key = min(groups, key=lambda k: (-len(groups[k]), k[0], k[1]))
    return _build_batch(view, report, _chunks(groups[key], max_batch)[0])
