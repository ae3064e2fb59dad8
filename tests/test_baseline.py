"""Baseline scores: per-pair logit differences equal a direct forward pass; per-basis tables are consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechfin_utils.screener.baseline import pair_scores, per_group_table
from mechfin_utils.tasks.batching import align_pairs, make_batches
from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs
from mechfin_utils.tooling.testing import rounding_tolerance


@pytest.fixture(scope="module")
def small_batches(smollm2):
    pairs = load_fair_lending_pairs()
    report = align_pairs(smollm2, pairs)
    chosen = [p for p in report.kept if p.basis in {"race", "age", "disability"}][:6]
    return make_batches(smollm2, chosen, max_batch=4)


def test_pair_scores_match_a_direct_forward(smollm2, small_batches):
    scores = pair_scores(smollm2, small_batches)
    assert len(scores) == sum(b.batch_size for b in small_batches)
    first = small_batches[0]
    pair = first.pairs[0]
    yes, no = smollm2.single_token_id(pair.clean_answer), smollm2.single_token_id(pair.corrupted_answer)
    with torch.no_grad():
        logits = smollm2.hf_model(smollm2.to_tokens(pair.clean_prompt)).logits[0, -1]
    row = scores.set_index("pair_id").loc[pair.id]
    tol = 2 * rounding_tolerance(logits, smollm2)  # a logit difference: twice the logits' rounding
    assert row["clean_logit_diff"] == pytest.approx((logits[yes] - logits[no]).item(), abs=tol)
    with torch.no_grad():
        other = smollm2.hf_model(smollm2.to_tokens(pair.corrupted_prompt)).logits[0, -1]
    assert row["corrupted_logit_diff"] == pytest.approx((other[yes] - other[no]).item(), abs=tol)
    assert row["gap"] == pytest.approx(row["clean_logit_diff"] - row["corrupted_logit_diff"], abs=1e-6)
    assert row["clean_prob_ratio"] == pytest.approx(1 / (1 + np.exp(-row["clean_logit_diff"])), abs=1e-6)


def test_per_group_table_means_and_counts(smollm2, small_batches):
    scores = pair_scores(smollm2, small_batches)
    table = per_group_table(scores, n_boot=200)
    for basis, group in scores.groupby("basis"):
        assert table.loc[basis, "n"] == len(group)
        assert table.loc[basis, "clean"] == pytest.approx(group["clean_logit_diff"].mean(), abs=1e-9)
        assert table.loc[basis, "gap_low"] <= table.loc[basis, "gap"] <= table.loc[basis, "gap_high"]
    by_pair = per_group_table(scores, by="pair_id", n_boot=200)  # every group a single pair: no interval
    assert by_pair["clean_low"].isna().all() and (by_pair["n"] == 1).all()
    assert by_pair.loc[scores["pair_id"][0], "gap"] == pytest.approx(scores["gap"][0])
    with pytest.raises(ValueError, match="by='nope'"):
        per_group_table(scores, by="nope")


def test_pair_scores_refuses_nothing():
    with pytest.raises(ValueError, match="empty"):
        pair_scores(None, [])
