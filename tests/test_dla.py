"""Direct logit attribution and the logit lens (mechfin_utils.methods.readout.dla), with the head labels
(methods.readout.heads) and the interval tables built on them (mechfin_utils.reporting.readout_tables).

Every number is checked against an independent computation: the model's own logits, and a reference
written here from the *unprocessed* Hugging Face checkpoint (its own modules, its own final-norm gain and
bias, no TransformerLens weight processing). Three models: the embedded SmolLM2 (RMSNorm, rotary,
grouped-query attention, no biases), the random-weight GPT-2 through the Hugging Face cache path, and a
random GPT-2 whose biases and LayerNorm parameters are random too (so every bias term is non-zero).
"""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import pytest
import torch

from mechfin_utils.methods.readout import dla, final_position
from mechfin_utils.methods.readout.heads import head_label, head_labels, parse_head, select_heads, top_heads
from mechfin_utils.reporting import readout_tables
from mechfin_utils.tasks import paper_claims
from mechfin_utils.tooling.testing import assert_close_up_to_rounding

MODELS = ["smollm2", "gpt2_random", "gpt2_random_biased"]
PAIR = (
    "The Black applicant was denied the loan. Is this illegal? Answer:",
    "The young applicant was denied the loan. Is this illegal? Answer:",
)
LONGER_PAIR = (
    "A bank refused a mortgage to her because she is a woman. Could this break fair lending law? Answer:",
    "A bank refused a mortgage to her because she has high debt. Could this break fair lending law? Answer:",
)


def answers_of(model) -> torch.Tensor:
    return torch.tensor([model.single_token_id(" Yes"), model.single_token_id(" No")])


# ---------------------------------------------------------------------------------------------------------
# An independent reference from the unprocessed Hugging Face model
# ---------------------------------------------------------------------------------------------------------


