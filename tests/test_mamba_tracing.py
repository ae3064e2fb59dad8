"""The generic hook tracer and the Mamba edit site, on tiny Llama and Mamba models trained for 80 steps (seconds).

Independent references and known answers (each follows from the definitions, not from a previous run):

* on a Llama, every restoration of :func:`trace_components` equals the project's tracer
  (:func:`mechfin_utils.methods.tracing.causal_trace`) with the same prompt and noise, on its functional engine
  (another implementation of the forward pass) and through the bridge's hooks;
* on a Mamba: the corrupted score equals a plain Hugging Face forward (no hooks, no bridge) from noised
  ``inputs_embeds``; restoring the last block's output at the last position gives the clean score; restoring every
  position of block 0's output gives the clean score; restoring a position before the subject changes nothing;
  restoring ``W_o``'s input equals restoring its output (it is linear, bias-free, position by position); restoring
  both halves of ``in_proj``'s output at every position equals restoring the mixer's output there (the mixer reads
  nothing else); zero noise gives the clean score everywhere;
* a ROME edit of a Mamba ``out_proj``: ``W' k* = v*``, keys ``C``-orthogonal to ``k̄`` keep their values, nothing
  but that matrix moves, and its key covariance equals a sum taken by hand on a plain Hugging Face model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mechfin_utils.core import hook_points
from mechfin_utils.core.models import ModelSpec, boot_bridge
from mechfin_utils.methods import editing, tracing
from mechfin_utils.methods.tracing import module_trace
from mechfin_utils.screener import fact_models
from mechfin_utils.tasks import synthetic_facts
from mechfin_utils.tasks.fact_tokenizer import build_fact_tokenizer
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

TINY = fact_models.FactRecipe(
    "tiny",
    n_subjects=12,
    d_model=32,
    llama_layers=3,
    llama_heads=2,
    llama_mlp=64,
    mamba_layers=4,
    mamba_state=4,
    steps=3,
    batch_size=8,
    learning_rate=1e-3,
    warmup_steps=1,
)
SHORT = dataclasses.replace(TINY, name="short", steps=80, batch_size=16, learning_rate=3e-3, warmup_steps=5)
"""Eighty steps: not a model that knows the facts, but one whose answers depend on the subject and the template, so
that noise and restorations move them well above rounding (at random init they barely do) -- a few seconds."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread_no_grad():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    return fact_models.fact_world(TINY)


def _tiny_model(tmp_path_factory, world, arch):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp(f"short-{arch}")
    fact_models.train_fact_model(arch, SHORT, folder, progress=False)
    loaded = boot_bridge(str(folder), ModelSpec(f"short-{arch}", f"briefly trained {arch}", prepend_bos=True), "test")
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return loaded, plain


@pytest.fixture(scope="module")
def llama(tmp_path_factory, world):
    return _tiny_model(tmp_path_factory, world, "llama")


@pytest.fixture(scope="module")
def mamba(tmp_path_factory, world):
    return _tiny_model(tmp_path_factory, world, "mamba")


def _task(world, pair):
    """A fact with a three-token subject in a template with words before it; the answer is the model's own most
    likely whole word there, so that its probability is large enough for restorations to move it."""
    from mechfin_utils.tasks.facts import TraceTask

    model, plain = pair
    fact = next(f for f in world.facts if len(model.tokenizer(f.subject)["input_ids"]) == 3)
    template = next(t for t in world.relation(fact.relation).templates if not t.startswith("{"))
    prompt = fact.prompt(template)
    words = [i for i, t in enumerate(model.tokenizer.convert_ids_to_tokens(range(len(model.tokenizer)))) if t.isalpha()]
    logits = plain(input_ids=torch.tensor([model.token_ids(prompt)])).logits[0, -1]
    answer = " " + model.tokenizer.decode([words[int(logits[words].argmax())]])
    return TraceTask("tiny", prompt, fact.subject, answer)


@pytest.fixture(scope="module")
def llama_task(world, llama):
    return _task(world, llama)


@pytest.fixture(scope="module")
def task(world, mamba):
    return _task(world, mamba)


