"""Segment alignment of unequal-length pairs, and segment patching against a by-hand Hugging Face computation."""

from __future__ import annotations

import pytest
import torch

from mechfin_utils.methods.patching.segments import SEGMENTS, segment_pair, segment_pairs, segment_patching
from mechfin_utils.tasks.batching import Exclusion
from mechfin_utils.tasks.fair_lending import FairLendingPair
from mechfin_utils.tasks.screener_sets import load_split
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

pytestmark = pytest.mark.slow


def _pair(clean: str, corrupted: str, protected: str, legitimate: str) -> FairLendingPair:
    return FairLendingPair(
        "x-1", "race", "ECOA", "T", "mortgage", clean, corrupted, " Yes", " No", protected, legitimate, "credit_score"
    )


def test_segments_cover_every_token_and_spell_the_phrase(smollm2):
    pairs = load_split("test_templates")[:24]
    aligned, excluded = segment_pairs(smollm2, pairs)
    assert len(aligned) + len(excluded) == 24 and len(aligned) >= 20
    assert any(len(a.clean.ids) != len(a.corrupted.ids) for a in aligned)  # unequal lengths are kept
    for item in aligned:
        for prompt, phrase in ((item.clean, item.pair.protected_phrase), (item.corrupted, item.pair.legitimate_phrase)):
            every = sorted(p for s in SEGMENTS for p in prompt.positions[s])
            assert every == list(range(len(prompt.ids)))
            assert prompt.positions["final"] == (len(prompt.ids) - 1,)
            spelled = smollm2.tokenizer.decode([prompt.ids[p] for p in prompt.positions["phrase"]])
            assert spelled.strip() == phrase
        clean_rest = [item.clean.ids[p] for p in item.clean.positions["rest"]]
        assert clean_rest == [item.corrupted.ids[p] for p in item.corrupted.positions["rest"]]


def test_a_phrase_that_splits_a_token_is_excluded_with_its_reason(smollm2):
    pair = _pair(
        "The bank denied Maria's loan because she is Black. Answer:",
        "The bank denied Maria's loan because of debtck. Answer:",
        "because she is Bla",
        "because of debt",
    )
    result = segment_pair(smollm2, pair)
    assert isinstance(result, Exclusion) and result.reason == "token_straddles_phrase_boundary"
    assert "clean prompt" in result.detail


