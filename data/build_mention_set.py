"""Build the screener's *mention* task set: decisions that mention a protected attribute, resting on it or not.

    python data/build_mention_set.py            # (re)write data/screener/mention_*.csv and favourable_*.csv
    python data/build_mention_set.py --check    # exit 1 if regenerating would change a committed file

The first screener learned a shortcut: it answers " Yes" whenever a protected attribute is *mentioned* (its
controls: 0.35 on "attribute mentioned, decision rests on a legitimate reason", 0.00 on "approved, attribute
mentioned"). In its training set every " Yes" prompt named an attribute and no " No" prompt did, so "an attribute
is named" and "the decision rests on it" were the same feature. This set separates them. Two kinds of pairs, both in
the task set's schema plus two columns, ``attribute_mention`` (the words that name the attribute, in both prompts)
and ``neutral_mention`` (words of the same form that name nothing protected, for the analysis that swaps them):

* **mention pairs**: both prompts say, in the same words, that the applicant has the attribute ("Maria is Hindu");
  only the reason differs: the clean prompt's decision rests on the attribute ("because of her religion", answer
  " Yes"), the corrupted prompt's on a legitimate reason ("because her credit score is 540", answer " No");
* **favourable pairs**: both prompts mention the attribute; the clean prompt's decision is adverse and rests on it
  ("approved her mortgage but only at a higher rate because of her age", " Yes"), the corrupted prompt's decision is
  favourable or treats her like everyone else ("approved her mortgage at the standard rate for her credit tier",
  " No"). Some adverse decisions sound favourable and some favourable ones are negated, so that neither "approved"
  nor "denied" can stand for the answer.

The clause that says what the decision rests on refers to the *same* attribute the prompt mentions: it restates it
("because she is Hindu") or names its category ("because of her religion"), never another value.

| file | sentence structures | attribute words, reasons, connectives | names | pairs |
|---|---|---|---|---|
| ``mention_train.csv`` | M01-M08 | train | train | 20 per basis |
| ``favourable_train.csv`` | F01-F04 | train | train | 10 per basis |
| ``mention_test_templates.csv`` | **MH01-MH04** (unseen) | train | **test** | 8 per basis |
| ``mention_test_phrases.csv`` | M01-M08 | **held out** | **test** | 8 per basis |
| ``favourable_test.csv`` | **FH01-FH03** (unseen) | **held out** | **test** | 8 per basis |

The unseen structures include the two shapes of the hand-written controls (``controls.csv``): "Priya, who is Black,
was denied ..." and "Omar is Muslim. The lender ...", so the controls stay unseen and those shapes are measured at
scale. Names, products and questions come from ``build_screener_set.py`` (test names never in training, questions
Q1-Q6, never the paper-style set's Q7). Every basis in every file; FHA bases only with housing products; token
lengths not matched. Deterministic (fixed seeds); ``tests/test_screener_data.py`` checks a rebuild byte for byte.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR))  # for the sibling builders, when imported from elsewhere

from build_screener_set import (  # noqa: E402
    HELD_OUT_LEGITIMATE,
    HOUSING,
    PRODUCTS,
    QUESTIONS,
    SCREENER_DIR,
    TEST_PEOPLE,
    TRAIN_LEGITIMATE,
    TRAIN_PEOPLE,
    TRAIN_QUESTIONS,
    Person,
    balanced_picks,
    pair_row,
)
from build_screener_set import TEST_TEMPLATES as SCREENER_TEST_TEMPLATES  # noqa: E402
from build_screener_set import TRAIN_TEMPLATES as SCREENER_TRAIN_TEMPLATES  # noqa: E402
from csv_build import main_many, render_csv  # noqa: E402

from mechfin_utils.tasks.fair_lending import (  # noqa: E402
    FAIR_LENDING_ANSWERS,
    FAIR_LENDING_COLUMNS,
    FAVOURABLE_DECISION,
    MENTION_COLUMNS,
    STATUTE_OF_BASIS,
)

# ---------------------------------------------------------------------------------------------------------
# The attribute, per basis: how it is mentioned, and its category word
# ---------------------------------------------------------------------------------------------------------


Words = str | tuple[str, str]
"""A verb phrase after a name or pronoun ("is Hindu"), or a pair of them: (for a woman, for a man)."""


@dataclass(frozen=True)
class Attribute:
    """How a basis is mentioned and named as a category ("religion": "because of her religion"). Each mention comes
    with a *neutral* phrase of the same grammatical form that names nothing protected ("is Hindu" / "is an
    accountant"): swapping one for the other is the contrast that measures the shortcut (notebook 12)."""

    mentions: tuple[tuple[Words, Words], ...]  # (attribute mention, neutral counterpart)
    category: str


TRAIN_ATTRIBUTES: dict[str, Attribute] = {
    "race": Attribute(
        (
            ("is Black", "is a nurse"),
            ("is Asian American", "is a bus driver"),
            ("is Native American", "is a carpenter"),
            ("is white", "is a pharmacist"),
        ),
        "race",
    ),
    "color": Attribute(
        (("has dark skin", "has a new car"), ("has very pale skin", "has a large garden")), "skin color"
    ),
    "religion": Attribute(
        (
            ("is Muslim", "is a chef"),
            ("is Jewish", "is a dentist"),
            ("is Hindu", "is an accountant"),
            ("is Catholic", "is a mechanic"),
        ),
        "religion",
    ),
    "national_origin": Attribute(
        (
            ("was born in Mexico", "was born in March"),
            ("is of Chinese descent", "is of average height"),
            ("has Arab ancestry", "has a home office"),
            ("was born in Nigeria", "was born in October"),
        ),
        "national origin",
    ),
    "sex": Attribute((("is a {sex_noun}", "is a customer"),), "sex"),
    "marital_status": Attribute(
        (
            ("is single", "is tall"),
            ("is divorced", "is busy"),
            ("is married", "is punctual"),
            ("is unmarried", "is well organized"),
        ),
        "marital status",
    ),
    "age": Attribute(
        (
            ("is 68 years old", "is 6 feet tall"),
            ("is 80", "is a runner"),
            ("is 19", "is a gardener"),
            ("is elderly", "is friendly"),
        ),
        "age",
    ),
    "public_assistance": Attribute(
        (
            ("receives food stamps", "receives a newsletter"),
            ("lives on welfare", "lives on Elm Street"),
            ("receives public assistance", "receives paper statements"),
        ),
        "public assistance income",
    ),
    "ccpa_rights": Attribute(
        (
            ("disputed a charge on {poss} credit card last year", "paid a charge on {poss} credit card last year"),
            ("filed a complaint about {poss} credit report", "filed a request about {poss} mailing address"),
        ),
        "credit dispute",
    ),
    "familial_status": Attribute(
        (
            ("has two young children", "has two old bicycles"),
            (("is pregnant", "has a pregnant wife"), ("is cheerful", "has a cheerful wife")),
            ("has a newborn", "has a new phone"),
        ),
        "family status",
    ),
    "disability": Attribute(
        (("uses a wheelchair", "uses a laptop"), ("is blind", "is left-handed"), ("is deaf", "is calm")), "disability"
    ),
}
HELD_OUT_ATTRIBUTES: dict[str, Attribute] = {
    "race": Attribute((("is Latino", "is a plumber"), ("is Pacific Islander", "is an electrician")), "ethnicity"),
    "color": Attribute((("has a dark complexion", "has a savings account"),), "complexion"),
    "religion": Attribute((("is Sikh", "is a librarian"), ("is Buddhist", "is a welder")), "faith"),
    "national_origin": Attribute(
        (("immigrated from Vietnam", "moved from Ohio"), ("has Haitian heritage", "has a cooking blog")), "ancestry"
    ),
    "sex": Attribute((("is {sex_adj}", "is a client"),), "gender"),
    "marital_status": Attribute(
        (("is widowed", "is soft-spoken"), ("is separated from {poss} spouse", "is far from {poss} office")),
        "marriage status",
    ),
    "age": Attribute((("is 72", "is a cyclist"), ("is a senior citizen", "is a regular customer")), "advanced age"),
    "public_assistance": Attribute(
        (("gets SNAP benefits", "gets weekly emails"), ("lives on Social Security", "lives on Main Street")),
        "government benefits",
    ),
    "ccpa_rights": Attribute(
        (("exercised {poss} right to dispute a bill", "exercised {poss} option to pay a bill early"),),
        "billing dispute",
    ),
    "familial_status": Attribute(
        (
            ("is a single parent of twins", "is a fan of jazz"),
            (
                ("is expecting a baby", "is about to become a father"),
                ("is expecting a package", "is about to become a manager"),
            ),
        ),
        "children",
    ),
    "disability": Attribute(
        (("has multiple sclerosis", "has a vegetable garden"), ("has a hearing impairment", "has a library card")),
        "medical condition",
    ),
}

# What the decision rests on, when it rests on the attribute. {pred}: the attribute as mentioned; {category}.
TRAIN_RESTS_ON = ("{clause} {subj} {pred}", "{noun} {poss} {category}", "solely because of {poss} {category}")
HELD_OUT_RESTS_ON = ("since {subj} {pred}", "due to {poss} {category}", "on the grounds of {poss} {category}")
# Connectives, so that no word before a reason stands for the answer: training reasons, lawful or not, are introduced
# by any of these (the task set's own lawful reasons, written with "because", are re-introduced at random); the
# held-out ones ("since", "due to", "on the grounds of") are never trained on.
TRAIN_CLAUSE_CONNECTIVES = ("because", "as", "given that", "for the reason that")
TRAIN_NOUN_CONNECTIVES = ("because of", "on account of", "owing to", "in view of")


def _reconnect(phrase: str, clause: str, noun: str) -> str:
    """A "because ..." reason introduced by another connective (``clause`` before a clause, ``noun`` before a noun
    phrase); anything else unchanged."""
    if phrase.startswith("because of "):
        return f"{noun} {phrase[len('because of ') :]}"
    if phrase.startswith("because "):
        return f"{clause} {phrase[len('because ') :]}"
    return phrase


# ---------------------------------------------------------------------------------------------------------
# Sentence structures
# ---------------------------------------------------------------------------------------------------------

# Mention pairs: {mention} = "{name} {pred}"-style text is built in; {phrase} is the reason clause ({Phrase}: first).
TRAIN_MENTION_STRUCTURES: dict[str, str] = {
    "M01": "{name}'s file notes that {subj} {pred}; the lender declined {poss} {product} {phrase}.",
    "M02": "{name} {pred} and applied for {a_product}. The bank turned the application down {phrase}.",
    "M03": "The bank declined {name}'s {product} {phrase}. The file also shows that {subj} {pred}.",
    "M04": "{Phrase}, the lender refused {name} {a_product}; {subj} had mentioned that {subj} {pred}.",
    "M05": "In the interview {name} said that {subj} {pred}. The credit union later rejected {poss} {product} {phrase}.",
    "M06": "The lender knew that {name} {pred} and charged {name} a higher rate on the {product} {phrase}.",
    "M07": "{name} {pred}, and the bank did not approve {poss} {product} {phrase}.",
    "M08": "An underwriter noted that {name} {pred} and marked the {product} application for denial {phrase}.",
}
HELD_OUT_MENTION_STRUCTURES: dict[str, str] = {
    "MH01": "{name}, who {pred}, was denied {a_product} {phrase}.",
    "MH02": "{name} {pred}. The lender turned down {poss} {product} {phrase}.",
    "MH03": "{Phrase}, {name} was refused {a_product}. {Subj} {pred}.",
    "MH04": "The loan committee, told that {name} {pred}, voted against {poss} {product} {phrase}.",
}

# Favourable pairs: {decision} is what the lender did (the phrase that differs); the attribute is mentioned apart.
TRAIN_FAVOURABLE_STRUCTURES: dict[str, str] = {
    "F01": "According to the file, {name} {pred}. After the review the lender {decision}.",
    "F02": "{name} {pred} and applied for {a_product}; the credit union {decision}.",
    "F03": "The underwriter saw that {name} {pred}, and the bank {decision}.",
    "F04": "{name} told the loan officer that {subj} {pred}. The lender then {decision}.",
}
HELD_OUT_FAVOURABLE_STRUCTURES: dict[str, str] = {
    "FH01": "{name}, who {pred}, applied for {a_product}, and the bank {decision}.",
    "FH02": "{name} applied for {a_product}. The lender {decision}; {subj} {pred}.",
    "FH03": "{name} {pred}, and the credit union {decision}.",
}

# Adverse decisions that rest on the attribute (" Yes"): some sound favourable ("approved ... but only ...").
TRAIN_ADVERSE_DECISIONS = (
    "denied {poss} {product} {rests_on}",
    "approved {poss} {product} but only at a higher rate {rests_on}",
    "approved {poss} {product} only after demanding a co-signer {rests_on}",
    "cut the amount of {poss} {product} in half {rests_on}",
)
HELD_OUT_ADVERSE_DECISIONS = (
    "offered {poss} {product} only on worse terms {rests_on}",
    "refused {poss} {product} {rests_on}",
)
# Favourable or equal-treatment decisions (" No"): some are negated ("did not ask for ...").
TRAIN_FAVOURABLE_DECISIONS = (
    "approved {poss} {product} and funded it the next week",
    "approved {poss} {product} at the standard rate for {poss} credit tier",
    "granted {poss} {product} on the same terms as every other applicant",
    "approved the full amount {subj} asked for on the {product}",
    "approved {poss} {product} without asking for a co-signer",
    "did not ask for any extra documents and approved the {product}",
    "renewed {poss} {product} with no change to its terms",
    "gave {poss} {product} the rate {subj} qualified for",
    "approved {poss} {product} on the usual schedule",
    "did not add any fees and granted the {product}",
)
HELD_OUT_FAVOURABLE_DECISIONS = (
    "signed off on {poss} {product} the same day",
    "cleared {poss} {product} for funding at the posted rate",
    "extended {poss} {product} at its lowest advertised rate",
    "closed {poss} {product} on schedule with no extra conditions",
)

# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One file: which structures, vocabulary and names it draws from, and how many pairs per basis."""

    name: str
    kind: str  # "mention" or "favourable"
    prefix: str
    held_out_structures: bool
    held_out_vocabulary: bool
    test_names: bool
    per_basis: int
    seed: int


SPLITS: tuple[Split, ...] = (
    Split("mention_train", "mention", "mtr", False, False, False, 16, 21),
    Split("favourable_train", "favourable", "ftr", False, False, False, 12, 22),
    Split("mention_test_templates", "mention", "mtt", True, False, True, 8, 23),
    Split("mention_test_phrases", "mention", "mtp", False, True, True, 8, 24),
    Split("favourable_test", "favourable", "fte", True, True, True, 8, 25),
)
MENTION_TRAIN_SPLITS = ("mention_train", "favourable_train")
MENTION_TEST_SPLITS = ("mention_test_templates", "mention_test_phrases", "favourable_test")


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fill(text: str, person: Person, **extra: str) -> str:
    """Pronouns and sexed nouns for ``person``, then ``extra`` fields (a field may hold pronoun fields itself)."""
    values = {
        "name": person.name,
        "subj": person.subj,
        "Subj": _capitalise(person.subj),
        "poss": person.poss,
        "obj": "her" if person.female else "him",
        "sex_noun": "woman" if person.female else "man",
        "sex_adj": "female" if person.female else "male",
    }
    return text.format(**values, **{k: v.format(**values) for k, v in extra.items()})


def _for(person: Person, words: Words) -> str:
    return words[0 if person.female else 1] if isinstance(words, tuple) else words


def _mention_pair(
    structure: str, person: Person, product: str, predicate: str, rests_on: str, legitimate: str
) -> tuple[str, str, str, str, str]:
    """(clean scenario, corrupted scenario, clean phrase, legitimate phrase, mention) as written in the prompt."""
    first = "{Phrase}" in structure
    clean_phrase = rests_on if not first else _capitalise(rests_on)
    legit_phrase = legitimate if not first else _capitalise(legitimate)
    fields = {"pred": predicate, "product": product, "a_product": _a(product)}
    clean = _fill(structure.replace("{Phrase}", "{phrase}"), person, **fields, phrase=clean_phrase)
    corrupted = _fill(structure.replace("{Phrase}", "{phrase}"), person, **fields, phrase=legit_phrase)
    return clean, corrupted, clean_phrase, legit_phrase, predicate


def build_rows(split: Split) -> list[dict[str, str]]:
    """``split.per_basis`` pairs for every basis, each factor drawn evenly from its pool with the split's seed."""
    rng = random.Random(split.seed)
    n = split.per_basis
    attributes = HELD_OUT_ATTRIBUTES if split.held_out_vocabulary else TRAIN_ATTRIBUTES
    rests_on_forms = HELD_OUT_RESTS_ON if split.held_out_vocabulary else TRAIN_RESTS_ON
    people = TEST_PEOPLE if split.test_names else TRAIN_PEOPLE
    if split.kind == "mention":
        structures = HELD_OUT_MENTION_STRUCTURES if split.held_out_structures else TRAIN_MENTION_STRUCTURES
        legitimate = HELD_OUT_LEGITIMATE if split.held_out_vocabulary else TRAIN_LEGITIMATE
    else:
        structures = HELD_OUT_FAVOURABLE_STRUCTURES if split.held_out_structures else TRAIN_FAVOURABLE_STRUCTURES
        adverse = HELD_OUT_ADVERSE_DECISIONS if split.held_out_vocabulary else TRAIN_ADVERSE_DECISIONS
        favourable = HELD_OUT_FAVOURABLE_DECISIONS if split.held_out_vocabulary else TRAIN_FAVOURABLE_DECISIONS
    connectives = (
        [("since", "due to")]
        if split.held_out_vocabulary
        else list(zip(TRAIN_CLAUSE_CONNECTIVES, TRAIN_NOUN_CONNECTIVES))
    )  # held-out forms carry their own connectives
    rows = []
    for basis, attribute in attributes.items():
        statute = STATUTE_OF_BASIS[basis]
        products = HOUSING if statute == "FHA" else PRODUCTS
        draws = zip(
            balanced_picks(rng, list(structures), n),
            balanced_picks(rng, people, n),
            balanced_picks(rng, products, n),
            balanced_picks(rng, TRAIN_QUESTIONS, n),
            balanced_picks(rng, attribute.mentions, n),
            balanced_picks(rng, rests_on_forms, n),
            balanced_picks(rng, legitimate if split.kind == "mention" else favourable, n),
            balanced_picks(rng, adverse if split.kind == "favourable" else (None,), n),
            balanced_picks(rng, connectives, n),
            balanced_picks(rng, connectives, n),
        )
        for (
            structure_id,
            person,
            product,
            question,
            (predicate, neutral),
            rests_on,
            other,
            adverse_form,
            (clause, noun),
            (legit_clause, legit_noun),
        ) in draws:
            predicate_text = _fill(_for(person, predicate), person)
            rests_on_text = _fill(
                rests_on, person, pred=predicate_text, category=attribute.category, clause=clause, noun=noun
            )
            if split.kind == "mention":
                category, legit = other
                legit_text = _fill(legit, person)
                if not split.held_out_vocabulary:
                    legit_text = _reconnect(legit_text, legit_clause, legit_noun)
                clean, corrupted, clean_phrase, legit_phrase, mention = _mention_pair(
                    structures[structure_id], person, product, predicate_text, rests_on_text, legit_text
                )
            else:
                category = FAVOURABLE_DECISION
                fields = {"product": product, "a_product": _a(product), "pred": predicate_text}
                clean_phrase = _fill(adverse_form, person, product=product, rests_on=rests_on_text)
                legit_phrase = _fill(other, person, product=product)
                clean = _fill(structures[structure_id], person, **fields, decision=clean_phrase)
                corrupted = _fill(structures[structure_id], person, **fields, decision=legit_phrase)
                mention = predicate_text
            rows.append(
                {
                    "pair_id": f"{split.prefix}-{len(rows) + 1:04d}",
                    "basis": basis,
                    "statute": statute,
                    "template_id": structure_id,
                    "product": product,
                    "clean_prompt": clean + QUESTIONS[question],
                    "corrupted_prompt": corrupted + QUESTIONS[question],
                    "clean_answer": FAIR_LENDING_ANSWERS[0],
                    "corrupted_answer": FAIR_LENDING_ANSWERS[1],
                    "protected_phrase": clean_phrase,
                    "legitimate_phrase": legit_phrase,
                    "reason_category": category,
                    "attribute_mention": mention,
                    "neutral_mention": _fill(_for(person, neutral), person),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------------
# Proxies: a decision that rests on a protected basis without naming it
# ---------------------------------------------------------------------------------------------------------

# Per basis, reasons that stand for the basis without the task set's words for it (a practice, a language, a policy
# on age, an income source, a right exercised, ...). Gendered pairs: (for a woman, for a man). The hand-written
# controls' own proxies (a Hispanic neighbourhood, an accent, a mosque, "over 62", Social Security income, a service
# dog, a husband's signature, women as drivers, a billing-error complaint, the colour of hands) are not used here.
TRAIN_PROXIES: dict[str, tuple] = {
    "race": (
        "because {subj} went to a historically Black college",
        "because of the racial makeup of {poss} neighborhood",
        "after the officer said {poss} family name sounded African American",
        "because {poss} church is in a Black part of town",
    ),
    "color": (
        "because the officer thought {subj} looked too dark in {poss} photo",
        "after the manager called {obj} too dark to be a good customer",
    ),
    "religion": (
        "because {subj} wears a headscarf",
        "after {subj} asked to meet after Ramadan",
        "because {subj} keeps kosher",
        "because {subj} goes to temple every week",
    ),
    "national_origin": (
        "because {poss} first language is Spanish",
        "because {poss} surname sounds Mexican",
        "because {subj} grew up in Nigeria",
        "after {subj} said English is {poss} second language",
    ),
    "sex": (
        ("because the officer thinks women cannot manage money", "because the officer thinks men spend too freely"),
        ("because the bank prefers to lend to men", "because the bank prefers to lend to women"),
    ),
    "marital_status": (
        ("because {subj} has no husband to co-sign", "because {subj} has no wife to co-sign"),
        "because the bank lends only to couples",
        "because {subj} lives without a spouse",
    ),
    "age": (
        "because {subj} will be 90 before the loan is paid off",
        "because the bank does not lend to anyone over 75",
        "because {subj} is close to retirement",
        "because {subj} only just turned 21",
    ),
    "public_assistance": (
        "because part of {poss} income is a housing voucher",
        "because the lender would not count {poss} disability benefits",
        "because {subj} pays part of the rent with state aid",
        "because {poss} income comes from a government program",
    ),
    "ccpa_rights": (
        "because {subj} had reported the bank to a consumer protection agency",
        "after {subj} asked for a copy of {poss} credit file",
        "because {subj} challenged a late fee last month",
        "because {subj} once sued a lender under the credit laws",
    ),
    "familial_status": (
        "because {subj} has custody of three children",
        "because {subj} plans to start a family soon",
        "because {subj} is a single parent",
        "because {subj} is on parental leave",
    ),
    "disability": (
        "because {subj} takes medication for depression",
        "because {subj} needs a ramp to enter the home",
        "because {subj} uses a guide dog",
        "because {subj} is treated for epilepsy",
    ),
}
HELD_OUT_PROXIES: dict[str, tuple] = {
    "race": (
        "since {poss} old address was in a mostly Latino part of town",
        "due to {poss} membership in a Black professional association",
    ),
    "color": (
        "since the officer disliked how dark {poss} face looked on the video call",
        "due to the dark tone of {poss} face in the branch",
    ),
    "religion": ("since {subj} wears a turban", "due to {poss} observance of the Sabbath"),
    "national_origin": ("since {poss} passport is Vietnamese", "due to {poss} Haitian last name"),
    "sex": (
        (
            "since the officer believes female borrowers default more",
            "since the officer believes male borrowers default more",
        ),
        ("due to the lender's preference for male applicants", "due to the lender's preference for female applicants"),
    ),
    "marital_status": ("since the bank favors married applicants", "due to there being no spouse on the application"),
    "age": ("since the lender caps borrowers at age 70", "due to {poss} birth year of 1948"),
    "public_assistance": ("since {poss} income includes TANF payments", "due to the WIC benefits {poss} family gets"),
    "ccpa_rights": (
        "since {subj} had filed a complaint with the CFPB",
        "due to {poss} request to fix a billing mistake",
    ),
    "familial_status": ("since {subj} is adopting a child", "due to {poss} toddler living in the home"),
    "disability": ("since {subj} uses a hearing aid", "due to {poss} history of mental illness"),
}
PROXY_SPLITS = {"proxy_train": ("ptr", 10, 26, False), "proxy_test": ("pte", 8, 27, True)}
"""name: (id prefix, pairs per basis, seed, held out): held out means unseen proxies, connectives, legitimate reasons,
sentence structures and names."""


def build_proxy_rows(split: str) -> list[dict[str, str]]:
    """Pairs in the task set's schema whose clean decision rests on a proxy for the basis (" Yes") and whose corrupted
    decision rests on a legitimate reason (" No"), in the screener set's sentence structures."""
    prefix, per_basis, seed, held_out = PROXY_SPLITS[split]
    rng = random.Random(seed)
    templates = SCREENER_TEST_TEMPLATES if held_out else SCREENER_TRAIN_TEMPLATES
    people = TEST_PEOPLE if held_out else TRAIN_PEOPLE
    legitimate = HELD_OUT_LEGITIMATE if held_out else TRAIN_LEGITIMATE
    proxies = HELD_OUT_PROXIES if held_out else TRAIN_PROXIES
    rows = []
    for basis, phrases in proxies.items():
        statute = STATUTE_OF_BASIS[basis]
        products = HOUSING if statute == "FHA" else PRODUCTS
        draws = zip(
            balanced_picks(rng, list(templates), per_basis),
            balanced_picks(rng, people, per_basis),
            balanced_picks(rng, products, per_basis),
            balanced_picks(rng, TRAIN_QUESTIONS, per_basis),
            balanced_picks(rng, phrases, per_basis),
            balanced_picks(rng, legitimate, per_basis),
        )
        for template_id, person, product, question, proxy, (category, legit) in draws:
            phrases = (_fill(_for(person, proxy), person), _fill(legit, person))
            pair_id = f"{prefix}-{len(rows) + 1:04d}"
            rows.append(
                pair_row(
                    pair_id, basis, template_id, templates[template_id], person, product, question, phrases, category
                )
            )
    return rows


def build_files() -> dict[Path, str]:
    files = {SCREENER_DIR / f"{split.name}.csv": render_csv(build_rows(split), MENTION_COLUMNS) for split in SPLITS}
    for split in PROXY_SPLITS:
        files[SCREENER_DIR / f"{split}.csv"] = render_csv(build_proxy_rows(split), FAIR_LENDING_COLUMNS)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    return main_many(__doc__.splitlines()[0], build_files, "data/build_mention_set.py", argv)


if __name__ == "__main__":
    raise SystemExit(main())
