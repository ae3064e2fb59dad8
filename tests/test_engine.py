"""The intervention engine against the TransformerLens bridge with hooks: every kind of intervention, once.

The reference is independent of the engine: a full forward pass of the bridge from the first token of the
first layer, with TransformerLens hooks writing the same values (``hook_resid_pre``, ``attn.hook_z``,
``hook_attn_out``, ``hook_mlp_out``) or blocking the same scores (``attn.hook_attn_scores``). The engine
instead continues a recorded run from a later layer and position, in one packed pass for all segments.
"""

from __future__ import annotations

import pytest
import torch

from mechfin_utils.core import engine
from mechfin_utils.core.functional import functional_model
from mechfin_utils.tooling.testing import assert_close_up_to_rounding

PROMPTS = ["The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"]


@pytest.fixture(scope="module", autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _bridge_final(model, tokens, hooks, n_read):
    return model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)[:, -n_read:]


def _write(positions, values, heads=None):
    def hook(act, hook):
        act = act.clone()
        if heads is None:
            act[:, list(positions)] = values.to(act.dtype)
        else:
            for i, p in enumerate(positions):
                act[:, p, list(heads)] = values[:, i].to(act.dtype)
        return act

    return hook


def _block(query_positions, key_positions):
    def hook(scores, hook):
        scores = scores.clone()
        for q in query_positions:
            scores[:, :, q, list(key_positions)] = float("-inf")
        return scores

    return hook


@pytest.mark.parametrize("model_name", ["smollm2", "gpt2_random_biased"])
def test_every_intervention_matches_bridge_hooks(request, model_name):
    model = request.getfixturevalue(model_name)
    fm = functional_model(model)
    tokens = model.to_tokens(PROMPTS)  # same length for both models (checked below)
    batch, n_pos = tokens.shape
    assert n_pos >= 8
    n_layers, n_read = fm.n_layers, 2
    other = model.to_tokens(["A quiet river runs under the old stone bridge at the edge of the sleepy town"])[:, :n_pos]
    assert other.shape[1] == n_pos
    source = fm.record(other.expand(batch, -1))  # where the replacement values come from
    reference = fm.record(tokens)
    mid, late, p = n_layers // 2, n_layers - 1, n_pos - 4
    cases = {
        "resid_pre": (
            mid,
            [engine.Replace("resid_pre", mid, (p,), source.resid_pre[mid][:, [p]])],
            [(f"blocks.{mid}.hook_resid_pre", _write((p,), source.resid_pre[mid][:, [p]]))],
        ),
        "z, two heads": (
            2,
            [engine.Replace("z", 2, (p, p + 1), source.z[2][:, p : p + 2][:, :, [0, 3]], heads=(0, 3))],
            [("blocks.2.attn.hook_z", _write((p, p + 1), source.z[2][:, p : p + 2][:, :, [0, 3]], (0, 3)))],
        ),
        "attn_out, last layer": (
            late,
            [engine.Replace("attn_out", late, (p, n_pos - 1), source.attn_out[late][:, [p, n_pos - 1]])],
            [(f"blocks.{late}.hook_attn_out", _write((p, n_pos - 1), source.attn_out[late][:, [p, n_pos - 1]]))],
        ),
        "mlp_out, two layers": (
            1,
            [engine.Replace("mlp_out", layer, (p,), source.mlp_out[layer][:, [p]]) for layer in (1, mid)],
            [(f"blocks.{layer}.hook_mlp_out", _write((p,), source.mlp_out[layer][:, [p]])) for layer in (1, mid)],
        ),
        "block attention": (
            3,
            [engine.BlockAttention(layer, (p, n_pos - 1), (1, 2, p)) for layer in (3, late)],
            [(f"blocks.{layer}.attn.hook_attn_scores", _block((p, n_pos - 1), (1, 2, p))) for layer in (3, late)],
        ),
        "resid after the last block": (
            n_layers,
            [engine.Replace("resid_pre", n_layers, (n_pos - 1,), source.resid_pre[n_layers][:, [-1]])],
            None,
        ),
    }
    segments = [
        engine.Segment(start, p, reference.resid_pre[start][:, p:], torch.arange(batch), interventions)
        for start, interventions, _ in cases.values()
    ]
    outputs = engine.run(fm, segments, reference, n_read=n_read)  # one call, packed, six start layers
    for (name, (_, _, hooks)), normed in zip(cases.items(), outputs):
        ours = fm.unembed(normed)
        if hooks is None:  # the stream after the last block is the final norm's input: check by hand
            expected_last = fm.unembed(fm.final_norm(source.resid_pre[n_layers][:, -1]))
            assert_close_up_to_rounding(ours[:, -1], expected_last, model, msg=name)
            continue
        theirs = _bridge_final(model, tokens, hooks, n_read)
        assert_close_up_to_rounding(ours, theirs, model, msg=name)  # packed engine runs against bridge hooks
        plain = _bridge_final(model, tokens, [], n_read)
        assert (theirs - plain).abs().max() > 1e-2, f"{name}: the intervention must matter for the test to bite"


@pytest.mark.batch_split
def test_a_segment_without_interventions_reproduces_the_recorded_run(smollm2, torch_threads):
    fm = functional_model(smollm2)
    tokens = smollm2.to_tokens(PROMPTS)
    record = fm.record(tokens)
    n_pos = tokens.shape[1]
    swapped = torch.tensor([1, 0])  # sequences may continue the recorded prompts in any order
    segments = [
        engine.Segment(start, first, record.resid_pre[start][swapped, first:], swapped)
        for start in (0, 7, fm.n_layers)
        for first in (0, n_pos - 3)
    ]
    for out in engine.run(fm, segments, record, n_read=3):
        assert_close_up_to_rounding(out[:, -1], record.final_normed.flip(0), smollm2)  # packed, another order


def test_bad_segments_are_all_named_at_once(smollm2):
    fm = functional_model(smollm2)
    tokens = smollm2.to_tokens(PROMPTS[:1])
    record = fm.record(tokens, keep=("resid_pre", "k", "v"))
    n_pos = tokens.shape[1]
    good = record.resid_pre[5][:, 4:]
    segments = [
        engine.Segment(
            5, 4, good, torch.tensor([0]), [engine.Replace("mlp_out", 2, (4,), torch.zeros(1, 1, fm.d_model))]
        ),
        engine.Segment(5, 4, good, torch.tensor([0]), [engine.Replace("z", 6, (4,), torch.zeros(1, 1, fm.d_model))]),
        engine.Segment(5, 4, good, torch.tensor([0]), [engine.BlockAttention(6, (4,), tuple(range(5)))]),
        engine.Segment(5, n_pos, good, torch.tensor([0])),
    ]
    with pytest.raises(ValueError) as err:
        engine.run(fm, segments, record)
    message = str(err.value)
    assert "segment 0" in message and "below the start" in message
    assert "segment 1" in message and "heads are given" in message
    assert "segment 2" in message and "attend to nothing" in message
    assert "segment 3" in message and "first_pos" in message


def test_chunks_fit_the_row_budget_and_an_oversized_item_runs_alone():
    chunks = list(engine.chunk_by_rows([3, 3, 5, 1, 9, 2], lambda rows: rows, 6))
    assert chunks == [[3, 3], [5, 1], [9], [2]]
    assert list(engine.chunk_by_rows([], lambda rows: rows, 6)) == []