# ---------------------------------------------------------------------------------------------------------
# The tracer against the project's tracer (Llama)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["engine", "bridge"])
def test_llama_restorations_equal_the_projects_tracer(llama, llama_task, backend):
    model, _ = llama
    task = llama_task
    windows = {"mlp": 2, "attn": 2}
    std = tracing.embedding_noise_std(model)
    settings = {"n_samples": 3, "noise_std": std, "noise_multiplier": 3.0, "windows": windows}
    ours = module_trace.trace_components(model, task, **settings)
    reference = tracing.causal_trace(model, task, backend=backend, **settings)
    prepared = tracing.prepare_trace(model, task)
    logits = model.hf_model(input_ids=prepared.tokens[None]).logits[0, -1]
    for kind in ("hidden", "mlp", "attn"):
        first = prepared.subject_span[0]
        got, want = ours[kind].restored[first:], reference[kind].restored[first:]
        assert np.isnan(ours[kind].restored[:first]).all() and not np.isnan(got).any()
        assert_close_up_to_rounding(torch.tensor(got), torch.tensor(want), model, scale=logits, msg=kind)
        assert ours[kind].corrupted_score == pytest.approx(reference[kind].corrupted_score, abs=1e-6)
        assert np.nanmax(got) - np.nanmin(got) > 10 * rounding_tolerance(logits, model)  # restorations matter


def test_component_maps_name_modules_that_exist_in_both_models(llama, mamba):
    for model, _ in (llama, mamba):
        mapping = module_trace.component_map(model)
        for component in mapping.components:
            assert isinstance(module_trace.component_module(model, component, 0), torch.nn.Module)
    with pytest.raises(ValueError, match="no component 'mlp'"):
        module_trace.component_map(mamba[0]).component("mlp")
    with pytest.raises(ValueError, match="outside"):
        module_trace.component_module(mamba[0], module_trace.COMPONENT_MAPS["mamba"].component("mixer"), 99)


# ---------------------------------------------------------------------------------------------------------
# Known answers on a Mamba
# ---------------------------------------------------------------------------------------------------------


def _noise(model, prepared, n=2, scale=3.0):
    std = scale * tracing.embedding_noise_std(model)
    n_subject = prepared.subject_span[1] - prepared.subject_span[0]
    return tracing.sample_subject_noise(n, n_subject, model.cfg.d_model, std, seed=3)


def test_mamba_known_answers(mamba, task):
    model, plain = mamba
    prepared = tracing.prepare_trace(model, task)
    noise = _noise(model, prepared)
    n_layers, last, first = model.cfg.n_layers, prepared.last_position, prepared.subject_span[0]
    everywhere = range(prepared.n_tokens)
    restorations = [
        [],  # 0: the corrupted run
        [("hidden", n_layers - 1, last)],  # 1: the last block's output at the last position: clean
        [("hidden", 0, p) for p in everywhere],  # 2: block 0's output everywhere: clean
        [("hidden", 1, first - 1), ("mixer", 2, first - 1)],  # 3: before the subject: nothing changes
        [("mixer", 1, last)],  # 4 and 5: W_o is linear and bias-free, so its input and output restore alike
        [("gated", 1, last)],
        [("mixer", 2, p) for p in everywhere],  # 6 and 7: the mixer reads only in_proj's two halves
        [(c, 2, p) for p in everywhere for c in ("gate", "ssm_in")],
        [("gate", 1, first + 1)],  # 8: one half alone moves the score (the check below has teeth)
    ]
    scores = module_trace.run_component_restorations(model, prepared, noise, restorations, batch_size=4)
    clean_logits = plain(input_ids=prepared.tokens[None]).logits[0, -1]
    clean = float(clean_logits.softmax(-1)[prepared.answer_id])
    tol = rounding_tolerance(clean_logits, model)  # probabilities move by at most their logits' rounding
    # the corrupted run, by hand: a plain Hugging Face forward from noised input embeddings
    embeds = plain.get_input_embeddings()(prepared.tokens[None]).repeat(noise.shape[0], 1, 1)
    embeds[:, prepared.subject_span[0] : prepared.subject_span[1]] += noise
    corrupted = plain(inputs_embeds=embeds).logits[:, -1].softmax(-1)[:, prepared.answer_id]
    assert_close_up_to_rounding(scores[:, 0], corrupted, model, scale=clean_logits)
    assert (corrupted - clean).abs().max() > 10 * tol  # the noise moves the answer
    for column in (1, 2):
        assert_close_up_to_rounding(scores[:, column], torch.full((2,), clean), model, scale=clean_logits)
    assert_close_up_to_rounding(scores[:, 3], scores[:, 0], model, scale=clean_logits)
    assert_close_up_to_rounding(scores[:, 4], scores[:, 5], model, scale=clean_logits)
    assert_close_up_to_rounding(scores[:, 6], scores[:, 7], model, scale=clean_logits)
    assert (scores[:, 8] - scores[:, 0]).abs().max() > 10 * tol


