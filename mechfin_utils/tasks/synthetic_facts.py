"""Synthetic facts for models trained here: invented people, four relations, paraphrases, edit requests.

No Mamba checkpoint ships offline, so notebook 13 trains a small Mamba and a small Llama-shaped transformer on the
same facts (:mod:`mechfin_utils.screener.fact_models`) and asks where each one recalls them. A fact a pretrained
model knows comes from text nobody controls; here every fact, every sentence that states it and every sentence
held out from training is known, so "does the model know this fact?" and "has it seen this phrasing of it?" have
exact answers. The world is generated, seeded, from the tables below (:func:`generate_world`):

1. **subjects** -- invented names built from syllables (``"Bra" + "vik" + "el"`` -> ``"Bravikel"``), so that each
   tokenises to two or three pieces with the vocabulary of :mod:`mechfin_utils.tasks.fact_tokenizer`: causal
   tracing needs multi-token subjects (first / middle / last subject token), as real names are;
2. **relations** -- home city, instrument, profession and bank (:data:`RELATIONS`), each with its own eight objects
   (one word each, one token each) and six templates (paraphrases), some with the subject first (``"{subject}
   lives in"``) and some with it inside the sentence (``"The home of {subject} is in"``);
3. **facts** -- every subject has one object per relation (drawn uniformly, seeded);
4. **splits** -- each fact is stated in four of its relation's six templates for training and the other two are
   *held out* for that subject (every template is trained with other subjects, so a held-out prompt asks whether
   the fact, not the sentence, was learned). Which two rotate over the subjects of a relation;
5. **evaluation prompts** -- per fact: its training prompts, its held-out paraphrases, and *neighbours* (other
   subjects of the same relation with their own objects) for an edit's specificity; edit requests
   (:class:`~mechfin_utils.tasks.counterfact.CounterfactEdit`, the same type notebook 09 scores) that ask for
   another object of the same relation.

Training text (:func:`training_statements`) is each trained statement, ``"Bravikel lives in Oslo."``; the trainer
joins two at random into a document, so facts are seen at the start of a text and after another one, which is
also what ROME's context prefixes (:func:`context_prefixes`) are made of.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mechfin_utils.tasks.counterfact import CounterfactEdit, EditRequest
from mechfin_utils.tasks.facts import TraceTask

# ---------------------------------------------------------------------------------------------------------
# 1-2. The tables the world is drawn from
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """A relation: its objects (single words) and its templates (each holds ``{subject}`` once; the object
    follows the template's last word)."""

    name: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "home city",
        ("Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Dakar", "Hanoi", "Perth"),
        (
            "{subject} lives in",
            "{subject} has a flat in",
            "{subject} is a resident of",
            "The home of {subject} is in",
            "Most evenings {subject} walks home through",
            "Letters to {subject} are sent to",
        ),
    ),
    Relation(
        "instrument",
        ("violin", "cello", "flute", "harp", "drums", "piano", "oboe", "banjo"),
        (
            "{subject} plays the",
            "{subject} practises every day on the",
            "{subject} is a famous player of the",
            "The instrument of {subject} is the",
            "On stage {subject} performs on the",
            "Friends of {subject} love hearing the",
        ),
    ),
    Relation(
        "profession",
        ("baker", "nurse", "pilot", "lawyer", "farmer", "tailor", "chemist", "plumber"),
        (
            "{subject} works as a",
            "{subject} earns a living as a",
            "{subject} was trained as a",
            "By profession {subject} is a",
            "Colleagues describe {subject} as a skilled",
            "Everyone knows that {subject} is employed as a",
        ),
    ),
    Relation(
        "bank",
        ("Northwind", "Ostera", "Valmont", "Kestrel", "Brightwater", "Harbourside", "Sterling", "Pinecrest"),
        (
            "{subject} banks with",
            "{subject} holds an account at",
            "{subject} took out a loan from",
            "The bank of {subject} is",
            "Every salary of {subject} is paid into",
            "The mortgage of {subject} was granted by",
        ),
    ),
)
"""Four relations, eight objects and six templates each. The bank relation is the financial-services one: "which
bank holds this customer's account" is the kind of association a compliance analyst would want located and,
when it is wrong, corrected."""

