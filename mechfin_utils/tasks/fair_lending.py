"""The fair-lending task sets: the legal categories, the two kinds of prompt pair, and their validating loaders.

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

1. :func:`load_fair_lending_pairs` / :func:`load_counterfactual_pairs` read the CSV
   (:func:`mechfin_utils.tasks.task_tables.read_task_rows`) and validate every row. Anything malformed raises
   :class:`~mechfin_utils.tasks.task_tables.TaskDataError` naming the file, the line, the row's id and the field.
2. :func:`mechfin_utils.tasks.batching.align_pairs` checks them against one tokenizer, and
   :func:`~mechfin_utils.tasks.batching.make_batches` / :func:`~mechfin_utils.tasks.batching.largest_template_batch`
   turn them into padding-free token batches (see :mod:`mechfin_utils.tasks.batching`).

This module holds the legal categories behind the pairs (the prohibited bases with their citations, the legitimate
reason categories, the answers), the two pair types and their loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mechfin_utils.core.paths import DATA_DIR
from mechfin_utils.tasks.task_tables import TaskDataError, raise_problems, read_task_rows, read_task_text, row_location

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

FAVOURABLE_DECISION = "favourable_decision"
"""The ``reason_category`` of a pair whose corrupted prompt is a favourable or equal-treatment decision rather than an
adverse one with a legitimate reason (the mention set's favourable pairs)."""
REASON_CATEGORIES: dict[str, str] = {
    **LEGITIMATE_REASON_CATEGORIES,
    FAVOURABLE_DECISION: "a favourable or equal-treatment decision (no adverse action)",
}
"""Every ``reason_category`` a pair file may hold."""

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

MENTION_COLUMNS: tuple[str, ...] = (*FAIR_LENDING_COLUMNS, "attribute_mention", "neutral_mention")
"""The mention set's schema (``data/build_mention_set.py``): the fair-lending columns plus ``attribute_mention``, the
words that name the protected attribute in both prompts, outside the phrase that differs, and ``neutral_mention``,
words of the same form that name nothing protected ("is Hindu" / "is an accountant")."""

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


FAIR_LENDING_CSV = DATA_DIR / "fair_lending_pairs.csv"
COUNTERFACTUAL_CSV = DATA_DIR / "counterfactual_decisions.csv"


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
    attribute_mention: str = ""  # mention-set pairs only: the words naming the attribute in both prompts
    neutral_mention: str = ""  # mention-set pairs only: words of the same form naming nothing protected
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


def _pair_columns(path: Path) -> tuple[str, ...]:
    """The schema a pair file declares: :data:`MENTION_COLUMNS` when its header ends with ``attribute_mention``,
    else :data:`FAIR_LENDING_COLUMNS` (a header that matches neither is reported by ``read_task_rows``)."""
    try:
        header = read_task_text(path, "pair_id").split("\n", 1)[0]
    except (TaskDataError, OSError):
        return FAIR_LENDING_COLUMNS  # read_task_rows reports the file's problem
    return MENTION_COLUMNS if header.rstrip("\r").endswith(",neutral_mention") else FAIR_LENDING_COLUMNS


def load_fair_lending_pairs(path: str | Path | None = None) -> list[FairLendingPair]:
    """Read and validate the fair-lending pairs (default ``data/fair_lending_pairs.csv``).

    Rules (a :class:`TaskDataError` names the line, ``pair_id`` and field of *every* bad row, in file order):
    UTF-8, a byte-order mark accepted; exactly the columns :data:`FAIR_LENDING_COLUMNS` (or :data:`MENTION_COLUMNS`,
    whose ``attribute_mention`` must name the attribute once in each prompt outside the phrase that differs); no
    empty value; unique ``pair_id``; ``basis`` in :data:`ALL_BASES`
    with the matching ``statute``; FHA bases only on housing products; answers exactly `` Yes`` / `` No``;
    a known ``reason_category``; clean and corrupted prompts differ, and only by replacing the one occurrence
    of ``protected_phrase`` with ``legitimate_phrase``.
    """
    path = Path(path) if path is not None else FAIR_LENDING_CSV
    rows, problems = read_task_rows(path, _pair_columns(path), "pair_id")
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
    where = row_location(path, line, "pair_id", row["pair_id"])
    _check_basis(row, where)
    for column, expected in zip(("clean_answer", "corrupted_answer"), FAIR_LENDING_ANSWERS):
        if row[column] != expected:
            raise TaskDataError(f"{where}, field {column!r}: {row[column]!r}, expected {expected!r}")
    if row["reason_category"] not in REASON_CATEGORIES:
        raise TaskDataError(
            f"{where}, field 'reason_category': unknown {row['reason_category']!r}; known: {sorted(REASON_CATEGORIES)}"
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
    if "attribute_mention" in row:
        _check_mention(where, row)
    return FairLendingPair(**row, line=line)


def _check_mention(where: str, row: dict[str, str]) -> None:
    """The mention names the attribute exactly once in each prompt outside the phrase that differs (the decision
    may restate it inside the phrase: "Maria is Hindu ... because she is Hindu")."""
    mention = row["attribute_mention"]
    if row["neutral_mention"] == mention:
        raise TaskDataError(f"{where}, field 'neutral_mention': identical to 'attribute_mention' ({mention!r})")
    for prompt_field, phrase_field in (("clean_prompt", "protected_phrase"), ("corrupted_prompt", "legitimate_phrase")):
        outside = row[prompt_field].count(mention) - row[phrase_field].count(mention)
        if outside != 1:
            raise TaskDataError(
                f"{where}, field 'attribute_mention': {mention!r} occurs {outside} times in {prompt_field!r} outside "
                f"{phrase_field!r}, not once"
            )


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
    where = row_location(path, line, "cf_id", row["cf_id"])
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