def test_mamba_zero_noise_and_trace_shapes(mamba, task):
    model, plain = mamba
    out = module_trace.trace_components(model, task, n_samples=2, noise_std=0.0, components=["hidden", "gate"])
    prepared = tracing.prepare_trace(model, task)
    clean_logits = plain(input_ids=prepared.tokens[None]).logits[0, -1]
    tol = rounding_tolerance(clean_logits, model)
    for result in out.values():
        first = result.subject_span[0]
        assert result.restored.shape == (prepared.n_tokens, model.cfg.n_layers)
        assert np.abs(result.restored[first:] - result.clean_score).max() <= tol
        assert result.corrupted_score == pytest.approx(result.clean_score, abs=tol)
    assert out["gate"].window == tracing.default_trace_window(model.cfg.n_layers) and out["hidden"].window == 1
    average = tracing.average_by_position_category([out["hidden"]])
    assert average.kind == "hidden" and average.counts[-1] == 1


def test_tracer_errors_name_what_is_wrong(mamba, task):
    model, _ = mamba
    prepared = tracing.prepare_trace(model, task)
    with pytest.raises(ValueError, match="noise must be"):
        module_trace.run_component_restorations(model, prepared, torch.zeros(1, 1, 3), [[]])
    with pytest.raises(ValueError, match="outside the prompt"):
        module_trace.run_component_restorations(model, prepared, _noise(model, prepared), [[("hidden", 0, 99)]])
    with pytest.raises(ValueError, match="no component map"):
        module_trace.component_map(type("M", (), {"name": "x", "hf_model": type("H", (), {"config": None})()})())


# ---------------------------------------------------------------------------------------------------------
# ROME on a Mamba's W_o
# ---------------------------------------------------------------------------------------------------------


def test_mamba_key_covariance_equals_a_hand_sum(mamba, world):
    model, plain = mamba
    corpus = [model.token_ids(s) for s in synthetic_facts.training_statements(world)[:40]]
    site = hook_points.edit_site(model, 2, "mamba_out_proj")
    covariance = editing.key_covariance(model, site, corpus)
    keys = []
    handle = plain.backbone.layers[2].mixer.out_proj.register_forward_pre_hook(lambda m, a: keys.append(a[0][0, 1:]))
    for row in corpus:
        plain(input_ids=torch.tensor([row]))
    handle.remove()
    stacked = torch.cat(keys).double()
    by_hand = (stacked.T @ stacked / stacked.shape[0]).float()
    assert covariance.n_tokens == stacked.shape[0] and covariance.site == "mamba_out_proj"
    assert_close_up_to_rounding(covariance.matrix, by_hand, model)
    with pytest.raises(ValueError, match="no Mamba mixer"):
        hook_points.edit_site(boot_llama_like(model), 0, "mamba_out_proj")


def boot_llama_like(model):
    """A stand-in whose blocks have no mixer (edit_site must refuse it)."""

    class Block:
        mlp = None

    class Bridge:
        blocks = [Block()]

    return type("Stub", (), {"bridge": Bridge(), "name": "stub"})()


