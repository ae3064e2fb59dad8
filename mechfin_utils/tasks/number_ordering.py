"""Number ordering: the fine-tuning text of notebook 14, kept apart from the greater-than prompts it is evaluated on.

Prakash et al. (2024) fine-tuned LLaMA-7B on arithmetic and found entity tracking improved through the circuit the base
model already had. Notebook 14 asks the same of SmolLM2-135M on greater-than (Hanna et al.: "The war lasted from the
year 1732 to the year 17" -> a year after 32), a task whose circuit the base model has (notebook 10). The fine-tuning
task is *related but not the evaluation*: text in which a number must be followed by a larger one, in two families,

* ``later date`` -- an event and a later one in the same century, in other centuries than the evaluation's
  ("The canal was opened in 1843 and closed in 18" -> "71"): the ordering of years, in other sentences;
* ``rising count`` -- a two-digit quantity followed by a larger one, no year at all ("The queue grew from 34 people
  to" -> " 58"): the ordering of numbers.

Each :class:`OrderingExample` is a prefix and the continuation the loss is taken on (a uniformly drawn number larger
than the first). What is kept out, and checked by :func:`evaluation_leaks` on every corpus built: the evaluation's
template (none of its word 3-grams, e.g. "lasted from the", "to the year"), its twenty nouns (as words, in any case)
and its years (its century, 17, never appears as a four-digit year ``17dd``), and every evaluation prompt verbatim.
:func:`build_corpus` refuses a corpus that leaks. The corpus is generated from a seed, so its sha256
(:func:`corpus_sha256`) identifies it in a fine-tuned model's card.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mechfin_utils.tasks.circuit_tasks import GreaterThanPrompt, load_greater_than

FAMILIES = ("later date", "rising count")

CENTURIES = ("12", "13", "14", "15", "16", "18", "19")
"""Centuries of the later-date family: every one but the evaluation's (17)."""

DATE_TEMPLATES = (
    "The {thing} was opened in {century}{first:02d} and closed in {century}",
    "Work on the {thing} began in {century}{first:02d} and was finished in {century}",
    "The old {thing} was built in {century}{first:02d}; a new one followed in {century}",
    "Records of the {thing} start in {century}{first:02d}, and a second entry is dated {century}",
    "The {thing} was first described in {century}{first:02d} and rebuilt in {century}",
)
"""Each ends with the century, so the continuation is the later year's last two digits (as in the evaluation, whose
years SmolLM2 writes digit by digit), but in sentences that share no 3-gram with the evaluation's."""

THINGS = (
    "bridge", "canal", "harbour", "cathedral", "mill", "library", "market", "lighthouse", "theatre", "hospital",
    "observatory", "college", "railway", "museum", "granary", "fortress", "chapel", "aqueduct", "brewery", "printing house",
)  # fmt: skip

COUNT_TEMPLATES = (
    "The queue grew from {first} people to",
    "After {first} laps the runner kept going until lap",
    "The price climbed from {first} dollars to",
    "Page {first} of the ledger is followed later by page",
    "The tide gauge read {first} centimetres in the morning and, by noon,",
    "From {first} members the club grew to",
)
"""Two-digit counts (10-98), continued by a space and a larger two-digit count."""


class OrderingDataError(ValueError):
    """A corpus that would leak the evaluation into fine-tuning; the message names the example and what leaked."""


@dataclass(frozen=True)
class OrderingExample:
    """One fine-tuning text: ``prefix + continuation``, the loss taken on the continuation's tokens only."""

    family: str
    template: int
    prefix: str
    continuation: str
    first: int
    later: int

    @property
    def text(self) -> str:
        return self.prefix + self.continuation


def _later_date(rng: random.Random) -> OrderingExample:
    template = rng.randrange(len(DATE_TEMPLATES))
    century, first = rng.choice(CENTURIES), rng.randint(1, 97)
    later = rng.randint(first + 1, 99)
    prefix = DATE_TEMPLATES[template].format(thing=rng.choice(THINGS), century=century, first=first)
    return OrderingExample("later date", template, prefix, f"{later:02d}", first, later)


def _rising_count(rng: random.Random) -> OrderingExample:
    template = rng.randrange(len(COUNT_TEMPLATES))
    first = rng.randint(10, 98)
    later = rng.randint(first + 1, 99)
    return OrderingExample(
        "rising count", template, COUNT_TEMPLATES[template].format(first=first), f" {later}", first, later
    )


def build_corpus(
    n_examples: int, *, seed: int = 0, evaluation: Sequence[GreaterThanPrompt] | None = None
) -> list[OrderingExample]:
    """``n_examples`` texts, the two families alternating, drawn from ``seed``; checked against ``evaluation`` (default:
    every prompt of ``data/greater_than.csv``) and refused with :class:`OrderingDataError` if anything leaks."""
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples must be a positive integer, got {n_examples!r}")
    rng = random.Random(seed)
    corpus = [(_later_date if i % 2 == 0 else _rising_count)(rng) for i in range(n_examples)]
    problems = evaluation_leaks(corpus, load_greater_than() if evaluation is None else evaluation)
    if problems:
        raise OrderingDataError(f"{len(problems)} fine-tuning texts leak the evaluation; first: {problems[:3]}")
    return corpus


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def evaluation_leaks(corpus: Sequence[OrderingExample], evaluation: Sequence[GreaterThanPrompt]) -> list[str]:
    """Every way a fine-tuning text touches the evaluation prompts, one line each (empty: none):
    an evaluation prompt (clean or corrupted) inside a text, a word 3-gram of an evaluation template, an evaluation
    noun as a word, or a four-digit year of an evaluation century."""
    prompts = {p.clean_prompt for p in evaluation} | {p.corrupted_prompt for p in evaluation}
    template_grams = set().union(*(_trigrams(p.clean_prompt) for p in evaluation)) if evaluation else set()
    nouns = {word for p in evaluation for word in _words(p.noun)}
    year = re.compile(r"\b(?:" + "|".join(sorted({re.escape(p.century) for p in evaluation})) + r")\d\d\b")
    problems = []
    for index, example in enumerate(corpus):
        text = example.text
        where = f"example {index} ({example.family}, template {example.template}): {text!r}"
        if any(prompt in text for prompt in prompts):
            problems.append(f"{where} contains an evaluation prompt")
        shared = sorted(" ".join(gram) for gram in _trigrams(text) & template_grams)
        if shared:
            problems.append(f"{where} shares the evaluation template's words {shared[:2]}")
        named = sorted(set(_words(text)) & nouns)
        if named:
            problems.append(f"{where} names the evaluation noun(s) {named}")
        if evaluation and year.search(text):
            problems.append(f"{where} has a year of an evaluation century: {year.search(text).group()}")  # type: ignore[union-attr]
    return problems


def corpus_sha256(corpus: Sequence[OrderingExample]) -> str:
    """The sha256 of the corpus as JSON lines: what a fine-tuned model's card records as its training data."""
    digest = hashlib.sha256()
    for example in corpus:
        digest.update((json.dumps(asdict(example), sort_keys=True) + "\n").encode())
    return digest.hexdigest()
