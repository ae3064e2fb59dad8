"""Arithmetic neurons: activations where the bridge reads them, shares that add up to a layer's log-probability
increase computed by hand from the Hugging Face model, zeroing that matches the engine, a cached last position that
matches a full forward, and a kept set that is exactly the problems answered right."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mechfin_utils.core import engine
from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.hook_points import key_point
from mechfin_utils.methods.neurons import arithmetic
from mechfin_utils.tasks import addition
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance


@pytest.mark.parametrize("model_name", ["smollm2", "gpt2_random"])
def test_neuron_activations_are_what_the_output_projection_reads(request, model_name):
    model = request.getfixturevalue(model_name)
    fm = FunctionalTransformer.from_model(model)
    tokens = torch.tensor([model.token_ids("12 + 35 = 47\n20 + 31 = ")])
    layer = 1
    seen = []
    handle = key_point(model, layer).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        model.hf_model(tokens)
        record = fm.record(tokens, keep=("resid_mid", "mlp_out"))
    handle.remove()
    ours = arithmetic.neuron_activations(fm, layer, record.resid_mid[layer])
    assert_close_up_to_rounding(ours, seen[0], model)  # the functional forward against Hugging Face's
    w = fm.layers[layer]
    out = ours @ w.W_out + (w.b_out if w.b_out is not None else 0.0)
    assert_close_up_to_rounding(out, record.mlp_out[layer], model)


def test_neuron_shares_add_up_to_the_layer_log_prob_increase_by_hand(smollm2):
    problems = [addition.tokenise_problem(smollm2, a, b) for a, b in ((21, 34), (45, 13))]
    measured = [1, 5, 20, 28]
    attribution = arithmetic.neuron_attribution(smollm2, problems, steps=32, layers=measured)
    assert attribution.layers == measured
    # By hand, from the Hugging Face model: the stream after block l and the MLP's output there (forward hooks).
    hf = smollm2.hf_model
    outputs = {}
    handles = [
        block.mlp.register_forward_hook(lambda m, a, out, layer=layer: outputs.__setitem__(layer, out.detach()))
        for layer, block in enumerate(hf.model.layers)
    ]
    for i, p in enumerate(problems):
        with torch.no_grad():
            hidden = hf(torch.tensor([p.prompt_ids]), output_hidden_states=True).hidden_states
        answer = p.answer_ids[0]

        def lens(x, answer=answer):
            return float(torch.log_softmax(hf.lm_head(hf.model.norm(x)), -1)[answer].detach())

        for slot, layer in enumerate(
            measured
        ):  # hidden_states[l + 1] is after block l (the last: after the final norm)
            after = hidden[layer + 1][0, -1]
            expected = lens(after) - lens(after - outputs[layer][0, -1])
            assert float(attribution.increase[slot, i]) == pytest.approx(expected, abs=2e-3)
            total = float(attribution.neurons[slot, i].sum() + attribution.bias[slot, i])
            assert total == pytest.approx(expected, abs=2e-3 + 2e-3 * abs(expected))
    for handle in handles:
        handle.remove()
    assert attribution.completeness_gap() < 2e-3 + 2e-3 * float(attribution.increase.abs().max())
    assert attribution.top(3, layers=[20])["layer"].tolist() == [20, 20, 20]


def test_zeroing_all_neurons_of_a_layer_is_replacing_its_output_by_the_bias(gpt2_random):
    fm = FunctionalTransformer.from_model(gpt2_random)
    tokens = torch.tensor([gpt2_random.token_ids("12 + 35 = 47\n20 + 31 = ")])
    layer, last = 3, tokens.shape[1] - 1
    with arithmetic.zeroing_neurons(gpt2_random, {layer: range(fm.layers[layer].W_out.shape[0])}):
        with torch.no_grad():
            hooked = gpt2_random.hf_model(tokens).logits[:, -1]
    with torch.no_grad():
        record = fm.record(tokens, keep=("resid_pre", "k", "v"))
        bias = fm.layers[layer].b_out.detach().view(1, 1, -1)
        segment = engine.Segment(
            layer,
            last,
            record.resid_pre[layer][:, last:],
            torch.arange(1),
            [engine.Replace("mlp_out", layer, (last,), bias)],
        )
        (normed,) = engine.run(fm, [segment], record)
    assert_close_up_to_rounding(hooked, fm.unembed(normed[:, -1]), gpt2_random)


@pytest.mark.batch_split
def test_cached_last_position_scores_equal_full_forward_passes(smollm2, torch_threads):
    problems = [addition.tokenise_problem(smollm2, a, b) for a, b in ((21, 34), (45, 13), (30, 30))]
    runner = arithmetic._LastPositionRunner(smollm2, problems)
    for zeroed in ({}, {20: [5, 77, 300], 25: [9]}):
        with arithmetic.zeroing_neurons(smollm2, zeroed):
            cached = runner.scores()
            with torch.no_grad():
                logits = smollm2.hf_model(torch.tensor([p.prompt_ids for p in problems])).logits[:, -1]
        full = torch.log_softmax(logits, -1)
        tol = 2 * rounding_tolerance(logits, smollm2)  # a log-probability: a logit minus a log-sum of logits
        for row, p in zip(cached.itertuples(), problems):
            assert row.log_prob == pytest.approx(float(full[problems.index(p), p.answer_ids[0]]), abs=tol)


def test_kept_problems_are_exactly_those_answered_right(smollm2):
    found = addition.addition_problems(smollm2, n_tried=12, seed=3)
    assert len(found.tried) == 12 and found.share_kept == len(found.kept) / 12
    assert not {(p.a, p.b) for p in found.tried} & set(addition.FEW_SHOT)
    for p in found.tried:
        ids = list(p.prompt_ids + p.answer_ids)
        with torch.no_grad():
            logits = smollm2.hf_model(torch.tensor([ids])).logits[0]
        predicted = logits[len(p.prompt_ids) - 1 : len(ids) - 1].argmax(-1).tolist()
        assert (p in found.kept) == (predicted == list(p.answer_ids)), p.id
    task = addition.addition_task(smollm2, found.tried[:4])
    batch = task.batches[0]
    differs = (batch.clean_tokens != batch.corrupted_tokens).any(0).nonzero().flatten().tolist()
    assert differs and min(differs) >= len(smollm2.token_ids(addition.PREFIX)) - 1  # only the first operand moves


def test_ablation_summary_puts_top_beside_random_mean_and_spread():
    table = pd.DataFrame(
        [
            {"condition": "none", "k": 0, "draw": 0, "log_prob": -0.1, "accuracy": 1.0},
            {"condition": "top", "k": 10, "draw": 0, "log_prob": -3.1, "accuracy": 0.0},
            {"condition": "random", "k": 10, "draw": 0, "log_prob": -0.2, "accuracy": 1.0},
            {"condition": "random", "k": 10, "draw": 1, "log_prob": -0.4, "accuracy": 0.5},
        ]
    )
    table["log_prob_drop"] = -0.1 - table["log_prob"]
    row = arithmetic.ablation_summary(table).iloc[0]
    assert row["top: log-prob drop"] == pytest.approx(3.0)
    assert row["random: log-prob drop (mean)"] == pytest.approx(0.2)
    assert row["random: log-prob drop (sd)"] == pytest.approx(0.1414, abs=1e-3)
    assert row["random: accuracy (mean)"] == pytest.approx(0.75)
