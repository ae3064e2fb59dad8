"""Metrics: logit difference, normalised probability ratio, normalised patching metric."""

from __future__ import annotations

import pytest
import torch

from mechfin_utils.core.metrics import (
    NormalisedLogitDiff,
    logit_diff,
    normalised_patching_metric,
    normalised_prob_ratio,
)


def _logits(seed=0, batch=3, pos=4, vocab=11):
    return torch.randn(batch, pos, vocab, generator=torch.Generator().manual_seed(seed))


def test_logit_diff_reads_final_position():
    logits = _logits()
    answers = torch.tensor([[1, 2], [3, 4], [5, 0]])
    expected = torch.stack([logits[i, -1, a] - logits[i, -1, b] for i, (a, b) in enumerate(answers.tolist())])
    assert torch.allclose(logit_diff(logits, answers), expected)
    assert torch.allclose(logit_diff(logits[:, -1], answers), expected)


def test_logit_diff_is_log_odds_of_the_two_answers():
    logits = _logits(1)
    answers = torch.tensor([2, 7])
    logp = logits[:, -1].log_softmax(-1)
    assert torch.allclose(logit_diff(logits, answers), logp[:, 2] - logp[:, 7], atol=1e-6)


def test_logit_diff_invariant_to_shared_shift():
    logits = _logits(2)
    answers = torch.tensor([0, 1])
    assert torch.allclose(logit_diff(logits + 3.0, answers), logit_diff(logits, answers), atol=1e-6)


def test_normalised_prob_ratio():
    logits = _logits(3)
    answers = torch.tensor([4, 9])
    p = logits[:, -1].softmax(-1)
    assert torch.allclose(normalised_prob_ratio(logits, answers), p[:, 4] / (p[:, 4] + p[:, 9]), atol=1e-6)


def test_bad_answer_shape_names_argument():
    with pytest.raises(ValueError, match="answer_tokens"):
        logit_diff(_logits(), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="logits"):
        logit_diff(torch.zeros(5), torch.tensor([0, 1]))


def test_normalised_patching_metric_endpoints():
    assert normalised_patching_metric(torch.tensor(2.5), 2.5, -1.0).item() == pytest.approx(1.0)
    assert normalised_patching_metric(torch.tensor(-1.0), 2.5, -1.0).item() == pytest.approx(0.0)
    assert normalised_patching_metric(torch.tensor(0.75), 2.5, -1.0).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="undefined"):
        normalised_patching_metric(torch.tensor(1.0), 0.3, 0.3)


def test_normalised_logit_diff_callable():
    clean, corrupted = _logits(4), _logits(5)
    answers = torch.tensor([[1, 2]] * 3)
    metric = NormalisedLogitDiff(clean, corrupted, answers)
    assert metric(clean).item() == pytest.approx(1.0, abs=1e-6)
    assert metric(corrupted).item() == pytest.approx(0.0, abs=1e-6)
    mixed = 0.25 * clean + 0.75 * corrupted  # logit diff is linear in the logits
    assert metric(mixed).item() == pytest.approx(0.25, abs=1e-5)
