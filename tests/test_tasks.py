"""Task sets: the committed CSVs, their validation rules, tokenizer alignment and batching.

Tokenizers used: the genuine GPT-2 tokenizer (no weights) with BOS prepended, as mechfin runs GPT-2, and
SmolLM2-135M-Instruct's (alone, and through the loaded model, whose BOS decision is "no BOS").
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mechfin_utils.tasks.batching import AlignmentReport, align_pairs, largest_template_batch, make_batches
from mechfin_utils.tasks.fair_lending import (
    ALL_BASES,
    COUNTERFACTUAL_ANSWERS,
    COUNTERFACTUAL_COLUMNS,
    COUNTERFACTUAL_CSV,
    ECOA_BASES,
    FAIR_LENDING_CSV,
    FHA_BASES,
    load_counterfactual_pairs,
    load_fair_lending_pairs,
)
from mechfin_utils.tasks.task_tables import TaskDataError

REPO = Path(__file__).resolve().parent.parent
GPT2_BOS = 50256


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def fl_pairs():
    return load_fair_lending_pairs()


@pytest.fixture(scope="module")
def cf_pairs():
    return load_counterfactual_pairs()


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_task_sets", REPO / "data" / "build_task_sets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# The committed files
# ---------------------------------------------------------------------------------------------------------


def test_committed_files_are_exactly_what_the_generator_writes(builder, gpt2_tokenizer, smollm2_tokenizer):
    files = builder.build_files((gpt2_tokenizer, smollm2_tokenizer))
    assert set(files) == {FAIR_LENDING_CSV, COUNTERFACTUAL_CSV}
    for path, text in files.items():
        assert path.read_bytes() == text.encode("utf-8"), f"{path.name} is stale: run python data/build_task_sets.py"


def test_legal_constants_list_every_ecoa_and_fha_basis():
    assert set(ECOA_BASES) == {
        "race",
        "color",
        "religion",
        "national_origin",
        "sex",
        "marital_status",
        "age",
        "public_assistance",
        "ccpa_rights",
    }
    assert set(FHA_BASES) == {"familial_status", "disability"}
    assert all("1691(a)" in c and "1002.2(z)" in c for c in ECOA_BASES.values())
    assert "1691(a)(2)" in ECOA_BASES["public_assistance"] and "1691(a)(3)" in ECOA_BASES["ccpa_rights"]
    assert all("42 U.S.C. 3605" in c for c in FHA_BASES.values())


def test_fair_lending_file_covers_every_basis_with_several_phrasings_and_templates(fl_pairs, builder):
    assert len(fl_pairs) >= 120
    by_basis = Counter(p.basis for p in fl_pairs)
    assert set(by_basis) == set(ALL_BASES)
    assert len({p.template_id for p in fl_pairs}) >= 6
    female_templates = {s.template_id for s in builder.SCENARIOS if s.applicant.female}
    assert len(female_templates) == 4
    for basis in ALL_BASES:
        # a phrasing is filled in with the template's pronouns: count it in the female-applicant templates only
        phrasings = {p.protected_phrase for p in fl_pairs if p.basis == basis and p.template_id in female_templates}
        assert len(phrasings) >= 4, basis
    assert {p.statute for p in fl_pairs if p.basis in FHA_BASES} == {"FHA"}
    assert {p.statute for p in fl_pairs if p.basis in ECOA_BASES} == {"ECOA"}


def test_fair_lending_pairs_differ_only_by_the_phrase(fl_pairs):
    for p in fl_pairs:
        start = p.clean_prompt.index(p.protected_phrase)
        assert p.clean_prompt[:start] == p.corrupted_prompt[:start]
        assert (
            p.clean_prompt[start + len(p.protected_phrase) :] == p.corrupted_prompt[start + len(p.legitimate_phrase) :]
        )
        assert p.corrupted_prompt[start : start + len(p.legitimate_phrase)] == p.legitimate_phrase
        assert (p.clean_answer, p.corrupted_answer) == (" Yes", " No")


def test_counterfactual_pairs_differ_only_by_the_attribute(cf_pairs):
    assert len(cf_pairs) >= 100
    assert len({p.basis for p in cf_pairs}) >= 9
    for p in cf_pairs:
        start = p.prompt_a.index(p.value_a)
        assert p.prompt_a[:start] == p.prompt_b[:start]
        assert p.prompt_a[start + len(p.value_a) :] == p.prompt_b[start + len(p.value_b) :]
        assert p.answer_tokens == (" approved", " denied")


@pytest.mark.parametrize("bos", [True, False])
def test_prompts_are_short_under_both_tokenizers(fl_pairs, cf_pairs, gpt2_tokenizer, smollm2_tokenizer, bos):
    tokenizer = gpt2_tokenizer if bos else smollm2_tokenizer
    longest = max(len(_ids(tokenizer, t)) + bos for p in [*fl_pairs, *cf_pairs] for t in p.texts)
    assert longest <= 60


# ---------------------------------------------------------------------------------------------------------
# Validation rules: each malformed file raises TaskDataError naming line, id and field
# ---------------------------------------------------------------------------------------------------------


def _rows(path: Path, n: int = 3) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [next(reader) for _ in range(n)]


def _write(tmp_path: Path, header: list[str], rows: list[list[str]], name: str = "tasks.csv") -> Path:
    path = tmp_path / name
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _set(header, row, column, value):
    row[header.index(column)] = value


def _fl_drop_column(h, rows):
    i = h.index("reason_category")
    return [c for c in h if c != "reason_category"], [r[:i] + r[i + 1 :] for r in rows]


def _fl_extra_column(h, rows):
    return h + ["notes"], [r + ["x"] for r in rows]


def _fl_repeat_column(h, rows):
    return h + ["basis"], [r + ["race"] for r in rows]


def _fl_mutate(column, value, row=1):
    def mutate(h, rows):
        _set(h, rows[row], column, value)
        return h, rows

    return mutate


def _fl_duplicate_id(h, rows):
    _set(h, rows[2], "pair_id", rows[0][h.index("pair_id")])
    return h, rows


def _fl_clean_equals_corrupted(h, rows):
    _set(h, rows[1], "corrupted_prompt", rows[1][h.index("clean_prompt")])
    return h, rows


def _fl_extra_edit(h, rows):
    _set(h, rows[1], "corrupted_prompt", rows[1][h.index("corrupted_prompt")].replace("Answer:", "Reply:"))
    return h, rows


def _fl_ragged(h, rows):
    rows[1].append("surplus")
    return h, rows


def _fl_fha_on_credit_card(h, rows):
    _set(h, rows[1], "basis", "disability")
    _set(h, rows[1], "statute", "FHA")
    _set(h, rows[1], "product", "credit card")
    return h, rows


FL2 = r"line 3 \(pair_id='fl-0002'\), field "  # where every error about the second data row points
FAIR_LENDING_RULES = [
    ("missing column", _fl_drop_column, r"line 1: missing column\(s\) \['reason_category'\]"),
    ("unknown column", _fl_extra_column, r"line 1: unknown column\(s\) \['notes'\]"),
    ("repeated column", _fl_repeat_column, r"line 1: column\(s\) \['basis'\] appear more than once"),
    ("empty field", _fl_mutate("legitimate_phrase", ""), FL2 + "'legitimate_phrase': empty"),
    ("blank field", _fl_mutate("template_id", "   "), FL2 + "'template_id': empty"),
    ("missing id", _fl_mutate("pair_id", ""), r"line 3 \(pair_id=<missing>\), field 'pair_id': empty"),
    ("unknown basis", _fl_mutate("basis", "height"), FL2 + "'basis': unknown basis 'height'"),
    ("statute mismatch", _fl_mutate("statute", "FHA"), FL2 + "'statute': 'FHA' but basis 'race'"),
    ("FHA basis off housing", _fl_fha_on_credit_card, FL2 + "'product': 'credit card' is not a housing"),
    ("clean answer", _fl_mutate("clean_answer", "Yes"), FL2 + "'clean_answer': 'Yes', expected ' Yes'"),
    ("corrupted answer", _fl_mutate("corrupted_answer", " Yes"), FL2 + "'corrupted_answer': ' Yes', expected ' No'"),
    ("unknown reason", _fl_mutate("reason_category", "vibes"), FL2 + "'reason_category': unknown 'vibes'"),
    (
        "duplicate id",
        _fl_duplicate_id,
        r"line 4 \(pair_id='fl-0001'\), field 'pair_id': duplicate id, first used on line 2",
    ),
    ("clean == corrupted", _fl_clean_equals_corrupted, FL2 + "'corrupted_prompt': identical to 'clean_prompt'"),
    (
        "phrase absent",
        _fl_mutate("protected_phrase", "because of the weather"),
        FL2 + "'protected_phrase': 'because of the weather' occurs 0 times",
    ),
    (
        "more than the phrase differs",
        _fl_extra_edit,
        FL2 + "'corrupted_prompt': differs from 'clean_prompt' by more than",
    ),
    ("ragged row", _fl_ragged, r"line 3 \(pair_id='fl-0002'\): 13 values for 12 columns"),
]


@pytest.mark.parametrize("mutate,message", [r[1:] for r in FAIR_LENDING_RULES], ids=[r[0] for r in FAIR_LENDING_RULES])
def test_fair_lending_validation_rule(tmp_path, mutate, message):
    header, rows = _rows(FAIR_LENDING_CSV)
    path = _write(tmp_path, *mutate(header, rows))
    with pytest.raises(TaskDataError, match=r"tasks\.csv " + message):
        load_fair_lending_pairs(path)


def test_unmodified_rows_load_and_keep_their_line_numbers(tmp_path):
    header, rows = _rows(FAIR_LENDING_CSV)
    # (legal) line breaks inside the first row's two prompts make it span lines 2-4 of the file
    for column in ("clean_prompt", "corrupted_prompt"):
        text = rows[0][header.index(column)]
        assert text.endswith(" Answer:")
        _set(header, rows[0], column, text[: -len(" Answer:")] + "\nAnswer:")
    pairs = load_fair_lending_pairs(_write(tmp_path, header, rows))
    assert [p.line for p in pairs] == [2, 5, 6]
    assert [p.pair_id for p in pairs] == ["fl-0001", "fl-0002", "fl-0003"]
    _set(header, rows[2], "basis", "height")
    with pytest.raises(TaskDataError, match=r"line 6 \(pair_id='fl-0003'\), field 'basis'"):
        load_fair_lending_pairs(_write(tmp_path, header, rows))


def test_empty_missing_and_header_only_files_are_errors(tmp_path):
    with pytest.raises(TaskDataError, match="does not exist"):
        load_fair_lending_pairs(tmp_path / "nowhere.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(TaskDataError, match="empty.csv is empty"):
        load_fair_lending_pairs(tmp_path / "empty.csv")
    with pytest.raises(TaskDataError, match="header but no rows"):
        load_counterfactual_pairs(_write(tmp_path, list(COUNTERFACTUAL_COLUMNS), []))


def _cf_mutate(column, value, row=1):
    def mutate(h, rows):
        _set(h, rows[row], column, value)
        return h, rows

    return mutate


def _cf_same_prompts(h, rows):
    _set(h, rows[1], "prompt_b", rows[1][h.index("prompt_a")])
    return h, rows


def _cf_duplicate_id(h, rows):
    _set(h, rows[1], "cf_id", rows[0][h.index("cf_id")])
    return h, rows


def _cf_drop_column(h, rows):
    i = h.index("profile")
    return [c for c in h if c != "profile"], [r[:i] + r[i + 1 :] for r in rows]


CF2 = r"line 3 \(cf_id='cf-0002'\), field "
COUNTERFACTUAL_RULES = [
    ("missing column", _cf_drop_column, r"line 1: missing column\(s\) \['profile'\]"),
    ("unknown basis", _cf_mutate("basis", "zodiac"), CF2 + "'basis': unknown basis 'zodiac'"),
    ("wrong answers", _cf_mutate("answer_tokens", " approve| deny"), CF2 + r"'answer_tokens': ' approve\| deny'"),
    ("one answer", _cf_mutate("answer_tokens", " approved"), CF2 + "'answer_tokens': ' approved'"),
    ("unknown profile", _cf_mutate("profile", "medium"), CF2 + "'profile': unknown 'medium'"),
    ("empty value", _cf_mutate("value_b", ""), CF2 + "'value_b': empty"),
    ("prompt_a == prompt_b", _cf_same_prompts, CF2 + "'prompt_b': identical to 'prompt_a'"),
    (
        "value absent",
        _cf_mutate("value_a", "a Martian applicant"),
        CF2 + "'value_a': 'a Martian applicant' occurs 0 times",
    ),
    (
        "duplicate id",
        _cf_duplicate_id,
        r"line 3 \(cf_id='cf-0001'\), field 'cf_id': duplicate id, first used on line 2",
    ),
]


@pytest.mark.parametrize(
    "mutate,message", [r[1:] for r in COUNTERFACTUAL_RULES], ids=[r[0] for r in COUNTERFACTUAL_RULES]
)
def test_counterfactual_validation_rule(tmp_path, mutate, message):
    header, rows = _rows(COUNTERFACTUAL_CSV)
    path = _write(tmp_path, *mutate(header, rows))
    with pytest.raises(TaskDataError, match=r"tasks\.csv " + message):
        load_counterfactual_pairs(path)


# ---------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------


def test_gpt2_alignment_counts_tokens_with_bos(fl_pairs, gpt2_tokenizer):
    report = align_pairs(gpt2_tokenizer, fl_pairs, prepend_bos=True)
    expected_kept = [p for p in fl_pairs if len(set(len(_ids(gpt2_tokenizer, t)) for t in p.texts)) == 1]
    assert report.kept == expected_kept
    assert len(report.kept) + len(report.excluded) == len(fl_pairs)
    for p in report.kept:
        assert report.lengths[p.id] == len(_ids(gpt2_tokenizer, p.clean_prompt)) + 1
    assert report.answer_ids == {" Yes": _ids(gpt2_tokenizer, " Yes")[0], " No": _ids(gpt2_tokenizer, " No")[0]}


def test_smollm2_model_alignment_matches_its_bare_tokenizer_without_bos(fl_pairs, cf_pairs, smollm2, smollm2_tokenizer):
    assert smollm2.prepend_bos is False
    for pairs in (fl_pairs, cf_pairs):
        via_model = align_pairs(smollm2, pairs)
        via_tokenizer = align_pairs(smollm2_tokenizer, pairs, prepend_bos=False)
        assert via_model.prepend_bos is False
        assert via_model.lengths == via_tokenizer.lengths
        assert [p.id for p in via_model.kept] == [p.id for p in via_tokenizer.kept]
        for p in via_model.kept[:20]:
            assert via_model.lengths[p.id] == len(_ids(smollm2_tokenizer, p.texts[0]))


def test_unequal_pairs_are_excluded_and_reported_never_dropped(fl_pairs, gpt2_tokenizer):
    sample = fl_pairs[:10]
    stretched = {sample[3].pair_id, sample[7].pair_id}

    def stretch(p):
        longer = p.legitimate_phrase + " and an unpaid tax lien"
        corrupted = p.clean_prompt.replace(p.protected_phrase, longer)
        return dataclasses.replace(p, corrupted_prompt=corrupted, legitimate_phrase=longer)

    pairs = [stretch(p) if p.pair_id in stretched else p for p in sample]
    report = align_pairs(gpt2_tokenizer, pairs, prepend_bos=True)
    assert {e.pair.pair_id for e in report.excluded} == stretched
    assert [p.pair_id for p in report.kept] == [p.pair_id for p in sample if p.pair_id not in stretched]
    for e in report.excluded:
        n_clean, n_corrupted = (len(_ids(gpt2_tokenizer, t)) + 1 for t in e.pair.texts)
        assert e.reason == "unequal_token_length"
        assert e.detail == f"{n_clean} vs {n_corrupted} tokens"
        assert n_clean != n_corrupted
    table = report.summary()
    bases = Counter(p.basis for p in pairs)
    for basis, n in bases.items():
        lost = sum(p.basis == basis for p in pairs if p.pair_id in stretched)
        assert table.loc[basis, "total"] == n
        assert table.loc[basis, "kept"] == n - lost
        assert table.loc[basis, "unequal_token_length"] == lost
    assert table.loc["all"].tolist() == [10, 8, 2]
    assert all(i in str(report) for i in stretched)


def test_multi_token_answer_is_an_error_naming_it(fl_pairs, gpt2_tokenizer):
    bad = dataclasses.replace(fl_pairs[1], clean_answer=" Yesss")
    n = len(_ids(gpt2_tokenizer, " Yesss"))
    assert n > 1
    with pytest.raises(TaskDataError, match=rf"answer ' Yesss' \(pair fl-0002\) is {n} tokens"):
        align_pairs(gpt2_tokenizer, [fl_pairs[0], bad], prepend_bos=True)


def test_alignment_refuses_guesses_and_mixtures(fl_pairs, cf_pairs, gpt2_tokenizer, smollm2):
    with pytest.raises(ValueError, match="prepend_bos"):
        align_pairs(gpt2_tokenizer, fl_pairs)
    with pytest.raises(ValueError, match="contradicts"):
        align_pairs(smollm2, fl_pairs, prepend_bos=True)
    with pytest.raises(TypeError, match="mix kinds"):
        align_pairs(gpt2_tokenizer, [fl_pairs[0], cf_pairs[0]], prepend_bos=True)
    with pytest.raises(TaskDataError, match="fl-0001"):
        align_pairs(gpt2_tokenizer, [fl_pairs[0], fl_pairs[0]], prepend_bos=True)


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


def test_gpt2_batches_hold_every_kept_pair_once_with_exact_tokens(fl_pairs, gpt2_tokenizer):
    report = align_pairs(gpt2_tokenizer, fl_pairs, prepend_bos=True)
    batches = make_batches(gpt2_tokenizer, report, max_batch=16, prepend_bos=True)
    assert sorted(i for b in batches for i in b.ids) == sorted(p.id for p in report.kept)
    assert [b.seq_len for b in batches] == sorted(b.seq_len for b in batches)
    yes, no = _ids(gpt2_tokenizer, " Yes")[0], _ids(gpt2_tokenizer, " No")[0]
    for b in batches:
        assert 1 <= b.batch_size <= 16
        assert b.clean_tokens.shape == b.corrupted_tokens.shape == (b.batch_size, b.seq_len)
        assert b.answer_tokens.tolist() == [[yes, no]] * b.batch_size
        for row, p in enumerate(b.pairs):
            assert b.clean_tokens[row].tolist() == [GPT2_BOS] + _ids(gpt2_tokenizer, p.clean_prompt)
            assert b.corrupted_tokens[row].tolist() == [GPT2_BOS] + _ids(gpt2_tokenizer, p.corrupted_prompt)
        assert "".join(b.str_tokens) == "<|endoftext|>" + b.pairs[0].clean_prompt
        # the positions where clean and corrupted differ all lie inside the swapped phrase
        positions = b.differing_positions()
        text, phrase = "".join(b.str_tokens), b.pairs[0].protected_phrase
        phrase_start = text.index(phrase)
        first_char = len("".join(b.str_tokens[: positions[0]]))
        last_char = len("".join(b.str_tokens[: positions[-1] + 1]))
        assert phrase_start - 1 <= first_char and last_char <= phrase_start + len(phrase)


def test_batches_from_raw_pairs_require_every_pair_to_align(fl_pairs, gpt2_tokenizer, smollm2_tokenizer):
    longer = "because of a long list of unpaid debts"
    corrupted = fl_pairs[0].clean_prompt.replace(fl_pairs[0].protected_phrase, longer)
    first = dataclasses.replace(fl_pairs[0], legitimate_phrase=longer, corrupted_prompt=corrupted)
    with pytest.raises(TaskDataError, match=r"1 pair\(s\) cannot be batched .*fl-0001 line 2"):
        make_batches(gpt2_tokenizer, [first, *fl_pairs[1:5]], prepend_bos=True)
    ok = make_batches(gpt2_tokenizer, fl_pairs[1:5], prepend_bos=True)
    assert sum(b.batch_size for b in ok) == 4
    report = align_pairs(gpt2_tokenizer, fl_pairs[1:5], prepend_bos=True)
    assert isinstance(report, AlignmentReport)
    with pytest.raises(ValueError, match="was made for"):
        make_batches(smollm2_tokenizer, report, prepend_bos=False)
    with pytest.raises(ValueError, match="max_batch"):
        make_batches(gpt2_tokenizer, report, max_batch=0, prepend_bos=True)


def test_largest_template_batch_is_the_biggest_same_template_same_length_group(fl_pairs, smollm2, smollm2_tokenizer):
    report = align_pairs(smollm2, fl_pairs)
    groups = Counter((p.template_id, len(_ids(smollm2_tokenizer, p.clean_prompt))) for p in report.kept)
    biggest = max(groups.values())
    batch = largest_template_batch(smollm2, report)
    assert batch.batch_size == biggest
    (template,) = batch.template_ids
    assert groups[(template, batch.seq_len)] == biggest
    assert all(groups[key] < biggest or key[0] >= template for key in groups)  # ties go to the smaller id
    # same template and length: the text before the phrase and the question after it line up position by position
    start = min(batch.differing_positions(row)[0] for row in range(batch.batch_size))
    assert (batch.clean_tokens[:, :start] == batch.clean_tokens[0, :start]).all()
    first = batch.pairs[0]
    after_phrase = first.clean_prompt[first.clean_prompt.index(first.protected_phrase) + len(first.protected_phrase) :]
    question = len(_ids(smollm2_tokenizer, after_phrase))  # ". Question: ... Answer:"
    assert question >= 5
    assert (batch.clean_tokens[:, -question:] == batch.clean_tokens[0, -question:]).all()
    assert batch.clean_tokens.device == torch.device(smollm2.cfg.device)
    assert largest_template_batch(smollm2, report, max_batch=3).ids == batch.ids[:3]


def test_counterfactual_batches_score_approved_against_denied(cf_pairs, smollm2, smollm2_tokenizer):
    batches = make_batches(smollm2, align_pairs(smollm2, cf_pairs), max_batch=32)
    assert sum(b.batch_size for b in batches) == len(cf_pairs)
    approved, denied = (_ids(smollm2_tokenizer, a) for a in COUNTERFACTUAL_ANSWERS)
    assert len(approved) == len(denied) == 1
    for b in batches:
        assert b.answer_tokens.tolist() == [[approved[0], denied[0]]] * b.batch_size
        assert b.tokens_a is b.clean_tokens and b.tokens_b is b.corrupted_tokens
        for row, p in enumerate(b.pairs):
            assert b.tokens_b[row].tolist() == _ids(smollm2_tokenizer, p.prompt_b)


def test_task_batch_head_keeps_the_first_pairs(smollm2_tokenizer):
    report = align_pairs(smollm2_tokenizer, load_fair_lending_pairs(), prepend_bos=False)
    batch = make_batches(smollm2_tokenizer, report, max_batch=6, prepend_bos=False)[0]
    first = batch.head(2)
    assert first.batch_size == 2 and first.ids == batch.ids[:2]
    assert torch.equal(first.clean_tokens, batch.clean_tokens[:2]) and torch.equal(
        first.answer_tokens, batch.answer_tokens[:2]
    )
    assert batch.head(100).batch_size == batch.batch_size
    with pytest.raises(ValueError, match="positive integer"):
        batch.head(0)


# --- Bad input, as a new user makes it: every problem named, nothing lost --------------------------------------


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + FAIR_LENDING_CSV.read_bytes())
    assert load_fair_lending_pairs(path) == load_fair_lending_pairs()


def test_a_byte_that_is_not_utf8_is_named_with_file_line_and_row(tmp_path):
    lines = FAIR_LENDING_CSV.read_bytes().split(b"\n")
    lines[5] = lines[5].replace(b"because", b"b\xe9cause", 1)  # a Latin-1 e-acute in row fl-0005
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(
        TaskDataError,
        match=r"latin1\.csv line 6 \(pair_id='fl-0005'\): byte 0xe9 at character \d+ "
        r"is not UTF-8",
    ):
        load_fair_lending_pairs(path)


def test_every_bad_row_is_reported_at_once_in_file_order(tmp_path):
    header, rows = _rows(FAIR_LENDING_CSV, n=6)
    _set(header, rows[1], "basis", "height")  # line 3: semantic
    rows[3] = rows[3][:-1]  # line 5: structural (a value short)
    _set(header, rows[4], "clean_answer", " Maybe")  # line 6: semantic
    with pytest.raises(TaskDataError) as error:
        load_fair_lending_pairs(_write(tmp_path, header, rows))
    message = str(error.value)
    assert message.startswith("3 bad rows in tasks.csv")
    assert message.index("line 3") < message.index("line 5") < message.index("line 6")


def test_a_prompt_longer_than_the_context_is_refused_before_any_forward(smollm2_tokenizer):
    from types import SimpleNamespace

    from mechfin_utils.core.models import SMOLLM2_SPEC

    def token_ids(text):
        return list(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"])

    tiny_context = SimpleNamespace(
        spec=SMOLLM2_SPEC,
        name="tiny-context model",
        prepend_bos=False,
        tokenizer=smollm2_tokenizer,
        token_ids=token_ids,
        cfg=SimpleNamespace(device="cpu", n_ctx=26),
    )
    pairs = load_fair_lending_pairs()[:6]
    too_long = [p for p in pairs if max(len(token_ids(t)) for t in p.texts) > 26]
    assert too_long and len(too_long) < len(pairs)
    with pytest.raises(
        TaskDataError,
        match=rf"{len(too_long)} pair\(s\) exceed tiny-context model's context of 26 "
        rf"tokens, refused before any forward pass: {too_long[0].id} \(line ",
    ):
        align_pairs(tiny_context, pairs)
