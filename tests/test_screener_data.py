"""The screener task set: rebuilt byte for byte, splits that really hold things out, controls validated."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from mechfin_utils.tasks.fair_lending import DATA_DIR, load_fair_lending_pairs
from mechfin_utils.tasks.screener_sets import (
    CONTROLS_CSV,
    SPLITS,
    TEST_SPLITS,
    load_control_prompts,
    load_split,
    split_path,
)
from mechfin_utils.tasks.task_tables import TaskDataError


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_screener_set", DATA_DIR / "build_screener_set.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_screener_set"] = module
    spec.loader.exec_module(module)
    return module


def test_rebuild_gives_the_committed_files(builder):
    for path, text in builder.build_files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run data/build_screener_set.py"


def test_every_split_loads_and_covers_every_basis():
    from mechfin_utils.tasks.fair_lending import ALL_BASES

    for split in SPLITS:
        pairs = load_split(split)
        assert {p.basis for p in pairs} == set(ALL_BASES), split
    assert len(load_split("train")) == 440


def _question_of(prompt: str, questions: dict[str, str]) -> str:
    matches = [q for q, text in questions.items() if prompt.endswith(text)]
    assert len(matches) == 1, prompt
    return matches[0]


def test_held_out_parts_never_appear_in_training(builder):
    train = load_split("train")
    train_templates = {p.template_id for p in train}
    train_questions = {_question_of(p.clean_prompt, builder.QUESTIONS) for p in train}
    train_phrases = {p.protected_phrase.lower() for p in train} | {p.legitimate_phrase.lower() for p in train}
    train_text = " ".join(p.clean_prompt + " " + p.corrupted_prompt for p in train)

    unseen_templates = load_split("test_templates")
    assert not ({p.template_id for p in unseen_templates} & train_templates)
    unseen_questions = load_split("test_questions")
    assert not ({_question_of(p.clean_prompt, builder.QUESTIONS) for p in unseen_questions} & train_questions)
    unseen_phrases = load_split("test_phrases")
    for pair in unseen_phrases:
        assert pair.protected_phrase.lower() not in train_phrases
        assert pair.legitimate_phrase.lower() not in train_phrases
    # test names never occur in training prompts, and do occur in the test splits
    test_text = " ".join(p.clean_prompt for split in TEST_SPLITS for p in load_split(split))
    for person in builder.TEST_PEOPLE:
        assert f" {person.name}" not in train_text and not train_text.startswith(person.name)
        assert person.name in test_text
    # the paper-style set's question is held out: that whole set is unseen by the screener
    paper = load_fair_lending_pairs()
    assert all(_question_of(p.clean_prompt, builder.QUESTIONS) == "Q7" for p in paper)
    assert "Q7" not in train_questions


def test_controls_load_with_the_answer_their_kind_requires():
    controls = load_control_prompts()
    kinds = {c.kind for c in controls}
    assert kinds == {"mentioned_legitimate", "approved_despite_mention", "unnamed_basis"}
    assert all(c.answer == (" Yes" if c.kind == "unnamed_basis" else " No") for c in controls)


def test_control_file_errors_name_every_bad_row_at_once(tmp_path):
    lines = CONTROLS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)
    header, good = lines[0], lines[1]
    bad_kind = good.replace("mentioned_legitimate", "mentioned_legit", 1)
    bad_answer = good.replace(", No,", ", Yes,", 1).replace("ctl-001", "ctl-900", 1)
    path = tmp_path / "controls.csv"
    path.write_text(header + good + bad_kind.replace("ctl-001", "ctl-901", 1) + bad_answer, encoding="utf-8")
    with pytest.raises(TaskDataError) as error:
        load_control_prompts(path)
    message = str(error.value)
    assert message.startswith("2 bad rows in controls.csv")
    assert message.index("line 3") < message.index("line 4")  # file order
    assert "mentioned_legit" in message and "ctl-900" in message


def test_control_file_accepts_a_byte_order_mark_and_names_a_bad_byte(tmp_path):
    text = CONTROLS_CSV.read_text(encoding="utf-8")
    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert len(load_control_prompts(with_bom)) == len(load_control_prompts())
    broken = tmp_path / "latin1.csv"
    lines = text.splitlines(keepends=True)
    fourth = lines[3].encode()
    comma = fourth.index(b",")
    bad = fourth[: comma + 1] + b"\xe9" + fourth[comma + 1 :]  # a Latin-1 e-acute after the id
    broken.write_bytes("".join(lines[:3]).encode() + bad + "".join(lines[4:]).encode())
    with pytest.raises(
        TaskDataError,
        match=rf"latin1.csv line 4 \(control_id='ctl-003'\): byte 0xe9 at character "
        rf"{comma + 2} is not UTF-8",
    ):
        load_control_prompts(broken)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="unknown split 'tests'"):
        split_path("tests")
