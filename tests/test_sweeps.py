"""Sweeps over several batches: normalisation over all prompts, bootstrap intervals, ranking, raw shifts."""

from __future__ import annotations

import pandas as pd
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
from mechfin_utils.tasks.batching import TaskBatch, align_pairs, largest_template_batch, make_batches
from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs
from mechfin_utils.tooling.testing import rounding_tolerance


@pytest.fixture(scope="module")
def template_batch(smollm2):
    report = align_pairs(smollm2, load_fair_lending_pairs())
    return largest_template_batch(smollm2, report, max_batch=4)


@pytest.fixture(scope="module")
def template_metric(smollm2, template_batch):
    """The reference normalisation of the template batch (bridge logits, run once per module) and the tolerance of a
    logit difference of its logits: twice the logits' rounding."""
    with torch.no_grad():
        clean = smollm2.bridge(template_batch.clean_tokens)
        corrupted = smollm2.bridge(template_batch.corrupted_tokens)
    metric = NormalisedLogitDiff(clean, corrupted, template_batch.answer_tokens)
    return metric, 2 * rounding_tolerance(clean[:, -1], smollm2)


def _first_middle_last(model) -> list[int]:
    """The layers a per-layer sweep below patches: the first, a middle and the last. How batches are combined and
    normalised is the same for every cell, so these three show it; the other layers would only add time."""
    n_layers = model.cfg.n_layers
    return [0, n_layers // 2, n_layers - 1]


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


@pytest.fixture(scope="module")
def one_batch_sweep(smollm2, template_batch, template_metric):
    """The reference for the split sweep: the whole template batch patched at once, at the first, a middle and the last
    layer of a per-layer sweep over all positions; computed once, with the worker's own thread count, so that each
    thread count of the test runs only the split sweep."""
    return activation_patch(
        smollm2,
        template_batch.clean_tokens,
        template_batch.corrupted_tokens,
        template_metric[0],
        "attn_out_all_pos",
        index_df=pd.DataFrame({"layer": _first_middle_last(smollm2)}),
        progress=False,
    )


@pytest.mark.batch_split
def test_sweep_over_split_batches_equals_one_batch(
    smollm2, template_batch, template_metric, one_batch_sweep, torch_threads
):
    # a per-layer sweep over all positions at three layers: the combination of split batches depends neither on the
    # component nor on the cells (the per-head version, 270 cells, took 38 s for the same check; all 30 layers 29 s)
    layers = _first_middle_last(smollm2)
    combined = sweep_batches(smollm2, _split(template_batch), "attn_out_all_pos", layers=layers, progress=False)
    metric, tol = template_metric
    whole = one_batch_sweep
    assert combined.values.shape == whole.shape == (len(layers),)
    # compared in logits: the normalised values divide by the clean - corrupted gap (a few hundredths of a logit for
    # the base model), so float32 rounding of other batch shapes is multiplied back by it; a logit difference has
    # twice the logits' rounding
    gap = float((metric.clean - metric.corrupted).abs())
    assert float((combined.values - whole).abs().max()) * gap <= tol


def test_endpoints_and_bootstrap(smollm2, template_batch, template_metric):
    sweep = sweep_batches(
        smollm2, [template_batch], "resid_pre_all_pos", layers=_first_middle_last(smollm2), progress=False
    )
    # the whole residual stream at any layer, the first and the last included, = the clean run: 1 up to the logits'
    # rounding over the normalising gap
    metric, tol = template_metric
    gap = float((metric.clean - metric.corrupted).abs())
    assert sweep.values.tolist() == pytest.approx([1.0] * len(sweep.values), abs=tol / gap)
    summary = bootstrap_sweep(sweep, n_boot=200, seed=1)
    assert summary.low.shape == summary.values.shape
    assert bool((summary.low <= summary.high).all())
    again = bootstrap_sweep(sweep, n_boot=200, seed=1)
    assert torch.equal(summary.low, again.low)
    # batches of two token lengths (the shortest and the longest pair) are refused: at the last layer alone, whose
    # cells recompute one layer each (the whole sweep of both took 13 s for the same error)
    report = align_pairs(smollm2, load_fair_lending_pairs())
    lengths = sorted({report.lengths[p.id] for p in report.kept})
    batches = make_batches(smollm2, report, max_batch=1)
    pick = [next(b for b in batches if b.seq_len == n) for n in (lengths[0], lengths[-1])]
    with pytest.raises(ValueError, match="one token length"):
        sweep_batches(smollm2, pick, "resid_pre", layers=[smollm2.cfg.n_layers - 1], progress=False)


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


def test_a_sweep_of_some_layers_is_those_rows_of_the_full_sweep(smollm2, template_batch):
    """``layers=`` (notebook 04's fast mode) patches only the given layers, in the order given: each row equals the
    full sweep's row of that layer exactly (the same patched runs), per prompt too; bad layers are refused.
    (``raw_shift_sweep`` passes ``layers`` the same way.)"""
    full = sweep_batches(smollm2, [template_batch], "attn_out_all_pos", progress=False)
    layers = [smollm2.cfg.n_layers - 1, 0, smollm2.cfg.n_layers // 2]
    some = sweep_batches(smollm2, [template_batch], "attn_out_all_pos", layers=layers, progress=False)
    assert torch.equal(some.values, full.values[layers])
    assert torch.equal(some.logit_diff, full.logit_diff[layers])
    with pytest.raises(ValueError, match="layers must be distinct layers of 0..29"):
        sweep_batches(smollm2, [template_batch], "attn_out_all_pos", layers=[0, 0])
    with pytest.raises(ValueError, match="pass layers or index_df, not both"):
        sweep_batches(smollm2, [template_batch], "attn_out_all_pos", layers=[1], index_df=pd.DataFrame({"layer": [1]}))
