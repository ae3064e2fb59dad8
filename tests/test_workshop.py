"""Workshop exercises: the copies are the notebooks minus their solutions (and nothing else), they are up to date, the
checker fails a missing or wrong answer with a hint, and the notebooks' DLA solutions match mechfin on both model
families (the LayerNorm path included, which the notebook run on the embedded model does not take)."""

from __future__ import annotations

import nbformat
import pytest
import torch

from mechfin_utils.methods.readout import dla
from mechfin_utils.tooling import workshop


def test_exercise_copies_are_the_notebooks_without_their_solutions():
    sources = workshop.exercise_sources()
    assert [p.name[:2] for p in sources] == ["02", "03", "04", "05"]
    for path in sources:
        source = nbformat.read(path, as_version=4)
        exercise = workshop.make_exercise_notebook(source, path.name)
        code = "\n".join(cell.source for cell in exercise.cells)
        assert workshop.BEGIN not in code and workshop.STUB in code
        assert nbformat.writes(workshop.fill_solutions(exercise, source)) == nbformat.writes(source), path.name


def test_committed_workshop_copies_are_up_to_date():
    assert workshop.main(["--check"]) == 0


def test_unbalanced_solution_markers_are_refused_with_their_line():
    with pytest.raises(ValueError, match="cell 3, line 2: # END SOLUTION without"):
        workshop.strip_solution("def f():\n    # END SOLUTION\n", "nb, cell 3")
    with pytest.raises(ValueError, match="never closed"):
        workshop.strip_solution("def f():\n    # BEGIN SOLUTION\n    return 1\n", "nb")


def test_check_passes_a_right_answer_and_explains_a_missing_or_wrong_one(capsys):
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    workshop.check(lambda: expected + 1e-6, expected)
    assert "matches mechfin" in capsys.readouterr().out

    def stub():
        raise NotImplementedError("Your code here")

    with pytest.raises(AssertionError, match="stub is not written yet"):
        workshop.check(stub, expected)
    with pytest.raises(
        AssertionError, match=r"largest difference is at index \(1, 0\): yours 9, mechfin's 3. Hint: look"
    ):
        workshop.check(lambda: torch.tensor([[1.0, 2.0], [9.0, 4.0]]), expected, hint="look")
    with pytest.raises(AssertionError, match="shape"):
        workshop.check(lambda: expected[0], expected)
    with pytest.raises(AssertionError, match="returned"):
        workshop.check(lambda: ["L1H0"], ["L1H1"])


def _solution(number: str, name: str):
    """The function a notebook's exercise cell defines, solution included."""
    path = next(p for p in workshop.exercise_sources() if p.name.startswith(number))
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "exercise" in c.metadata.get("tags", []))
    namespace = {"torch": torch}
    exec(cell.source, namespace)  # noqa: S102 (the notebook's own cell)
    return namespace[name]


@pytest.mark.parametrize("model_name", ["smollm2", "gpt2_random"])
def test_the_notebooks_dla_solutions_match_mechfin(request, model_name):
    model = request.getfixturevalue(model_name)
    tokens = torch.tensor([model.token_ids("The bank denied the loan because of her race. Answer:")] * 2)
    answers = torch.tensor([[model.token_ids(" Yes")[-1], model.token_ids(" No")[-1]]] * 2)
    inputs = workshop.dla_inputs(model, tokens, answers)
    labels, values = dla.layer_decomposition(model, tokens, answers)
    assert labels[:-1] == inputs["labels"]
    args = (inputs["final_resid"], inputs["norm_weight"], inputs["eps"], inputs["direction"], inputs["norm"])
    workshop.check(_solution("02", "direct_logit_attribution"), values[:, :-1], inputs["components"], *args)
    heads = dla.head_attribution(model, tokens, answers).heads
    workshop.check(_solution("03", "head_contributions"), heads, inputs["z"], inputs["W_O"], *args)
