"""Sweeps over several batches: normalisation over all prompts, bootstrap intervals, ranking, raw shifts."""

from __future__ import annotations

import pytest
import torch

from mechfin_utils.core.metrics import NormalisedLogitDiff
from mechfin_utils.methods.patching.activation import activation_patch
from mechfin_utils.methods.patching.results import PatchSweep
from mechfin_utils.methods.patching.sweeps import (
    SweepSummary,
    bootstrap_sweep,
    group_shift_table,
    rank_cells,
    raw_shift_sweep,
    sweep_batches,
)
from mechfin_utils.tasks.batching import TaskBatch, align_pairs, largest_template_batch
from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs
from mechfin_utils.tooling.testing import rounding_tolerance


@pytest.fixture(scope="module")
def template_batch(smollm2):
    report = align_pairs(smollm2, load_fair_lending_pairs())
    return largest_template_batch(smollm2, report, max_batch=4)


def _split(batch: TaskBatch) -> list[TaskBatch]:
    halves = []
    for rows in (slice(0, 2), slice(2, None)):
        halves.append(
            TaskBatch(
                batch.clean_tokens[rows],
                batch.corrupted_tokens[rows],
                batch.answer_tokens[rows],
                batch.pairs[rows],
                batch.str_tokens,
            )
        )
    return halves


@pytest.mark.batch_split
def test_sweep_over_split_batches_equals_one_batch(smollm2, template_batch, torch_threads):
    # a per-layer sweep over all positions (30 cells): the combination of split batches does not depend on the
    # component, and the per-head version (270 cells) took 38 s here for the same check
    combined = sweep_batches(smollm2, _split(template_batch), "attn_out_all_pos", progress=False)
    with torch.no_grad():
        metric = NormalisedLogitDiff(
            smollm2.bridge(template_batch.clean_tokens),
            smollm2.bridge(template_batch.corrupted_tokens),
            template_batch.answer_tokens,
        )
    whole = activation_patch(
        smollm2,
        template_batch.clean_tokens,
        template_batch.corrupted_tokens,
        metric,
        "attn_out_all_pos",
        progress=False,
    )
    assert combined.values.shape == whole.shape == (30,)
    # compared in logits: the normalised values divide by the clean - corrupted gap (a few hundredths of a logit for
    # the base model), so float32 rounding of other batch shapes is multiplied back by it; a logit difference has
    # twice the logits' rounding
    gap = float((metric.clean - metric.corrupted).abs())
    tol = 2 * rounding_tolerance(smollm2.bridge(template_batch.clean_tokens)[:, -1], smollm2)
    assert float((combined.values - whole).abs().max()) * gap <= tol


def test_endpoints_and_bootstrap(smollm2, template_batch):
    sweep = sweep_batches(smollm2, [template_batch], "resid_pre_all_pos", progress=False)
    # the whole residual stream at layer 0 = the clean run: 1 up to the logits' rounding over the normalising gap
    with torch.no_grad():
        metric = NormalisedLogitDiff(
            smollm2.bridge(template_batch.clean_tokens),
            smollm2.bridge(template_batch.corrupted_tokens),
            template_batch.answer_tokens,
        )
    tol = 2 * rounding_tolerance(smollm2.bridge(template_batch.clean_tokens)[:, -1], smollm2)
    assert sweep.values[0].item() == pytest.approx(1.0, abs=tol / float((metric.clean - metric.corrupted).abs()))
    summary = bootstrap_sweep(sweep, n_boot=200, seed=1)
    assert summary.low.shape == summary.values.shape
    assert bool((summary.low <= summary.high).all())
    again = bootstrap_sweep(sweep, n_boot=200, seed=1)
    assert torch.equal(summary.low, again.low)
    with pytest.raises(ValueError, match="one token length"):
        other = align_pairs(smollm2, load_fair_lending_pairs())
        lengths = sorted({other.lengths[p.id] for p in other.kept})
        from mechfin_utils.tasks.batching import make_batches

        batches = make_batches(smollm2, other, max_batch=1)
        pick = [
            next(b for b in batches if b.seq_len == lengths[0]),
            next(b for b in batches if b.seq_len == lengths[-1]),
        ]
        sweep_batches(smollm2, pick, "resid_pre", progress=False)


def test_rank_cells_orders_and_flags():
    values = torch.tensor([[0.5, -0.2], [0.1, -0.6]])
    summary = SweepSummary("k", ("layer", "head"), values, values - 0.15, values + 0.15, 10, "m")
    table = rank_cells(summary, k=2)
    assert table[table.direction == "positive"].component.tolist() == ["L0H0", "L1H0"]
    assert table[table.direction == "negative"].component.tolist() == ["L1H1", "L0H1"]
    assert table.set_index("component").loc["L1H0", "excludes_zero"] == False  # noqa: E712 (0.1 +- 0.15 spans 0)
    assert table.set_index("component").loc["L1H1", "excludes_zero"] == True  # noqa: E712


def test_raw_shift_endpoints(smollm2, template_batch):
    shift = raw_shift_sweep(smollm2, template_batch, "resid_pre_all_pos", progress=False)  # [layer, batch]
    with torch.no_grad():
        clean = smollm2.bridge(template_batch.clean_tokens)[:, -1].gather(1, template_batch.answer_tokens)
        corrupted = smollm2.bridge(template_batch.corrupted_tokens)[:, -1].gather(1, template_batch.answer_tokens)
    expected = (clean[:, 0] - clean[:, 1]) - (corrupted[:, 0] - corrupted[:, 1])
    tol = 4 * rounding_tolerance(torch.cat([clean, corrupted]), smollm2)  # a difference of two logit differences
    assert (shift[0] - expected).abs().max() <= tol


def test_group_shift_table_by_hand():
    # 3 prompts, a [2 layers, 1 head] sweep; prompts 0 and 2 are group "a", prompt 1 group "b".
    clean = torch.tensor([2.0, 1.0, 4.0])
    corrupted = torch.tensor([0.0, 0.5, 1.0])
    patched = torch.tensor([[[1.0, 0.5, 2.0]], [[0.0, 1.0, 1.0]]])  # [layer, head, batch]
    sweep = PatchSweep(torch.zeros(2, 1), patched, clean, corrupted, ("layer", "head"), "k", "m")
    table = group_shift_table(sweep, ["a", "b", "a"], [(0, 0), (1, 0)])
    assert list(table.index) == ["a", "b"] and list(table["n"]) == [2, 1]
    assert table.loc["a", "gap"] == pytest.approx(2.5) and table.loc["b", "gap"] == pytest.approx(0.5)
    assert table.loc["a", "L0H0"] == pytest.approx(1.0) and table.loc["b", "L1H0"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="groups has 2 labels"):
        group_shift_table(sweep, ["a", "b"], [(0, 0)])
    with pytest.raises(IndexError, match="cell"):
        group_shift_table(sweep, ["a", "b", "a"], [(2, 0)])