class RawReference:
    """Final-position pieces of the unprocessed model and their exact shares of the logit difference.

    share(c) = frozen_norm(c) . (gain * (W_U[yes] - W_U[no])), with the norm's scale taken from the real
    final residual stream; the final norm's bias and any lm_head bias make a constant term.
    """

    def __init__(self, hf, tokens: torch.Tensor, answers: torch.Tensor):
        self.is_gpt2 = hasattr(hf, "transformer")
        body = hf.transformer if self.is_gpt2 else hf.model
        self.blocks = body.h if self.is_gpt2 else body.layers
        self.final_norm = body.ln_f if self.is_gpt2 else body.norm
        self.hf, self.tokens = hf, tokens
        n_heads = hf.config.num_attention_heads
        self.d_model = hf.config.hidden_size
        self.n_heads, self.d_head = n_heads, self.d_model // n_heads
        captured: dict[str, torch.Tensor] = {}
        handles = []

        def keep(key, from_output=False):
            def hook(module, args, output=None):
                value = (output[0] if isinstance(output, tuple) else output) if from_output else args[0]
                captured[key] = value[:, -1].detach().clone()

            return hook

        handles.append(self.final_norm.register_forward_pre_hook(keep("final_in")))
        for layer, block in enumerate(self.blocks):
            attn = block.attn if self.is_gpt2 else block.self_attn
            out_proj = attn.c_proj if self.is_gpt2 else attn.o_proj
            handles.append(out_proj.register_forward_pre_hook(keep(f"z{layer}")))
            handles.append(attn.register_forward_hook(keep(f"attn{layer}", from_output=True)))
            handles.append(block.mlp.register_forward_hook(keep(f"mlp{layer}", from_output=True)))
        try:
            with torch.no_grad():
                output = hf(tokens, output_hidden_states=True)
        finally:
            for handle in handles:
                handle.remove()
        self.captured = captured
        self.logits = output.logits[:, -1].detach()
        self.hidden_states = [h[:, -1].detach() for h in output.hidden_states]
        picked = self.logits.gather(1, answers.expand(tokens.shape[0], 2))
        self.logit_diff = picked[:, 0] - picked[:, 1]

        W_U = hf.lm_head.weight.detach()  # [vocab, d_model]
        raw_direction = W_U[answers[0]] - W_U[answers[1]]
        self.direction = raw_direction * self.final_norm.weight.detach()
        norm_bias = getattr(self.final_norm, "bias", None)
        self.constant = torch.zeros(()) if norm_bias is None else (norm_bias.detach() * raw_direction).sum()
        if getattr(hf.lm_head, "bias", None) is not None:
            self.constant = self.constant + hf.lm_head.bias[answers[0]] - hf.lm_head.bias[answers[1]]
        self.eps = self.final_norm.eps if self.is_gpt2 else self.final_norm.variance_epsilon
        self.scale = self.norm_scale(captured["final_in"])

    def center(self, x):
        return x - x.mean(-1, keepdim=True) if self.is_gpt2 else x

    def norm_scale(self, x):
        return (self.center(x).pow(2).mean(-1) + self.eps).sqrt()

    def share(self, piece, scale=None):
        scale = self.scale if scale is None else scale
        return (self.center(piece) / scale[:, None] * self.direction).sum(-1)

    def embeddings(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if self.is_gpt2:
                positions = torch.arange(self.tokens.shape[1])
                return {
                    "embed": self.hf.transformer.wte(self.tokens)[:, -1],
                    "pos_embed": self.hf.transformer.wpe(positions)[-1].expand(self.tokens.shape[0], -1),
                }
            return {"embed": self.hf.model.embed_tokens(self.tokens)[:, -1]}

    def head_outputs(self, layer: int) -> torch.Tensor:
        """[batch, n_heads, d_model]: each head's z (with its value bias) through its slice of W_O."""
        z = self.captured[f"z{layer}"].reshape(-1, self.n_heads, self.d_head)
        attn = self.blocks[layer].attn if self.is_gpt2 else self.blocks[layer].self_attn
        if self.is_gpt2:
            W_O = attn.c_proj.weight.detach().reshape(self.n_heads, self.d_head, self.d_model)
        else:
            W_O = attn.o_proj.weight.detach().T.reshape(self.n_heads, self.d_head, self.d_model)
        return torch.einsum("bhd,hdm->bhm", z, W_O)

    def value_bias_outputs(self, layer: int) -> torch.Tensor:
        """[n_heads, d_model] (GPT-2 only): each head's constant value offset through its W_O, which
        TransformerLens moves into b_O. The offset is b_V plus the block's LayerNorm bias read through W_V
        (fold_ln folds ln_1's bias into b_V); every value vector carries it and attention weights sum to 1."""
        block = self.blocks[layer]
        value_weight = block.attn.c_attn.weight.detach()[:, 2 * self.d_model :]
        value_offset = block.attn.c_attn.bias.detach()[2 * self.d_model :] + block.ln_1.bias.detach() @ value_weight
        W_O = block.attn.c_proj.weight.detach().reshape(self.n_heads, self.d_head, self.d_model)
        return torch.einsum("hd,hdm->hm", value_offset.reshape(self.n_heads, self.d_head), W_O)


@pytest.fixture(scope="module", params=MODELS)
def case(request, unprocessed_hf_reference):
    """One model, a pair of prompts, and the unprocessed reference computed on them."""
    model = request.getfixturevalue(request.param)
    tokens = model.to_tokens(list(PAIR))
    answers = answers_of(model)
    reference = RawReference(unprocessed_hf_reference(request.param), tokens, answers)
    return SimpleNamespace(name=request.param, model=model, tokens=tokens, answers=answers, ref=reference)


@pytest.fixture(scope="module")
def decomposition(case):
    return dla.layer_decomposition(case.model, case.tokens, case.answers)


@pytest.fixture(scope="module")
def heads(case):
    return dla.head_attribution(case.model, case.tokens, case.answers)


def test_reference_itself_reproduces_the_logit_difference(case):
    ref = case.ref
    pieces = list(ref.embeddings().values())
    for layer in range(len(ref.blocks)):
        pieces += [ref.captured[f"attn{layer}"], ref.captured[f"mlp{layer}"]]
    shares = [ref.share(p) for p in pieces]
    total = sum(shares) + ref.constant
    # a sum of many components: rounding of the components' scale, not of the (smaller) total's
    assert_close_up_to_rounding(total, ref.logit_diff, case.model, scale=sum(s.abs() for s in shares))


# ---------------------------------------------------------------------------------------------------------
# layer_decomposition
# ---------------------------------------------------------------------------------------------------------


def test_layer_decomposition_sums_to_the_models_logit_difference(case, decomposition):
    labels, values = decomposition
    n_layers = case.model.cfg.n_layers
    embeds = ["embed", "pos_embed"] if case.name.startswith("gpt2") else ["embed"]
    per_layer = [f"{layer}_{kind}" for layer in range(n_layers) for kind in ("attn_out", "mlp_out")]
    assert labels == embeds + per_layer + ["unembed_bias"]
    assert values.shape == (2, len(labels))
    assert_close_up_to_rounding(values.sum(-1), case.ref.logit_diff, case.model, scale=values.abs().sum(-1))


def test_layer_decomposition_matches_the_unprocessed_reference(case, decomposition):
    labels, values = decomposition
    ref = case.ref
    expected = {label: ref.share(piece) for label, piece in ref.embeddings().items()}
    for layer in range(len(ref.blocks)):
        expected[f"{layer}_attn_out"] = ref.share(ref.captured[f"attn{layer}"])
        expected[f"{layer}_mlp_out"] = ref.share(ref.captured[f"mlp{layer}"])
    expected["unembed_bias"] = ref.constant.expand(2)
    want = torch.stack([expected[label] for label in labels], dim=1)
    assert_close_up_to_rounding(values, want, case.model)


def test_bias_terms_are_real_and_needed(case, decomposition, heads):
    labels, values = decomposition
    bias_columns = [i for i, label in enumerate(heads.other_labels) if label.endswith("_attn_bias")]
    if case.name == "gpt2_random_biased":
        # GPT-2's lm_head has no bias, but its final LayerNorm bias is folded into b_U.
        assert values[:, -1].abs().min() > 1e-2
        assert (values[:, :-1].sum(-1) - case.ref.logit_diff).abs().min() > 1e-2
        assert heads.other[:, bias_columns].abs().max() > 1e-2
    else:
        assert values[:, -1].abs().max() == 0  # no unembedding bias: nothing is computed, exactly 0
        # no attention biases: each column is attn_out minus its heads' sum, 0 up to rounding of the heads' scale
        assert_close_up_to_rounding(
            heads.other[:, bias_columns], 0 * heads.other[:, bias_columns], case.model, scale=heads.heads
        )


# ---------------------------------------------------------------------------------------------------------
# head_attribution
# ---------------------------------------------------------------------------------------------------------


def test_head_attribution_sums_to_the_logit_difference(case, heads):
    n_layers, n_heads = case.model.cfg.n_layers, case.model.cfg.n_heads
    assert heads.heads.shape == (2, n_layers, n_heads)
    assert heads.model_name == case.model.name
    # logit_diff is the bridge's own output; the reference is the unprocessed checkpoint's
    terms = heads.heads.abs().sum((1, 2)) + heads.other.abs().sum(-1)  # the scale of what is summed
    assert_close_up_to_rounding(heads.logit_diff, case.ref.logit_diff, case.model, scale=terms)
    assert_close_up_to_rounding(heads.total, heads.logit_diff, case.model, scale=terms)
    assert_close_up_to_rounding(heads.total, case.ref.logit_diff, case.model, scale=terms)


def test_heads_plus_attention_bias_equal_the_layer_attention_output(case, decomposition, heads):
    labels, values = decomposition
    for layer in range(case.model.cfg.n_layers):
        attn_total = heads.heads[:, layer].sum(-1) + heads.other[:, heads.other_labels.index(f"{layer}_attn_bias")]
        scale = heads.heads[:, layer].abs().sum(-1)
        assert_close_up_to_rounding(attn_total, values[:, labels.index(f"{layer}_attn_out")], case.model, scale=scale)
        assert_close_up_to_rounding(
            heads.other[:, heads.other_labels.index(f"{layer}_mlp_out")],
            values[:, labels.index(f"{layer}_mlp_out")],
            case.model,
        )


def test_each_head_matches_the_unprocessed_reference(case, heads):
    """Per query head, from the checkpoint's own o_proj/c_proj slices (for SmolLM2, 9 query heads sharing
    3 key/value heads). GPT-2's value bias is counted in the attention-bias term, as TransformerLens does."""
    ref = case.ref
    for layer in range(case.model.cfg.n_layers):
        outputs = ref.head_outputs(layer)  # [batch, heads, d_model]
        attn_bias = ref.captured[f"attn{layer}"] - outputs.sum(1)  # c_proj / o_proj bias (0 for SmolLM2)
        if ref.is_gpt2:
            value_bias = ref.value_bias_outputs(layer)
            outputs = outputs - value_bias[None]
            attn_bias = attn_bias + value_bias.sum(0)[None]
        want = torch.stack([ref.share(outputs[:, h]) for h in range(ref.n_heads)], dim=1)
        assert_close_up_to_rounding(heads.heads[:, layer], want, case.model)
        got_bias = heads.other[:, heads.other_labels.index(f"{layer}_attn_bias")]
        assert_close_up_to_rounding(got_bias, ref.share(attn_bias), case.model, scale=want)


# ---------------------------------------------------------------------------------------------------------
# The logit lens
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenses(case):
    modes = ("cached", "recompute")
    return {mode: dla.logit_lens(case.model, case.tokens, case.answers, ln_mode=mode) for mode in modes}


@pytest.mark.parametrize("ln_mode", ["cached", "recompute"])
def test_logit_lens_matches_the_reference(case, lenses, ln_mode):
    labels, values = lenses[ln_mode]
    ref = case.ref
    n_layers = case.model.cfg.n_layers
    assert labels == [f"{layer}_pre" for layer in range(n_layers)] + ["final_post"]
    # hidden_states[L] is the stream entering layer L (the last one is already normed, so use logits there).
    streams = ref.hidden_states[:n_layers]
    want = [ref.share(h, scale=None if ln_mode == "cached" else ref.norm_scale(h)) + ref.constant for h in streams]
    want = torch.stack(want + [ref.logit_diff], dim=1)
    assert_close_up_to_rounding(values, want, case.model)
    assert_close_up_to_rounding(values[:, -1], ref.logit_diff, case.model, scale=values)


def test_logit_lens_without_the_unembedding_bias(gpt2_random_biased):
    tokens = gpt2_random_biased.to_tokens(list(PAIR))
    answers = answers_of(gpt2_random_biased)
    _, with_bias = dla.logit_lens(gpt2_random_biased, tokens, answers)
    _, without_bias = dla.logit_lens(gpt2_random_biased, tokens, answers, include_unembed_bias=False)
    b_U = gpt2_random_biased.bridge.b_U
    constant = (b_U[answers[0]] - b_U[answers[1]]).item()
    assert abs(constant) > 1e-2
    want = torch.full_like(with_bias, constant)
    assert_close_up_to_rounding(with_bias - without_bias, want, gpt2_random_biased, scale=with_bias)


def test_cached_logit_lens_steps_are_the_layer_decomposition(case, decomposition, lenses):
    """With a frozen final scale the lens is additive: column L+1 - column L is layer L's direct effect."""
    labels, values = decomposition
    _, lens = lenses["cached"]
    n_embeds = labels.index("0_attn_out")
    assert_close_up_to_rounding(lens[:, 0], values[:, :n_embeds].sum(-1) + values[:, -1], case.model, scale=values)
    for layer in range(case.model.cfg.n_layers):
        step = values[:, labels.index(f"{layer}_attn_out")] + values[:, labels.index(f"{layer}_mlp_out")]
        assert_close_up_to_rounding(lens[:, layer + 1] - lens[:, layer], step, case.model, scale=lens)


# ---------------------------------------------------------------------------------------------------------
# Helpers: top_heads, over_batches, the final-position runner, input errors
# ---------------------------------------------------------------------------------------------------------


def test_top_heads_orders_by_magnitude_or_sign():
    values = torch.tensor([[0.1, -0.5, 0.0], [0.3, -0.05, 0.2]])
    top = top_heads(values, 3)
    assert [head for head, _ in top] == ["L0H1", "L1H0", "L1H2"]
    assert [value for _, value in top] == pytest.approx([-0.5, 0.3, 0.2])
    assert [h for h, _ in top_heads(values, 2, order="positive")] == ["L1H0", "L1H2"]
    assert [h for h, _ in top_heads(values, 2, order="negative")] == ["L0H1", "L1H1"]
    with pytest.raises(ValueError, match="n_layers, n_heads"):
        top_heads(values[None], 2)
    with pytest.raises(ValueError, match="k must be"):
        top_heads(values, 7)


@pytest.mark.batch_split
def test_over_batches_concatenates_clean_and_corrupted_per_prompt(gpt2_random_biased, torch_threads):
    answers = answers_of(gpt2_random_biased)
    batches = [
        SimpleNamespace(
            clean_tokens=gpt2_random_biased.to_tokens([PAIR[0], PAIR[1]]),
            corrupted_tokens=gpt2_random_biased.to_tokens([PAIR[1], PAIR[0]]),
            answer_tokens=answers.expand(2, 2),
        ),
        SimpleNamespace(  # a different prompt length
            clean_tokens=gpt2_random_biased.to_tokens([LONGER_PAIR[0]]),
            corrupted_tokens=gpt2_random_biased.to_tokens([LONGER_PAIR[1]]),
            answer_tokens=answers.expand(1, 2),
        ),
    ]
    results = dla.over_batches(dla.head_attribution, gpt2_random_biased, batches)
    assert set(results) == {"clean", "corrupted"}
    clean, corrupted = results["clean"], results["corrupted"]
    assert len(clean) == len(corrupted) == 3
    # prompt 0 clean is prompt 1 corrupted (same text), and the longer pair's rows come last
    # the same prompt in another batch: the same sums in another order
    assert_close_up_to_rounding(clean.heads[0], corrupted.heads[1], gpt2_random_biased)
    alone = dla.head_attribution(gpt2_random_biased, gpt2_random_biased.to_tokens([LONGER_PAIR[1]]), answers)
    assert_close_up_to_rounding(corrupted.heads[2], alone.heads[0], gpt2_random_biased)
    terms = corrupted.heads.abs().sum((1, 2)) + corrupted.other.abs().sum(-1)
    assert_close_up_to_rounding(corrupted.total, corrupted.logit_diff, gpt2_random_biased, scale=terms)

    recompute_lens = functools.partial(dla.logit_lens, ln_mode="recompute")
    lens = dla.over_batches(recompute_lens, gpt2_random_biased, batches, runs=["clean"])
    labels, values = lens["clean"]
    assert values.shape == (3, gpt2_random_biased.cfg.n_layers + 1) and labels[-1] == "final_post"
    assert_close_up_to_rounding(values[:, -1], clean.logit_diff, gpt2_random_biased, scale=values)

    broken = [SimpleNamespace(clean_tokens=batches[0].clean_tokens, answer_tokens=answers)]
    with pytest.raises(ValueError, match="batch 0 has no 'corrupted_tokens'"):
        dla.over_batches(dla.layer_decomposition, gpt2_random_biased, broken)


def test_final_position_cache_keeps_exactly_the_last_position(gpt2_random):
    tokens = gpt2_random.to_tokens(list(PAIR))
    names = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern", "ln_final.hook_scale", "blocks.0.hook_resid_pre"]
    logits, cache = final_position.run_with_final_position_cache(gpt2_random, tokens, names)
    with torch.no_grad():
        full_logits, full = gpt2_random.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    # one position's queries against every position's: the same sums in another batch shape
    assert_close_up_to_rounding(logits, full_logits[:, -1], gpt2_random)
    for name, last in [
        (names[0], (slice(None), slice(-1, None))),
        (names[1], (slice(None), slice(None), slice(-1, None))),
    ]:
        assert_close_up_to_rounding(cache[name], full[name][last], gpt2_random, msg=name)
    assert_close_up_to_rounding(cache[names[2]], full[names[2]][:, -1:], gpt2_random, msg=names[2])
    assert torch.equal(cache[names[3]], full[names[3]][:, -1:])  # the embedding: a lookup, exact
    with pytest.raises(KeyError, match="no hook named"):
        final_position.run_with_final_position_cache(gpt2_random, tokens, ["blocks.0.hook_nonsense"])


def test_bad_inputs_are_named(smollm2):
    tokens = smollm2.to_tokens(list(PAIR))
    with pytest.raises(ValueError, match="answer_tokens must be"):
        dla.layer_decomposition(smollm2, tokens, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor of token ids, non-empty \[batch, pos\]"):
        dla.logit_lens(smollm2, tokens[0], answers_of(smollm2))
    bad = tokens.clone()
    bad[1, 3] = smollm2.cfg.d_vocab
    with pytest.raises(ValueError, match=r"tokens\[1, 3\]"):
        dla.head_attribution(smollm2, bad, answers_of(smollm2))
    with pytest.raises(ValueError, match="ln_mode"):
        dla.logit_lens(smollm2, tokens, answers_of(smollm2), ln_mode="fresh")


# ---------------------------------------------------------------------------------------------------------
# Summaries over a task set: intervals, head tables, groups, the paper's claims, layer totals
# ---------------------------------------------------------------------------------------------------------


def test_layer_totals_reproduce_the_layer_decomposition(case, decomposition, heads):
    labels, values = dla.layer_totals(heads)
    want_labels, want_values = decomposition
    assert labels == want_labels
    assert_close_up_to_rounding(values, want_values, case.model, scale=heads.heads.abs().sum(-1).max())
    assert_close_up_to_rounding(values.sum(-1), heads.logit_diff, case.model, scale=values.abs().sum(-1))


def test_accumulated_from_components_is_the_cached_logit_lens(case, decomposition, lenses):
    labels, values = dla.accumulated_from_components(*decomposition)
    want_labels, want = lenses["cached"]
    assert labels == want_labels
    assert_close_up_to_rounding(values, want, case.model, scale=decomposition[1].abs().sum(-1))
    with pytest.raises(ValueError, match="layer_decomposition's"):
        dla.accumulated_from_components(decomposition[0][1:], decomposition[1][:, 1:])


def test_term_groups_split_the_logit_difference(case, heads):
    labels, values = dla.term_groups(heads)
    assert labels == ["all_heads", "all_mlps", "embeddings", "attention_biases", "unembed_bias"]
    assert_close_up_to_rounding(values.sum(-1), heads.logit_diff, case.model, scale=values.abs().sum(-1))
    assert_close_up_to_rounding(
        values[:, 0], heads.heads.sum(dim=(1, 2)), case.model, scale=heads.heads.abs().sum((1, 2))
    )
    mlp_columns = [i for i, label in enumerate(heads.other_labels) if label.endswith("_mlp_out")]
    mlps = heads.other[:, mlp_columns]
    assert_close_up_to_rounding(values[:, 1], mlps.sum(1), case.model, scale=mlps.abs().sum(1))
    if case.name == "smollm2":  # no biases anywhere
        # attn_out minus the heads: float error only, of the heads' scale
        assert_close_up_to_rounding(values[:, 3:], 0 * values[:, 3:], case.model, scale=heads.heads)
    if case.name == "gpt2_random_biased":
        assert values[:, 3].abs().min() > 1e-3  # the b_O terms are real here


def test_ci_table_means_intervals_and_signs():
    from mechfin_utils.core.stats import bootstrap_ci

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=generator)
    values = torch.stack([base + 5.0, base - 5.0, base * 0.01, torch.full((40,), 2.0), base + 7.0], dim=1)
    table = readout_tables.ci_table(["up", "down", "flat", "constant", "shifted"], values, n_boot=500, seed=3)
    assert list(table.index) == ["up", "down", "flat", "constant", "shifted"]
    assert table["mean"].to_numpy() == pytest.approx(values.double().mean(0).numpy(), abs=1e-12)
    assert (table["n"] == 40).all()
    assert list(table["sign"]) == ["positive", "negative", "unclear", "positive", "positive"]
    assert table.loc["constant", "low"] == pytest.approx(2.0) and table.loc["constant", "high"] == pytest.approx(2.0)
    # rows are resampled jointly: a column shifted by a constant has its interval shifted by that constant
    assert table.loc["shifted", "low"] - table.loc["up", "low"] == pytest.approx(2.0)
    assert table.loc["shifted", "high"] - table.loc["up", "high"] == pytest.approx(2.0)
    alone = bootstrap_ci(values[:, 2].double().numpy(), n_boot=500, seed=3)
    assert (table.loc["flat", "low"], table.loc["flat", "high"]) == pytest.approx((alone.low, alone.high))
    with pytest.raises(ValueError, match="3 labels for 5 columns"):
        readout_tables.ci_table(["a", "b", "c"], values)
    with pytest.raises(ValueError, match="labels repeat 'a'"):
        readout_tables.ci_table(["a", "a", "b", "c", "d"], values)


def test_paired_ci_table_takes_the_gap_per_pair():
    generator = torch.Generator().manual_seed(1)
    shared = 10 * torch.randn(30, 2, generator=generator)  # large, shared by both prompts of a pair
    clean, corrupted = shared + torch.tensor([0.5, 0.0]), shared.clone()
    table = readout_tables.paired_ci_table(["moves", "same"], clean, corrupted, n_boot=400)
    assert table.loc["moves", "gap"] == pytest.approx(0.5) and table.loc["same", "gap"] == pytest.approx(0.0)
    # paired: the shared noise cancels, so the gap's interval is exact while clean's is wide
    assert table.loc["moves", "gap_low"] == pytest.approx(0.5) and table.loc["moves", "gap_high"] == pytest.approx(0.5)
    assert table.loc["moves", "clean_high"] - table.loc["moves", "clean_low"] > 1.0
    assert table.loc["same", "clean"] == pytest.approx(float(shared[:, 1].double().mean()))
    with pytest.raises(ValueError, match="must be paired"):
        readout_tables.paired_ci_table(["moves", "same"], clean, corrupted[:-1])


def test_head_labels_parse_and_select():
    values = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    labels = head_labels(3, 4)
    assert labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"] and len(labels) == 12
    flat = values.reshape(2, -1)
    picked = select_heads(values, ["L2H1", "L0H3"])
    torch.testing.assert_close(picked, flat[:, [labels.index("L2H1"), labels.index("L0H3")]].double())
    assert parse_head("L10H7") == (10, 7) and parse_head((10, 7)) == (10, 7) and head_label(10, 7) == "L10H7"
    with pytest.raises(
        ValueError, match=r"head label '10\.7' is not of the form 'L<layer>H<head>'.*for layer 10, head 7 write 'L10H7'"
    ):
        parse_head("10.7")  # the papers' way: the error says how mechfin writes it
    for wrong in ("L10", "H7", "L10H7.q", "MLP10", "l10h7", ""):
        with pytest.raises(ValueError, match=f"head label {re.escape(repr(wrong))} is not of the form"):
            parse_head(wrong)
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        select_heads(values, ["L3H0"])
    with pytest.raises(ValueError, match="head 4 does not exist"):
        select_heads(values, ["L1H4"])


def test_head_table_selects_ranks_and_summarises():
    means = torch.tensor([[0.1, -0.9, 0.0], [0.6, -0.2, 0.3]])
    per_prompt = means + torch.tensor([-0.01, 0.01])[:, None, None]  # two prompts around those means
    extremes = readout_tables.head_table(per_prompt, k=2, order="extremes", n_boot=200)
    assert list(extremes.index) == ["L1H0", "L1H2", "L1H1", "L0H1"]  # most positive first, most negative last
    assert extremes["mean"].to_numpy() == pytest.approx([0.6, 0.3, -0.2, -0.9])
    assert list(extremes["layer"]) == [1, 1, 1, 0] and list(extremes["head_index"]) == [0, 2, 1, 1]
    assert list(extremes["rank"]) == [2, 3, 4, 1]  # by magnitude among all six heads
    positive = readout_tables.head_table(per_prompt, k=3, order="positive", n_boot=200)
    assert list(positive.index) == ["L1H0", "L1H2", "L0H0"] and list(positive["rank"]) == [1, 2, 3]
    chosen = readout_tables.head_table(per_prompt, ["L0H2", "L0H1"], order="negative", n_boot=200)
    assert list(chosen.index) == ["L0H2", "L0H1"] and list(chosen["rank"]) == [3, 1]  # 0.0 ranks after -0.9, -0.2
    assert (chosen["low"] <= chosen["mean"]).all() and (chosen["mean"] <= chosen["high"]).all()
    by_pair = readout_tables.head_table(per_prompt, [(0, 2), (0, 1)], order="negative", n_boot=200)
    assert list(by_pair.index) == ["L0H2", "L0H1"]  # (layer, head) pairs come back labelled
    with pytest.raises(ValueError, match="order must be"):
        readout_tables.head_table(per_prompt, order="largest")
    with pytest.raises(ValueError, match="k must be"):
        readout_tables.head_table(per_prompt, k=4, order="extremes")


def test_grouped_ci_table_per_group_with_a_single_prompt_group():
    values = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0], [100.0, -1.0]])
    groups = ["race", "race", "age", "age", "sex"]
    table = readout_tables.grouped_ci_table(["a", "b"], values, groups, n_boot=300)
    assert list(table.columns) == ["group", "component", "n", "mean", "low", "high", "sign"]
    grid = table.pivot(index="group", columns="component", values="mean")
    assert grid.loc["race", "a"] == pytest.approx(2.0) and grid.loc["age", "b"] == pytest.approx(60.0)
    assert grid.loc["sex", "a"] == pytest.approx(100.0)
    single = table[table["group"] == "sex"]
    assert (single["n"] == 1).all() and single["low"].isna().all() and (single["sign"] == "unclear").all()
    race_a = table[(table["group"] == "race") & (table["component"] == "a")].iloc[0]
    assert 1.0 <= race_a["low"] <= race_a["high"] <= 3.0 and race_a["n"] == 2
    with pytest.raises(ValueError, match="3 groups for 5 rows"):
        readout_tables.grouped_ci_table(["a", "b"], values, groups[:3])


