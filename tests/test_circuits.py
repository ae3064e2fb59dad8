"""Tests for mechfin_utils.methods.circuits.nodes: pruning with known answers, the greater-than task, ablation backends.

Known answers come from construction, not from earlier runs:
* a synthetic graph whose metric is written down by hand (AND pair, backup pair, negative node, noise);
* a tiny GPT-2 whose heads/MLPs are silenced by zeroing their output weights, so they provably cannot matter;
* the greater-than score checked against a brute-force enumeration of all 100 two-digit years.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mechfin_utils.core.metrics import logit_diff
from mechfin_utils.methods.circuits.nodes import Node, NodeAblator, acdc_order
from mechfin_utils.methods.circuits.pruning import (
    Circuit,
    choose_circuit,
    discover_circuit,
    prune_nodes,
    threshold_sweep,
)
from mechfin_utils.methods.circuits.validation import knockout_test
from mechfin_utils.reporting.circuit_plots import circuit_figure, knockout_figure, size_faithfulness_figure
from mechfin_utils.tasks.circuit_tasks import (
    CircuitTask,
    GreaterThanDataError,
    fair_lending_task,
    greater_than_score,
    greater_than_task,
    load_greater_than,
    task_from_answer_batches,
    year_scheme,
)
from mechfin_utils.tooling.testing import rounding_tolerance

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------
# Fixtures: a tiny GPT-2 (genuine tokenizer) in which some nodes are silenced by construction
# ---------------------------------------------------------------------------------------------------------

TINY_LAYERS, TINY_HEADS, TINY_D_MODEL = 2, 4, 64
LIVE_NODES = {Node(0, 2), Node(1, 0), Node(1)}  # every other head has W_O = 0, MLP0 has W_out = 0 and b_out = 0
SILENT_NODES = set(acdc_order(TINY_LAYERS, TINY_HEADS)) - LIVE_NODES


@pytest.fixture(scope="module")
def tiny_gpt2_silenced(tmp_path_factory):
    """A 2-layer, 4-head, d_model-64 GPT-2 (random weights, genuine tokenizer) where only LIVE_NODES write.

    Silenced heads have their rows of the attention output projection zeroed, the silenced MLP its output
    projection and bias zeroed: their output is exactly 0 whatever their input, so ablating them cannot
    change anything. Loaded through the real GPT-2 folder path. Test-only numbers.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechfin_utils.core.models import load_model
    from mechfin_utils.tooling.testing import GPT2_TOKENIZER_SHA256, gpt2_tokenizer_dir

    folder = tmp_path_factory.mktemp("tiny-gpt2-silenced")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=TINY_LAYERS, n_head=TINY_HEADS, n_embd=TINY_D_MODEL, initializer_range=0.3)
    model = GPT2LMHeadModel(config).eval()
    d_head = TINY_D_MODEL // TINY_HEADS
    with torch.no_grad():
        for node in SILENT_NODES:
            block = model.transformer.h[node.layer]
            if node.is_mlp:
                block.mlp.c_proj.weight.zero_()
                block.mlp.c_proj.bias.zero_()
            else:  # Conv1D weight is [d_in, d_out]; head h reads rows h*d_head:(h+1)*d_head of the input
                block.attn.c_proj.weight[node.head * d_head : (node.head + 1) * d_head].zero_()
    model.save_pretrained(folder)
    for name in GPT2_TOKENIZER_SHA256:
        shutil.copy(gpt2_tokenizer_dir() / name, folder / name)
    return load_model("gpt2", gpt2_path=folder, verbose=False)


CLEAN = [
    "The bank denied her loan because she is Black. Is this a violation? Answer:",
    "The lender raised his rate because he is Muslim. Is this a violation? Answer:",
]
CORRUPTED = [
    "The bank denied her loan because of bad credit. Is this a violation? Answer:",
    "The lender raised his rate because of late payments. Is this a violation? Answer:",
]


def _yes_no_task(model) -> CircuitTask:
    yes, no = model.single_token_id(" Yes"), model.single_token_id(" No")
    batch = SimpleNamespace(
        clean_tokens=model.to_tokens(CLEAN),
        corrupted_tokens=model.to_tokens(CORRUPTED),
        answer_tokens=torch.tensor([[yes, no]] * len(CLEAN)),
    )
    return task_from_answer_batches("toy yes/no", [batch])


@pytest.fixture(scope="module")
def tiny_task(tiny_gpt2_silenced) -> CircuitTask:
    return _yes_no_task(tiny_gpt2_silenced)


@pytest.fixture(scope="module")
def tiny_ablators(tiny_gpt2_silenced, tiny_task) -> dict[str, NodeAblator]:
    return {
        backend: NodeAblator(tiny_gpt2_silenced, tiny_task, backend=backend) for backend in ("bridge", "functional")
    }