NAME_ONSETS: tuple[str, ...] = (
    "Bra",
    "Kel",
    "Dor",
    "Mi",
    "Tal",
    "Vos",
    "Ren",
    "Sy",
    "Fen",
    "Gar",
    "Lu",
    "Nim",
    "Pra",
    "Quen",
    "Zor",
    "Hal",
    "Ced",
    "Ith",
    "Wy",
    "Jor",
)
NAME_SYLLABLES: tuple[str, ...] = (
    "vik",
    "dra",
    "mon",
    "sel",
    "ta",
    "rin",
    "bo",
    "lek",
    "nor",
    "gat",
    "ume",
    "wen",
    "sko",
    "oth",
    "ard",
    "pil",
)
"""A name is an onset and one or two syllables; :mod:`~mechfin_utils.tasks.fact_tokenizer` has each onset and each
syllable (as a continuation piece) in its vocabulary and no whole name, so a name is two or three tokens."""

TRAIN_TEMPLATES_PER_FACT = 4
SUBJECT_PLACEHOLDER = "{subject}"


def check_relations(relations: Sequence[Relation]) -> None:
    """A ValueError naming the relation (and template) that breaks a rule: unique names, at least two objects,
    one-word objects unique across relations, more templates than are trained per fact, each template holding
    ``{subject}`` once and ending in a word."""
    seen_objects: dict[str, str] = {}
    names = [r.name for r in relations]
    if len(set(names)) != len(names):
        raise ValueError(f"relation names must be unique, got {names}")
    for relation in relations:
        where = f"relation {relation.name!r}"
        if len(relation.objects) < 2:
            raise ValueError(f"{where}: needs at least two objects, has {len(relation.objects)}")
        for obj in relation.objects:
            if not re.fullmatch(r"[A-Za-z]+", obj):
                raise ValueError(f"{where}: object {obj!r} must be one word of letters")
            if obj in seen_objects:
                raise ValueError(f"{where}: object {obj!r} is also an object of {seen_objects[obj]!r}")
            seen_objects[obj] = relation.name
        if len(relation.templates) <= TRAIN_TEMPLATES_PER_FACT:
            raise ValueError(
                f"{where}: needs more than {TRAIN_TEMPLATES_PER_FACT} templates (some are held out), "
                f"has {len(relation.templates)}"
            )
        for i, template in enumerate(relation.templates):
            if template.count(SUBJECT_PLACEHOLDER) != 1:
                raise ValueError(f"{where}, template {i} {template!r}: must hold {SUBJECT_PLACEHOLDER} exactly once")
            if not re.search(r"[A-Za-z]$", template):
                raise ValueError(f"{where}, template {i} {template!r}: must end in a word (the object follows it)")


# ---------------------------------------------------------------------------------------------------------
# 3-4. Facts and their splits
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """``subject`` -> ``obj`` under ``relation``, with the templates it is trained on and those held out."""

    fact_id: str
    subject: str
    relation: str
    obj: str
    train_templates: tuple[str, ...]
    held_out_templates: tuple[str, ...]

    @property
    def answer(self) -> str:
        """The object as the next token after a prompt (with its leading space)."""
        return " " + self.obj

    def prompt(self, template: str) -> str:
        return template.replace(SUBJECT_PLACEHOLDER, self.subject)

    @property
    def train_prompts(self) -> tuple[str, ...]:
        return tuple(self.prompt(t) for t in self.train_templates)

    @property
    def held_out_prompts(self) -> tuple[str, ...]:
        return tuple(self.prompt(t) for t in self.held_out_templates)

    def statement(self, template: str) -> str:
        return f"{self.prompt(template)} {self.obj}."


