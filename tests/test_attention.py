"""Attention patterns, attention to a phrase, phrase positions and the offline CircuitsVis view
(mechfin_utils.methods.readout.attention).

Patterns are checked against the unprocessed Hugging Face checkpoint run with eager attention and
``output_attentions=True``, an implementation independent of the TransformerLens bridge. The GPT-2-shape
model is the one with random biases, so its patterns are not near-uniform.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mechfin_utils.methods.readout import attention
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

MODELS = ["smollm2", "gpt2_random_biased"]
PAIR = (
    "The Black applicant was denied the loan. Is this illegal? Answer:",
    "The young applicant was denied the loan. Is this illegal? Answer:",
)


@pytest.fixture(scope="module", params=MODELS)
def case(request, unprocessed_hf_reference):
    model = request.getfixturevalue(request.param)
    tokens = model.to_tokens(list(PAIR))
    with torch.no_grad():
        output = unprocessed_hf_reference(request.param)(tokens, output_attentions=True)
    reference = torch.stack(output.attentions, dim=1)  # [batch, layer, head, q, k]
    return model, tokens, reference


@pytest.fixture(scope="module")
def pattern_tolerance(case):
    """Float32 rounding of a softmax: a weight p moves by at most 2 p times its scores' rounding, so the scale is
    the largest attention score (before the causal mask), read from the bridge."""
    model, tokens, _ = case
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_attn_scores"))
    scores = torch.stack(list(cache.values()))
    return 2 * rounding_tolerance(scores[scores > torch.finfo(scores.dtype).min / 2], model)


@pytest.fixture(scope="module")
def patterns(case):
    model, tokens, _ = case
    return attention.attention_patterns(model, tokens)


def test_patterns_are_causal_distributions_matching_the_reference(case, patterns, pattern_tolerance):
    model, tokens, reference = case
    batch, pos = tokens.shape
    assert patterns.shape == (batch, model.cfg.n_layers, model.cfg.n_heads, pos, pos)
    ones = torch.ones(patterns.shape[:-1])
    assert_close_up_to_rounding(patterns.sum(-1), ones, model)  # weights of at most 1, after the model's layers
    assert patterns.triu(diagonal=1).abs().max() == 0
    assert (patterns - reference).abs().max() <= pattern_tolerance


def test_chosen_heads_come_back_in_the_order_asked(case, patterns):
    model, tokens, _ = case
    last = model.cfg.n_layers - 1
    chosen = [(1, 2), (0, 0), (1, 0)]
    picked = attention.attention_patterns(model, tokens, chosen)
    assert picked.shape == (2, 3, tokens.shape[1], tokens.shape[1])
    for index, (layer, head) in enumerate(chosen):
        torch.testing.assert_close(picked[:, index], patterns[:, layer, head])
    with pytest.raises(ValueError, match=r"layer_heads\[1\] layer"):
        attention.attention_patterns(model, tokens, [(0, 0), (last + 1, 0)])
    with pytest.raises(ValueError, match=r"layer_heads\[0\] head"):
        attention.attention_patterns(model, tokens, [(0, model.cfg.n_heads)])


def test_final_position_attention_to_a_phrase(case, pattern_tolerance):
    model, tokens, reference = case
    mask = attention.phrase_position_mask(model, list(PAIR), ["Black applicant", "young applicant"])
    split = attention.attention_to_positions(model, tokens, mask)
    assert split.to_positions.shape == (2, model.cfg.n_layers, model.cfg.n_heads)
    total = split.to_positions + split.to_rest
    assert_close_up_to_rounding(total, torch.ones_like(split.to_rest), model)
    final_row = reference[:, :, :, -1, :]
    want = (final_row * mask[:, None, None, :]).sum(-1)
    assert (split.to_positions - want).abs().max() <= pattern_tolerance  # a sum of weights that add up to at most 1
    assert split.to_positions.max() > 0.05  # some head does look at the phrase: the test is not vacuous

    with pytest.raises(ValueError, match=r"marks no position in row\(s\) \[1\]"):
        empty = mask.clone()
        empty[1] = False
        attention.attention_to_positions(model, tokens, empty)
    with pytest.raises(ValueError, match="must match"):
        attention.attention_to_positions(model, tokens, mask[:, :-1])


# ---------------------------------------------------------------------------------------------------------
# Phrase positions, for both tokenizers
# ---------------------------------------------------------------------------------------------------------

KNOWN = [
    # prompt, phrase, positions without BOS (both tokenizers split these words the same way)
    (PAIR[0], "Black applicant", [1, 2]),
    (PAIR[0], "The Black", [0, 1]),
    (PAIR[0], "Answer:", [12, 13]),
    ("Her creditworthiness was fine.", "creditworthiness", None),
]


@pytest.mark.parametrize("name", MODELS)
def test_phrase_positions_on_known_prompts(name, request):
    model = request.getfixturevalue(name)
    shift = 1 if model.prepend_bos else 0
    for prompt, phrase, positions in KNOWN:
        found = attention.phrase_token_positions(model, prompt, phrase)
        if positions is not None:
            assert found == [p + shift for p in positions], (prompt, phrase)
        pieces = model.to_str_tokens(prompt)
        assert "".join(pieces[p] for p in found).strip() == phrase
        assert found == list(range(found[0], found[-1] + 1))
    if model.prepend_bos:
        assert model.to_str_tokens(PAIR[0])[0] == model.tokenizer.bos_token


@pytest.mark.parametrize("name", MODELS)
def test_phrase_position_errors_name_the_prompt_and_phrase(name, request):
    model = request.getfixturevalue(name)
    prompt = "The bank denied the loan; the bank said so."
    with pytest.raises(ValueError, match=r"'Hispanic' does not occur in prompt 'The bank denied"):
        attention.phrase_token_positions(model, prompt, "Hispanic")
    with pytest.raises(ValueError, match=r"occurs 2 times"):
        attention.phrase_token_positions(model, prompt, "bank")
    first = attention.phrase_token_positions(model, prompt, "bank", occurrence=0)
    second = attention.phrase_token_positions(model, prompt, "bank", occurrence=1)
    assert len(first) == len(second) == 1 and first[0] < second[0]
    tokens = model.to_tokens(prompt)[0]
    assert tokens[first[0]] == tokens[second[0]] == model.single_token_id(" bank")
    with pytest.raises(ValueError, match="cuts through token"):
        attention.phrase_token_positions(model, prompt, "ban", occurrence=0)
    assert attention.phrase_token_positions(model, prompt, "ban", occurrence=0, allow_partial_tokens=True) == first
    with pytest.raises(ValueError, match=r"row 1: phrase 'Hispanic'"):
        attention.phrase_position_mask(model, [prompt, prompt], ["denied", "Hispanic"])
    with pytest.raises(ValueError, match="2 prompts but 1 phrases"):
        attention.phrase_position_mask(model, [prompt, prompt], ["denied"])


# ---------------------------------------------------------------------------------------------------------
# CircuitsVis, offline
# ---------------------------------------------------------------------------------------------------------


def test_circuitsvis_html_is_offline_and_labelled(smollm2):
    import circuitsvis

    page = attention.circuitsvis_html(smollm2, PAIR[0], layer=3, heads=[1, 4])
    assert "SmolLM2-135M-Instruct: attention, layer 3, heads 1, 4" in page
    assert "unpkg.com" not in page and "cdn.jsdelivr" not in page and "<script src=" not in page
    bundle = (Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js").read_text(encoding="utf-8")
    bundle = bundle.replace("</script>", "")
    assert len(bundle) > 100_000 and bundle in page
    assert '"L3H1"' in page and '"L3H4"' in page and '" applicant"' in page
    with pytest.raises(ValueError, match="layer=30 is not a layer"):
        attention.circuitsvis_html(smollm2, PAIR[0], layer=30)
    with pytest.raises(ValueError, match=r"heads\[0\]=9 is not a head"):
        attention.circuitsvis_html(smollm2, PAIR[0], layer=0, heads=[9])


# ---------------------------------------------------------------------------------------------------------
# Attention to the differing phrase over a task set
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_phrase_attention_over_task_batches(name, request, unprocessed_hf_reference):
    from mechfin_utils.tasks.batching import align_pairs, make_batches
    from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs

    model = request.getfixturevalue(name)
    report = align_pairs(model, load_fair_lending_pairs())
    chosen = [report.kept[i] for i in (0, 1, 40, 120)]
    batches = make_batches(model, chosen, max_batch=2)
    assert len(batches) >= 2  # more than one batch: rows must be joined in batch order
    reference_model = unprocessed_hf_reference(name)
    for run, phrase_field in (("clean", "protected_phrase"), ("corrupted", "legitimate_phrase")):
        result = attention.phrase_attention(model, batches, run=run)
        assert result.run == run and result.to_phrase.shape == (4, model.cfg.n_layers, model.cfg.n_heads)
        ordered = [pair for batch in batches for pair in batch.pairs]
        assert result.pair_ids == [pair.id for pair in ordered] and result.bases == [p.basis for p in ordered]
        for row, pair in enumerate(ordered):
            prompt = pair.clean_prompt if run == "clean" else pair.corrupted_prompt
            phrase = getattr(pair, phrase_field)
            tokens = model.to_tokens(prompt)
            # independent position finding: the phrase's tokens are the prompt's tokens after its prefix
            prefix = model.to_tokens(prompt[: prompt.index(phrase)].rstrip())
            n_phrase = len(model.tokenizer(" " + phrase, add_special_tokens=False)["input_ids"])
            assert torch.equal(tokens[0, : prefix.shape[1]], prefix[0]), (pair.id, "prefix splits a token")
            positions = list(range(prefix.shape[1], prefix.shape[1] + n_phrase))
            with torch.no_grad():
                attentions = reference_model(tokens, output_attentions=True).attentions
            final_row = torch.stack(attentions, dim=1)[0, :, :, -1, :]  # [layer, head, key]
            # softmax rounding: at most twice the scores' rounding (a sum of weights that add up to at most 1)
            with torch.no_grad():
                _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_attn_scores"))
            scores = torch.stack(list(cache.values()))
            tol = 2 * rounding_tolerance(scores[scores > torch.finfo(scores.dtype).min / 2], model)
            assert (result.to_phrase[row] - final_row[:, :, positions].sum(-1)).abs().max() <= tol
            assert float(result.phrase_share[row]) == pytest.approx(n_phrase / tokens.shape[1])
    with pytest.raises(ValueError, match="run must be"):
        attention.phrase_attention(model, batches, run="both")
    with pytest.raises(ValueError, match="no batches"):
        attention.phrase_attention(model, [], run="clean")


@pytest.mark.slow
def test_final_position_attention_by_token_is_the_mean_final_row(smollm2):
    from mechfin_utils.methods.readout.attention import attention_patterns, final_position_attention_by_token

    prompt = "Priya, who is Black, was denied a mortgage because her credit score is 510. Answer:"
    tokens, weights = final_position_attention_by_token(smollm2, prompt, [27, 29])
    assert len(tokens) == weights.shape[0] == smollm2.to_tokens(prompt).shape[1]
    assert float(weights.sum()) == pytest.approx(1.0, abs=rounding_tolerance(1.0, smollm2))
    heads = [(layer, head) for layer in (27, 29) for head in range(smollm2.cfg.n_heads)]
    full = attention_patterns(smollm2, smollm2.to_tokens(prompt), heads)[0, :, -1, :]
    assert (weights - full.mean(0)).abs().max() <= rounding_tolerance(1.0, smollm2)  # weights of at most 1


@pytest.mark.slow
def test_top_attended_tokens_skip_the_sink_and_the_answer_position(smollm2):
    from mechfin_utils.methods.readout.attention import final_position_attention_by_token, top_attended_tokens

    prompt = "Priya, who is Black, was denied a mortgage because her credit score is 510. Answer:"
    tokens, weights = final_position_attention_by_token(smollm2, prompt, [28])
    top = top_attended_tokens(smollm2, prompt, [28], k=4)
    inner = weights[1:-1]
    assert [w for _, _, w in top] == pytest.approx(sorted(inner.tolist(), reverse=True)[:4])
    assert all(0 < i < len(tokens) - 1 and tokens[i] == t for i, t, _ in top)