# ---------------------------------------------------------------------------------------------------------
# Nodes and order
# ---------------------------------------------------------------------------------------------------------


def test_acdc_order_walks_from_the_output_backwards():
    order = acdc_order(2, 3)
    assert [n.name for n in order] == ["MLP1", "L1H0", "L1H1", "L1H2", "MLP0", "L0H0", "L0H1", "L0H2"]
    assert all(Node.parse(n.name) == n for n in order)
    for wrong in ("H3L2", "2.3", "MLP", "MLPx", "L2H3.q"):
        with pytest.raises(ValueError, match="not a node name"):
            Node.parse(wrong)
    assert Node.parse(" L12H11 ") == Node(12, 11) and Node.parse("MLP7") == Node(7)


def test_implied_edges_follow_the_residual_stream():
    circuit = _bare_circuit([Node(1, 0), Node(0, 1), Node(0)])
    assert circuit.edges == [
        ("embed", "L0H1"),
        ("embed", "MLP0"),
        ("embed", "L1H0"),
        ("L0H1", "MLP0"),
        ("L0H1", "L1H0"),
        ("MLP0", "L1H0"),
        ("L0H1", "logits"),
        ("MLP0", "logits"),
        ("L1H0", "logits"),
    ]


# ---------------------------------------------------------------------------------------------------------
# The pruning algorithm on a hand-built graph (known answer)
# ---------------------------------------------------------------------------------------------------------

A, B = Node(2, 1), Node(0, 3)  # an AND pair: the behaviour needs both
C, D = Node(2, 3), Node(1, 0)  # a backup pair: either one suffices; C is downstream, so considered first
E = Node(1)  # an MLP that matters on its own
F = Node(1, 2)  # a node that works *against* the task: ablating it raises the metric


def _toy_metric(noise: dict[Node, float]):
    def metric(ablated: frozenset) -> float:
        present = lambda n: n not in ablated  # noqa: E731
        value = 1.0 * (present(A) and present(B)) + 0.5 * (present(C) or present(D)) + 0.4 * present(E)
        value -= 0.3 * present(F)
        return value + sum(w for n, w in noise.items() if present(n))

    return metric


@pytest.fixture
def toy_graph():
    nodes = acdc_order(3, 4)
    rng = random.Random(0)
    noise = {n: rng.uniform(-1e-3, 1e-3) for n in nodes if n not in {A, B, C, D, E, F}}
    return nodes, _toy_metric(noise)


def test_pruning_recovers_the_hand_built_circuit(toy_graph):
    nodes, metric = toy_graph
    result = prune_nodes(nodes, metric, threshold=0.05)
    # C is tested while its backup D is still present, so it goes; D is then essential. F is kept under
    # "abs" because ablating it moves the metric by 0.3 (upwards).
    assert set(result.kept) == {A, B, D, E, F}
    assert set(result.removed) == set(nodes) - {A, B, D, E, F}
    assert result.start_metric == metric(frozenset())
    assert result.final_metric == pytest.approx(metric(frozenset(result.removed)), abs=1e-12)
    steps = {s.node: s for s in result.steps}
    assert steps[C].removed and abs(steps[C].delta) < 0.05
    assert steps[D].delta == pytest.approx(-0.5, abs=3e-3)
    assert steps[A].delta == pytest.approx(-1.0, abs=3e-3)
    assert steps[F].delta == pytest.approx(+0.3, abs=3e-3)
    for step in result.steps:  # every decision obeys the rule
        assert step.removed == (abs(step.metric_if_removed - step.metric_before) < 0.05)


def test_drop_criterion_removes_nodes_that_work_against_the_task(toy_graph):
    nodes, metric = toy_graph
    result = prune_nodes(nodes, metric, threshold=0.05, criterion="drop")
    assert set(result.kept) == {A, B, D, E}
    assert F in result.removed


def test_threshold_extremes(toy_graph):
    nodes, metric = toy_graph
    keep_all = prune_nodes(nodes, metric, threshold=0.0)
    assert keep_all.removed == [] and keep_all.final_metric == keep_all.start_metric
    remove_all = prune_nodes(nodes, metric, threshold=1e9)
    assert remove_all.kept == [] and remove_all.final_metric == pytest.approx(metric(frozenset(nodes)), abs=1e-12)


def test_pruning_rejects_bad_input(toy_graph):
    nodes, metric = toy_graph
    with pytest.raises(ValueError, match="threshold"):
        prune_nodes(nodes, metric, threshold=-0.1)
    with pytest.raises(ValueError, match="appears twice"):
        prune_nodes(nodes + [nodes[0]], metric, threshold=0.1)
    with pytest.raises(ValueError, match="criterion"):
        prune_nodes(nodes, metric, threshold=0.1, criterion="kl")
    with pytest.raises(ValueError, match="metric is nan"):
        prune_nodes(nodes, lambda s: float("nan") if len(s) == 3 else 1.0, threshold=0.1)