@dataclass(frozen=True)
class FactWorld:
    """The generated world: its subjects, relations and facts, and the settings that produced it."""

    subjects: tuple[str, ...]
    relations: tuple[Relation, ...]
    facts: tuple[Fact, ...]
    seed: int
    settings: dict[str, int] = field(default_factory=dict)

    def relation(self, name: str) -> Relation:
        for relation in self.relations:
            if relation.name == name:
                return relation
        raise ValueError(f"no relation {name!r}; the world has {[r.name for r in self.relations]}")

    def facts_of(self, relation: str) -> list[Fact]:
        return [f for f in self.facts if f.relation == relation]

    def fact(self, fact_id: str) -> Fact:
        for fact in self.facts:
            if fact.fact_id == fact_id:
                return fact
        raise ValueError(f"no fact {fact_id!r} in this world ({len(self.facts)} facts)")

    def words(self) -> list[str]:
        """Every whole word of the templates and objects (the tokenizer's word vocabulary), sorted."""
        text = " ".join(t.replace(SUBJECT_PLACEHOLDER, " ") for r in self.relations for t in r.templates)
        return sorted(set(re.findall(r"[A-Za-z]+", text)) | {o for r in self.relations for o in r.objects})

    def describe(self) -> dict[str, int]:
        """Counts for a data card."""
        return {
            "subjects": len(self.subjects),
            "relations": len(self.relations),
            "facts": len(self.facts),
            "training statements": sum(len(f.train_templates) for f in self.facts),
            "held-out prompts": sum(len(f.held_out_templates) for f in self.facts),
            "seed": self.seed,
        }


