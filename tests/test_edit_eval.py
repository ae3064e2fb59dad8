"""CounterFact-style evaluation: the edit file's validation, the scores on a known case, knowledge-circuit helpers."""

from __future__ import annotations

import csv

import pandas as pd
import pytest
import torch

from mechfin_utils.core import hook_points
from mechfin_utils.methods.circuits import knowledge as knowledge_circuits
from mechfin_utils.methods.circuits.nodes import Node
from mechfin_utils.methods.circuits.pruning import Circuit
from mechfin_utils.methods.editing import evaluation as edit_eval
from mechfin_utils.tasks import counterfact
from mechfin_utils.tasks.task_tables import TaskDataError


def test_the_shipped_file_loads_and_matches_its_builder(tmp_path):
    edits = counterfact.load_counterfact()
    assert len(edits) == 79
    france = next(e for e in edits if e.request.edit_id == "edit-capital-france")
    assert (france.request.target_true, france.request.target_new) == (" Paris", " Berlin")
    assert france.paraphrases == ("The capital city of France is", "France's capital is")
    assert france.neighbours[0] == ("The capital of Italy is", " Rome")
    assert all(e.request.target_new != e.request.target_true for e in edits)


def _write(path, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=counterfact.COUNTERFACT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def test_every_bad_row_is_reported_with_its_line(tmp_path):
    good = next(
        r for r in csv.DictReader(counterfact.COUNTERFACT_CSV.open(encoding="utf-8")) if r["edit_id"].endswith("france")
    )
    rows = [
        good,
        {**good, "edit_id": "e2", "subject": "Spain"},
        {**good, "edit_id": "e3", "target_new": "Berlin"},
        {**good, "edit_id": "e4", "neighbours": "capital-atlantis"},
        {**good, "edit_id": "e5", "target_new": " Paris"},
    ]
    path = tmp_path / "edits.csv"
    _write(path, rows)
    with pytest.raises(TaskDataError) as error:
        counterfact.load_counterfact(path)
    message = str(error.value)
    assert message.startswith("4 bad rows in edits.csv")
    for line, text in [
        (3, "'Spain' is not in the prompt"),
        (4, "'target_new': 'Berlin' must start with a space"),
        (5, "['capital-atlantis'] are not fact ids"),
        (6, "equals target_true ' Paris'"),
    ]:
        assert f"edits.csv line {line} " in message and text in message
    assert message.index("line 3") < message.index("line 4") < message.index("line 5") < message.index("line 6")


def test_evaluate_edit_scores_the_unedited_model_against_a_by_hand_computation(smollm2):
    france = next(e for e in counterfact.load_counterfact() if e.request.edit_id == "edit-capital-france")
    row = edit_eval.evaluate_edit(smollm2, france, n_generated=8)

    def by_hand(prompt: str, first: str, second: str) -> bool:
        with torch.no_grad():
            logits = smollm2.hf_model(input_ids=torch.tensor([smollm2.token_ids(prompt)])).logits[0, -1]
        return bool(logits[smollm2.single_token_id(first)] > logits[smollm2.single_token_id(second)])

    assert row["efficacy"] == float(by_hand(france.request.prompt, " Berlin", " Paris")) == 0.0
    expected_general = sum(by_hand(p, " Berlin", " Paris") for p in france.paraphrases) / len(france.paraphrases)
    assert row["generalisation"] == pytest.approx(expected_general)
    expected_specific = sum(by_hand(p, a, " Berlin") for p, a in france.neighbours) / len(france.neighbours)
    assert row["specificity"] == pytest.approx(expected_specific)
    assert 0 < row["p_true"] <= 1 and row["p_new"] < row["p_true"]


def test_summarise_gives_means_with_intervals_per_method():
    results = pd.DataFrame(
        {
            "method": ["A"] * 4 + ["B"] * 4,
            "efficacy": [1, 1, 1, 1, 0, 1, 0, 1],
            "generalisation": [1, 0.5, 1, 0.5, 0, 0, 0, 0],
            "specificity": [1] * 8,
            "fluency": [5.0, 5.0, 5.0, 5.0, 1.0, 2.0, 3.0, 4.0],
        }
    )
    table = edit_eval.summarise(results, n_boot=200)
    assert table.loc["A", "efficacy"] == 1.0 and table.loc["B", "efficacy"] == 0.5
    assert table.loc["A", "generalisation"] == 0.75 and table.loc["B", "fluency"] == 2.5
    assert table.loc["B", "fluency_low"] < 2.5 < table.loc["B", "fluency_high"]
    assert table.loc["A", "n"] == 4
    one = edit_eval.summarise(pd.concat([results, results.head(1).assign(method="C")]), n_boot=200)
    assert one.loc["C", "efficacy"] == 1.0 and one.loc["C", "n"] == 1 and pd.isna(one.loc["C", "efficacy_low"])


def test_fact_task_refuses_prompts_of_different_lengths_and_equal_answers(smollm2):
    with pytest.raises(ValueError, match="needs prompts of one length"):
        knowledge_circuits.fact_task(
            smollm2, "x", ("The capital of France is", " Paris"), ("The capital of the Czech Republic is", " Prague")
        )
    with pytest.raises(ValueError, match="same token"):
        knowledge_circuits.fact_task(
            smollm2, "x", ("The capital of France is", " Paris"), ("The capital of Spain is", " Paris")
        )
    task = knowledge_circuits.fact_task(
        smollm2, "x", ("The capital of France is", " Paris"), ("The capital of Spain is", " Madrid")
    )
    assert task.n_prompts == 1


def test_circuit_change_counts_nodes_on_a_hand_built_pair():
    def circuit(nodes):
        return Circuit("m", "t", "metric", "resample", 0.02, "abs", 2, 2, nodes, [], {}, 1.0, 0.0, 0.9, 0.9)

    before = circuit([Node(0, 1), Node(1), Node(1, 0)])
    after = circuit([Node(1), Node(1, 0), Node(1, 1)])
    change = knowledge_circuits.circuit_change(before, after)
    assert change["kept_in_both"] == ["L1H0", "MLP1"]
    assert change["only_before"] == ["L0H1"] and change["only_after"] == ["L1H1"]
    assert change["jaccard"] == pytest.approx(2 / 4)


def test_with_demonstrations_prefixes_the_examples():
    text = knowledge_circuits.with_demonstrations("The capital of France is", [("The capital of Spain is", " Madrid")])
    assert text == "The capital of Spain is Madrid. The capital of France is"


def test_next_token_logits_is_the_last_position(smollm2):
    logits = hook_points.next_token_logits(smollm2, "The capital of France is")
    assert smollm2.tokenizer.decode([int(logits.argmax())]) == " Paris"


def test_the_builder_rebuilds_the_committed_file():
    """``data/build_counterfact.py`` on ``factual_prompts.csv`` gives the committed rows, in order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_counterfact", counterfact.COUNTERFACT_CSV.with_name("build_counterfact.py")
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    with builder.FACTS.open(newline="", encoding="utf-8") as handle:
        rebuilt, dropped = builder.build(list(csv.DictReader(handle)))
    with counterfact.COUNTERFACT_CSV.open(newline="", encoding="utf-8") as handle:
        committed = list(csv.DictReader(handle))
    assert rebuilt == committed
    assert any(line.startswith("author") for line in dropped)