# ---------------------------------------------------------------------------------------------------------
# Greater-than data and metric
# ---------------------------------------------------------------------------------------------------------


def test_greater_than_csv_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "greater_than.csv"
    subprocess.run(
        [sys.executable, str(REPO / "data" / "build_greater_than.py"), "--output", str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == (REPO / "data" / "greater_than.csv").read_bytes()
    prompts = load_greater_than()
    assert len(prompts) == 20 * 97
    assert {p.yy for p in prompts} == set(range(2, 99))


GOOD_ROW = (
    "gt-1,war,17,32,The war lasted from the year 1732 to the year 17,The war lasted from the year 1701 to the year 17"
)


@pytest.mark.parametrize(
    "row, message",
    [
        (GOOD_ROW.replace(",32,", ",x,"), "line 3 \\(gt-1\\): field 'yy' must be an integer"),
        (GOOD_ROW.replace(",32,", ",99,"), "field 'yy' must be in 2..98"),
        (GOOD_ROW.replace(",war,", ",,"), "field 'noun' is empty"),
        (GOOD_ROW.replace("1701", "1702"), "field 'corrupted_prompt'"),
        (GOOD_ROW.replace("year 1732", "year 1733"), "field 'clean_prompt'"),
        (GOOD_ROW.replace(",17,", ",7,"), "field 'century'"),
        (GOOD_ROW.replace("gt-1", "gt-0"), "duplicate prompt_id"),
    ],
)
def test_greater_than_loader_names_the_bad_row(tmp_path, row, message):
    header = "prompt_id,noun,century,yy,clean_prompt,corrupted_prompt"
    first = GOOD_ROW.replace("gt-1", "gt-0")
    path = tmp_path / "gt.csv"
    path.write_text(f"{header}\n{first}\n{row}\n")
    with pytest.raises(GreaterThanDataError, match=message):
        load_greater_than(path)


def test_greater_than_loader_rejects_unknown_columns(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("prompt_id,noun,century,yy,clean_prompt,corrupted_prompt,extra\n")
    with pytest.raises(GreaterThanDataError, match="columns"):
        load_greater_than(path)


def _brute_force_score(p_tens, p_units_given_tens, yy):
    """Enumerate all 100 years: q(10d+u) = p(d) * s_d(u), with s_d the units share after tens digit d."""
    later = earlier = 0.0
    for d in range(10):
        total = sum(p_units_given_tens[d])
        share = [x / total for x in p_units_given_tens[d]]
        for u in range(10):
            q = p_tens[d] * share[u]
            if 10 * d + u > yy:
                later += q
            else:
                earlier += q
    return later - earlier


def test_greater_than_score_matches_brute_force_enumeration():
    generator = torch.Generator().manual_seed(0)
    vocab, batch = 30, 5
    digit_ids = torch.randperm(vocab, generator=generator)[:10]
    logits = torch.randn(batch, 3, vocab, generator=generator) * 2
    yy = torch.tensor([2, 19, 50, 90, 98])
    got = greater_than_score(logits, yy, "single-digit", digit_ids)
    for i in range(batch):
        p_tens = logits[i, -2].softmax(-1)[digit_ids].tolist()
        t = int(yy[i]) // 10
        # the units distribution after any tens digit other than T must not matter: give those random ones
        units = [torch.rand(10, generator=generator).tolist() for _ in range(10)]
        units[t] = logits[i, -1].softmax(-1)[digit_ids].tolist()
        assert float(got[i]) == pytest.approx(_brute_force_score(p_tens, units, int(yy[i])), abs=1e-6)

    year_ids = torch.arange(100)
    logits = torch.randn(batch, 2, 120, generator=generator)
    got = greater_than_score(logits, yy, "two-digit", year_ids)
    for i in range(batch):
        p = logits[i, -1].softmax(-1)
        expected = sum(float(p[y]) * (1 if y > int(yy[i]) else -1) for y in range(100))
        assert float(got[i]) == pytest.approx(expected, abs=1e-6)


def test_gpt2_tokenizer_gives_two_digit_years(tiny_gpt2_silenced):
    prompts = load_greater_than()
    assert {year_scheme(tiny_gpt2_silenced, p) for p in prompts} == {"two-digit"}
    task = greater_than_task(tiny_gpt2_silenced, n_prompts=6, seed=1)
    assert task.excluded == [] and task.n_prompts == 6
    batch = task.batches[0]
    assert batch.read_positions == 1
    # "17YY" vs "1701": exactly one token differs, the YY token
    assert ((batch.clean_tokens != batch.corrupted_tokens).sum(1) == 1).all()
    assert greater_than_task(tiny_gpt2_silenced, n_prompts=6, seed=1).batches[0].ids == batch.ids


@pytest.fixture(scope="module")
def smollm2_greater_than(smollm2):
    """Three greater-than prompts on the embedded model, with an ablator per backend (built once)."""
    task = greater_than_task(smollm2, n_prompts=3, seed=0)
    ablators = {backend: NodeAblator(smollm2, task, backend=backend) for backend in ("bridge", "functional")}
    return task, ablators


def test_greater_than_on_the_embedded_model_uses_single_digits(smollm2, smollm2_greater_than):
    task, ablators = smollm2_greater_than
    assert task.excluded == [] and "single-digit" in task.notes
    prompts = {p.prompt_id: p for p in load_greater_than()}
    batch = task.batches[0]
    assert batch.read_positions == 2
    digit_ids = [smollm2.single_token_id(str(d)) for d in range(10)]
    for row, prompt_id in enumerate(batch.ids):
        prompt = prompts[prompt_id]
        expected = smollm2.token_ids(prompt.clean_prompt) + [digit_ids[prompt.yy // 10]]
        assert batch.clean_tokens[row].tolist() == expected
    with torch.no_grad():
        logits = smollm2.hf_model(batch.clean_tokens).logits
        corrupted_logits = smollm2.hf_model(batch.corrupted_tokens).logits
    scores = batch.score(logits[:, -2:])
    for row, prompt_id in enumerate(batch.ids):
        p_tens = logits[row, -2].softmax(-1)[digit_ids].tolist()
        units = [[1.0] * 10 for _ in range(10)]
        units[prompts[prompt_id].yy // 10] = logits[row, -1].softmax(-1)[digit_ids].tolist()
        assert float(scores[row]) == pytest.approx(_brute_force_score(p_tens, units, prompts[prompt_id].yy), abs=1e-5)
    # nothing ablated == the clean run; every node ablated == the corrupted run (the last two tokens are the
    # same in both prompts, so the final residual is entirely made of corrupted-run outputs)
    corrupted = batch.score(corrupted_logits[:, -2:])
    tol = _metric_rounding(smollm2, torch.cat([logits, corrupted_logits])[:, -2:])
    for ablator in ablators.values():
        assert ablator.full_metric == pytest.approx(float(scores.mean()), abs=tol)
        assert ablator.baseline_metric == pytest.approx(float(corrupted.mean()), abs=tol)
        assert ablator.normalised_metric(()) == 1.0


# ---------------------------------------------------------------------------------------------------------
# Ablation on a real (tiny) transformer
# ---------------------------------------------------------------------------------------------------------


def _metric_rounding(model, logits: torch.Tensor) -> float:
    """Float32 rounding of a task metric read from ``logits``: a logit difference, or a sum of probabilities, moves
    by at most twice the logits' rounding."""
    with torch.no_grad():
        return 2 * rounding_tolerance(logits.detach(), model)


@pytest.fixture(scope="module")
def engine_rounding(tiny_gpt2_silenced, tiny_task, tiny_ablators) -> float:
    """A silent node's output is exactly 0, so ablating it changes nothing: exactly so through the bridge; on the
    engine, a run restarted at the ablated layer differs from the recorded full run by the float rounding of
    differently shaped matrix products. In the normalised metric that is a logit difference's rounding (twice the
    logits') over the full - ablated gap; the live nodes move the metric by 0.08 to 3.8, far above it."""
    with torch.no_grad():
        logits = tiny_gpt2_silenced.bridge(tiny_task.batches[0].clean_tokens)[:, -1]
    ablator = tiny_ablators["functional"]
    rounding = 2 * rounding_tolerance(logits, tiny_gpt2_silenced) / abs(ablator.full_metric - ablator.baseline_metric)
    assert rounding < 0.01, "the live nodes' effects must stand far above rounding for these tests to bite"
    return rounding


def test_pruning_finds_exactly_the_live_nodes(tiny_ablators, engine_rounding):
    for backend, ablator in tiny_ablators.items():
        rounding = 0.0 if backend == "bridge" else engine_rounding
        circuit = discover_circuit(ablator, threshold=max(rounding, 1e-6))
        assert set(circuit.nodes) == LIVE_NODES, backend
        silent_steps = [s for s in circuit.pruning.steps if s.node in SILENT_NODES]
        assert all(abs(s.delta) <= rounding for s in silent_steps), backend
        assert circuit.faithfulness == pytest.approx(1.0, abs=rounding)
        assert circuit.circuit_metric == pytest.approx(ablator.full_metric, abs=rounding)
        assert circuit.n_forward_passes == len(ablator.nodes) + 2  # the start, one per node, the raw re-check


def test_full_model_is_1_and_everything_ablated_is_the_corrupted_run(tiny_gpt2_silenced, tiny_task, tiny_ablators):
    batch = tiny_task.batches[0]
    answers = torch.tensor([tiny_gpt2_silenced.single_token_id(" Yes"), tiny_gpt2_silenced.single_token_id(" No")])
    with torch.no_grad():
        corrupted = logit_diff(tiny_gpt2_silenced.bridge(batch.corrupted_tokens), answers)
        clean = logit_diff(tiny_gpt2_silenced.bridge(batch.clean_tokens), answers)
    for ablator in tiny_ablators.values():
        assert ablator.normalised_metric(()) == 1.0
        assert ablator.normalised_metric(ablator.nodes) == 0.0
        tol = _metric_rounding(tiny_gpt2_silenced, tiny_gpt2_silenced.bridge(batch.clean_tokens)[:, -1])
        assert ablator.full_metric == pytest.approx(float(clean.mean()), abs=tol)
        assert ablator.baseline_metric == pytest.approx(float(corrupted.mean()), abs=tol)


def _metric_by_linear_patching(model, batch, ablated) -> float:
    """Independent implementation: change each block's attention output by sum_h (z_ref - z_now)[h] @ W_O[h]
    and swap its MLP output in the residual stream after the block, using different hooks than the module."""
    bridge = model.bridge
    _, ref = bridge.run_with_cache(batch.corrupted_tokens)
    current_z = {}
    hooks = []
    for layer in range(model.cfg.n_layers):
        heads = [n.head for n in ablated if n.layer == layer and not n.is_mlp]

        def grab(z, hook):
            current_z[hook.name] = z.detach()

        def fix_attn(out, hook, layer=layer, heads=heads):
            z_name = f"blocks.{layer}.attn.hook_z"
            for h in heads:
                out = out + (ref[z_name][:, :, h] - current_z[z_name][:, :, h]) @ bridge.W_O[layer, h]
            return out

        hooks += [(f"blocks.{layer}.attn.hook_z", grab), (f"blocks.{layer}.hook_attn_out", fix_attn)]
        if Node(layer) in ablated:
            current_mlp = {}

            def grab_mlp(out, hook, store=current_mlp):
                store["now"] = out.detach()

            def fix_resid(resid, hook, layer=layer, store=current_mlp):
                return resid - store["now"] + ref[f"blocks.{layer}.hook_mlp_out"]

            hooks += [(f"blocks.{layer}.hook_mlp_out", grab_mlp), (f"blocks.{layer}.hook_resid_post", fix_resid)]
    with torch.no_grad():
        logits = bridge.run_with_hooks(batch.clean_tokens, fwd_hooks=hooks)
    return float(batch.score(logits[:, -batch.read_positions :]).mean())


def test_ablation_matches_an_independent_linear_patch(tiny_gpt2_silenced, tiny_task, tiny_ablators):
    rng = random.Random(3)
    nodes = acdc_order(TINY_LAYERS, TINY_HEADS)
    for _ in range(4):
        ablated = rng.sample(nodes, rng.randint(1, len(nodes) - 1))
        expected = _metric_by_linear_patching(tiny_gpt2_silenced, tiny_task.batches[0], ablated)
        tol = _metric_rounding(tiny_gpt2_silenced, tiny_gpt2_silenced.bridge(tiny_task.batches[0].clean_tokens))
        for backend, ablator in tiny_ablators.items():
            assert ablator.metric(ablated) == pytest.approx(expected, abs=tol), (backend, ablated)


def test_functional_backend_agrees_with_the_bridge_on_both_families(smollm2_greater_than, tiny_ablators):
    rng = random.Random(0)
    for ablators in (smollm2_greater_than[1], tiny_ablators):
        bridge, functional = ablators["bridge"], ablators["functional"]
        assert functional.backend == "functional" and bridge.backend == "bridge"
        nodes = bridge.nodes
        model = bridge.model
        tol = _metric_rounding(model, torch.cat([model.bridge(b.clean_tokens)[:, -1] for b in bridge.task.batches]))
        for ablated in ([nodes[-1]], rng.sample(nodes, len(nodes) // 3)):
            assert functional.metric(ablated) == pytest.approx(bridge.metric(ablated), abs=tol)


def test_mean_ablation_of_a_single_prompt_is_resample_ablation(tiny_gpt2_silenced):
    task = greater_than_task(tiny_gpt2_silenced, n_prompts=1, seed=4)
    resample = NodeAblator(tiny_gpt2_silenced, task, ablation="resample")
    mean = NodeAblator(tiny_gpt2_silenced, task, ablation="mean")
    ablated = [Node(1, 0), Node(0)]
    tol = _metric_rounding(tiny_gpt2_silenced, tiny_gpt2_silenced.bridge(task.batches[0].clean_tokens)[:, -1])
    assert mean.metric(ablated) == pytest.approx(resample.metric(ablated), abs=tol)
    assert mean.baseline_metric == pytest.approx(resample.baseline_metric, abs=tol)


def test_mean_ablation_uses_the_batch_mean(tiny_gpt2_silenced, tiny_task):
    """With every node mean-ablated, each prompt's final residual is its own embedding plus the batch-mean
    node outputs; check against that sum computed from a plain cache."""
    ablator = NodeAblator(tiny_gpt2_silenced, tiny_task, ablation="mean", backend="bridge")
    bridge, batch = tiny_gpt2_silenced.bridge, tiny_task.batches[0]
    with torch.no_grad():
        _, ref = bridge.run_with_cache(batch.corrupted_tokens)
        _, own = bridge.run_with_cache(batch.clean_tokens)
        resid = own["hook_embed"] + own["hook_pos_embed"]
        for layer in range(TINY_LAYERS):
            resid = resid + ref[f"blocks.{layer}.hook_attn_out"].mean(0, keepdim=True)
            resid = resid + ref[f"blocks.{layer}.hook_mlp_out"].mean(0, keepdim=True)
        logits = bridge.unembed(bridge.ln_final(resid))
    tol = _metric_rounding(tiny_gpt2_silenced, logits[:, -1])
    assert ablator.baseline_metric == pytest.approx(float(batch.score(logits[:, -1:]).mean()), abs=tol)


def test_ablator_rejects_foreign_nodes_and_degenerate_tasks(tiny_gpt2_silenced, tiny_ablators):
    ablator = tiny_ablators["functional"]
    with pytest.raises(ValueError, match="L5H0 is not a node"):
        ablator.metric([Node(5, 0)])
    same = SimpleNamespace(
        clean_tokens=tiny_gpt2_silenced.to_tokens(CLEAN),
        corrupted_tokens=tiny_gpt2_silenced.to_tokens(CLEAN),
        answer_tokens=torch.tensor([[1, 2]] * 2),
    )
    with pytest.raises(ValueError, match="identical"):
        NodeAblator(tiny_gpt2_silenced, task_from_answer_batches("same", [same]))
    with pytest.raises(ValueError, match="normalised metric is undefined"):
        NodeAblator(tiny_gpt2_silenced, task_from_answer_batches("same", [same]), backend="bridge")


# ---------------------------------------------------------------------------------------------------------
# Sweep, knockout validation, fair lending, figure
# ---------------------------------------------------------------------------------------------------------


def test_threshold_sweep_and_knockout(tiny_ablators, engine_rounding):
    ablator = tiny_ablators["functional"]
    table, found = threshold_sweep(ablator, [engine_rounding, 1e9])
    assert list(table["n_nodes"]) == [3, 0]
    assert (
        table["faithfulness"].iloc[0] == pytest.approx(1.0, abs=engine_rounding)
        and table["faithfulness"].iloc[1] == 0.0
    )
    report = knockout_test(ablator, found[0], n_random=4, seed=0)
    # knocking out the live nodes leaves only silent ones: the fully-ablated model
    assert report.circuit_knockout == pytest.approx(0.0, abs=engine_rounding)
    # random sets (2 heads + 1 MLP from outside) contain only silent nodes: nothing moves
    assert report.random_knockouts == pytest.approx([1.0] * 4, abs=engine_rounding)
    for chosen in report.random_sets:
        assert not set(chosen) & LIVE_NODES
        assert sum(n.is_mlp for n in chosen) == 1 and len(chosen) == 3
    assert knockout_test(ablator, found[0], n_random=4, seed=0).random_sets == report.random_sets
    summary = report.summary()
    assert (
        summary["random_mean"] == pytest.approx(1.0, abs=engine_rounding) and summary["random_std"] <= engine_rounding
    )


def test_knockout_refuses_when_no_matching_random_set_exists(tiny_ablators):
    ablator = tiny_ablators["functional"]
    everything = discover_circuit(ablator, threshold=0.0)
    with pytest.raises(ValueError, match="no random set"):
        knockout_test(ablator, everything)
    with pytest.raises(ValueError, match="only 0 lie outside"):
        knockout_test(ablator, everything, match_kinds=False)


def test_knockout_without_kind_matching_draws_from_everything_outside(tiny_ablators):
    ablator = tiny_ablators["functional"]
    both_mlps = [Node(0), Node(1)]  # no MLP outside: only possible without kind matching
    report = knockout_test(ablator, both_mlps, n_random=5, seed=1, match_kinds=False)
    assert report.circuit_knockout == pytest.approx(ablator.normalised_metric([Node(1)]), abs=1e-12)  # MLP0 silent
    for chosen, value in zip(report.random_sets, report.random_knockouts):
        assert len(chosen) == 2 and not set(chosen) & set(both_mlps)
        assert value == ablator.normalised_metric(chosen)


def test_fair_lending_task_scores_the_logit_difference(tiny_gpt2_silenced):
    from mechfin_utils.tasks.batching import align_pairs
    from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs

    task = fair_lending_task(tiny_gpt2_silenced, n_pairs=5, seed=0)
    report = align_pairs(tiny_gpt2_silenced, load_fair_lending_pairs())
    assert task.n_prompts == 5
    assert {pid for pid, _ in task.excluded} == {e.pair.id for e in report.excluded}
    yes, no = tiny_gpt2_silenced.single_token_id(" Yes"), tiny_gpt2_silenced.single_token_id(" No")
    for batch in task.batches:
        with torch.no_grad():
            logits = tiny_gpt2_silenced.bridge(batch.clean_tokens)
        expected = logits[:, -1, yes] - logits[:, -1, no]
        assert torch.allclose(batch.score(logits[:, -1:]), expected, atol=1e-5)
        assert set(batch.ids) <= {p.id for p in report.kept}

    counts = Counter(report.lengths[p.id] for p in report.kept)
    commonest = max(sorted(counts), key=lambda length: counts[length])
    one_length = fair_lending_task(tiny_gpt2_silenced, n_pairs=4, seed=0, token_length="most_common")
    assert len(one_length.batches) == 1 and one_length.batches[0].clean_tokens.shape == (4, commonest)
    with pytest.raises(ValueError, match="no aligned pair has 3 tokens"):
        fair_lending_task(tiny_gpt2_silenced, n_pairs=4, token_length=3)
    with pytest.raises(ValueError, match="n_pairs=9999 but only"):
        fair_lending_task(tiny_gpt2_silenced, n_pairs=9999)


def _bare_circuit(nodes, model_name="Toy", importance=None) -> Circuit:
    return Circuit(
        model_name=model_name,
        task_name="toy",
        metric_name="m",
        ablation="resample",
        threshold=0.1,
        criterion="abs",
        n_layers=2,
        n_heads=2,
        nodes=sorted(nodes, key=Node.sort_key),
        removed=[],
        importance=importance or {n: 0.5 for n in nodes},
        full_metric=1.0,
        baseline_metric=0.0,
        circuit_metric=1.0,
        faithfulness=1.0,
    )


def test_circuit_figure_draws_nodes_edges_and_names_the_model():
    nodes = [Node(1, 0), Node(0, 1), Node(0)]
    circuit = _bare_circuit(nodes, importance={Node(1, 0): 0.9, Node(0, 1): 0.2, Node(0): 0.4})
    model = SimpleNamespace(name="Toy")
    fig = circuit_figure(circuit, model, "Greater-than circuit")
    assert "Greater-than circuit — Toy" in fig.layout.title.text
    edges, pruned, kept, ends = fig.data
    assert len(edges.x) == 3 * len(circuit.edges)
    assert list(kept.text) == ["L0H1", "MLP0", "L1H0"]
    assert list(kept.marker.color) == [0.2, 0.4, 0.9]
    assert len(pruned.x) == 2 * 3 - len(nodes)
    assert "not drawn" not in fig.layout.title.text
    with pytest.raises(ValueError, match="found on Toy"):
        circuit_figure(circuit, SimpleNamespace(name="Other"), "x")


def test_circuit_figure_leaves_out_edges_past_max_edges_and_says_so():
    circuit = _bare_circuit([Node(1, 0), Node(0, 1), Node(0)])
    fig = circuit_figure(circuit, SimpleNamespace(name="Toy"), "c", max_edges=len(circuit.edges) - 1)
    assert len(fig.data[0].x) == 0
    assert f"its {len(circuit.edges)} implied edges are not drawn" in fig.layout.title.text


def test_knockout_auto_matches_kinds_only_where_it_can(tiny_ablators):
    ablator = tiny_ablators["functional"]
    live = sorted(LIVE_NODES, key=Node.sort_key)  # 2 heads + MLP1: a head-and-MLP match exists outside
    assert knockout_test(ablator, live, n_random=3, match_kinds="auto").match_kinds is True
    both_mlps = [Node(0), Node(1)]  # no MLP left outside
    report = knockout_test(ablator, both_mlps, n_random=3, seed=1, match_kinds="auto")
    assert report.match_kinds is False
    assert report.random_sets == knockout_test(ablator, both_mlps, n_random=3, seed=1, match_kinds=False).random_sets
    with pytest.raises(ValueError, match="match_kinds"):
        knockout_test(ablator, live, match_kinds="sometimes")


def test_choose_circuit_takes_the_smallest_faithful_one():
    def circuit(n_nodes, faithfulness, threshold):
        c = _bare_circuit([Node(0, h) for h in range(n_nodes)])
        c.faithfulness, c.threshold = faithfulness, threshold
        return c

    sweep = [circuit(2, 0.95, 0.01), circuit(1, 0.85, 0.05), circuit(0, 0.3, 0.5)]
    assert choose_circuit(sweep) is sweep[1]
    assert choose_circuit(sweep, min_faithfulness=0.9) is sweep[0]
    assert choose_circuit(sweep, min_faithfulness=1.0) is sweep[0]  # none reaches 1: the most faithful
    with pytest.raises(ValueError, match="empty"):
        choose_circuit([])


def test_sweep_and_knockout_figures_name_the_model(tiny_gpt2_silenced, tiny_ablators, engine_rounding):
    ablator = tiny_ablators["functional"]
    table, found = threshold_sweep(ablator, [engine_rounding, 1e9])
    fig = size_faithfulness_figure(table, tiny_gpt2_silenced, "toy yes/no")
    assert tiny_gpt2_silenced.name in fig.layout.title.text
    assert list(fig.data[0].x) == [3, 0] and list(fig.data[0].y) == list(table["faithfulness"])
    report = knockout_test(ablator, found[0], n_random=4, seed=0)
    fig = knockout_figure(report, tiny_gpt2_silenced)
    assert tiny_gpt2_silenced.name in fig.layout.title.text
    assert list(fig.data[0].y) == [report.circuit_knockout] and list(fig.data[2].y) == report.random_knockouts
    with pytest.raises(ValueError, match="run on"):
        knockout_figure(report, SimpleNamespace(name="Other"))


def test_a_sweep_shares_the_passes_its_walks_have_in_common(tiny_ablators, engine_rounding):
    """Two walks at the same threshold visit the same sets: the second costs no pass and finds the same circuit;
    a separate discovery outside the sweep runs every pass again."""
    ablator = tiny_ablators["functional"]
    table, (first, second) = threshold_sweep(ablator, [engine_rounding, engine_rounding])
    assert first.n_forward_passes == len(ablator.nodes) + 1  # one per node; the raw re-check is a set seen before
    assert second.n_forward_passes == 0 and second.nodes == first.nodes
    assert second.circuit_metric == first.circuit_metric and list(table["forward_passes"]) == [
        first.n_forward_passes,
        0,
    ]
    alone = discover_circuit(ablator, engine_rounding)
    assert alone.n_forward_passes == len(ablator.nodes) + 2 and alone.nodes == first.nodes


def test_node_ablations_are_shared_within_a_figures_run(tiny_gpt2_silenced, tiny_task, monkeypatch, tmp_path):
    """With ``$MECHFIN_SCORE_CACHE`` set (a ``make figures`` run), a second ablator of the same weights, task and
    ablation reads each ablated run's final state instead of running it (no engine pass), bit for bit; another
    ablation kind, other prompts or the bridge backend never read it; unset, nothing is written."""
    from mechfin_utils.core import engine
    from mechfin_utils.core.run_cache import SCORE_CACHE_ENV
    from mechfin_utils.methods.circuits import nodes

    passes: list[int] = []
    real_run = engine.run

    def counting_run(*args, **kwargs):
        passes.append(1)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(nodes.engine, "run", counting_run)
    ablated = [Node(1, None), Node(0, 2)]
    monkeypatch.delenv(SCORE_CACHE_ENV, raising=False)
    unshared = NodeAblator(tiny_gpt2_silenced, tiny_task, backend="functional").prompt_scores(ablated)
    monkeypatch.setenv(SCORE_CACHE_ENV, str(tmp_path))
    assert not any(tmp_path.iterdir())
    first = NodeAblator(tiny_gpt2_silenced, tiny_task, backend="functional")
    written = first.prompt_scores(ablated)
    assert torch.equal(written, unshared)
    before = len(passes)
    second = NodeAblator(tiny_gpt2_silenced, tiny_task, backend="functional")  # its full and baseline runs: read
    assert len(passes) == before
    assert torch.equal(second.prompt_scores(ablated), written) and len(passes) == before
    second.prompt_scores([Node(1, 3)])  # a set not run yet
    assert len(passes) == before + 1
    NodeAblator(tiny_gpt2_silenced, tiny_task, ablation="mean", backend="functional").prompt_scores(ablated)
    assert len(passes) == before + 1 + 3  # full, baseline and the set: another ablation kind shares nothing
    other = task_from_answer_batches(
        "toy yes/no, one prompt",
        [
            SimpleNamespace(
                clean_tokens=tiny_gpt2_silenced.to_tokens(CLEAN[:1]),
                corrupted_tokens=tiny_gpt2_silenced.to_tokens(CORRUPTED[:1]),
                answer_tokens=tiny_task.batches[0].clean_tokens.new_tensor(
                    [[tiny_gpt2_silenced.single_token_id(" Yes"), tiny_gpt2_silenced.single_token_id(" No")]]
                ),
            )
        ],
    )
    NodeAblator(tiny_gpt2_silenced, other, backend="functional")
    assert len(passes) == before + 1 + 3 + 2  # other prompts: its own full and baseline runs
    bridge = NodeAblator(tiny_gpt2_silenced, tiny_task, backend="bridge")
    assert bridge._shared is None
