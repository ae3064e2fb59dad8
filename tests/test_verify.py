"""``make verify``: numbers agree within a tolerance, labels exactly, sentences number by number; a model whose weights
differ from the committed run's is named first and its dependents are compared with the looser tolerance."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mechfin_utils.reporting import figures
from mechfin_utils.tooling import verify

SENTENCE = "the gap is reliably positive: mean gap 9.21 (95% CI [8.81, 9.57], n=264 pairs); d = 4.17"


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------


def test_a_sentence_whose_numbers_are_roundings_of_the_same_values_agrees():
    rounded_otherwise = SENTENCE.replace("8.81", "8.82").replace("4.17", "4.16")
    assert verify.compare_values({"why": SENTENCE}, {"why": rounded_otherwise}) == []
    assert verify.compare_values("CI [4.01, 10.5]", "CI [4.01, 10.46]") == []  # the coarser digit: 10.5 is 0.1 wide
    assert verify.compare_values("a lr of 3e-05 here", "a lr of 3.00001e-05 here") == []  # within the tolerance


@pytest.mark.parametrize(
    "fresh",
    [
        SENTENCE.replace("8.81", "8.84"),  # three units of the last digit: a real change
        SENTENCE.replace("n=264", "n=265"),  # an integer is a count: within the tolerance only
        SENTENCE.replace("reliably positive", "positive"),  # the words changed
        SENTENCE.replace("; d = 4.17", ""),  # a number fewer
        SENTENCE.replace("95%", "90%"),
    ],
)
def test_a_sentence_that_really_moved_is_reported_with_both_versions(fresh):
    assert verify.compare_values({"why": SENTENCE}, {"why": fresh}) == [("/why", SENTENCE, fresh)]


@pytest.mark.parametrize(
    ("committed", "fresh"),
    [
        ("26.5", "26.6"),  # head 26.5 and head 26.6 are two heads, not two roundings of one number
        ("L10H7", "L10H8"),
        ("tau=0.02", "tau=0.03"),
        ("fl-0003", "fl-0004"),
        ("head L10H7 leads", "head L10H8 leads"),  # an identifier inside a sentence is text
        ("pair fl-0157", "pair fl-0158"),
    ],
)
def test_labels_and_identifiers_must_be_equal_exactly(committed, fresh):
    assert verify.compare_values(committed, fresh) == [("/", committed, fresh)]
    assert verify.compare_values(committed, committed) == []


def test_numbers_lists_dicts_and_nan_compare_as_before():
    assert verify.compare_values(0.5, 0.50001) == []
    assert verify.compare_values(0.5, 0.5002) == [("", 0.5, 0.5002)]
    assert verify.compare_values(1000.0, 1000.05) == []  # relative above 1
    assert verify.compare_values(float("nan"), float("nan")) == []
    assert len(verify.compare_values(float("nan"), 1.0)) == 1
    assert verify.compare_values(True, False) == [("/", True, False)]  # flags exactly
    assert verify.compare_values([1, 2], [1, 2, 3]) == [(" (length)", 2, 3)]
    assert verify.compare_values({"a": [1.0, {"b": 2.0}]}, {"a": [1.0, {"b": 2.1}]}) == [("/a[1]/b", 2.0, 2.1)]
    assert verify.compare_values({"a": 1, "seconds_total": 5.0}, {"b": 1, "seconds_total": 9.0}) == [
        ("/a", 1, "(missing)"),
        ("/b", "(missing)", 1),
    ]


def test_split_numbers_keeps_numbers_inside_words_as_text():
    assert verify.split_numbers("L10H7 at 0.5, smollm2-135m n=3.") == (
        ["L10H7 at ", ", smollm2-135m n=", "."],
        ["0.5", "3"],
    )


def test_the_largest_relative_change_is_found_in_numbers_and_in_sentences():
    numbers: list = []
    committed = {"x": 2.0, "why": "gap 8.81 here", "tiny": 1e-8}
    fresh = {"x": 2.00001, "why": "gap 8.82 here", "tiny": 5e-8}  # float noise on a tiny value: absolute, not 400%
    assert verify.compare_values(committed, fresh, numbers=numbers) == []
    change, path, a, b = verify.largest_change(numbers)
    assert path == "/why" and (a, b) == (8.81, 8.82) and change == pytest.approx(0.01 / 8.81)
    assert verify.largest_change([]) is None


# ---------------------------------------------------------------------------------------------------------
# Runs: weights that differ, and which files depend on them
# ---------------------------------------------------------------------------------------------------------


def _write(root, relative, content):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _runs(tmp_path, fresh_screener_sha: str):
    """A committed and a fresh run of a base model and its screener; every number moved by 1% in the fresh run."""
    committed, fresh = tmp_path / "committed", tmp_path / "fresh"
    for root, value, sha in ((committed, 1.0, "45ac85ed" + "0" * 56), (fresh, 1.01, fresh_screener_sha)):
        _write(root, "smollm2-135m/manifest.json", {"weights_sha256": "a6" * 32})
        _write(root, "smollm2-135m-screener/manifest.json", {"weights_sha256": sha})
        _write(root, "smollm2-135m-screener/01_results.json", {"results": {"dla": value}})  # the screener's own
        # the base model's notebook 10 loaded the screener too (the fresh file says so; the committed one predates it)
        loaded = {"models_loaded": ["smollm2-135m", "smollm2-135m-screener"]} if root == fresh else {}
        _write(root, "smollm2-135m/10_results.json", {"results": {"edges": value}, **loaded})
        _write(root, "smollm2-135m/00_results.json", {"results": {"gap": value}})  # the base model alone
        _write(root, ".staging/00_results.json", {"results": {"gap": value * 7}})  # a hidden folder: never compared
    return committed, fresh


def test_files_that_depend_on_a_retrained_model_get_the_looser_tolerance(tmp_path, monkeypatch, capsys):
    committed, fresh = _runs(tmp_path, "96df178a" + "1" * 56)
    report = verify.verify_runs(committed, fresh)
    assert [(c.slug, c.committed[:8], c.fresh[:8]) for c in report.weights] == [
        ("smollm2-135m-screener", "45ac85ed", "96df178a")
    ]
    tolerances = {f.file: (f.tolerance, f.retrained) for f in report.files}
    assert tolerances == {  # .staging is never compared
        "smollm2-135m-screener/01_results.json": (verify.RETRAINED_TOLERANCE, ["smollm2-135m-screener"]),
        "smollm2-135m/10_results.json": (verify.RETRAINED_TOLERANCE, ["smollm2-135m-screener"]),
        "smollm2-135m/00_results.json": (verify.TOLERANCE, []),
    }
    assert [(m.file, m.path) for m in report.moved] == [("smollm2-135m/00_results.json", "/gap")]
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(committed))
    assert verify.main(["--fresh", str(fresh)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (  # first: it changes what every comparison below means
        "smollm2-135m-screener: weights differ from the committed run's (sha256 96df178a\u2026 now, 45ac85ed\u2026 "
        "committed): a fine-tuned model trained on another CPU or thread count; its dependents are compared with tolerance "
        f"{verify.RETRAINED_TOLERANCE:g} (relative above 1, absolute below)"
    )
    assert "  smollm2-135m/00_results.json: largest change 0.01 at /gap (1.0 -> 1.01)" in lines
    assert any(line.startswith("  smollm2-135m/10_results.json [tolerance 0.05: depends on smollm2-") for line in lines)
    assert "  MOVED smollm2-135m/00_results.json: /gap: committed 1.0, now 1.01" in lines
    assert lines[-1] == "1 value(s) moved"


def test_the_same_weights_keep_the_strict_tolerance_everywhere(tmp_path, monkeypatch, capsys):
    committed, fresh = _runs(tmp_path, "45ac85ed" + "0" * 56)
    report = verify.verify_runs(committed, fresh)
    assert report.weights == [] and len(report.moved) == 3 and report.compared == 3
    for root in (committed, fresh):  # now nothing moved: each file still reports its largest change
        for path in root.glob("*/*_results.json"):
            stored = json.loads(path.read_text())
            stored["results"] = {k: 1.0 for k in stored["results"]}
            path.write_text(json.dumps(stored))
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(committed))
    assert verify.main(["--fresh", str(fresh)]) == 0
    out = capsys.readouterr().out
    assert "weights differ" not in out and out.splitlines()[-1] == "everything agrees"
    assert "  smollm2-135m/00_results.json: largest change 0 at /gap (1.0 -> 1.0)" in out


# ---------------------------------------------------------------------------------------------------------
# Results files name the models their notebook loaded
# ---------------------------------------------------------------------------------------------------------


def test_results_files_name_every_model_their_process_loaded(tmp_path, monkeypatch):
    from mechfin_utils.core import models

    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_models_loaded", set())
    stand_in = lambda name: models.LoadedModel(bridge=None, spec=models.ModelSpec(name, name, False), source="test")  # noqa: E731
    monkeypatch.setattr(models, "load_smollm2", lambda verbose=True: stand_in("smollm2-135m"))
    monkeypatch.setattr(
        "mechfin_utils.screener.training.load_screener", lambda *a, **k: stand_in("smollm2-135m-screener")
    )
    screener = models.load_model("smollm2-135m-screener", verbose=False)
    path = figures.save_results(screener, "08", "a", 1.0)
    assert json.loads(path.read_text())["models_loaded"] == ["smollm2-135m-screener"]
    models.load_model("smollm2-135m", verbose=False)  # notebook 08 loads the base model after its screener
    figures.save_results(screener, "08", "b", 2.0)
    stored = json.loads(path.read_text())
    assert stored["models_loaded"] == ["smollm2-135m", "smollm2-135m-screener"]
    assert figures.load_results(screener, "08") == {"a": 1.0, "b": 2.0}  # the key is not a result
    # a stand-in that load_model never loaded (tests) writes no such key
    other = SimpleNamespace(name="Other", slug="other")
    assert "models_loaded" not in json.loads(figures.save_results(other, "00", "a", 1).read_text())
