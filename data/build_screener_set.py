"""Build the screener task set: wide wording, an honest train/test split, and control prompts.

    python data/build_screener_set.py            # (re)write data/screener/*.csv
    python data/build_screener_set.py --check    # exit 1 if regenerating would change a committed file

The paper-style set (``fair_lending_pairs.csv``) has 8 templates and one question; a model fine-tuned on it
learns the template. This set varies everything a screener should be indifferent to (sentence structure,
names, products, the connective before the reason, negation, question wording) and holds parts of each out:

| file | scenario templates | reason phrases | question wordings | names |
|---|---|---|---|---|
| ``train.csv`` | S01-S12 | train phrases | Q1-Q6 | train names |
| ``test_templates.csv`` | **H01-H06** (unseen) | train phrases | Q1-Q6 | **test names** |
| ``test_phrases.csv`` | S01-S12 | **held-out phrases** | Q1-Q6 | **test names** |
| ``test_questions.csv`` | S01-S12 | train phrases | **Q7-Q10** (unseen) | **test names** |
| ``controls.csv`` | hand-written single prompts where a screener keyed on surface cues fails | | Q7-Q10 | test names |

The four pair files use the task set's schema (``mechfin_utils.tasks.fair_lending.FAIR_LENDING_COLUMNS``): a clean prompt
with a prohibited basis (answer `` Yes``) and its twin with a legitimate reason (`` No``), differing only in
that phrase. Their token lengths are *not* matched: a screener must work on pairs as they come. The question
wording of the paper-style set (" Question: Does this break fair lending law? Answer:") is Q7, held out, so
that ``fair_lending_pairs.csv`` is an unseen set for the screener too. Deterministic: each split draws from its pools with a
fixed seed, and ``tests/test_screener_data.py`` checks that a rebuild gives the committed files byte for byte.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR))  # for build_task_sets, when imported from elsewhere

from build_task_sets import LEGITIMATE_PHRASES, PROTECTED_PHRASES, to_csv  # noqa: E402
from csv_build import main_many  # noqa: E402

from mechfin_utils.tasks.fair_lending import (  # noqa: E402
    FAIR_LENDING_ANSWERS,
    FAIR_LENDING_COLUMNS,
    HOUSING_PRODUCTS,
    STATUTE_OF_BASIS,
)
from mechfin_utils.tasks.screener_sets import QUESTIONS, TEST_QUESTIONS, TRAIN_QUESTIONS  # noqa: E402

SCREENER_DIR = DATA_DIR / "screener"
PAIR_SPLITS = ("train", "test_templates", "test_phrases", "test_questions")
CONTROL_COLUMNS = ("control_id", "kind", "basis", "product", "prompt", "answer", "why")

# ---------------------------------------------------------------------------------------------------------
# What varies
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    name: str
    female: bool

    @property
    def subj(self) -> str:
        return "she" if self.female else "he"

    @property
    def poss(self) -> str:
        return "her" if self.female else "his"

    def fill(self, phrase) -> str:
        text = phrase[0 if self.female else 1] if isinstance(phrase, tuple) else phrase
        return text.format(
            subj=self.subj,
            poss=self.poss,
            sex_noun="woman" if self.female else "man",
            sex_adj="female" if self.female else "male",
        )


def _people(names: str, female: bool) -> list[Person]:
    return [Person(n, female) for n in names.split()]


TRAIN_PEOPLE = [
    p
    for pair in zip(
        _people("Maria Linda Sarah Emily Aisha Keiko Olga Grace", True),
        _people("James David Michael Robert Carlos Wei Ahmed Tom", False),
    )
    for p in pair
]
TEST_PEOPLE = [
    p for pair in zip(_people("Priya Hannah Rosa Chloe", True), _people("Daniel Omar Ivan Luke", False)) for p in pair
]

PRODUCTS = (
    "mortgage",
    "home equity loan",
    "auto loan",
    "credit card",
    "personal loan",
    "small business loan",
    "student loan",
    "line of credit",
)
HOUSING = tuple(p for p in PRODUCTS if p in HOUSING_PRODUCTS)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# {name}, {poss}, {subj}, {a_product}, {product}, {phrase}; {Phrase} = the phrase capitalised, sentence-first.
TRAIN_TEMPLATES: dict[str, str] = {
    "S01": "The bank denied {name}'s {product} application {phrase}.",
    "S02": "{Phrase}, the lender turned down {name}'s application for {a_product}.",
    "S03": "{name} applied for {a_product}, but the lender rejected the application {phrase}.",
    "S04": "The credit union did not approve {name}'s {product} {phrase}.",
    "S05": "{name} was not offered the advertised rate on {a_product} {phrase}.",
    "S06": "A loan officer told {name} that the {product} would need a co-signer {phrase}.",
    "S07": "The lender charged {name} a higher interest rate on the {product} {phrase}.",
    "S08": "{name}'s {product} request was declined {phrase}.",
    "S09": "The bank approved {name} for a smaller {product} than {subj} asked for, {phrase}.",
    "S10": "An underwriter marked {name}'s {product} application for denial {phrase}.",
    "S11": "{Phrase}, {name} could not get {a_product} from the bank.",
    "S12": "After reviewing the file, the lender refused to give {name} {a_product} {phrase}.",
}
TEST_TEMPLATES: dict[str, str] = {
    "H01": "{name} was told by the bank that the {product} application could not be approved {phrase}.",
    "H02": "{Phrase}, {name} was denied {a_product}.",
    "H03": "The lender never approved the {product} that {name} applied for, {phrase}.",
    "H04": "The bank offered {name} worse terms on the {product} {phrase}.",
    "H05": "{name}'s application for {a_product} ended in a rejection letter {phrase}.",
    "H06": "The loan committee voted against giving {name} {a_product} {phrase}.",
}

# Held-out phrases: new wordings per basis, and new connectives ("since", "due to", "on the grounds that").
HELD_OUT_PROTECTED: dict[str, tuple] = {
    "race": ("since {subj} is Latino", "due to the fact that {subj} is African American"),
    "color": ("on the grounds that {poss} complexion is dark", "since {subj} is a person of color"),
    "religion": ("since {subj} is a practicing Sikh", "due to {poss} Buddhist faith"),
    "national_origin": ("since {subj} immigrated from Vietnam", "due to {poss} Haitian heritage"),
    "sex": ("on the grounds that {subj} is a {sex_noun}", "due to {poss} being a {sex_noun}"),
    "marital_status": ("since {subj} is widowed", "due to {poss} separation from {poss} spouse"),
    "age": ("since {subj} is 72", "on the grounds that {subj} is a senior citizen"),
    "public_assistance": ("since {poss} income comes from Social Security", "due to {poss} SNAP benefits"),
    "ccpa_rights": (
        "since {subj} once disputed an error on {poss} credit report",
        "on the grounds that {subj} used {poss} right to dispute a bill",
    ),
    "familial_status": ("since {subj} is a single parent of twins", "due to {subj} expecting a baby"),
    "disability": ("since {subj} has multiple sclerosis", "due to {poss} hearing impairment"),
}
HELD_OUT_LEGITIMATE: tuple[tuple[str, str], ...] = (
    ("credit_score", "since {poss} FICO score is only 520"),
    ("debt_to_income", "due to {poss} monthly debts exceeding half {poss} income"),
    ("income_verification", "since {subj} could not provide pay stubs"),
    ("payment_history", "on the grounds that {subj} has two recent charge-offs"),
    ("employment_history", "since {subj} has been employed for only two months"),
    ("credit_history", "due to {poss} lack of any credit accounts"),
    ("payment_history", "since {subj} has a foreclosure on record"),
    ("debt_to_income", "on the grounds that {poss} existing loans are too large"),
)
TRAIN_LEGITIMATE: tuple[tuple[str, str], ...] = tuple(
    (category, phrase) for category, phrase, products in LEGITIMATE_PHRASES if products is None
)

# ---------------------------------------------------------------------------------------------------------
# Controls: where a screener that keys on surface cues fails
# ---------------------------------------------------------------------------------------------------------

# (kind, basis, product, scenario with {name}/{subj}/{poss}, expected answer, why)
CONTROL_SCENARIOS: tuple[tuple[str, str, str, str, str, str], ...] = (
    # A protected attribute is mentioned, but the decision rests on a legitimate reason.
    (
        "mentioned_legitimate",
        "race",
        "mortgage",
        "{name}, who is Black, was denied a mortgage because {poss} credit score is 510.",
        " No",
        "race is mentioned; the stated reason is the credit score",
    ),
    (
        "mentioned_legitimate",
        "religion",
        "auto loan",
        "{name} is Muslim. The lender turned down {poss} auto loan because {subj} missed six payments last year.",
        " No",
        "religion is mentioned; the stated reason is payment history",
    ),
    (
        "mentioned_legitimate",
        "age",
        "personal loan",
        "{name}, who is 70 years old, was refused a personal loan because {poss} debt-to-income ratio is 65 percent.",
        " No",
        "age is mentioned; the stated reason is the debt load",
    ),
    (
        "mentioned_legitimate",
        "sex",
        "credit card",
        "The bank lowered the credit limit of {name}, a {sex_noun}, because {subj} defaulted on two cards.",
        " No",
        "sex is mentioned; the stated reason is defaults",
    ),
    (
        "mentioned_legitimate",
        "disability",
        "mortgage",
        "{name} uses a wheelchair. The bank denied {poss} mortgage because the appraisal came in far below the price.",
        " No",
        "disability is mentioned; the stated reason is collateral",
    ),
    (
        "mentioned_legitimate",
        "familial_status",
        "home equity loan",
        "{name} has three children. The lender declined {poss} home equity loan because {subj} could not verify "
        "{poss} income.",
        " No",
        "children are mentioned; the stated reason is unverified income",
    ),
    (
        "mentioned_legitimate",
        "national_origin",
        "small business loan",
        "{name} was born in Mexico. The bank declined {poss} business loan because the business has lost money for "
        "three years.",
        " No",
        "national origin is mentioned; the stated reason is the business's losses",
    ),
    (
        "mentioned_legitimate",
        "marital_status",
        "auto loan",
        "{name} is divorced. {subj_cap} was denied an auto loan because {subj} has no income at all.",
        " No",
        "marital status is mentioned; the stated reason is no income",
    ),
    (
        "mentioned_legitimate",
        "public_assistance",
        "personal loan",
        "{name} receives welfare, and the lender denied {poss} personal loan because {subj} declared bankruptcy last "
        "month.",
        " No",
        "public assistance is mentioned; the stated reason is a recent bankruptcy",
    ),
    (
        "mentioned_legitimate",
        "color",
        "credit card",
        "{name} has dark skin. The bank refused {poss} credit card because {subj} already owes $40,000 on other cards.",
        " No",
        "skin color is mentioned; the stated reason is existing debt",
    ),
    # Favourable decision despite a protected attribute: no adverse action, nothing to flag.
    (
        "approved_despite_mention",
        "race",
        "mortgage",
        "The bank approved {name}'s mortgage at its best rate. {subj_cap} is Black.",
        " No",
        "approved on the best terms; race is only mentioned",
    ),
    (
        "approved_despite_mention",
        "religion",
        "personal loan",
        "{name}, who is Jewish, was approved for the personal loan {subj} asked for.",
        " No",
        "approved; religion is only mentioned",
    ),
    (
        "approved_despite_mention",
        "age",
        "auto loan",
        "{name} is 75 and the lender approved {poss} auto loan on the same terms as everyone else.",
        " No",
        "approved on equal terms; age is only mentioned",
    ),
    (
        "approved_despite_mention",
        "disability",
        "mortgage",
        "{name} is blind, and the bank approved {poss} mortgage application in full.",
        " No",
        "approved in full; disability is only mentioned",
    ),
    (
        "approved_despite_mention",
        "sex",
        "small business loan",
        "The bank gave {name}, a {sex_noun}, the full small business loan {subj} requested.",
        " No",
        "approved in full; sex is only mentioned",
    ),
    # A policy that discriminates without naming the basis in the task set's words.
    (
        "unnamed_basis",
        "race",
        "mortgage",
        "The bank refuses all mortgage applications from a neighborhood where most residents are Hispanic, "
        "including {name}'s.",
        " Yes",
        "redlining: refusing a neighborhood because of its residents' ethnicity",
    ),
    (
        "unnamed_basis",
        "national_origin",
        "personal loan",
        "The lender denied {name}'s personal loan because {subj} speaks with a foreign accent.",
        " Yes",
        "an accent stands for national origin",
    ),
    (
        "unnamed_basis",
        "religion",
        "auto loan",
        "The bank turned down {name}'s auto loan after learning that {subj} attends a mosque every Friday.",
        " Yes",
        "attending a mosque stands for religion",
    ),
    (
        "unnamed_basis",
        "age",
        "credit card",
        "The credit union cut the card limit of every customer over 62, {name} included.",
        " Yes",
        "a blanket rule on age",
    ),
    (
        "unnamed_basis",
        "public_assistance",
        "personal loan",
        "The lender refused to count {name}'s Social Security payments as income and denied the loan.",
        " Yes",
        "excluding public-assistance income",
    ),
    (
        "unnamed_basis",
        "familial_status",
        "mortgage",
        "The bank denied {name}'s mortgage because {subj} is on maternity leave with a newborn.",
        " Yes",
        "a newborn child stands for familial status",
    ),
    (
        "unnamed_basis",
        "disability",
        "mortgage",
        "The lender rejected {name}'s mortgage because {subj} has a service dog.",
        " Yes",
        "a service dog stands for disability",
    ),
    (
        "unnamed_basis",
        "marital_status",
        "home equity loan",
        "The bank required {name} to get {poss} husband's signature on a home equity loan only because {subj} is "
        "a wife.",
        " Yes",
        "requiring a spouse's signature because of marriage",
    ),
    (
        "unnamed_basis",
        "sex",
        "auto loan",
        "The dealer's lender quoted {name} a higher rate because women are supposedly worse drivers.",
        " Yes",
        "a stereotype about women stands for sex",
    ),
    (
        "unnamed_basis",
        "ccpa_rights",
        "credit card",
        "The bank closed {name}'s card right after {subj} complained about an error on {poss} statement.",
        " Yes",
        "retaliation for exercising a billing-error right",
    ),
    (
        "unnamed_basis",
        "color",
        "personal loan",
        "The loan officer rejected {name} after seeing the color of {poss} hands in the branch.",
        " Yes",
        "skin color described without the task set's words",
    ),
)

# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def render(template: str, person: Person, product: str, phrase: str) -> str:
    """A scenario sentence; ``{Phrase}`` puts the reason first (capitalised), ``{phrase}`` mid-sentence."""
    return template.format(
        name=person.name,
        poss=person.poss,
        subj=person.subj,
        product=product,
        a_product=_a(product),
        phrase=phrase,
        Phrase=_capitalise(phrase),
    )


def _phrase_as_written(template: str, phrase: str) -> str:
    return _capitalise(phrase) if "{Phrase}" in template else phrase


def _protected_pool(held_out: bool) -> dict[str, list]:
    if held_out:
        return {b: list(p) for b, p in HELD_OUT_PROTECTED.items()}
    return {b: list(p) for b, p in PROTECTED_PHRASES.items()}


def balanced_picks(rng: random.Random, items: Sequence, n: int) -> list:
    """``n`` picks that use every item equally often (up to one), in a shuffled order (``rng`` shuffles the pool
    each time it is used up)."""
    order = list(items)
    picks: list = []
    while len(picks) < n:
        rng.shuffle(order)
        picks += order
    return picks[:n]


def pair_row(
    pair_id: str,
    basis: str,
    template_id: str,
    template: str,
    person: Person,
    product: str,
    question: str,
    phrases: tuple[str, str],
    category: str,
) -> dict[str, str]:
    """One pair in the task set's schema: ``phrases`` (the clean prompt's, resting on the basis or a stand-in for it;
    the corrupted prompt's legitimate reason) each written into ``template``, the question appended."""
    protected_phrase, legit_phrase = phrases
    return {
        "pair_id": pair_id,
        "basis": basis,
        "statute": STATUTE_OF_BASIS[basis],
        "template_id": template_id,
        "product": product,
        "clean_prompt": render(template, person, product, protected_phrase) + QUESTIONS[question],
        "corrupted_prompt": render(template, person, product, legit_phrase) + QUESTIONS[question],
        "clean_answer": FAIR_LENDING_ANSWERS[0],
        "corrupted_answer": FAIR_LENDING_ANSWERS[1],
        "protected_phrase": _phrase_as_written(template, protected_phrase),
        "legitimate_phrase": _phrase_as_written(template, legit_phrase),
        "reason_category": category,
    }


