"""reporting.notebook: a comparing notebook's parameters turned into the base model's and the screener's names."""

from __future__ import annotations

import pytest

from mechfin_utils.core.models import resolve_auto
from mechfin_utils.reporting.notebook import resolve_base_and_screener


@pytest.mark.parametrize(
    ("model", "screener", "fast", "expected"),
    [
        ("smollm2-135m", "", False, ("smollm2-135m", "smollm2-135m-screener")),
        ("smollm2-135m", "", True, ("smollm2-135m", "smollm2-135m-screener-brief")),
        ("gpt2", "gpt2-screener-shortcut", True, ("gpt2", "gpt2-screener-shortcut")),
        # a screener as the model: compared with its own base model
        ("smollm2-135m-screener-shortcut", "", False, ("smollm2-135m", "smollm2-135m-screener-shortcut")),
        ("gpt2-screener-brief", "", False, ("gpt2", "gpt2-screener-brief")),
        ("smollm2-135m-screener", "smollm2-135m-screener-lora", True, ("smollm2-135m", "smollm2-135m-screener-lora")),
    ],
)
def test_base_and_screener_from_the_parameters(model, screener, fast, expected):
    assert resolve_base_and_screener(model, screener, fast=fast) == expected


def test_auto_is_the_model_load_model_picks():
    base = resolve_auto(None)[0]
    assert resolve_base_and_screener("auto", "", fast=False, gpt2_path="") == (base, f"{base}-screener")


def test_the_notebooks_environment_is_read_word_by_word_and_bad_words_are_all_named():
    from mechfin_utils.tooling.testing import notebook_environment

    assert notebook_environment("MECHFIN_FAST=1 MECHFIN_FIGURES_DIR=/tmp/a=b") == {
        "MECHFIN_FAST": "1",
        "MECHFIN_FIGURES_DIR": "/tmp/a=b",  # split at the first "=" only
    }
    assert notebook_environment("") == {}
    with pytest.raises(ValueError, match=r"not so: word 1 'FAST', word 3 '=1'"):
        notebook_environment("FAST MECHFIN_FAST=1 =1")


def test_a_unit_test_never_sees_the_notebooks_environment():
    """``make test`` runs the unit tests beside the notebooks; what it gives the notebooks' kernels (fast mode,
    scratch folders for figures and executed copies) must not reach a unit test, which would then write there."""
    import os

    from mechfin_utils.tooling.testing import notebook_environment

    # (in `make test` the notebooks are handed out first, so a worker runs this after a notebook's kernel started)
    for name in notebook_environment():
        assert name not in os.environ, f"{name} leaked from the notebooks' environment into a unit test"