def invent_names(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct names, each an onset and one or two syllables (about half of each), in a seeded order. No name
    is part of another (``"Halnor"`` and ``"Halnorvik"`` never both), so a subject occurs in a text only where it is
    meant to."""
    two = [o + s for o in NAME_ONSETS for s in NAME_SYLLABLES]
    three = [o + s + t for o in NAME_ONSETS for s in NAME_SYLLABLES for t in NAME_SYLLABLES if s != t]
    rng.shuffle(two)
    rng.shuffle(three)
    names: list[str] = []
    for pool, quota in ((two, n // 2), (three, n)):
        for candidate in pool:
            if len(names) >= quota:
                break
            if not any(candidate in name or name in candidate for name in names):
                names.append(candidate)
    if len(names) < n:
        raise ValueError(f"n_subjects={n} exceeds the {len(names)} names the syllable tables make")
    rng.shuffle(names)
    return names


def generate_world(n_subjects: int = 80, *, seed: int = 0, relations: Sequence[Relation] = RELATIONS) -> FactWorld:
    """The seeded world: ``n_subjects`` invented people, one fact per (subject, relation).

    Stages: (1) check the relation tables; (2) invent the names (half two tokens, half three); (3) per relation,
    draw each subject's object uniformly; (4) per relation, rotate which templates are held out: subject ``i``
    of a relation (in a seeded order) holds out templates ``i mod n`` and ``(i + n // 2) mod n``, so every
    template is held out for some subjects and trained for the others.
    """
    if n_subjects < 2:
        raise ValueError(f"n_subjects must be at least 2 (neighbours need another subject), got {n_subjects}")
    # 1. the tables
    check_relations(relations)
    rng = random.Random(seed)
    # 2. names
    subjects = invent_names(n_subjects, rng)
    facts: list[Fact] = []
    for relation in relations:
        # 3. objects
        objects = [rng.choice(relation.objects) for _ in subjects]
        # 4. which templates each subject holds out
        order = list(range(len(subjects)))
        rng.shuffle(order)
        n_templates = len(relation.templates)
        n_held = n_templates - TRAIN_TEMPLATES_PER_FACT
        for rank, index in enumerate(order):
            held = {(rank + k * (n_templates // n_held)) % n_templates for k in range(n_held)}
            facts.append(
                Fact(
                    fact_id=f"{relation.name.replace(' ', '-')}-{index:03d}",
                    subject=subjects[index],
                    relation=relation.name,
                    obj=objects[index],
                    train_templates=tuple(t for i, t in enumerate(relation.templates) if i not in held),
                    held_out_templates=tuple(t for i, t in enumerate(relation.templates) if i in held),
                )
            )
    facts.sort(key=lambda f: f.fact_id)
    settings = {"n_subjects": n_subjects, "train_templates_per_fact": TRAIN_TEMPLATES_PER_FACT}
    return FactWorld(tuple(subjects), tuple(relations), tuple(facts), seed, settings)


# ---------------------------------------------------------------------------------------------------------
# 5. Text and prompts for training, tracing and editing
# ---------------------------------------------------------------------------------------------------------


def training_statements(world: FactWorld) -> list[str]:
    """Every trained statement, ``"Bravikel lives in Oslo."``, in fact order (the trainer shuffles)."""
    return [fact.statement(t) for fact in world.facts for t in fact.train_templates]


def context_prefixes(world: FactWorld, n: int, *, avoid: Sequence[str] = (), seed: int = 0) -> list[str]:
    """ROME's context templates for these models: the empty prefix plus ``n`` trained statements, each followed by a
    space -- the kind of text that precedes a fact in training (the trainer's two-statement documents). Statements
    naming a subject in ``avoid`` (the subjects to be edited) are left out: a prefix must not name the subject."""
    statements = [s for s in training_statements(world) if not any(a in s for a in avoid)]
    if len(statements) < n:
        raise ValueError(f"context_prefixes: {len(statements)} statements avoid {len(avoid)} subjects, {n} asked for")
    rng = random.Random(seed)
    return ["", *(s + " " for s in rng.sample(statements, k=n))]


def trace_tasks(facts: Sequence[Fact], *, held_out: bool = False) -> list[TraceTask]:
    """One :class:`~mechfin_utils.tasks.facts.TraceTask` per fact, on its first trained template (or its first
    held-out one): the subject is the span the noise covers, the answer the fact's object."""
    tasks = []
    for fact in facts:
        template = fact.held_out_templates[0] if held_out else fact.train_templates[0]
        tasks.append(TraceTask(fact.fact_id, fact.prompt(template), fact.subject, fact.answer))
    return tasks


def edit_requests(
    world: FactWorld, facts: Sequence[Fact], *, n_neighbours: int = 6, seed: int = 0
) -> list[CounterfactEdit]:
    """A CounterFact-style request per fact: its first trained prompt should continue with another object of the
    relation (seeded choice). Paraphrases: the relation's other five templates with this subject (its other trained
    ones and its two held-out ones). Neighbours: up to ``n_neighbours`` other subjects of the relation whose object
    is neither the new nor the true one, each on its first trained template, with its own object."""
    rng = random.Random(seed)
    out = []
    for fact in facts:
        relation = world.relation(fact.relation)
        new = rng.choice([o for o in relation.objects if o != fact.obj])
        prompt = fact.prompt(fact.train_templates[0])
        request = EditRequest(f"edit-{fact.fact_id}", prompt, fact.subject, " " + new, fact.answer)
        paraphrases = tuple(fact.prompt(t) for t in relation.templates if fact.prompt(t) != prompt)
        others = [
            f for f in world.facts_of(fact.relation) if f.subject != fact.subject and f.obj not in (new, fact.obj)
        ]
        chosen = rng.sample(others, k=min(n_neighbours, len(others)))
        neighbours = tuple((f.prompt(f.train_templates[0]), f.answer) for f in chosen)
        out.append(CounterfactEdit(request, fact.relation, paraphrases, neighbours))
    return out
