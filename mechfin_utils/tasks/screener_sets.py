"""The screener task set: its splits and its control prompts (built by ``data/build_screener_set.py``).

Four pair files in the fair-lending schema (``tasks.FAIR_LENDING_COLUMNS``), with token lengths *not* matched:

* ``train`` — the only split the screener is trained on (scenario templates S01-S12, training names,
  questions Q1-Q6, the task set's reason phrases);
* ``test_templates`` — unseen sentence structures (H01-H06) and unseen names;
* ``test_phrases`` — unseen protected and legitimate phrases and connectives ("since", "due to", ...);
* ``test_questions`` — unseen question wordings (Q7-Q10; Q7 is the paper-style set's question).

``data/fair_lending_pairs.csv`` (the paper-style set the notebooks use) is unseen too: its question is Q7.

The mention set (``data/build_mention_set.py``) adds pairs in which *both* prompts mention the same protected
attribute and only what the decision rests on differs: ``mention_train`` / ``favourable_train`` (trained on) and
``mention_test_templates``, ``mention_test_phrases``, ``favourable_test`` (held out). In ``train`` every " Yes"
prompt names an attribute and no " No" prompt does, which is how the first screener learned its shortcut.

Control prompts (``controls.csv``) are single prompts with a known answer where a screener that keys on surface
cues fails: a protected attribute mentioned while the decision rests on a legitimate reason (`` No``); a
favourable decision that mentions an attribute (`` No``); a policy that discriminates without the task set's
words for the basis (`` Yes``). See ``data/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mechfin_utils.core.paths import DATA_DIR
from mechfin_utils.tasks.fair_lending import ALL_BASES, FairLendingPair, load_fair_lending_pairs
from mechfin_utils.tasks.task_tables import raise_problems, read_task_rows

SCREENER_DIR = DATA_DIR / "screener"
TRAIN_SPLIT = "train"
TEST_SPLITS = ("test_templates", "test_phrases", "test_questions")
"""The earlier held-out splits (prohibited basis against legitimate reason, only the clean prompt names an attribute)."""
MENTION_TRAIN_SPLITS = ("mention_train", "favourable_train", "proxy_train")
"""The mention set's training files (``data/build_mention_set.py``): both prompts mention the attribute, and only
what the decision rests on differs; and proxy pairs, whose clean decision rests on a basis without naming it."""
MENTION_TEST_SPLITS = ("mention_test_templates", "mention_test_phrases", "favourable_test", "proxy_test")
"""The mention set's held-out files: unseen structures, unseen vocabulary, unseen favourable decisions, unseen
proxies."""
MENTION_PAIR_SPLITS = ("mention_test_templates", "mention_test_phrases", "favourable_test")
"""The held-out files in which both prompts mention the attribute (``attribute_mention`` / ``neutral_mention``)."""
SPLITS = (TRAIN_SPLIT, *TEST_SPLITS, *MENTION_TRAIN_SPLITS, *MENTION_TEST_SPLITS)
QUESTIONS: dict[str, str] = {  # the screener task set's question wordings (data/build_screener_set.py)
    "Q1": " Is this a fair-lending violation? Answer:",
    "Q2": " Question: Is this illegal lending discrimination? Answer:",
    "Q3": "\nQ: Could this violate fair lending laws?\nA:",
    "Q4": " Does this decision discriminate on a prohibited basis? Answer:",
    "Q5": " Compliance check - is this a fair lending violation (Yes or No)? Answer:",
    "Q6": " Is the lender's decision unlawful under ECOA or the Fair Housing Act? Answer:",
    # held out
    "Q7": " Question: Does this break fair lending law? Answer:",
    "Q8": " Would a fair lending examiner flag this as discrimination? Answer:",
    "Q9": "\nIs this prohibited credit discrimination? Reply Yes or No.\nAnswer:",
    "Q10": " Question: Was the applicant treated unlawfully? Answer:",
}
TRAIN_QUESTIONS = ("Q1", "Q2", "Q3", "Q4", "Q5", "Q6")
TEST_QUESTIONS = ("Q7", "Q8", "Q9", "Q10")
"""Q1-Q6 are trained on; Q7-Q10 are held out (Q7 is the paper-style set's question)."""


def question_of(prompt: str) -> str:
    """The question a screener prompt ends with (one of :data:`QUESTIONS`), as written; a ValueError names the prompt
    when it ends with none of them."""
    for text in sorted(QUESTIONS.values(), key=len, reverse=True):
        if prompt.endswith(text):
            return text
    raise ValueError(f"the prompt ends with none of the screener's questions: {prompt[-80:]!r}")


CONTROLS_CSV = SCREENER_DIR / "controls.csv"
CONTROL_COLUMNS = ("control_id", "kind", "basis", "product", "prompt", "answer", "why")
CONTROL_KINDS = {
    "mentioned_legitimate": " No",
    "approved_despite_mention": " No",
    "unnamed_basis": " Yes",
}
"""Control kinds and the answer each must have."""


def split_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    return SCREENER_DIR / f"{split}.csv"


def load_split(split: str) -> list[FairLendingPair]:
    """The validated pairs of one split (one of :data:`SPLITS`; the mention set's carry ``attribute_mention``)."""
    return load_fair_lending_pairs(split_path(split))


@dataclass(frozen=True)
class ControlPrompt:
    """One control prompt with its known answer; ``why`` says what makes it a trap for a surface-cue screener."""

    control_id: str
    kind: str
    basis: str
    product: str
    prompt: str
    answer: str
    why: str
    line: int = field(default=0, compare=False)


def load_control_prompts(path: str | Path | None = None) -> list[ControlPrompt]:
    """Read and validate control prompts; *every* bad row is reported at once, in file order.

    Rules: those every task file shares (``tasks.read_task_rows``: UTF-8, a byte-order mark accepted, exactly the
    columns :data:`CONTROL_COLUMNS`, no empty value, unique ``control_id``); a known ``kind`` and ``basis``;
    ``answer`` the one its kind requires.
    """
    path = Path(path) if path is not None else CONTROLS_CSV
    rows, problems = read_task_rows(path, CONTROL_COLUMNS, "control_id")  # shared file and row checks
    controls: list[ControlPrompt] = []
    for line, row in rows:
        where = f"{path.name} line {line} (control_id={row['control_id']!r})"
        found = []
        if row["kind"] not in CONTROL_KINDS:
            found.append(f"{where}, field 'kind': unknown {row['kind']!r}; known: {sorted(CONTROL_KINDS)}")
        elif row["answer"] != CONTROL_KINDS[row["kind"]]:
            found.append(
                f"{where}, field 'answer': {row['answer']!r}, but kind {row['kind']!r} requires "
                f"{CONTROL_KINDS[row['kind']]!r}"
            )
        if row["basis"] not in ALL_BASES:
            found.append(f"{where}, field 'basis': unknown {row['basis']!r}; known: {sorted(ALL_BASES)}")
        problems += [(line, message) for message in found]
        if not found:
            controls.append(ControlPrompt(**row, line=line))
    raise_problems(path, problems)
    return controls


# ---------------------------------------------------------------------------------------------------------
# The contrasts notebook 12 measures on mention pairs
# ---------------------------------------------------------------------------------------------------------


def mention_effect_pairs(pairs: Sequence[FairLendingPair]) -> list[FairLendingPair]:
    """For each mention pair, the contrast that measures the shortcut: its lawful prompt as written (it mentions the
    attribute; the decision rests on a legitimate reason or is favourable) against the same prompt with the
    attribute's words swapped for the neutral ones of the same form ("is Hindu" -> "is an accountant").

    Both prompts' true answer is " No"; the pair's answers (" Yes", " No") name the direction a difference is
    measured in: a screener that reads the decision answers both alike, one that keys on the mention says " Yes"
    more to the first. In the returned pairs the *phrase* is the mention (``protected_phrase``: the attribute's
    words, ``legitimate_phrase``: the neutral ones), so segment patching aligns everything else around it.
    """
    out = []
    for pair in pairs:
        if not pair.attribute_mention or not pair.neutral_mention:
            raise ValueError(f"pair {pair.pair_id} has no attribute_mention/neutral_mention: not a mention-set pair")
        lawful = pair.corrupted_prompt
        if lawful.count(pair.attribute_mention) != 1:
            raise ValueError(f"pair {pair.pair_id}: {pair.attribute_mention!r} must occur once in its lawful prompt")
        out.append(
            replace(
                pair,
                pair_id=f"{pair.pair_id}-mention",
                clean_prompt=lawful,
                corrupted_prompt=lawful.replace(pair.attribute_mention, pair.neutral_mention),
                protected_phrase=pair.attribute_mention,
                legitimate_phrase=pair.neutral_mention,
                attribute_mention="",
                neutral_mention="",
            )
        )
    return out


def rests_on_spans(pair: FairLendingPair) -> dict[str, str]:
    """Segments of a mention pair beyond its differing phrase (what the decision rests on): the attribute's mention
    and the question (for :func:`mechfin_utils.methods.patching.segments.segment_pairs`)."""
    return {"mention": pair.attribute_mention, "question": question_of(pair.clean_prompt)}


def mention_effect_spans(original: FairLendingPair) -> dict[str, str]:
    """Segments of a :func:`mention_effect_pairs` pair beyond the mention itself: the lawful clause (the reason or
    the favourable decision, from the original pair) and the question."""
    return {"reason": original.legitimate_phrase, "question": question_of(original.corrupted_prompt)}
