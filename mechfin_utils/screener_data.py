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

import csv
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import (
    ALL_BASES,
    DATA_DIR,
    FAIR_LENDING_ANSWERS,
    FairLendingPair,
    TaskDataError,
    load_fair_lending_pairs,
    read_task_text,
)

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

    Rules: UTF-8 (a byte-order mark is accepted); exactly the columns :data:`CONTROL_COLUMNS`; no empty value;
    unique ``control_id``; a known ``kind`` and ``basis``; ``answer`` the one its kind requires.
    """
    path = Path(path) if path is not None else CONTROLS_CSV
    if not path.is_file():
        raise TaskDataError(f"control file {path} does not exist")
    text = read_task_text(path, "control_id")
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader, None)
    if header is None:
        raise TaskDataError(f"{path.name} is empty: expected a header with columns {list(CONTROL_COLUMNS)}")
    if sorted(header) != sorted(CONTROL_COLUMNS) or len(header) != len(CONTROL_COLUMNS):
        raise TaskDataError(f"{path.name} line 1: columns {header}; expected exactly {list(CONTROL_COLUMNS)}")
    problems: list[str] = []
    controls: list[ControlPrompt] = []
    seen: dict[str, int] = {}
    next_line = reader.line_num + 1
    for values in reader:
        line, next_line = next_line, reader.line_num + 1
        if len(values) != len(header):
            problems.append(f"{path.name} line {line}: {len(values)} values for {len(header)} columns")
            continue
        row = dict(zip(header, values))
        where = f"{path.name} line {line} (control_id={row['control_id']!r})"
        empty = [c for c in CONTROL_COLUMNS if not row[c].strip()]
        if empty:
            problems.append(f"{where}: empty value in {empty}")
            continue
        if row["control_id"] in seen:
            problems.append(f"{where}: duplicate control_id, first on line {seen[row['control_id']]}")
        seen.setdefault(row["control_id"], line)
        if row["kind"] not in CONTROL_KINDS:
            problems.append(f"{where}, field 'kind': unknown {row['kind']!r}; known: {sorted(CONTROL_KINDS)}")
        elif row["answer"] != CONTROL_KINDS[row["kind"]]:
            problems.append(f"{where}, field 'answer': {row['answer']!r}, but kind {row['kind']!r} requires "
                            f"{CONTROL_KINDS[row['kind']]!r}")
        if row["basis"] not in ALL_BASES:
            problems.append(f"{where}, field 'basis': unknown {row['basis']!r}; known: {sorted(ALL_BASES)}")
        if row["answer"] not in FAIR_LENDING_ANSWERS:
            problems.append(f"{where}, field 'answer': {row['answer']!r} is not one of {list(FAIR_LENDING_ANSWERS)}")
        controls.append(ControlPrompt(**row, line=line))
    if problems:
        raise TaskDataError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems))
    if not controls:
        raise TaskDataError(f"{path.name} has a header but no rows")
    return controls
