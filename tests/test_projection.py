"""Projection to the unembedding space: the token-level readouts of mechfin_utils.methods.readout
(unembedding, token_lens, ffn_neurons, ffn_updates, embedding_circuits, vocabulary, task_sets) and their tables
(mechfin_utils.reporting.readout_tables, token_tables).

Independent references: the model's own logits, brute-force products on small matrices, and the
*unprocessed* Hugging Face checkpoint (``unprocessed_hf_reference``: its own final-norm gain, its own
``lm_head``, no TransformerLens folding or centring). Two models: the embedded SmolLM2 (RMSNorm, gated MLP,
grouped-query attention, no biases) and the random GPT-2 whose biases and LayerNorm gains are random too,
so that a mishandled norm gain, LayerNorm centring or MLP bias would show.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from mechfin_utils.methods.readout import (
    embedding_circuits,
    ffn_neurons,
    ffn_updates,
    task_sets,
    token_lens,
    unembedding,
    vocabulary,
)
from mechfin_utils.reporting import readout_tables, token_tables
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

MODELS = ["smollm2", "gpt2_random_biased"]
PROMPTS = (
    "The Black applicant was denied the loan. Is this illegal? Answer:",
    "The young applicant was denied the loan. Is this illegal? Answer:",
)
ANSWERS = (" Yes", " No")


# ---------------------------------------------------------------------------------------------------------
# The unprocessed reference
# ---------------------------------------------------------------------------------------------------------


class Raw:
    """The unprocessed Hugging Face model's weights and one forward pass on ``tokens``."""

    def __init__(self, hf, tokens: torch.Tensor):
        self.hf = hf
        self.is_gpt2 = hasattr(hf, "transformer")
        body = hf.transformer if self.is_gpt2 else hf.model
        self.body = body
        self.blocks = body.h if self.is_gpt2 else body.layers
        self.final_norm = body.ln_f if self.is_gpt2 else body.norm
        self.gain = self.final_norm.weight.detach()
        self.lm_head = hf.lm_head.weight.detach()  # [vocab, d_model]
        self.n_heads = hf.config.num_attention_heads
        self.n_kv = getattr(hf.config, "num_key_value_heads", None) or self.n_heads
        self.d_model = hf.config.hidden_size
        self.d_head = self.d_model // self.n_heads
        acts, mlp_out, handles = {}, {}, []

        def pre(layer):
            def hook(module, args):
                acts[layer] = args[0][:, -1].detach().clone()

            return hook

        def post(layer):
            def hook(module, args, output):
                mlp_out[layer] = output[:, -1].detach().clone()

            return hook

        def final_in(module, args):
            acts["final_in"] = args[0][:, -1].detach().clone()

        handles.append(self.final_norm.register_forward_pre_hook(final_in))
        for layer, block in enumerate(self.blocks):
            down = block.mlp.c_proj if self.is_gpt2 else block.mlp.down_proj
            handles.append(down.register_forward_pre_hook(pre(layer)))
            handles.append(block.mlp.register_forward_hook(post(layer)))
        try:
            with torch.no_grad():
                out = hf(tokens, output_hidden_states=True)
        finally:
            for handle in handles:
                handle.remove()
        self.final_in = acts.pop("final_in")  # [batch, d_model]: the final residual stream, before the norm
        self.acts, self.mlp_out = acts, mlp_out
        self.logits = out.logits.detach()  # [batch, pos, vocab]
        self.hidden = [h.detach() for h in out.hidden_states]  # [i]: after i blocks (the last one is normed)

    def centre(self, x):
        return x - x.mean(-1, keepdim=True) if self.is_gpt2 else x

    def eps(self, norm):
        return norm.eps if self.is_gpt2 else norm.variance_epsilon

    def normalise(self, x, norm):
        """The norm without its gain and bias."""
        x = self.centre(x)
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps(norm)).sqrt()

    def value_vectors(self, layer) -> torch.Tensor:  # [d_mlp, d_model]
        mlp = self.blocks[layer].mlp
        return mlp.c_proj.weight.detach() if self.is_gpt2 else mlp.down_proj.weight.detach().T

    def mlp_bias(self, layer) -> torch.Tensor:
        return self.blocks[layer].mlp.c_proj.bias.detach() if self.is_gpt2 else torch.zeros(self.d_model)

    def head_weights(self, layer, head):
        """W_Q[head], W_K, W_V (of the key/value head HF's repeat_kv gives it), W_O[head], input-norm gain."""
        block = self.blocks[layer]
        d, dh = self.d_model, self.d_head
        if self.is_gpt2:
            W = block.attn.c_attn.weight.detach()  # [d_model, 3 d_model]
            q, k, v = W[:, :d], W[:, d : 2 * d], W[:, 2 * d :]
            kv = head
            W_O = block.attn.c_proj.weight.detach()  # [d_model(in), d_model(out)]
            gain = block.ln_1.weight.detach()
        else:
            a = block.self_attn
            q, k, v = a.q_proj.weight.detach().T, a.k_proj.weight.detach().T, a.v_proj.weight.detach().T
            kv = torch.arange(self.n_kv).repeat_interleave(self.n_heads // self.n_kv)[head].item()
            W_O = a.o_proj.weight.detach().T
            gain = block.input_layernorm.weight.detach()
        sl, kvsl = slice(head * dh, (head + 1) * dh), slice(kv * dh, (kv + 1) * dh)
        return q[:, sl], k[:, kvsl], v[:, kvsl], W_O[sl], gain, block.ln_1 if self.is_gpt2 else block.input_layernorm


@pytest.fixture(scope="module", params=MODELS)
def case(request, unprocessed_hf_reference):
    model = request.getfixturevalue(request.param)
    tokens = model.to_tokens(list(PROMPTS))
    answers = torch.tensor([model.single_token_id(a) for a in ANSWERS])
    raw = Raw(unprocessed_hf_reference(request.param), tokens)
    return SimpleNamespace(name=request.param, model=model, tokens=tokens, answers=answers, raw=raw)


def ranks_of(logits: torch.Tensor, ids) -> list[int]:
    return [int((logits > logits[i]).sum()) + 1 for i in ids]


def assert_ranks_match(found: list[int], logits: torch.Tensor, ids, label, tol: float = 1e-3) -> None:
    """``found`` equals the reference ranks up to ties within float32 noise: another logit within ``tol`` of the
    answer's may fall on either side of it (an off-by-one rank was seen on an AMD EPYC CPU)."""
    for rank, i in zip(found, ids):
        best = int((logits > logits[i] + tol).sum()) + 1
        worst = int((logits > logits[i] - tol).sum())  # every logit above x - tol, the answer itself included
        assert best <= rank <= worst, (label, rank, best, worst)


# ---------------------------------------------------------------------------------------------------------
# Generic machinery against brute force
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("block_rows,k", [(1, 5), (7, 13), (64, 40), (1000, 3)])
def test_factored_top_pairs_equals_a_full_argsort(largest, block_rows, k):
    gen = torch.Generator().manual_seed(block_rows * 31 + k)
    left, right = torch.randn(53, 4, generator=gen), torch.randn(4, 37, generator=gen)
    full = left @ right
    order = full.flatten().argsort(descending=largest)[:k]
    scores, rows, cols = embedding_circuits.factored_top_pairs(left, right, k, largest=largest, block_rows=block_rows)
    assert rows.tolist() == (order // 37).tolist()
    assert cols.tolist() == (order % 37).tolist()
    torch.testing.assert_close(scores, full.flatten()[order])


def test_factored_top_pairs_rejects_bad_shapes_and_k():
    with pytest.raises(ValueError, match="must agree"):
        embedding_circuits.factored_top_pairs(torch.ones(3, 2), torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="k must be in"):
        embedding_circuits.factored_top_pairs(torch.ones(3, 2), torch.ones(2, 4), 13)


def test_top_and_bottom_tokens_equal_a_sort():
    gen = torch.Generator().manual_seed(0)
    vectors, W_U = torch.randn(3, 8, generator=gen), torch.randn(8, 50, generator=gen)
    top_v, top_i, bot_v, bot_i = unembedding.top_and_bottom_tokens(vectors, W_U, 4)
    scores = vectors @ W_U
    assert top_i.tolist() == scores.argsort(-1, descending=True)[:, :4].tolist()
    assert bot_i.tolist() == scores.argsort(-1)[:, :4].tolist()
    torch.testing.assert_close(bot_v, scores.gather(1, bot_i))


def test_mean_pairwise_cosine_known_values():
    assert ffn_neurons.mean_pairwise_cosine(torch.tensor([[1.0, 0], [2.0, 0], [3.0, 0]])) == pytest.approx(1.0)
    assert ffn_neurons.mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)
    assert ffn_neurons.mean_pairwise_cosine(torch.tensor([[1.0, 1.0], [-2.0, -2.0]])) == pytest.approx(-1.0)
    # three vectors: cos(a,b)=1, cos(a,c)=cos(b,c)=0 -> mean over the 3 pairs = 1/3
    assert ffn_neurons.mean_pairwise_cosine(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])) == pytest.approx(1 / 3)