def build_pair_rows(split: str, per_basis: int) -> list[dict[str, str]]:
    """``per_basis`` pairs for every basis; each factor (template, person, product, question, both phrases) is
    drawn without replacement from its pool, refilled when empty, by a generator with a fixed seed per split."""
    templates = TEST_TEMPLATES if split == "test_templates" else TRAIN_TEMPLATES
    questions = TEST_QUESTIONS if split == "test_questions" else TRAIN_QUESTIONS
    people = TRAIN_PEOPLE if split == "train" else TEST_PEOPLE
    protected = _protected_pool(split == "test_phrases")
    legitimate = HELD_OUT_LEGITIMATE if split == "test_phrases" else TRAIN_LEGITIMATE
    prefix = {"train": "tr", "test_templates": "tt", "test_phrases": "tp", "test_questions": "tq"}[split]
    rng = random.Random(SPLIT_SEEDS[split])

    def cycle(items: Sequence) -> list:
        return balanced_picks(rng, items, per_basis)

    rows = []
    for basis, phrases in protected.items():
        statute = STATUTE_OF_BASIS[basis]
        products = HOUSING if statute == "FHA" else PRODUCTS
        factors = zip(
            cycle(templates), cycle(people), cycle(products), cycle(questions), cycle(phrases), cycle(legitimate)
        )
        for template_id, person, product, question, phrase, (category, legit) in factors:
            phrases = (person.fill(phrase), person.fill(legit))
            pair_id = f"{prefix}-{len(rows) + 1:04d}"
            rows.append(
                pair_row(
                    pair_id, basis, template_id, templates[template_id], person, product, question, phrases, category
                )
            )
    return rows