def test_segment_patching_matches_hooks_on_the_plain_model(smollm2, unprocessed_hf_reference):
    pair = _pair(
        "The bank denied Maria's mortgage because she is Black. Is this a fair-lending violation? Answer:",
        "The bank denied Maria's mortgage because her credit score is 540. Is this a fair-lending violation? Answer:",
        "because she is Black",
        "because her credit score is 540",
    )
    item = segment_pair(smollm2, pair)
    assert len(item.clean.ids) != len(item.corrupted.ids)
    layer = 12
    results = segment_patching(smollm2, [item], layers=[layer])
    hf = unprocessed_hf_reference("smollm2")
    yes, no = smollm2.single_token_id(" Yes"), smollm2.single_token_id(" No")
    captured = {}

    def capture(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = hf.model.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        clean_logits = hf(torch.tensor([item.clean.ids])).logits[0, -1]
    handle.remove()
    clean_hidden = captured["h"][0]
    for segment in SEGMENTS:
        clean_positions, corrupted_positions = item.mapping(segment)
        if not clean_positions:
            continue

        def overwrite(module, args, kwargs, c=clean_positions, k=corrupted_positions):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[0, list(k)] = clean_hidden[list(c)]
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = hf.model.layers[layer].register_forward_pre_hook(overwrite, with_kwargs=True)
        with torch.no_grad():
            final = hf(torch.tensor([item.corrupted.ids])).logits[0, -1]
        handle.remove()
        row = results[results["segment"] == segment].iloc[0]
        tol = 2 * rounding_tolerance(final, smollm2)  # a logit difference: twice the logits' rounding
        assert row["ld_patched"] == pytest.approx(float(final[yes] - final[no]), abs=tol), segment
    tol = 2 * rounding_tolerance(clean_logits, smollm2)
    assert results["ld_clean"].iloc[0] == pytest.approx(float(clean_logits[yes] - clean_logits[no]), abs=tol)


def test_restoration_grid_and_segment_lengths_by_hand(smollm2):
    import pandas as pd

    from mechfin_utils.methods.patching.segments import restoration_grid, segment_lengths

    results = pd.DataFrame(
        [
            {"segment": "final", "layer": 0, "restoration": 0.5},
            {"segment": "final", "layer": 0, "restoration": 1.0},
            {"segment": "prefix", "layer": 0, "restoration": 0.0},
            {"segment": "prefix", "layer": 1, "restoration": 0.25},
            {"segment": "final", "layer": 1, "restoration": 1.0},
        ]
    )
    grid = restoration_grid(results)
    assert list(grid.index) == ["prefix", "final"]  # reading order, absent segments left out
    assert grid.loc["final", 0] == 0.75 and grid.loc["prefix", 1] == 0.25
    pair = _pair(
        "The bank denied Maria's mortgage because she is Black. Answer:",
        "The bank denied Maria's mortgage because her credit score is 540. Answer:",
        "because she is Black",
        "because her credit score is 540",
    )
    item = segment_pair(smollm2, pair)
    (row,) = segment_lengths([item]).to_dict(orient="records")
    assert row["clean_phrase"] == len(item.clean.positions["phrase"]) and row["corrupted_final"] == 1
    assert row["clean_prefix"] == row["corrupted_prefix"] and row["equal_length"] is False
    assert sum(row[f"clean_{s}"] for s in SEGMENTS) == len(item.clean.ids)


@pytest.mark.batch_split
def test_pair_batches_give_each_prompts_own_final_position_dla(smollm2, torch_threads):
    """Unequal-length pairs batched by (clean, corrupted) length: direct logit attribution over the batches equals
    each prompt run alone (no padding, nothing misaligned at the final position)."""
    from mechfin_utils.methods.patching.segments import pair_batches
    from mechfin_utils.methods.readout import dla

    aligned, _ = segment_pairs(smollm2, load_split("test_templates")[:12])
    chosen = [a for a in aligned if len(a.clean.ids) != len(a.corrupted.ids)][:4]
    assert len(chosen) == 4
    batches = pair_batches(smollm2, chosen, max_batch=3)
    assert sum(b.batch_size for b in batches) == 4 and all(b.batch_size <= 3 for b in batches)
    parts = dla.over_batches(dla.layer_decomposition, smollm2, batches)
    by_id = {item.pair.id: item for item in chosen}
    row = 0
    for batch in batches:
        for pair_id in batch.ids:
            item = by_id[pair_id]
            for run, ids in (("clean", item.clean.ids), ("corrupted", item.corrupted.ids)):
                answers = batch.answer_tokens[batch.ids.index(pair_id)][None]
                _, alone = dla.layer_decomposition(smollm2, torch.tensor([ids]), answers)
                assert_close_up_to_rounding(parts[run][1][row], alone[0], smollm2, msg=f"{pair_id} {run}")
            row += 1
    with pytest.raises(ValueError, match="max_batch"):
        pair_batches(smollm2, chosen, max_batch=0)


def test_attention_by_segment_sums_the_final_query_row_of_each_segment(smollm2):
    """Against the bridge's own hook_pattern, read by hand: final query row, mean over heads, summed per segment."""
    from mechfin_utils.methods.patching.segments import attention_by_segment

    pair = _pair(
        "The bank denied Maria's mortgage because she is Black. Is this a fair-lending violation? Answer:",
        "The bank denied Maria's mortgage because her credit score is 540. Is this a fair-lending violation? Answer:",
        "because she is Black",
        "because her credit score is 540",
    )
    item = segment_pair(smollm2, pair)
    layers = [3, 27]
    table = attention_by_segment(smollm2, [item], layers)
    assert len(table) == 2 * len(layers) * len(SEGMENTS)
    for run, prompt in (("clean", item.clean), ("corrupted", item.corrupted)):
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
        _, cache = smollm2.bridge.run_with_cache(
            torch.tensor([prompt.ids]), names_filter=lambda n, names=names: n in names
        )
        for layer in layers:
            row = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1, :].mean(0)
            got = table[(table.run == run) & (table.layer == layer)].set_index("segment")["weight"]
            for segment in SEGMENTS:
                expected = float(row[list(prompt.positions[segment])].sum())
                # attention weights are at most 1: rounding of that scale
                assert got[segment] == pytest.approx(expected, abs=rounding_tolerance(1.0, smollm2)), (run, layer)
            assert got.sum() == pytest.approx(1.0, abs=rounding_tolerance(1.0, smollm2))
