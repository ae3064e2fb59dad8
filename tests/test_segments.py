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


def _mortgage_pair():
    """A pair of unequal token lengths: the decision rests on race, or on a credit score."""
    return _pair(
        "The bank denied Maria's mortgage because she is Black. Is this a fair-lending violation? Answer:",
        "The bank denied Maria's mortgage because her credit score is 540. Is this a fair-lending violation? Answer:",
        "because she is Black",
        "because her credit score is 540",
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
    pair = _mortgage_pair()
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

    pair = _mortgage_pair()
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


def test_named_spans_are_carved_out_of_prefix_and_rest_in_reading_order(smollm2):
    from mechfin_utils.tasks.screener_sets import load_split, mention_effect_pairs, mention_effect_spans, rests_on_spans

    mention_pairs = load_split("mention_test_templates")[:12]
    aligned, excluded = segment_pairs(smollm2, mention_pairs, rests_on_spans)
    assert len(aligned) + len(excluded) == 12 and len(aligned) >= 8
    for item in aligned:
        for prompt in (item.clean, item.corrupted):
            assert {"mention", "question", "phrase", "final"} <= set(prompt.segments)
            every = sorted(p for s in prompt.segments for p in prompt.positions[s])
            assert every == list(range(len(prompt.ids)))  # every token in exactly one segment
            firsts = [prompt.positions[s][0] for s in prompt.segments if prompt.positions[s]]
            assert firsts == sorted(firsts)  # reading order
            spelled = smollm2.tokenizer.decode([prompt.ids[p] for p in prompt.positions["mention"]])
            assert spelled.strip() == item.pair.attribute_mention
        assert (
            item.clean.segments[-1] == "final"
            and item.clean.positions["question"][-1] < item.clean.positions["final"][0]
        )
    # the mention-effect contrast: the mention is the phrase, the lawful clause a named span
    effect = mention_effect_pairs(mention_pairs)
    spans = {e.pair_id: mention_effect_spans(p) for p, e in zip(mention_pairs, effect)}
    aligned, _ = segment_pairs(smollm2, effect, lambda pair: spans[pair.pair_id])
    assert aligned and all({"phrase", "reason", "question"} <= set(a.clean.segments) for a in aligned)
    results = segment_patching(smollm2, aligned[:2], layers=[0, 29])
    assert set(results["segment"]) == set(aligned[0].clean.segments)
    # the tokens before the mention are the same in both prompts, so patching them changes nothing (up to rounding)
    prefix = results[results.segment == "prefix"]
    tol = 2 * rounding_tolerance(smollm2.bridge(smollm2.to_tokens(aligned[0].pair.clean_prompt))[0, -1], smollm2)
    assert not prefix.empty and (prefix["ld_patched"] - prefix["ld_corrupted"]).abs().max() <= tol


def test_final_position_patching_matches_hooks_on_the_plain_model(smollm2, unprocessed_hf_reference):
    """A head's and an MLP's output at the last position, taken from another prompt of another length: the engine
    against forward hooks on the unprocessed Hugging Face model (o_proj's input for the head, the MLP's output)."""
    from mechfin_utils.core.head_labels import Node
    from mechfin_utils.methods.patching.final_position import component_shares, patch_at_final_position

    pair = _mortgage_pair()
    components = [Node(27, 4), Node(29), Node(3, 0)]
    results = patch_at_final_position(smollm2, [pair], components)
    hf = unprocessed_hf_reference("smollm2")
    yes, no = smollm2.single_token_id(" Yes"), smollm2.single_token_id(" No")
    source_ids = torch.tensor([smollm2.token_ids(pair.clean_prompt)])
    target_ids = torch.tensor([smollm2.token_ids(pair.corrupted_prompt)])
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    for component, row in zip(components, results.itertuples()):
        block = hf.model.layers[component.layer]
        seen: dict[str, torch.Tensor] = {}
        if component.head is None:  # the MLP's output, at the last position
            hooks = (
                lambda m, a, out, seen=seen: seen.setdefault("value", out.detach().clone()),
                lambda m, a, out, seen=seen: torch.cat([out[:, :-1], seen["value"][:, -1:]], dim=1),
            )
            register = block.mlp.register_forward_hook
        else:  # the head's slice of o_proj's input (its z), at the last position
            span = slice(component.head * d_head, (component.head + 1) * d_head)

            def put(m, args, seen=seen, span=span):
                z = args[0].clone()
                z[:, -1, span] = seen["value"][:, -1, span]
                return (z, *args[1:])

            def keep(m, args, seen=seen):
                seen["value"] = args[0].detach().clone()

            hooks = (keep, put)
            register = block.self_attn.o_proj.register_forward_pre_hook
        handle = register(hooks[0])
        with torch.no_grad():
            hf(source_ids)
        handle.remove()
        handle = register(hooks[1])
        with torch.no_grad():
            logits = hf(target_ids).logits[0, -1]
        handle.remove()
        tol = 2 * rounding_tolerance(logits, smollm2)
        assert row.ld_patched == pytest.approx(float(logits[yes] - logits[no]), abs=tol), component
    import pandas as pd

    twice = pd.concat([results, results.assign(pair_id="x-2")])  # two identical pairs: the interval has no width
    shares = component_shares(twice, n_boot=20)
    assert list(shares["component"]) == [c.name for c in components] and shares["n_pairs"].eq(2).all()
    assert (shares["low"] - shares["share"]).abs().max() < 1e-9 and (
        shares["high"] - shares["share"]
    ).abs().max() < 1e-9
    assert (
        shares["share"] * (results.ld_source.iloc[0] - results.ld_target.iloc[0]) - shares["mean_effect"]
    ).abs().max() < 1e-9


def test_holding_a_component_at_the_answer_position_is_the_engines_patch(smollm2, hold_through_bridge_hooks):
    """Bridge hooks holding a component at another prompt's value (its "mean" over that one prompt) give the
    engine's patched score: the patch and the hold are the same intervention."""
    from mechfin_utils.core.head_labels import Node
    from mechfin_utils.methods.patching.final_position import mean_outputs_at_final_position, patch_at_final_position

    # prompts of two lengths whose answers differ a lot, so that one component's output at the end matters
    pair = FairLendingPair(
        "cap-1", "race", "ECOA", "T", "mortgage", "The capital of France is", "The capital of the United Kingdom is",
        " Paris", " London", "France", "the United Kingdom", "credit_score",
    )  # fmt: skip
    yes, no = smollm2.single_token_id(" Paris"), smollm2.single_token_id(" London")
    for component in (Node(27, 4), Node(29)):
        engine_row = patch_at_final_position(smollm2, [pair], [component]).iloc[0]
        values = mean_outputs_at_final_position(smollm2, [pair.clean_prompt], [component])
        with torch.no_grad(), hold_through_bridge_hooks(smollm2, values):
            logits = smollm2.bridge(smollm2.to_tokens(pair.corrupted_prompt))[0, -1]
        tol = 2 * rounding_tolerance(logits, smollm2)
        assert float(logits[yes] - logits[no]) == pytest.approx(engine_row.ld_patched, abs=tol), component
        assert abs(engine_row.ld_patched - engine_row.ld_target) > 10 * tol  # the held value matters
    with torch.no_grad():  # and outside the context the model is itself again
        logits = smollm2.bridge(smollm2.to_tokens(pair.corrupted_prompt))[0, -1]
    assert float(logits[yes] - logits[no]) == pytest.approx(engine_row.ld_target, abs=tol)


def test_segment_patching_skips_only_patches_that_write_what_is_there(smollm2, monkeypatch):
    """A patch whose clean values equal the corrupted run's bit for bit is not run and restores exactly 0; every
    other patch still runs (counted at the engine), and its numbers equal a run with no skipping at all."""
    from mechfin_utils.core import engine

    pair = _mortgage_pair()
    item = segment_pair(smollm2, pair)
    layers = [0, 14, 29]
    segments_run = []
    real_run = engine.run

    def counting_run(fm, segments, *args, **kwargs):
        segments_run.extend(segments)
        return real_run(fm, segments, *args, **kwargs)

    monkeypatch.setattr(engine, "run", counting_run)
    results = segment_patching(smollm2, [item], layers=layers)
    expected_rows = [(layer, s) for layer in layers for s in item.clean.segments if item.mapping(s)[0]]
    assert list(zip(results["layer"], results["segment"])) == expected_rows  # every patch reported, in order
    skipped = results[results["ld_patched"] == results["ld_corrupted"]]
    # the shared opening at every layer; at layer 0 (token embeddings, no positions in a Llama's residual stream)
    # also every segment whose tokens are the same in both prompts
    same_tokens = {
        s
        for s in item.clean.segments
        if [item.clean.ids[p] for p in item.mapping(s)[0]] == [item.corrupted.ids[p] for p in item.mapping(s)[1]]
    }
    assert set(zip(skipped["layer"], skipped["segment"])) == {(layer, "prefix") for layer in layers} | {
        (0, s) for s in same_tokens
    }
    assert {"prefix", "final"} <= same_tokens and (skipped["restoration"] == 0).all()
    assert len(segments_run) == len(expected_rows) - len(skipped)
    # the same patches with equality never detected: every patch run, the prefix's only up to rounding
    monkeypatch.setattr(torch, "equal", lambda a, b: False)
    everything = segment_patching(smollm2, [item], layers=layers)
    assert len(segments_run) == 2 * len(expected_rows) - len(skipped)
    # (a packed run of other size rounds differently: compared at the rounding of the logits' magnitude)
    tol = 2 * rounding_tolerance(smollm2.bridge(torch.tensor([item.corrupted.ids]))[0, -1], smollm2)
    assert (everything["ld_patched"] - results["ld_patched"]).abs().max() <= tol