def test_rome_on_mamba_out_proj_maps_the_key_to_the_value(mamba, world):
    model, _ = mamba
    layer = 1
    site = hook_points.edit_site(model, layer, "mamba_out_proj")
    corpus = [model.token_ids(s) for s in synthetic_facts.training_statements(world)]
    covariance = editing.key_covariance(model, site, corpus)
    request = synthetic_facts.edit_requests(world, world.facts[:1])[0].request
    prefixes = synthetic_facts.context_prefixes(world, 2, avoid=[request.subject])
    before = {name: p.detach().clone() for name, p in model.hf_model.named_parameters()}
    weight_before = site.weight.detach().clone()
    try:
        with torch.enable_grad():  # the value is fitted by gradient steps
            edit = editing.rome(model, request, site, covariance, prefixes, editing.ValueParams(steps=3))
        after = site.weight.detach()
        # W' k* = v* (the value has no bias to subtract: out_proj is bias-free)
        assert_close_up_to_rounding(after @ edit.key, edit.value.target, model, scale=(after @ edit.key).abs().max())
        # a key with uᵀk' = 0, u = C⁻¹k̄, keeps its value
        direction = covariance.solve(edit.mean_key[:, None])[:, 0]
        other = torch.randn(edit.key.shape, generator=torch.Generator().manual_seed(0))
        other = other - (direction @ other) / (direction @ direction) * direction
        assert_close_up_to_rounding(after @ other, weight_before @ other, model)
        assert (after - weight_before).abs().max() > 1e-3  # the edit wrote something
        changed = [n for n, p in model.hf_model.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == 1 and f"layers.{layer}." in changed[0] and "out_proj" in changed[0], changed
        assert edit.site is site and edit.layer == layer
        with pytest.raises(ValueError, match="covariance is of"):
            editing.rome(model, request, hook_points.edit_site(model, 2, "mamba_out_proj"), covariance, prefixes)
    finally:
        with torch.no_grad():
            site.weight.copy_(weight_before)
    editing.reapply(model, edit)  # the same update, bit for bit, onto the matrix it was fitted on
    assert torch.equal(site.weight, after)
    with torch.no_grad():
        site.weight.copy_(weight_before)


# ---------------------------------------------------------------------------------------------------------
# Data and tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_world_is_seeded_and_splits_are_complementary():
    a, b = synthetic_facts.generate_world(30, seed=4), synthetic_facts.generate_world(30, seed=4)
    assert a == b and a != synthetic_facts.generate_world(30, seed=5)
    assert len(a.facts) == 30 * len(synthetic_facts.RELATIONS)
    for fact in a.facts:
        relation = a.relation(fact.relation)
        assert fact.obj in relation.objects
        assert sorted(fact.train_templates + fact.held_out_templates) == sorted(relation.templates)
        assert len(fact.train_templates) == synthetic_facts.TRAIN_TEMPLATES_PER_FACT
    for relation in a.relations:  # every template is trained with some subjects and held out for others
        facts = a.facts_of(relation.name)
        for template in relation.templates:
            assert any(template in f.train_templates for f in facts)
            assert any(template in f.held_out_templates for f in facts)
    names = a.subjects
    assert len(set(names)) == len(names)
    assert not any(x != y and x in y for x in names for y in names)  # no name inside another


def test_every_subject_is_two_or_three_tokens_and_every_object_one():
    world = synthetic_facts.generate_world(80)
    tokenizer = build_fact_tokenizer(world)
    lengths = {len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in world.subjects}
    assert lengths == {2, 3}
    statement = world.facts[0].statement(world.facts[0].train_templates[0])
    ids = tokenizer(statement, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == statement


def test_edit_requests_and_prefixes(world):
    edits = synthetic_facts.edit_requests(world, world.facts[:6], n_neighbours=4)
    for edit, fact in zip(edits, world.facts[:6]):
        assert edit.request.target_true == fact.answer and edit.request.target_new != fact.answer
        assert all(fact.subject in p for p in edit.paraphrases) and len(edit.paraphrases) == 5
        assert all(answer not in (edit.request.target_new, fact.answer) for _, answer in edit.neighbours)
        assert all(fact.subject not in p for p, _ in edit.neighbours)
    subjects = [f.subject for f in world.facts[:6]]
    prefixes = synthetic_facts.context_prefixes(world, 5, avoid=subjects)
    assert prefixes[0] == "" and len(prefixes) == 6 and not any(s in p for p in prefixes for s in subjects)


def test_bad_relation_tables_are_named():
    good = synthetic_facts.RELATIONS[0]
    bad_template = synthetic_facts.Relation("r", good.objects, (*good.templates[:5], "no placeholder here"))
    with pytest.raises(ValueError, match=r"relation 'r', template 5 'no placeholder here'"):
        synthetic_facts.check_relations([bad_template])
    clash = synthetic_facts.Relation("other", ("Oslo", "Rome"), good.templates)
    with pytest.raises(ValueError, match="'Oslo' is also an object of 'home city'"):
        synthetic_facts.check_relations([good, clash])
    with pytest.raises(ValueError, match="more than 4 templates"):
        synthetic_facts.check_relations([synthetic_facts.Relation("few", good.objects, good.templates[:4])])


# ---------------------------------------------------------------------------------------------------------
# Training, cache and card
# ---------------------------------------------------------------------------------------------------------


def test_training_is_cached_carded_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_CACHE", str(tmp_path / "cache"))
    folder, card = fact_models.ensure_fact_model("mamba", TINY, progress=False)
    assert (folder / "model.safetensors").is_file() and folder.with_name(folder.name + ".lock").exists()
    assert card["weights_sha256"] == fact_models.file_sha256(folder / "model.safetensors")
    assert card["steps"] == TINY.steps and card["data"]["facts"] == 12 * 4 and card["train_seconds"] > 0
    assert {"trained", "held_out"} == set(card["accuracy"])
    again_folder, again = fact_models.ensure_fact_model("mamba", TINY, progress=False)  # read, not retrained
    assert again_folder == folder and again["trained_at"] == card["trained_at"]
    other = fact_models.train_fact_model("mamba", TINY, tmp_path / "second", progress=False)
    assert other["weights_sha256"] == card["weights_sha256"]  # same seed, data and threads: the same weights


def test_fact_accuracy_counts_by_hand(llama, world):
    model, plain = llama
    facts = world.facts[:5]
    result = fact_models.fact_accuracy(plain, model.tokenizer, facts, split="held_out", n_boot=50)
    by_hand = []
    for fact in facts:
        hits = []
        for prompt in fact.held_out_prompts:
            logits = plain(input_ids=torch.tensor([model.token_ids(prompt)])).logits[0, -1]
            hits.append(float(logits.argmax() == model.single_token_id(fact.answer)))
        by_hand.append(np.mean(hits))
    assert result["accuracy"] == pytest.approx(np.mean(by_hand))
    assert list(result["per_fact"].values()) == pytest.approx(by_hand)
    assert result["n_prompts"] == 10 and fact_models.chance_accuracy(world, facts) == 1 / 8


def test_peak_layer_interval_from_prompts():
    per_prompt = np.zeros((5, len(tracing.POSITION_CATEGORIES), 4))
    per_prompt[:, 2, 1] = [1.0, 1.1, 0.9, 1.2, 1.0]  # every prompt peaks at layer 1 at the last subject token
    per_prompt[:, 5, :] = np.eye(4)[[0, 1, 2, 3, 0]]  # at the last token each prompt peaks elsewhere
    average = tracing.CategoryAverage("mixer", "m", "p", per_prompt.mean(0), np.full(6, 5), per_prompt=per_prompt)
    assert average.peak_layer_interval("last subject token", n_boot=200) == (1, 1)
    low, high = average.peak_layer_interval("last token", n_boot=200)
    assert low == 0 and high >= 2  # a peak the prompts disagree on has a wide interval
    one = tracing.CategoryAverage("mixer", "m", "p", per_prompt[0], np.full(6, 1), per_prompt=per_prompt[:1])
    assert one.peak_layer_interval("last token") is None


def test_trace_dataset_components_averages_every_prompt(mamba, world):
    model, _ = mamba
    tasks = synthetic_facts.trace_tasks(world.facts[:2])
    result = module_trace.trace_dataset_components(model, tasks, ["hidden", "mixer"], n_samples=1)
    assert set(result.traces) == {"hidden", "mixer"} and all(len(v) == 2 for v in result.traces.values())
    assert result.averages["mixer"].counts[-1] == 2 and result.model_name == model.name
    from mechfin_utils.reporting import trace_plots

    fig = trace_plots.plot_category_average(result.averages["mixer"])
    assert model.name in fig.layout.title.text and "mixer output" in fig.layout.title.text