def test_top_neurons_orders_by_value_abs_and_sign():
    scores = torch.tensor([[0.5, -3.0, 1.0], [2.0, 0.0, -0.1]])
    assert list(zip(*[ffn_neurons.top_neurons(scores, 2)[c] for c in ("layer", "neuron")])) == [(1, 0), (0, 2)]
    assert list(zip(*[ffn_neurons.top_neurons(scores, 2, by="abs")[c] for c in ("layer", "neuron")])) == [
        (0, 1),
        (1, 0),
    ]
    assert ffn_neurons.top_neurons(scores, 1, by="negative")["score"].tolist() == [-3.0]
    per_layer = ffn_neurons.top_neurons(torch.stack([scores, 3 * scores]), 1, per_layer=True)  # mean over a batch axis
    assert per_layer[["layer", "neuron"]].values.tolist() == [[0, 2], [1, 0]]
    assert per_layer["score"].tolist() == pytest.approx([2.0, 4.0])


# ---------------------------------------------------------------------------------------------------------
# Logit lens, token level
# ---------------------------------------------------------------------------------------------------------


def test_logit_lens_final_layer_is_the_models_output(case):
    model, raw = case.model, case.raw
    lens = token_lens.logit_lens_tokens(model, PROMPTS[0], ANSWERS, k=5)
    n = model.cfg.n_layers
    assert lens.answer_ranks.shape == (n + 1, 2) and lens.answer_probs.shape == (n + 1, 2)
    logits = model.bridge(case.tokens[:1])[0, -1].detach()
    final = lens.top_tokens[lens.top_tokens["layer"] == n]
    assert final["token_id"].tolist() == logits.topk(5).indices.tolist()
    assert final["token_id"].iloc[0] == int(raw.logits[0, -1].argmax())  # the unprocessed model's argmax
    assert_ranks_match(lens.answer_ranks[n].tolist(), raw.logits[0, -1], case.answers.tolist(), n)
    # a probability moves by at most its logit's rounding: the logits' scale sets the tolerance
    want = raw.logits[0, -1].softmax(-1)[case.answers]
    assert_close_up_to_rounding(lens.answer_probs[n], want, model, scale=raw.logits[0, -1])
    table = lens.answer_table()
    assert len(table) == 2 * (n + 1) and set(table["answer"]) == set(ANSWERS)


