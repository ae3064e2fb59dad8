"""Notebook 14's pieces: the fine-tuning corpus kept apart from greater-than, the cached fine-tune, cross-model
patching of a circuit task, and two models' circuits compared.

References: planted leaks the corpus check must name; a cache whose train function counts its calls; tiny models in
which fine-tuning changed one known component (cross-model patching must recover exactly 1 there and exactly 0
elsewhere) and a forward hook on the plain Hugging Face model; hand-computed bootstrap and Jaccard values.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.graph import ComputationalGraph
from mechfin_utils.core.models import SMOLLM2_SPEC
from mechfin_utils.core.stats import bootstrap_distribution
from mechfin_utils.methods.circuits import base_vs_tuned
from mechfin_utils.methods.circuits.edges import EdgePatcher, EdgeScores, top_edges
from mechfin_utils.methods.patching.cross_model import cross_model_task_patching
from mechfin_utils.screener import fine_tune_cache, ordering
from mechfin_utils.tasks import number_ordering
from mechfin_utils.tasks.circuit_tasks import CircuitBatch, CircuitTask, GreaterThanPrompt, load_greater_than
from mechfin_utils.tooling.testing import assert_close_up_to_rounding

VOCAB = 40

# ---------------------------------------------------------------------------------------------------------
# The corpus, kept apart from the evaluation
# ---------------------------------------------------------------------------------------------------------


def test_the_corpus_never_touches_a_greater_than_prompt_and_always_continues_with_a_larger_number():
    evaluation = load_greater_than()
    corpus = number_ordering.build_corpus(400, seed=3, evaluation=evaluation)
    assert number_ordering.evaluation_leaks(corpus, evaluation) == []
    nouns = {p.noun for p in evaluation}
    for example in corpus:
        assert example.later > example.first and int(example.continuation) == example.later
        assert not any(noun in example.text.lower().split() for noun in nouns)
        assert re.search(r"\b17\d\d\b", example.text) is None
        assert all(p.clean_prompt not in example.text for p in evaluation[::97])
    assert {e.family for e in corpus} == set(number_ordering.FAMILIES)
    again = number_ordering.build_corpus(400, seed=3, evaluation=evaluation)
    other = number_ordering.build_corpus(400, seed=4, evaluation=evaluation)
    assert number_ordering.corpus_sha256(again) == number_ordering.corpus_sha256(corpus)
    assert number_ordering.corpus_sha256(other) != number_ordering.corpus_sha256(corpus)


@pytest.mark.parametrize(
    ("prefix", "what"),
    [
        ("The war was opened in 1843 and closed in 18", "noun"),
        ("The canal was opened in 1743 and closed in 17", "year"),
        ("The canal lasted from the year 1843 to", "template"),
        ("Notes: The siege lasted from the year 1732 to the year 17", "prompt"),
    ],
)
def test_a_planted_leak_is_named_and_refused(prefix, what):
    evaluation = [
        GreaterThanPrompt(
            "gt-1",
            "siege",
            "17",
            32,
            "The siege lasted from the year 1732 to the year 17",
            "The siege lasted from the year 1701 to the year 17",
        ),
        GreaterThanPrompt(
            "gt-2",
            "war",
            "17",
            40,
            "The war lasted from the year 1740 to the year 17",
            "The war lasted from the year 1701 to the year 17",
        ),
    ]
    leak = number_ordering.OrderingExample("later date", 0, prefix, "50", 43, 50)
    problems = number_ordering.evaluation_leaks([leak], evaluation)
    expected = {"noun": "names the evaluation noun", "year": "year of an evaluation century",
                "template": "shares the evaluation template", "prompt": "contains an evaluation prompt"}[what]  # fmt: skip
    assert any(expected in line and "example 0" in line for line in problems), problems
    clean = number_ordering.build_corpus(20, seed=0, evaluation=evaluation)
    assert number_ordering.evaluation_leaks(clean, evaluation) == []


def test_only_the_continuation_is_labelled_and_the_loss_is_its_cross_entropy(smollm2_tokenizer):
    corpus = number_ordering.build_corpus(6, seed=1)
    ids, mask, labels = ordering.continuation_batch(smollm2_tokenizer, corpus, prepend_bos=False)
    for row, example in enumerate(corpus):
        labelled = labels[row][labels[row] != -100].tolist()
        assert smollm2_tokenizer.decode(labelled) == example.continuation
        n = int(mask[row].sum())
        assert smollm2_tokenizer.decode(ids[row, :n].tolist()) == example.text
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
                         intermediate_size=32, vocab_size=len(smollm2_tokenizer))  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    loss = ordering.continuation_loss(model, ids, mask, labels)
    by_hand = []  # one example at a time, unpadded: -log p(continuation token | everything before it)
    for example in corpus:
        prefix = smollm2_tokenizer(example.prefix, add_special_tokens=False)["input_ids"]
        full = smollm2_tokenizer(example.text, add_special_tokens=False)["input_ids"]
        log_probs = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
        by_hand += [-float(log_probs[p - 1, full[p]].detach()) for p in range(len(prefix), len(full))]
    assert float(loss.detach()) == pytest.approx(np.mean(by_hand), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# The cache: trained once, refused when stale
# ---------------------------------------------------------------------------------------------------------


def test_a_cached_fine_tune_trains_once_and_a_stale_card_is_retrained(tmp_path):
    folder = tmp_path / "tuned"
    calls = []

    def train(fingerprint):
        def run():
            calls.append(fingerprint)
            folder.mkdir(exist_ok=True)
            (folder / "model.safetensors").write_bytes(b"weights")
            card = {"fingerprint": fingerprint, "weights_sha256": "x"}
            (folder / fine_tune_cache.CARD_FILES[1]).write_text(json.dumps(card))
            return card

        return run

    first = {"recipe": {"steps": 3}, "corpus_sha256": "a"}
    assert (
        fine_tune_cache.cached_fine_tune(folder, first, train(first), label="t", progress=False)["fingerprint"] == first
    )
    fine_tune_cache.cached_fine_tune(folder, first, train(first), label="t", progress=False)
    assert len(calls) == 1  # the second call found the card
    stale = {"recipe": {"steps": 3}, "corpus_sha256": "b"}  # another corpus: the cached weights must not be used
    fine_tune_cache.cached_fine_tune(folder, stale, train(stale), label="t", progress=False)
    assert calls == [first, stale] and fine_tune_cache.read_card(folder)["fingerprint"] == stale
    (folder / "model.safetensors").unlink()  # a card without its weights is not a cache either
    fine_tune_cache.cached_fine_tune(folder, stale, train(stale), label="t", progress=False)
    assert len(calls) == 3
    with pytest.raises(RuntimeError, match="fingerprint is not the one requested"):
        fine_tune_cache.cached_fine_tune(folder, {"other": 1}, train(first), label="t", progress=False)
    with pytest.raises(ValueError, match="JSON round trip"):
        fine_tune_cache.cached_fine_tune(folder, {"steps": (1, 2)}, train(first), label="t", progress=False)


def test_the_ordering_fingerprint_changes_with_recipe_and_corpus():
    base = ordering.Base("smollm2-135m", SMOLLM2_SPEC, "unused", {"gguf": "x.gguf", "gguf_bytes": 1})
    recipe = ordering.ORDERING_RECIPES["ordering-brief"]
    corpus = number_ordering.build_corpus(8, seed=0)
    reference = ordering.ordering_fingerprint(base, recipe, corpus)
    assert json.loads(json.dumps(reference)) == reference
    other_recipe = ordering.OrderingRecipe(**{**recipe.__dict__, "learning_rate": 2e-3})
    assert ordering.ordering_fingerprint(base, other_recipe, corpus) != reference
    assert ordering.ordering_fingerprint(base, recipe, number_ordering.build_corpus(8, seed=1)) != reference


# ---------------------------------------------------------------------------------------------------------
# Cross-model patching of a circuit task
# ---------------------------------------------------------------------------------------------------------


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(12.0 if p.ndim == 2 else 1.0)
    return model


def _task(n: int = 5, n_pos: int = 7, seed: int = 0, read: int = 1) -> CircuitTask:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, n_pos), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 1 + torch.randint(0, VOCAB - 1, (n,), generator=generator)) % VOCAB

    def score(logits: torch.Tensor) -> torch.Tensor:  # reads every position it is given, as greater-than reads two
        return (logits[:, :, 3] - logits[:, :, 5]).mean(1)

    return CircuitTask("toy", "logit diff", [CircuitBatch(clean, corrupted, score, [f"p{i}" for i in range(n)], read)])


def _changed(base: LlamaForCausalLM, module: str, seed: int = 1) -> LlamaForCausalLM:
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = tuned.get_submodule(module).weight
        weight.add_(0.5 * weight.std() * torch.randn(weight.shape, generator=generator))
    return tuned


@pytest.mark.parametrize("measure", ["clean", "gap"])
def test_a_change_in_the_last_mlp_is_recovered_there_exactly_and_nowhere_else(measure):
    base = _tiny_llama()
    tuned = _changed(base, "model.layers.2.mlp.down_proj")
    result = cross_model_task_patching(FunctionalTransformer(base), FunctionalTransformer(tuned), _task(read=2),
                                       measure=measure)  # fmt: skip
    table = result.table(n_boot=200).set_index(["layer", "component"])
    assert abs(result.gain) > 1e-3
    assert table.loc[(2, "mlp_out"), "recovery"] == pytest.approx(1.0, abs=1e-5)
    others = table.drop(index=(2, "mlp_out"))
    assert np.abs(others["recovery"]).max() < 1e-5  # those outputs are equal in both models: patching changes nothing
    assert len(table) == 2 * 3 and (table["low"] <= table["recovery"] + 1e-9).all()


def test_cross_model_task_patching_equals_a_forward_hook_on_the_plain_model():
    base = _tiny_llama()
    tuned = _changed(_changed(base, "model.layers.0.self_attn.o_proj"), "model.layers.1.mlp.up_proj", seed=2)
    task = _task(read=2)
    result = cross_model_task_patching(FunctionalTransformer(base), FunctionalTransformer(tuned), task)
    batch = task.batches[0]
    for cell, (layer, component) in enumerate(result.cells):
        module = f"model.layers.{layer}." + ("self_attn" if component == "attn_out" else "mlp")
        recorded = {}

        def record(m, a, out, recorded=recorded):
            recorded["out"] = out[0] if isinstance(out, tuple) else out

        handle = tuned.get_submodule(module).register_forward_hook(record)
        with torch.no_grad():
            tuned(batch.clean_tokens)
        handle.remove()

        def replace(m, a, out, recorded=recorded):
            return (recorded["out"], *out[1:]) if isinstance(out, tuple) else recorded["out"]

        handle = base.get_submodule(module).register_forward_hook(replace)
        with torch.no_grad():
            logits = base(batch.clean_tokens).logits
        handle.remove()
        expected = batch.score(logits[:, -2:])  # a difference of logits: rounding scales with the logits' size
        assert_close_up_to_rounding(result.patched[:, cell], expected, scale=float(logits.abs().max()), width=64,
                                    depth=3)  # fmt: skip


def test_a_model_patched_into_itself_gains_nothing_and_recovery_is_undefined():
    base = FunctionalTransformer(_tiny_llama())
    result = cross_model_task_patching(base, base, _task())
    assert result.gain == 0.0  # the same recorded run on both sides
    logits = base.logits(_task().batches[0].clean_tokens)  # the packed run sums in another order: rounding only
    assert_close_up_to_rounding(result.patched, result.base[:, None].expand_as(result.patched),
                                scale=float(logits.abs().max()), width=64, depth=3)  # fmt: skip
    with pytest.raises(ValueError, match="is 0 in"):
        result.table(n_boot=50)


# ---------------------------------------------------------------------------------------------------------
# Two models' circuits
# ---------------------------------------------------------------------------------------------------------


def _scores(graph: ComputationalGraph, per_prompt: torch.Tensor, name: str) -> EdgeScores:
    return EdgeScores("EAP-IG", 2, name, "toy", graph, [f"p{i}" for i in range(per_prompt.shape[0])], per_prompt)


def test_overlap_of_a_circuit_with_itself_is_its_own_noise_and_with_a_disjoint_one_is_zero():
    graph = ComputationalGraph.of(FunctionalTransformer(_tiny_llama()))
    valid = graph.valid()
    generator = torch.Generator().manual_seed(0)
    per_prompt = torch.randn(12, *valid.shape, generator=generator) * valid
    same = base_vs_tuned.circuit_overlap(_scores(graph, per_prompt, "a"), _scores(graph, per_prompt, "b"), 20, n_boot=8)
    assert same.jaccard == 1.0 and same.cross == same.self_base == same.self_tuned
    assert same.summary()["cross_over_self"] == pytest.approx(1.0)
    # every prompt's scores on edges the other model's circuit never has: the top 20 of each are disjoint
    order = torch.randperm(int(valid.sum()), generator=generator)
    cells = valid.flatten().nonzero().flatten()[order]
    first, second = torch.zeros(valid.numel()), torch.zeros(valid.numel())
    first[cells[:20]], second[cells[20:40]] = 5.0, 5.0
    a = first.view_as(valid) + 0.01 * per_prompt
    b = second.view_as(valid) + 0.01 * per_prompt
    apart = base_vs_tuned.circuit_overlap(_scores(graph, a, "a"), _scores(graph, b, "b"), 20, n_boot=6)
    assert apart.jaccard == 0.0 and max(apart.cross) == 0.0 and min(apart.self_base) == 1.0
    with pytest.raises(ValueError, match="different prompts"):
        base_vs_tuned.circuit_overlap(_scores(graph, a, "a"), _scores(graph, b[:6], "b"), 20)


def test_every_circuit_in_every_model_and_the_paired_difference():
    base, tuned = _tiny_llama(), _tiny_llama(seed=5)
    task = _task(n=6)
    patchers = {"base": EdgePatcher(FunctionalTransformer(base), task),
                "tuned": EdgePatcher(FunctionalTransformer(tuned), task)}  # fmt: skip
    valid = patchers["base"].valid
    some = top_edges(torch.randn(valid.shape, generator=torch.Generator().manual_seed(0)) * valid, 30)
    transfer = base_vs_tuned.circuit_transfer(patchers, {"all": valid, "none": valid & False, "some": some},
                                              n_random=2, n_boot=100)  # fmt: skip
    table = transfer.table.set_index(["model", "circuit", "n_edges"])
    for model in patchers:
        assert table.loc[(model, "all", int(valid.sum())), "faithfulness"] == pytest.approx(1.0, abs=1e-6)
        assert table.loc[(model, "none", 0), "faithfulness"] == pytest.approx(0.0, abs=1e-6)
        itself = transfer.difference(model, "some", "some", n_boot=100)
        assert itself.estimate == itself.low == itself.high == 0.0
        whole = transfer.difference(model, "all", "none", n_boot=100)
        assert whole.estimate == pytest.approx(1.0, abs=1e-6) and whole.low == pytest.approx(1.0, abs=1e-6)
    assert set(transfer.table["circuit"]) == {"all", "none", "some", "random"}


def test_the_normalised_difference_is_the_by_hand_ratio_of_resampled_means():
    generator = np.random.default_rng(0)
    a, b, zero, one = (generator.normal(size=9) + shift for shift in (0.7, 0.4, 0.0, 1.0))
    result = base_vs_tuned.normalised_difference(a, b, zero, one, n_boot=400, seed=3)
    assert result.estimate == pytest.approx((a.mean() - b.mean()) / (one.mean() - zero.mean()))
    means = bootstrap_distribution(np.stack([a, b, zero, one], 1), n_boot=400, seed=3)
    by_hand = (means[:, 0] - means[:, 1]) / (means[:, 3] - means[:, 2])
    assert (result.low, result.high) == pytest.approx(tuple(np.quantile(by_hand, [0.025, 0.975])))
