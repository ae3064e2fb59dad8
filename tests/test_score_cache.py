"""The scores one ``make figures`` run shares between notebooks (``screener.score_cache``): a prompt scored once is
read back, not run again; scores of other weights, other answers, held components or a hooked model are never
shared; and nothing is shared unless ``$MECHFIN_SCORE_CACHE`` names a folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechfin_utils.core.head_labels import Node
from mechfin_utils.screener import behaviour
from mechfin_utils.screener.behaviour import BridgeScorer
from mechfin_utils.screener.score_cache import SCORE_CACHE_ENV, RunScoreCache, weights_fingerprint
from mechfin_utils.tooling.testing import rounding_tolerance

PROMPTS = [
    "The bank denied Maria's mortgage because she is Black. Is this a fair-lending violation? Answer:",
    "Because of her late payments, the lender turned down Linda's auto loan. Answer:",
    "Is this legal? Answer:",
]
MORE = ["The lender refused the loan because he is Muslim. Answer:", "Is this fair? Answer:"]


def _tolerance(model, prompts) -> float:
    """Two padded batches' logit differences: twice the rounding of logits as large as these prompts' largest."""
    with torch.no_grad():
        scale = max(float(model.bridge(model.to_tokens(p)).abs().max()) for p in prompts)
    return 2 * rounding_tolerance(scale, model)


def _rows_run(monkeypatch) -> list[int]:
    """Counts the prompts that reach the model (the batch sizes passed to the forward pass)."""
    counted: list[int] = []
    forward = BridgeScorer._final_logit_diffs

    def counting(self, tokens, last):
        counted.append(int(tokens.shape[0]))
        return forward(self, tokens, last)

    monkeypatch.setattr(BridgeScorer, "_final_logit_diffs", counting)
    return counted


def test_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    second.load_state_dict(first.state_dict())
    assert weights_fingerprint(first) == weights_fingerprint(second)  # equal weights, another module
    before = weights_fingerprint(first)
    with torch.no_grad():
        first.weight[0, 0] += 1e-6  # an in-place edit the size of float32 rounding is still another model
    assert weights_fingerprint(first) != before
    with torch.no_grad():
        first.weight[0, 0] -= 1e-6
        first.weight.copy_(second.weight)
    assert weights_fingerprint(first) == weights_fingerprint(second)


def test_a_prompt_scored_once_is_read_back_not_run_again(gpt2_random_biased, tmp_path, monkeypatch):
    model = gpt2_random_biased
    uncached = BridgeScorer(model).logit_diffs(PROMPTS + MORE)  # no folder set: nothing shared
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv(SCORE_CACHE_ENV, str(tmp_path))
    rows_run = _rows_run(monkeypatch)
    first = BridgeScorer(model, batch_size=2).logit_diffs(PROMPTS)
    assert sum(rows_run) == len(PROMPTS)
    rows_run.clear()
    both = BridgeScorer(model, batch_size=2).logit_diffs(MORE + PROMPTS)  # another order, two new prompts
    assert sum(rows_run) == len(MORE)  # only the new prompts reached the model
    np.testing.assert_array_equal(both[len(MORE) :], first)  # read back exactly, in the caller's order
    # every score, read back or computed in another batch, is the prompt's own (to a padded batch's rounding)
    expected = np.concatenate([uncached[len(PROMPTS) :], uncached[: len(PROMPTS)]])
    assert np.abs(both - expected).max() <= _tolerance(model, PROMPTS + MORE)
    rows_run.clear()
    again = BridgeScorer(model).logit_diffs(PROMPTS + MORE)
    assert sum(rows_run) == 0  # all seven known now
    np.testing.assert_array_equal(again, np.concatenate([first, both[: len(MORE)]]))


def test_held_components_and_hooks_are_never_shared(gpt2_random_biased, tmp_path, monkeypatch):
    model = gpt2_random_biased
    monkeypatch.setenv(SCORE_CACHE_ENV, str(tmp_path))
    BridgeScorer(model).logit_diffs(PROMPTS)
    rows_run = _rows_run(monkeypatch)
    held = {Node(0): torch.zeros(int(model.cfg.d_model))}
    BridgeScorer(model, held_at_last=held).logit_diffs(PROMPTS)
    assert sum(rows_run) == len(PROMPTS)  # held: computed, not read from the plain model's scores
    rows_run.clear()

    def zero_mlp(activation, hook):
        return activation * 0

    with model.bridge.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", zero_mlp)]):
        hooked = BridgeScorer(model).logit_diffs(PROMPTS)
    assert sum(rows_run) == len(PROMPTS)
    plain = BridgeScorer(model).logit_diffs(PROMPTS)
    assert np.abs(hooked - plain).max() > 0  # the hooked run's scores were its own, and were not stored either
    # what is stored is plain scores only (the held run shares its plain pass, never its held answers)
    stored = {}
    for path in tmp_path.rglob("*.json"):
        entry = json.loads(path.read_text())
        stored.update(zip(map(tuple, entry["tokens"]), entry["logit_diffs"]))
    by_prompt = dict(zip((tuple(model.token_ids(p)) for p in PROMPTS), plain))
    assert set(stored) == set(by_prompt)
    assert max(abs(stored[key] - by_prompt[key]) for key in stored) <= _tolerance(model, PROMPTS)


def test_a_held_run_shares_its_plain_pass(gpt2_random_biased, tmp_path, monkeypatch):
    """Notebook 12's mean ablation passes through the plain forward pass first: within a run, the plain scores of
    the same prompts are read from it afterwards (no forward pass), equal to a plain scorer's to rounding; outside a
    run nothing is stored."""
    model = gpt2_random_biased
    held = {Node(0): torch.zeros(int(model.cfg.d_model))}
    uncached_plain = BridgeScorer(model).logit_diffs(PROMPTS)
    BridgeScorer(model, held_at_last=held).logit_diffs(PROMPTS)
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv(SCORE_CACHE_ENV, str(tmp_path))
    rows_run = _rows_run(monkeypatch)
    held_scores = BridgeScorer(model, held_at_last=held).logit_diffs(PROMPTS)
    assert sum(rows_run) == len(PROMPTS)
    rows_run.clear()
    plain = BridgeScorer(model).logit_diffs(PROMPTS)
    assert sum(rows_run) == 0  # read from the held run's plain pass
    assert np.abs(plain - uncached_plain).max() <= _tolerance(model, PROMPTS)
    assert np.abs(held_scores - plain).max() > 100 * _tolerance(model, PROMPTS)  # and the held answers differ


def test_other_weights_or_answers_do_not_see_each_others_scores(tmp_path):
    rows = [[1, 2, 3], [4, 5]]
    RunScoreCache(tmp_path, "a" * 64, (10, 11)).store(rows, [0.5, -1.25])
    assert RunScoreCache(tmp_path, "a" * 64, (10, 11)).lookup([[4, 5], [9], [1, 2, 3]]) == {0: -1.25, 2: 0.5}
    assert RunScoreCache(tmp_path, "b" * 64, (10, 11)).lookup(rows) == {}
    assert RunScoreCache(tmp_path, "a" * 64, (11, 10)).lookup(rows) == {}
    with pytest.raises(ValueError, match="2 token rows but 1 scores"):
        RunScoreCache(tmp_path, "a" * 64, (10, 11)).store(rows, [0.5])
    assert not list(tmp_path.rglob("*.tmp"))  # every file moved into place whole


def test_evaluate_pairs_is_unchanged_by_the_cache(smollm2, tmp_path, monkeypatch):
    from mechfin_utils.tasks import screener_sets

    pairs = screener_sets.load_split(screener_sets.MENTION_TEST_SPLITS[0])[:4]
    plain = behaviour.evaluate_pairs(smollm2, pairs, n_boot=50)
    monkeypatch.setenv(SCORE_CACHE_ENV, str(tmp_path))
    behaviour.evaluate_pairs(smollm2, pairs[:2], n_boot=50)  # half of them scored first, in other batches
    shared = behaviour.evaluate_pairs(smollm2, pairs, n_boot=50)
    tolerance = _tolerance(smollm2, [t for p in pairs for t in p.texts])
    for column in ("clean_ld", "corrupted_ld"):
        assert np.abs(shared.scores[column].to_numpy() - plain.scores[column].to_numpy()).max() <= tolerance
    assert shared.summary["auroc"] == plain.summary["auroc"]