def test_logit_lens_every_layer_matches_the_unprocessed_model(case):
    """Layer i: the unprocessed model's hidden state after i blocks through its own final norm and lm_head."""
    model, raw = case.model, case.raw
    lens = token_lens.logit_lens_tokens(model, case.tokens[0], ANSWERS, k=3)
    n = model.cfg.n_layers
    for layer in (0, 1, n // 2, n - 1):
        with torch.no_grad():
            ref = raw.hf.lm_head(raw.final_norm(raw.hidden[layer][0, -1]))
        assert_ranks_match(lens.answer_ranks[layer].tolist(), ref, case.answers.tolist(), layer)
        assert_close_up_to_rounding(lens.answer_probs[layer], ref.softmax(-1)[case.answers], model, scale=ref)
        rows = lens.top_tokens[lens.top_tokens["layer"] == layer]
        assert rows["token_id"].tolist() == ref.topk(3).indices.tolist(), layer


def test_logit_lens_agreement_against_the_unprocessed_model(case):
    model, raw = case.model, case.raw
    table = token_lens.logit_lens_agreement(model, case.tokens, positions="all")
    n = model.cfg.n_layers
    assert table["layer"].tolist() == list(range(n + 1))
    assert table["top1_agreement"].iloc[-1] == 1.0 and table["mean_kl_to_final"].iloc[-1] == pytest.approx(0, abs=1e-5)
    start = 1 if model.prepend_bos else 0
    final_lp = raw.logits[:, start:].log_softmax(-1)
    for layer in (1, n // 2):
        with torch.no_grad():
            lp = raw.hf.lm_head(raw.final_norm(raw.hidden[layer][:, start:])).log_softmax(-1)
        agree = (lp.argmax(-1) == final_lp.argmax(-1)).float().mean().item()
        kl = (final_lp.exp() * (final_lp - lp)).sum(-1).mean().item()
        assert table["top1_agreement"].iloc[layer] == pytest.approx(agree)
        assert table["mean_kl_to_final"].iloc[layer] == pytest.approx(kl, abs=rounding_tolerance(lp, model))
        assert table["n_positions"].iloc[layer] == final_lp.shape[0] * final_lp.shape[1]


# ---------------------------------------------------------------------------------------------------------
# FFN neurons
# ---------------------------------------------------------------------------------------------------------


def test_neuron_value_tokens_match_the_unprocessed_weights(case):
    """A neuron's value vector through the real final-norm gain and lm_head (LayerNorm: centred first)."""
    model, raw = case.model, case.raw
    neurons = [(0, 3), (model.cfg.n_layers - 1, 17)]
    table = ffn_neurons.neuron_value_tokens(model, neurons, k=6)
    no_gain = ffn_neurons.neuron_value_tokens(model, neurons, k=6, through_final_norm_gain=False)
    for layer, n in neurons:
        v = raw.centre(raw.value_vectors(layer)[n])
        for frame, vec in ((table, v * raw.gain), (no_gain, v)):
            scores = raw.lm_head @ vec
            rows = frame[(frame.layer == layer) & (frame.neuron == n)]
            assert rows[rows.side == "top"]["token_id"].tolist() == scores.topk(6).indices.tolist()
            assert rows[rows.side == "bottom"]["token_id"].tolist() == (-scores).topk(6).indices.tolist()
            # same scores up to the vocabulary centring of W_U (one constant for the whole vector)
            got = torch.tensor(rows[rows.side == "top"]["score"].tolist())
            shift = got - scores.topk(6).values
            assert_close_up_to_rounding(shift, shift[:1].expand(6), model, scale=scores)


def test_value_vector_along_an_unembedding_column_tops_that_token(smollm2):
    """Hand-built: v = W_U[:, t] for the column of largest norm. By Cauchy-Schwarz no other column scores higher,
    so t must be the top token; -v must put t at the bottom."""
    W_U = unembedding.unembedding(smollm2)
    t = int(W_U.norm(dim=0).argmax())
    v = W_U[:, t]
    _, top_i, _, bot_i = unembedding.top_and_bottom_tokens(torch.stack([v, -v]), W_U, 3)
    assert top_i[0, 0] == t and bot_i[1, 0] == t
    vocab_mean = W_U.mean(dim=1)  # centring adds a shared constant; check the raw column too
    assert float(v @ vocab_mean) == pytest.approx(0, abs=1e-3)


@pytest.fixture(scope="module")
def direct_effects(case):
    return SimpleNamespace(
        plain=ffn_neurons.neuron_scores(case.model, case.tokens, "direct_effect", case.answers),
        scaled=ffn_neurons.neuron_scores(
            case.model, case.tokens, "direct_effect", case.answers, divide_by_final_norm_scale=True
        ),
        size=ffn_neurons.neuron_scores(case.model, case.tokens, "activation_x_weight_norm"),
        mlp=ffn_updates.mlp_answer_contributions(case.model, case.tokens, case.answers),
    )


def test_neuron_scores_match_the_unprocessed_model(case, direct_effects):
    model, raw = case.model, case.raw
    direction = raw.gain * (raw.lm_head[case.answers[0]] - raw.lm_head[case.answers[1]])
    assert direct_effects.plain.shape == (2, model.cfg.n_layers, model.cfg.d_mlp)
    for layer in (0, model.cfg.n_layers - 1):
        W = raw.centre(raw.value_vectors(layer))  # [d_mlp, d_model]
        act = raw.acts[layer]  # [batch, d_mlp]
        assert_close_up_to_rounding(direct_effects.plain[:, layer], act * (W @ direction), model)
        assert_close_up_to_rounding(direct_effects.size[:, layer], act.abs() * W.norm(dim=-1), model)


def test_mlp_answer_contributions_match_the_unprocessed_model(case, direct_effects):
    model, raw = case.model, case.raw
    direction = raw.gain * (raw.lm_head[case.answers[0]] - raw.lm_head[case.answers[1]])
    scale = (raw.centre(raw.final_in).pow(2).mean(-1) + raw.eps(raw.final_norm)).sqrt()  # [batch]
    expected = torch.stack([raw.centre(raw.mlp_out[L]) @ direction for L in range(model.cfg.n_layers)], dim=1)
    assert_close_up_to_rounding(direct_effects.mlp.unscaled, expected, model)
    assert_close_up_to_rounding(direct_effects.mlp.final_norm_scaled, expected / scale[:, None], model)


def test_neuron_direct_effects_add_up_to_the_layer(case, direct_effects):
    """Sum over a layer's neurons (+ its output bias) = that layer's MLP output on the answer direction."""
    model = case.model
    direction = unembedding.logit_diff_direction(model, case.answers.expand(2, 2))
    for layer in range(model.cfg.n_layers):
        b_out = getattr(model.bridge.blocks[layer].mlp, "b_out", None)
        bias_term = 0.0 if b_out is None else (direction @ (b_out - b_out.mean())).detach()
        total = direct_effects.plain[:, layer].sum(-1) + bias_term
        # a sum of d_mlp terms against one matrix product: rounding of the terms' scale, not of the total's
        terms = direct_effects.plain[:, layer].abs().sum(-1)
        assert_close_up_to_rounding(total, direct_effects.mlp.unscaled[:, layer], model, scale=terms)
    ratio = direct_effects.plain / direct_effects.scaled  # the final norm's scale, one per prompt
    torch.testing.assert_close(ratio[:, -1, :5], ratio[:, -1, :1].expand(2, 5), rtol=1e-4, atol=0)


def test_mlp_update_top_tokens_and_fraction_in_token_set(case):
    model, raw = case.model, case.raw
    k = 8
    table = ffn_updates.mlp_update_top_tokens(model, case.tokens, k=k)
    n = model.cfg.n_layers
    assert len(table) == 2 * n * k
    layer = n - 1
    expected = (raw.centre(raw.mlp_out[layer]) * raw.gain) @ raw.lm_head.T  # [batch, vocab]
    for prompt in range(2):
        rows = table[(table.prompt == prompt) & (table.layer == layer)]
        assert rows["token_id"].tolist() == expected[prompt].topk(k).indices.tolist()
    chosen = table[(table.prompt == 0) & (table.layer == layer)]["token_id"].tolist()[:3] + [12345678]
    frac = ffn_updates.fraction_in_token_set(table, chosen)
    got = frac.set_index(["prompt", "layer"])["fraction"]
    assert got[(0, layer)] == pytest.approx(3 / k)
    manual = table.groupby(["prompt", "layer"])["token_id"].apply(lambda s: s.isin(chosen).mean())
    assert got.sort_index().tolist() == pytest.approx(manual.sort_index().tolist())


def test_neuron_token_coherence_matches_a_manual_computation(smollm2):
    table = ffn_neurons.neuron_token_coherence(smollm2, [(5, 10)], k=6)
    W_U = unembedding.unembedding(smollm2)
    ids = (smollm2.bridge.blocks[5].mlp.W_out[10].detach() @ W_U).topk(6).indices
    unit = torch.nn.functional.normalize(W_U[:, ids].T, dim=-1)
    sims = unit @ unit.T
    manual = float(sum(sims[i, j] for i, j in itertools.permutations(range(6), 2)) / 30)
    assert table["coherence"].iloc[0] == pytest.approx(manual, abs=1e-5)
    assert table["top_tokens"].iloc[0] == unembedding.decode_each(smollm2, ids)
    baseline = ffn_neurons.random_token_coherence(smollm2, k=6, n_samples=20, seed=1)
    assert baseline.shape == (20,) and torch.equal(baseline, ffn_neurons.random_token_coherence(smollm2, 6, 20, seed=1))


# ---------------------------------------------------------------------------------------------------------
# OV and QK circuits in embedding space
# ---------------------------------------------------------------------------------------------------------


def test_query_heads_read_the_kv_head_kv_head_of_names(smollm2):
    """z of query head h = its attention pattern applied to the values of key/value head kv_head_of(h)."""
    tokens = smollm2.to_tokens(PROMPTS[0])
    names = {"blocks.2.attn.hook_z", "blocks.2.attn.hook_pattern", "blocks.2.attn.hook_v"}
    with torch.no_grad():
        _, cache = smollm2.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    z, pattern, v = (
        cache["blocks.2.attn.hook_z"][0],
        cache["blocks.2.attn.hook_pattern"][0],
        cache["blocks.2.attn.hook_v"][0],
    )
    assert [embedding_circuits.kv_head_of(smollm2, h) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for h in range(9):
        assert_close_up_to_rounding(
            z[:, h], pattern[h] @ v[:, embedding_circuits.kv_head_of(smollm2, h)], smollm2, scale=v
        )


def _centre_over_vocab(scores: torch.Tensor, vector_to_vocab_mean: torch.Tensor) -> torch.Tensor:
    return scores - vector_to_vocab_mean[:, None]


@pytest.mark.parametrize("layer,head", [(1, 0), (3, 5)])
def test_ov_and_qk_top_pairs_match_brute_force_on_unprocessed_weights(case, layer, head):
    model, raw = case.model, case.raw
    src = list(range(300, 360))
    out = list(range(1000, 1080))
    W_Q, W_K, W_V, W_O, gain, norm = raw.head_weights(layer, head)
    E = raw.normalise(raw.body.wte.weight.detach() if raw.is_gpt2 else raw.body.embed_tokens.weight.detach(), norm)
    written = raw.centre((E[src] * gain) @ W_V @ W_O) * raw.gain  # what the final norm's gain sees
    full_vocab = written @ raw.lm_head.T  # [n_src, vocab]; W_U is centred over the vocabulary in the bridge
    ov = _centre_over_vocab(full_vocab[:, out], full_vocab.mean(-1))
    order = ov.flatten().argsort(descending=True)[:7]
    table = embedding_circuits.ov_circuit_top_pairs(model, layer, head, src, out, k=7)
    assert table["source_id"].tolist() == [src[i] for i in (order // len(out)).tolist()]
    assert table["output_id"].tolist() == [out[i] for i in (order % len(out)).tolist()]
    assert_close_up_to_rounding(torch.tensor(table["score"].tolist()), ov.flatten()[order], model, scale=full_vocab)

    qk = ((E[src] * gain) @ W_Q) @ ((E[out] * gain) @ W_K).T / raw.d_head**0.5
    order = qk.flatten().argsort()[:5]  # the most negative pairs this time
    table = embedding_circuits.qk_circuit_top_pairs(model, layer, head, src, out, k=5, largest=False)
    assert table["query_id"].tolist() == [src[i] for i in (order // len(out)).tolist()]
    assert table["key_id"].tolist() == [out[i] for i in (order % len(out)).tolist()]
    assert_close_up_to_rounding(torch.tensor(table["score"].tolist()), qk.flatten()[order], model, scale=qk)

    per_token = embedding_circuits.ov_top_outputs(model, layer, head, src[:2], out, k=4)
    assert per_token[per_token.source_id == src[1]]["output_id"].tolist() == [
        out[i] for i in ov[1].topk(4).indices.tolist()
    ]


@pytest.mark.parametrize("model_name", MODELS)
def test_frequent_token_ids_are_words_in_id_order(request, model_name):
    any_model = request.getfixturevalue(model_name)
    ids = vocabulary.frequent_token_ids(any_model, 50)
    assert ids == sorted(ids) and len(set(ids)) == 50
    words = unembedding.decode_each(any_model, ids)
    assert all(w.startswith(" ") and w[1:].isalpha() and len(w) >= 3 for w in words)
    assert not set(ids) & set(any_model.tokenizer.all_special_ids)
    with pytest.raises(ValueError, match="only .* tokens"):
        vocabulary.frequent_token_ids(any_model, 10, pattern=r"^ Answer$")


# ---------------------------------------------------------------------------------------------------------
# Bad input is named
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_are_named(smollm2):
    tokens = smollm2.to_tokens(PROMPTS[0])
    with pytest.raises(ValueError, match="Yesterday"):
        token_lens.logit_lens_tokens(smollm2, PROMPTS[0], (" Yesterday's", " No"))
    with pytest.raises(ValueError, match="method"):
        ffn_neurons.neuron_scores(smollm2, tokens, "loudness")
    with pytest.raises(ValueError, match="needs answer_tokens"):
        ffn_neurons.neuron_scores(smollm2, tokens, "direct_effect")
    with pytest.raises(ValueError, match=r"neurons\[1\] neuron"):
        ffn_neurons.neuron_value_tokens(smollm2, [(0, 1), (0, smollm2.cfg.d_mlp)])
    with pytest.raises(ValueError, match=r"neurons\[0\] layer"):
        ffn_neurons.neuron_value_tokens(smollm2, [(2.5, 1)])
    with pytest.raises(ValueError, match="head"):
        embedding_circuits.ov_circuit_top_pairs(smollm2, 0, 9, [1, 2], [3, 4])
    with pytest.raises(ValueError, match=r"output_ids\[1\]"):
        embedding_circuits.ov_circuit_top_pairs(smollm2, 0, 0, [300], [301, 10**7])
    with pytest.raises(ValueError, match="tokens must be"):
        ffn_updates.mlp_answer_contributions(smollm2, tokens[0], torch.tensor([1, 2]))
    ids, multi = vocabulary.token_set_ids(smollm2, [" Yes", " Yesterday's"])
    assert ids == [smollm2.single_token_id(" Yes")] and multi == [" Yesterday's"]


# ---------------------------------------------------------------------------------------------------------
# Task-set helpers (notebook 07)
# ---------------------------------------------------------------------------------------------------------


def test_logit_lens_trajectories_match_the_unprocessed_model(case):
    """Every prompt's answer ranks, probabilities and top token at each layer, against the unprocessed model's
    hidden states through its own final norm and lm_head."""
    model, raw = case.model, case.raw
    found = token_lens.logit_lens_trajectories(model, case.tokens, case.answers)  # [2] answers, broadcast to the batch
    n = model.cfg.n_layers
    assert found.answer_ranks.shape == (2, n + 1, 2) and found.top1.shape == (2, n + 1)
    for layer in (0, 1, n // 2, n):
        with torch.no_grad():  # HF's last hidden state is already normed, so the output layer uses the logits
            ref = raw.logits[:, -1] if layer == n else raw.hf.lm_head(raw.final_norm(raw.hidden[layer][:, -1]))
        for row in range(2):
            assert_ranks_match(found.answer_ranks[row, layer].tolist(), ref[row], case.answers.tolist(), layer)
            assert int(found.top1[row, layer]) == int(ref[row].argmax()), layer
        assert_close_up_to_rounding(found.answer_probs[:, layer], ref.softmax(-1)[:, case.answers], model, scale=ref)
    assert torch.equal(found.agrees_with_final, (found.top1 == found.top1[:, -1:]).float())
    prefers_yes = found.answer_ranks[..., 0] < found.answer_ranks[..., 1]
    assert torch.equal(found.choice_agrees_with_final, (prefers_yes == prefers_yes[:, -1:]).float())
    assert bool((found.choice_agrees_with_final[:, -1] == 1).all())
    # per-row answer pairs: swapping row 1's pair swaps its rank columns and leaves row 0 alone
    per_row = token_lens.logit_lens_trajectories(model, case.tokens, torch.stack([case.answers, case.answers.flip(0)]))
    assert torch.equal(per_row.answer_ranks[0], found.answer_ranks[0])
    assert torch.equal(per_row.answer_ranks[1], found.answer_ranks[1].flip(-1))
    with pytest.raises(ValueError, match="answer_tokens"):
        token_lens.logit_lens_trajectories(model, case.tokens, torch.tensor([1, model.cfg.d_vocab]))


def test_logit_lens_agreement_by_prompt_against_the_unprocessed_model(case):
    model, raw = case.model, case.raw
    by_prompt = token_lens.logit_lens_agreement_by_prompt(model, case.tokens, "all")
    start = 1 if model.prepend_bos else 0
    n_pos = case.tokens.shape[1] - start
    assert by_prompt.n_positions.tolist() == [n_pos, n_pos]
    final_lp = raw.logits[:, start:].log_softmax(-1)
    layer = 2
    with torch.no_grad():
        lp = raw.hf.lm_head(raw.final_norm(raw.hidden[layer][:, start:])).log_softmax(-1)
    agree = (lp.argmax(-1) == final_lp.argmax(-1)).float().mean(-1)  # per prompt
    kl = (final_lp.exp() * (final_lp - lp)).sum(-1).mean(-1)
    torch.testing.assert_close(by_prompt.top1_agreement[:, layer], agree)
    assert_close_up_to_rounding(by_prompt.kl_to_final[:, layer], kl, model, scale=lp)
    last = token_lens.logit_lens_agreement_by_prompt(
        model, case.tokens, "last"
    )  # same as the trajectories' top-1 check
    trajectories = token_lens.logit_lens_trajectories(model, case.tokens, case.answers)
    assert torch.equal(last.top1_agreement, trajectories.agrees_with_final)


@pytest.mark.batch_split
def test_collect_over_batches_joins_batches_in_order(smollm2, torch_threads):
    from mechfin_utils.methods.readout import dla

    tokens = smollm2.to_tokens(list(PROMPTS))
    answers = torch.tensor([[smollm2.single_token_id(" Yes"), smollm2.single_token_id(" No")]] * 2)
    batches = [
        SimpleNamespace(
            clean_tokens=tokens[i : i + 1], corrupted_tokens=tokens[1 - i : 2 - i], answer_tokens=answers[i : i + 1]
        )
        for i in range(2)
    ]
    got = task_sets.collect_over_batches(task_sets.lens_and_mlp_readout, smollm2, batches)  # NamedTuple of NamedTuples
    whole = ffn_updates.mlp_answer_contributions(smollm2, tokens, answers)  # the separate functions on the whole batch
    lens = token_lens.logit_lens_trajectories(smollm2, tokens, answers)
    # batches of one against a batch of two: the same sums in another order (float32 rounding of their scale)
    assert_close_up_to_rounding(got["clean"].mlp.final_norm_scaled, whole.final_norm_scaled, smollm2)
    assert_close_up_to_rounding(got["corrupted"].mlp.unscaled, whole.unscaled.flip(0), smollm2)
    # a rank can move one place where another token's logit ties the answer's within that rounding
    assert (got["clean"].lens.answer_ranks - lens.answer_ranks).abs().max() <= 1
    assert torch.equal(got["corrupted"].lens.top1, lens.top1.flip(0))
    acts = task_sets.collect_over_batches(
        ffn_neurons.mlp_activations_last, smollm2, batches, ("clean",), pass_answer_tokens=False
    )
    assert list(acts) == ["clean"]
    assert_close_up_to_rounding(acts["clean"], ffn_neurons.mlp_activations_last(smollm2, tokens), smollm2)
    effects = task_sets.collect_over_batches(
        ffn_neurons.neuron_scores, smollm2, batches, ("corrupted",), method="direct_effect"
    )
    want = ffn_neurons.neuron_scores(smollm2, tokens.flip(0), "direct_effect", answers)
    assert_close_up_to_rounding(effects["corrupted"], want, smollm2)
    heads = task_sets.collect_over_batches(dla.head_attribution, smollm2, batches, ("clean",))["clean"]
    expected = dla.head_attribution(smollm2, tokens, answers).logit_diff
    assert_close_up_to_rounding(heads.logit_diff, expected, smollm2, scale=heads.heads.abs().sum((1, 2)))
    with pytest.raises(ValueError, match="runs"):
        task_sets.collect_over_batches(
            ffn_neurons.mlp_activations_last, smollm2, batches, ("dirty",), pass_answer_tokens=False
        )
    with pytest.raises(ValueError, match="no batches"):
        task_sets.collect_over_batches(ffn_neurons.mlp_activations_last, smollm2, [], pass_answer_tokens=False)
    with pytest.raises(TypeError, match="dict"):
        task_sets.collect_over_batches(lambda model, tokens, answer_tokens: {"x": 1}, smollm2, batches)


def test_geometric_mean_ci_is_the_bootstrap_of_log_values():
    from mechfin_utils.core.stats import bootstrap_ci

    values = torch.tensor([[1.0, 10.0], [100.0, 10.0], [10.0, 1000.0], [1000.0, 1.0]])
    result = token_lens.geometric_mean_ci(values, n_boot=300, seed=3)
    expected = torch.exp(values.double().log().mean(0))  # (1*100*10*1000)^(1/4) and (10*10*1000*1)^(1/4)
    np.testing.assert_allclose(result.estimate, expected.numpy(), rtol=1e-9)
    on_logs = bootstrap_ci(np.log10(values.numpy().astype(np.float64)), n_boot=300, seed=3)
    np.testing.assert_allclose(result.low, 10.0**on_logs.low, rtol=1e-9)
    np.testing.assert_allclose(result.high, 10.0**on_logs.high, rtol=1e-9)
    single = token_lens.geometric_mean_ci(values[:, 0], n_boot=300, seed=3)
    assert isinstance(single.estimate, float) and single.estimate == pytest.approx(float(expected[0]))
    with pytest.raises(ValueError, match=r"values\[2, 1\]"):
        token_lens.geometric_mean_ci(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]))


def test_answer_rank_bands_name_runs_and_answers():
    ranks = torch.tensor([[[1, 5], [2, 6]], [[3, 5], [4, 6]], [[9, 5], [8, 6]]])  # [batch 3, layer 2, answers 2]
    traj = token_lens.LensTrajectories(
        ranks, answer_probs=torch.zeros(3, 2, 2), top1=torch.zeros(3, 2, dtype=torch.long)
    )
    bands = token_lens.answer_rank_bands({"clean": traj}, (" Yes", " No"), n_boot=50, seed=0)
    assert list(bands) == ["Yes · clean", "No · clean"]
    np.testing.assert_allclose(bands["Yes · clean"].estimate, [27 ** (1 / 3), 64 ** (1 / 3)], rtol=1e-9)
    np.testing.assert_allclose(bands["No · clean"].estimate, [5, 6], rtol=1e-9)
    np.testing.assert_allclose(bands["No · clean"].low, [5, 6], rtol=1e-9)  # no spread, no width


def test_readable_tokens_and_wide_tables():
    assert token_tables.readable_token(" Yes") == "␣Yes" and token_tables.readable_token("\n\n") == "\\n\\n"
    assert token_tables.readable_token("") == "''"
    tidy = pd.DataFrame({"layer": [0, 0, 1, 1], "rank": [1, 2, 1, 2], "token": [" a", "b\n", "c", " "]})
    wide = token_tables.token_table(tidy, "layer")
    assert wide.loc[0].tolist() == ["␣a", "b\\n"] and wide.loc[1].tolist() == ["c", "␣"]
    with pytest.raises(ValueError, match="more than one"):
        token_tables.token_table(pd.concat([tidy, tidy.iloc[:1]]), "layer")
    with pytest.raises(ValueError, match="lacks columns"):
        token_tables.token_table(tidy, "prompt")
    lens = token_lens.LogitLensTokens(
        model_name="fake",
        prompt="p",
        answers=(" Yes", " No"),
        answer_ids=(1, 2),
        top_tokens=tidy,
        answer_ranks=torch.tensor([[4, 7], [1, 3]]),
        answer_probs=torch.zeros(2, 2),
    )
    table = token_tables.lens_table(lens)
    assert list(table.columns) == ["top 1", "top 2", "rank of ␣Yes", "rank of ␣No"]
    assert table["rank of ␣No"].tolist() == [7, 3]
    shown = token_tables.readable_columns(
        pd.DataFrame({"source_token": [" x"], "output_token": ["\n"], "score": [1.0]})
    )
    assert shown.iloc[0].tolist() == ["␣x", "\\n", 1.0]


def _fake_model(n_layers=3, n_heads=4):
    return SimpleNamespace(name="fake", cfg=SimpleNamespace(n_layers=n_layers, n_heads=n_heads))


def test_named_heads_table_means_intervals_and_ranks():
    from mechfin_utils.core.stats import bootstrap_ci

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 3, 4, generator=gen)
    values[:, 2, 1] += 5.0  # the largest |mean|
    values[:, 0, 3] -= 3.0  # the second largest
    table = readout_tables.named_heads_table(values, ["L0H3", "L2H1", "L1H0"], _fake_model(), n_boot=100, seed=1)
    assert table["head"].tolist() == ["L0H3", "L2H1", "L1H0"]
    mean = values.double().mean(0)
    assert table["mean"].tolist() == pytest.approx([float(mean[0, 3]), float(mean[2, 1]), float(mean[1, 0])])
    assert table["rank_by_abs"].tolist()[:2] == [2, 1]
    ranks_by_hand = 1 + int((mean.abs() > mean[1, 0].abs()).sum())
    assert table["rank_by_abs"].iloc[2] == ranks_by_hand
    ci = bootstrap_ci(values.double().numpy(), n_boot=100, seed=1)
    assert table["low"].iloc[1] == pytest.approx(ci.low[2, 1]) and table["high"].iloc[0] == pytest.approx(ci.high[0, 3])
    with pytest.raises(ValueError, match=r"head 'L3H0': layer 3 does not exist"):
        readout_tables.named_heads_table(values, ["L3H0"], _fake_model())
    with pytest.raises(ValueError, match="not of the form"):
        readout_tables.named_heads_table(values, ["1-2"], _fake_model())
    with pytest.raises(ValueError, match="layers x heads"):
        readout_tables.named_heads_table(values, ["L0H0"], _fake_model(n_heads=5))


@pytest.mark.parametrize("layer,head", [(2, 4)])
def test_ov_answer_scores_match_brute_force_on_unprocessed_weights(case, layer, head):
    model, raw = case.model, case.raw
    src = list(range(500, 540))
    _, _, W_V, W_O, gain, norm = raw.head_weights(layer, head)
    E = raw.normalise(raw.body.wte.weight.detach() if raw.is_gpt2 else raw.body.embed_tokens.weight.detach(), norm)
    written = raw.centre((E[src] * gain) @ W_V @ W_O) * raw.gain
    expected = written @ (raw.lm_head[case.answers[0]] - raw.lm_head[case.answers[1]])  # vocab centring cancels
    table = embedding_circuits.ov_answer_scores(model, layer, head, src, ANSWERS)
    assert table["source_id"].tolist() == src
    assert_close_up_to_rounding(torch.tensor(table["score"].tolist()), expected, model, scale=written)
    grouped = embedding_circuits.ov_answer_push_by_group(
        model, [f"L{layer}H{head}"], {"b": src[20:], "a": src[:20]}, ANSWERS, n_boot=50
    )
    assert grouped["group"].tolist() == ["b", "a"] and grouped["n"].tolist() == [20, 20]
    means = [float(expected[20:].mean()), float(expected[:20].mean())]
    assert grouped["estimate"].tolist() == pytest.approx(means, rel=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        embedding_circuits.ov_answer_push_by_group(model, [f"L{layer}H{head}"], {"lonely": src[:1]}, ANSWERS)


def test_phrase_vocabulary_and_prompt_word_ids(smollm2):
    pairs = [
        SimpleNamespace(id="p1", protected_phrase="because she is Black", legitimate_phrase="because of bad credit"),
        SimpleNamespace(id="p2", protected_phrase="because he is Muslim", legitimate_phrase="because of his debts"),
    ]
    vocab = vocabulary.phrase_vocabulary(smollm2, pairs)
    assert unembedding.decode_each(smollm2, vocab.protected_only) == [" she", " is", " Black", " he", " Muslim"]
    assert unembedding.decode_each(smollm2, vocab.legitimate_only) == [" of", " bad", " credit", " his", " debts"]
    assert unembedding.decode_each(smollm2, vocab.shared) == [" because"]
    with pytest.raises(ValueError, match=r"pairs\[1\] \(p3\) has no legitimate_phrase"):
        vocabulary.phrase_vocabulary(
            smollm2, pairs[:1] + [SimpleNamespace(id="p3", protected_phrase="x", legitimate_phrase="")]
        )
    words = vocabulary.prompt_word_ids(smollm2, ["Is this a fair-lending violation? Answer:", "Is this fair?"])
    assert unembedding.decode_each(smollm2, words) == ["Is", " this", " fair", "ending", " violation", " Answer"]


def test_coherence_sides_baselines_and_percentiles(smollm2):
    W_U = unembedding.unembedding(smollm2)
    bottom = ffn_neurons.neuron_token_coherence(smollm2, [(5, 10), (5, 10)], k=6, sides=["bottom", "top"])
    ids = (-smollm2.bridge.blocks[5].mlp.W_out[10].detach() @ W_U).topk(6).indices  # the most lowered tokens
    assert bottom["top_tokens"].iloc[0] == unembedding.decode_each(smollm2, ids) and bottom["side"].tolist() == [
        "bottom",
        "top",
    ]
    assert bottom["coherence"].iloc[0] == pytest.approx(ffn_neurons.mean_pairwise_cosine(W_U[:, ids].T), abs=1e-6)
    with pytest.raises(ValueError, match=r"sides\[0\]"):
        ffn_neurons.neuron_token_coherence(smollm2, [(5, 10)], sides=["left"])
    # random neurons: the same draws read one by one give the same numbers
    drawn = ffn_neurons.random_neuron_coherence(smollm2, k=5, n_samples=4, seed=2, layers=[3, 7])
    gen = torch.Generator().manual_seed(2)
    layers = torch.tensor([3, 7])[torch.randint(2, (4,), generator=gen)]
    neurons = torch.randint(smollm2.cfg.d_mlp, (4,), generator=gen)
    by_hand = ffn_neurons.neuron_token_coherence(smollm2, list(zip(layers.tolist(), neurons.tolist())), k=5)
    assert drawn.tolist() == pytest.approx(by_hand["coherence"].tolist(), abs=1e-6)
    # percentiles against a known baseline: 0.1 has one draw below and one tie among 0.0 ... 0.9
    toy = torch.arange(10, dtype=torch.float64) / 10
    table = ffn_neurons.coherence_against_baseline(pd.DataFrame({"coherence": [0.1, 0.95]}), toy, "toy")
    assert table["toy_percentile"].tolist() == pytest.approx([15.0, 100.0])
    assert table["above_toy_95"].tolist() == [False, True] and table["toy_95th"].iloc[0] == pytest.approx(0.855)
    with pytest.raises(ValueError, match="'coherence' column"):
        ffn_neurons.coherence_against_baseline(pd.DataFrame({"x": [1.0]}), torch.arange(3.0))


def test_pair_value_frame_feeds_the_per_basis_table():
    from mechfin_utils.screener.baseline import per_group_table

    pairs = [SimpleNamespace(id=f"p{i}", basis="race" if i < 3 else "age", template_id="T1") for i in range(5)]
    clean, corrupted = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0]), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    frame = task_sets.pair_value_frame(pairs, clean, corrupted)
    assert frame["gap"].tolist() == [1.0, 2.0, 2.0, 3.0, 5.0]
    table = per_group_table(frame, "basis", n_boot=50)
    assert table.loc["race", "clean"] == pytest.approx(2.0) and table.loc["age", "gap"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="5 pairs but 4 clean"):
        task_sets.pair_value_frame(pairs, clean[:4], corrupted)