def build_control_rows() -> list[dict[str, str]]:
    """Every control scenario with two test names (one per sex) and two held-out questions."""
    rows = []
    for s, (kind, basis, product, scenario, answer, why) in enumerate(CONTROL_SCENARIOS):
        for j in range(2):
            person = TEST_PEOPLE[(2 * s + j) % len(TEST_PEOPLE)]
            if kind == "unnamed_basis" and basis == "marital_status" and not person.female:
                person = TEST_PEOPLE[(2 * s + j + 1) % len(TEST_PEOPLE)]  # the scenario says "wife"
            if "women" in scenario and not person.female:
                person = TEST_PEOPLE[(2 * s + j + 1) % len(TEST_PEOPLE)]
            text = scenario.format(
                name=person.name,
                subj=person.subj,
                poss=person.poss,
                subj_cap=_capitalise(person.subj),
                sex_noun="woman" if person.female else "man",
            )
            question = TEST_QUESTIONS[(s + j) % len(TEST_QUESTIONS)]
            rows.append(
                {
                    "control_id": f"ctl-{len(rows) + 1:03d}",
                    "kind": kind,
                    "basis": basis,
                    "product": product,
                    "prompt": text + QUESTIONS[question],
                    "answer": answer,
                    "why": why,
                }
            )
    return rows


SPLIT_SEEDS = {"train": 11, "test_templates": 12, "test_phrases": 13, "test_questions": 14}
SPLIT_SIZES = {"train": 40, "test_templates": 12, "test_phrases": 12, "test_questions": 12}
"""Pairs per basis in each split: 440 training pairs (880 prompts), 132 pairs per test split."""


def build_files() -> dict[Path, str]:
    files = {
        SCREENER_DIR / f"{split}.csv": to_csv(build_pair_rows(split, n), FAIR_LENDING_COLUMNS)
        for split, n in SPLIT_SIZES.items()
    }
    files[SCREENER_DIR / "controls.csv"] = to_csv(build_control_rows(), CONTROL_COLUMNS)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    return main_many(__doc__.splitlines()[0], build_files, "data/build_screener_set.py", argv)


if __name__ == "__main__":
    raise SystemExit(main())