def test_compare_with_paper_reads_the_intervals():
    import pandas as pd

    table = pd.DataFrame(
        {
            "mean": [0.5, -0.4, 0.1, 0.3],
            "low": [0.2, -0.6, -0.1, 0.1],
            "high": [0.8, -0.1, 0.3, 0.5],
            "rank": [1, 2, 4, 3],
        },
        index=["2_mlp_out", "4_mlp_out", "10_mlp_out", "0_attn_out"],
    )
    compared = readout_tables.compare_with_paper(table, paper_claims.LAYER_DLA)
    assert list(compared.index) == ["2_mlp_out", "4_mlp_out", "10_mlp_out", "0_attn_out"]
    assert list(compared["paper"]) == ["positive", "positive", "negative", "negative"]
    assert list(compared["verdict"]) == ["agrees", "opposite", "unclear", "opposite"]
    assert list(compared["rank"]) == [1, 2, 4, 3] and compared.loc["2_mlp_out", "this_run"] == 0.5
    with pytest.raises(KeyError, match="'L11H4' is not in the table"):
        readout_tables.compare_with_paper(table, {"L11H4": "positive"})


def test_component_display_names():
    assert [
        readout_tables.component_display_name(x)
        for x in ["embed", "pos_embed", "3_attn_out", "11_mlp_out", "unembed_bias"]
    ] == ["embed", "pos embed", "attn 3", "MLP 11", "unembed bias"]
    with pytest.raises(ValueError, match="not a component label"):
        readout_tables.component_display_name("3_attn_bias")
