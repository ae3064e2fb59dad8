"""Behavioural evaluation: metrics against hand-computed answers, scoring against a by-hand HF computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechfin_utils.screener.behaviour import (
    BridgeScorer,
    HFScorer,
    PromptTooLongError,
    calibration_curve,
    controls_by_kind,
    evaluate_controls,
    evaluate_pairs,
    expected_calibration_error,
)
from mechfin_utils.tasks.fair_lending import FairLendingPair
from mechfin_utils.tasks.screener_sets import ControlPrompt
from mechfin_utils.tooling.testing import rounding_tolerance


class TableScorer:
    """A scorer that looks prompts up in a table: the metrics can then be checked by hand."""

    name = "table"

    def __init__(self, table: dict[str, float], n_ctx: int = 100):
        self.table, self.n_ctx = table, n_ctx

    def token_count(self, prompt: str) -> int:
        return len(prompt.split())

    def logit_diffs(self, prompts):
        return np.array([self.table[p] for p in prompts])


def _pair(i: int, basis: str, clean: str, corrupted: str) -> FairLendingPair:
    return FairLendingPair(
        f"p{i}", basis, "ECOA", "T1", "mortgage", clean, corrupted, " Yes", " No", "a", "b", "credit_score"
    )


def test_pair_metrics_match_a_hand_computation():
    table = {"c1": 2.0, "k1": -1.0, "c2": 0.5, "k2": 1.0, "c3": -0.5, "k3": -2.0, "c4": 3.0, "k4": 0.2}
    pairs = [_pair(i, "race" if i <= 3 else "age", f"c{i}", f"k{i}") for i in (1, 2, 3, 4)]
    result = evaluate_pairs(TableScorer(table), pairs, n_boot=200)
    s = result.summary
    # prompts answered Yes when LD > 0: clean right: c1 c2 c4 (3/4); corrupted right: k1 k3 (2/4)
    assert s["accuracy"] == pytest.approx(5 / 8)
    # AUROC: pairs (clean_i > corrupted_j) over 16: c1>k1,k3,k4 (and k2? 2>1 yes) -> 4; c2(0.5)>k1,k3,k4 -> 3;
    # c3(-0.5)>k1,k3 -> 2; c4(3)> all 4 -> 4; total 13
    assert s["auroc"] == pytest.approx(13 / 16)
    assert s["mean_gap"] == pytest.approx(np.mean([3.0, -0.5, 1.5, 2.8]))
    p = 1 / (1 + np.exp(-np.array([2.0, 0.5, -0.5, 3.0, -1.0, 1.0, -2.0, 0.2])))
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    assert s["brier"] == pytest.approx(np.mean((p - truth) ** 2))
    assert s["mean_gap_low"] <= s["mean_gap"] <= s["mean_gap_high"]
    assert list(result.by_basis.index) == ["age", "race"] and result.by_basis.loc["age", "n"] == 1
    assert result.by_basis.loc["race", "n"] == 3


def test_expected_calibration_error_by_hand():
    # confidences 0.9, 0.9 (one right, one wrong) and 0.6, 0.6 (both right): bins [0.85,0.9] and [0.6,0.65]
    p_yes = np.array([0.9, 0.9, 0.6, 0.4])
    truth = np.array([1, 0, 1, 0])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(p_yes, truth) == pytest.approx(expected)
    curve = calibration_curve(p_yes, truth)
    assert curve["n"].sum() == 4 and curve.loc[curve["bin_low"] == 0.9, "share_yes"].item() == 0.5


def test_too_long_pairs_are_excluded_with_their_reason():
    table = {"short": 1.0, "short too": -1.0, "one two three four five six": 1.0, "x": 0.0, "a b": 0.5, "c d": -0.5}
    pairs = [
        _pair(1, "race", "short", "short too"),
        _pair(2, "race", "one two three four five six", "x"),
        _pair(3, "race", "a b", "c d"),
    ]
    result = evaluate_pairs(TableScorer(table, n_ctx=4), pairs, n_boot=50)
    assert result.summary["n"] == 2
    assert result.excluded == [("p2", "longer than the context of 4 tokens (6 tokens)")]


def test_controls_are_scored_and_summarised_by_kind():
    controls = [
        ControlPrompt("c1", "unnamed_basis", "race", "mortgage", "yes1", " Yes", "-"),
        ControlPrompt("c2", "unnamed_basis", "race", "mortgage", "yes2", " Yes", "-"),
        ControlPrompt("c3", "mentioned_legitimate", "age", "auto loan", "no1", " No", "-"),
    ]
    scores = evaluate_controls(TableScorer({"yes1": 1.0, "yes2": -1.0, "no1": 2.0}), controls)
    assert scores["correct"].tolist() == [True, False, False]
    table = controls_by_kind(scores, n_boot=50)
    assert table.loc["unnamed_basis", "accuracy"] == 0.5 and table.loc["mentioned_legitimate", "n"] == 1


@pytest.mark.slow
def test_bridge_scorer_matches_hugging_face_on_unequal_lengths(smollm2, unprocessed_hf_reference):
    prompts = [
        "The bank denied Maria's mortgage because she is Black. Is this a fair-lending violation? Answer:",
        "Because of her late payments, the lender turned down Linda's auto loan. Answer:",
        "Is this legal? Answer:",
    ]
    scorer = BridgeScorer(smollm2, batch_size=2)
    got = scorer.logit_diffs(prompts)
    hf = unprocessed_hf_reference("smollm2")
    tok = smollm2.tokenizer
    yes, no = (
        tok(" Yes", add_special_tokens=False)["input_ids"][0],
        tok(" No", add_special_tokens=False)["input_ids"][0],
    )
    expected, scale = [], 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
            final = hf(ids).logits[0, -1]
            expected.append(float(final[yes] - final[no]))
            scale = max(scale, float(final.abs().max()))
    # padded batches of two against one prompt alone: a logit difference carries twice the logits' rounding
    assert np.abs(got - np.array(expected)).max() <= 2 * rounding_tolerance(scale, smollm2)
    # the plain Hugging Face scorer (used while training) pads the same way and must agree with the same reference
    by_hf = HFScorer(hf, tok, prepend_bos=False, name="plain", batch_size=2).logit_diffs(prompts)
    assert np.abs(by_hf - np.array(expected)).max() <= 2 * rounding_tolerance(scale, smollm2)
    scorer.n_ctx = 10
    with pytest.raises(PromptTooLongError, match=r"prompt 0 \(\d+ tokens\), prompt 1"):
        scorer.logit_diffs(prompts)


def test_behaviour_table_rows():
    import pandas as pd

    from mechfin_utils.screener.behaviour import behaviour_table

    class Fake:
        def __init__(self, auroc):
            self.summary = {"n": 3, "auroc": auroc}

    table = behaviour_table({("m", "a"): Fake(0.5), ("m", "b"): Fake(0.9)})
    assert isinstance(table, pd.DataFrame) and table.loc[("m", "b"), "auroc"] == 0.9


@pytest.mark.slow
def test_bridge_scorer_honours_hooks_on_the_bridge(smollm2, hold_through_bridge_hooks):
    """Hooks of one's own on the bridge (here: a component held at the last position, read as ``[:, -1]``): inside
    them the scorer runs the bridge one length per batch, and each prompt gets its own hooked run."""
    from mechfin_utils.core.head_labels import Node
    from mechfin_utils.methods.patching.final_position import mean_outputs_at_final_position

    prompts = ["The capital of France is", "The capital of the United Kingdom is", "The capital of Spain is"]
    values = mean_outputs_at_final_position(smollm2, [prompts[1]], [Node(29)])
    scorer = BridgeScorer(smollm2, answers=(" Paris", " London"), batch_size=8)
    with torch.no_grad():  # a plain forward leaves the bridge's own capture hooks behind: those are no intervention
        smollm2.bridge(smollm2.to_tokens(prompts[0]))
    assert not scorer._one_length_per_batch()  # so the padded path runs
    plain = scorer.logit_diffs(prompts)
    yes, no = smollm2.single_token_id(" Paris"), smollm2.single_token_id(" London")
    with torch.no_grad(), hold_through_bridge_hooks(smollm2, values):
        assert scorer._one_length_per_batch()
        held = scorer.logit_diffs(prompts)
        one_by_one = [smollm2.bridge(smollm2.to_tokens(p))[0, -1] for p in prompts]
    expected = np.array([float(logits[yes] - logits[no]) for logits in one_by_one])
    tol = 2 * rounding_tolerance(torch.stack(one_by_one), smollm2)
    assert np.abs(held - expected).max() <= tol
    assert np.abs(held - plain).max() > 100 * tol  # the hold changed the answers: the hooks were honoured
    assert np.abs(scorer.logit_diffs(prompts) - plain).max() <= tol  # and outside it, the plain path again


@pytest.mark.slow
def test_components_held_on_the_engine_equal_bridge_hooks(smollm2, hold_through_bridge_hooks):
    """``BridgeScorer(held_at_last=...)`` (the engine: the last position recomputed from the earliest held layer)
    against the bridge run whole with hooks, prompt by prompt: a head and an MLP held at their mean over prompts of
    two token lengths (the batched mean checked against the mean of single-prompt records), scored on prompts of
    three lengths."""
    from mechfin_utils.core.functional import functional_model
    from mechfin_utils.core.head_labels import Node
    from mechfin_utils.methods.patching.final_position import mean_outputs_at_final_position

    components = [Node(27, 4), Node(29), Node(28, 1)]
    sources = ["The capital of the United Kingdom is", "The capital of Italy is", "The capital of Spain is"]
    values = mean_outputs_at_final_position(smollm2, sources, components, batch_size=2)
    fm = functional_model(smollm2)
    with torch.no_grad():
        records = [fm.record(smollm2.to_tokens(p), keep=("z", "mlp_out")) for p in sources]
    for c in components:
        by_hand = torch.stack(
            [r.mlp_out[c.layer][0, -1] if c.head is None else r.z[c.layer][0, -1, c.head] for r in records]
        ).mean(0)
        assert torch.allclose(values[c], by_hand, rtol=0, atol=2 * rounding_tolerance(by_hand, smollm2)), c.name

    prompts = ["The capital of France is", "The capital of Germany is", "The capital of the United States is"]
    answers = (" Paris", " London")
    held = BridgeScorer(smollm2, answers=answers, batch_size=8, held_at_last=values).logit_diffs(prompts)
    plain = BridgeScorer(smollm2, answers=answers, batch_size=8).logit_diffs(prompts)
    yes, no = smollm2.single_token_id(" Paris"), smollm2.single_token_id(" London")
    with torch.no_grad(), hold_through_bridge_hooks(smollm2, values):
        one_by_one = [smollm2.bridge(smollm2.to_tokens(p))[0, -1] for p in prompts]
    expected = np.array([float(logits[yes] - logits[no]) for logits in one_by_one])
    tol = 2 * rounding_tolerance(torch.stack(one_by_one), smollm2)
    assert np.abs(held - expected).max() <= tol
    assert np.abs(held - plain).max() > 100 * tol  # the held values changed the answers


def test_held_components_are_checked():
    """Wrong value sizes and components the model does not have are refused, every one at once, by name."""
    from mechfin_utils.core import engine
    from mechfin_utils.core.head_labels import Node

    class Tiny:
        d_model, d_head, n_layers, n_heads = 8, 4, 2, 2

    with pytest.raises(ValueError) as error:
        engine.final_normed_with_outputs_held(
            Tiny(), torch.zeros(1, 3, dtype=torch.long), {Node(0, 1): torch.zeros(8), Node(2): torch.zeros(8)}
        )
    assert "L0H1: (8,) values, expected 4" in str(error.value) and "MLP2: no such component" in str(error.value)


def test_auroc_interval_equals_ranking_every_resample():
    """The matrix form of the paired AUROC bootstrap against the definition: the same seeded resamples of pairs,
    each ranked by :func:`~mechfin_utils.core.stats.auroc` (scipy's average ranks for ties). Scores rounded to one
    decimal so that ties occur."""
    from mechfin_utils.core.stats import auroc
    from mechfin_utils.screener.behaviour import _bootstrap_auroc

    rng = np.random.default_rng(1)
    clean, corrupted = np.round(rng.normal(0.4, 1, 40), 1), np.round(rng.normal(-0.4, 1, 40), 1)
    draws_rng = np.random.default_rng(7)
    draws = []
    for _ in range(300):
        idx = draws_rng.integers(0, clean.size, size=clean.size)
        draws.append(auroc(clean[idx], corrupted[idx]))
    expected = np.quantile(draws, [0.025, 0.975])
    low, high = _bootstrap_auroc(clean, corrupted, n_boot=300, seed=7)
    assert abs(low - expected[0]) < 1e-12 and abs(high - expected[1]) < 1e-12
    assert low < auroc(clean, corrupted) < high
