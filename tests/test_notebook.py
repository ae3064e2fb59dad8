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
