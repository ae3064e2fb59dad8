"""The screener task set: its splits and its control prompts (built by ``data/build_screener_set.py``).

Four pair files in the fair-lending schema (``tasks.FAIR_LENDING_COLUMNS``), with token lengths *not* matched:

* ``train`` — the only split the screener is trained on (scenario templates S01-S12, training names,
  questions Q1-Q6, the task set's reason phrases);
* ``test_templates`` — unseen sentence structures (H01-H06) and unseen names;
* ``test_phrases`` — unseen protected and legitimate phrases and connectives ("since", "due to", ...);
* ``test_questions`` — unseen question wordings (Q7-Q10; Q7 is the paper-style set's question).

``data/fair_lending_pairs.csv`` (the paper-style set the notebooks use) is unseen too: its question is Q7.

Control prompts (``controls.csv``) are single prompts with a known answer where a screener that keys on surface
cues fails: a protected attribute mentioned while the decision rests on a legitimate reason (`` No``); a
favourable decision that mentions an attribute (`` No``); a policy that discriminates without the task set's
words for the basis (`` Yes``). See ``data/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mechfin_utils.core.paths import DATA_DIR
from mechfin_utils.tasks.fair_lending import ALL_BASES, FairLendingPair, load_fair_lending_pairs
from mechfin_utils.tasks.task_tables import raise_problems, read_task_rows

SCREENER_DIR = DATA_DIR / "screener"
TRAIN_SPLIT = "train"
TEST_SPLITS = ("test_templates", "test_phrases", "test_questions")
SPLITS = (TRAIN_SPLIT, *TEST_SPLITS)
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
    """The validated pairs of one split (``train``, ``test_templates``, ``test_phrases``, ``test_questions``)."""
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
