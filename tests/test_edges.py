"""Edge-level circuits: the computational graph, exact edge patching, EAP / EAP-IG, selection and stability.

References: a plain forward pass (nothing patched = clean run, everything patched = corrupted run), a naive path
patching through Hugging Face hooks (Wang et al.'s freeze-and-record recipe, one receiver at a time), integrated
gradients' completeness, a finite difference of exact patching, node-level resample ablation, EAP-IG's published
edge count for GPT-2 Small, and a hand-built model whose circuit is known.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mechfin_utils.core import engine
from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.graph import ComputationalGraph
from mechfin_utils.methods.circuits import edges as ea
from mechfin_utils.methods.circuits import stability
from mechfin_utils.methods.circuits.nodes import NodeAblator
from mechfin_utils.tasks import circuit_tasks
from mechfin_utils.tasks.circuit_tasks import CircuitBatch, CircuitTask
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

VOCAB = 40


def _tiny_gpt2(seed: int = 0, n_layer: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=16)).eval()
    with torch.no_grad():  # random biases and norm gains: code that drops a bias or a gain fails
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif p.ndim == 2:
                p.mul_(10.0)
    return model


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(12.0 if p.ndim == 2 else 1.0)
    return model


def _pair(n: int = 3, n_pos: int = 7, seed: int = 0, changed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, n_pos), generator=generator)
    corrupted = clean.clone()
    corrupted[:, changed] = (clean[:, changed] + 1 + torch.randint(0, VOCAB - 1, (n,), generator=generator)) % VOCAB
    return clean, corrupted


def _task(clean: torch.Tensor, corrupted: torch.Tensor, answers: tuple[int, int] = (3, 5)) -> CircuitTask:
    def score(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, answers[0]] - logits[:, -1, answers[1]]

    ids = [f"p{i}" for i in range(clean.shape[0])]
    return CircuitTask("toy", "logit diff", [CircuitBatch(clean, corrupted, score, ids)])


# ---------------------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------------------


def test_graph_counts_match_eap_ig_for_gpt2_small_and_names_round_trip():
    graph = ComputationalGraph(12, 12, 12)
    assert (graph.n_senders, graph.n_receivers, graph.n_edges) == (157, 445, 32491)  # EAP-IG's GPT-2 Small graph
    smollm2 = ComputationalGraph(30, 9, 3)
    assert (
        smollm2.n_edges
        == 15 * sum(1 + 10 * layer for layer in range(30)) + sum(10 + 10 * layer for layer in range(30)) + 301
    )
    for sender, receiver in [
        (0, 0),
        (3, smollm2.logits_receiver),
        (smollm2.head_sender(2, 4), smollm2.mlp_receiver(2)),
    ]:
        assert smollm2.parse_edge(smollm2.edge_name(sender, receiver)) == (sender, receiver)
    assert smollm2.receiver_name(smollm2.attention_receivers(1).start + 9) == "L1KV0.k"
    with pytest.raises(ValueError, match="does not run before"):
        smollm2.parse_edge("L3H0->L2H1.q")
    with pytest.raises(ValueError, match="not an edge"):
        smollm2.parse_edge("L3H0 to logits")


def test_edges_among_nodes_keep_input_and_logits_and_only_kept_nodes():
    graph = ComputationalGraph(3, 4, 2)
    kept = graph.edges_among(["L0H1", "MLP1"])
    names = set(graph.edge_list(kept))
    assert "input->L0H1.q" in names and "L0H1->MLP1" in names and "MLP1->logits" in names
    assert "input->L0KV0.k" in names  # head 1 reads key/value head 0 (two query heads per key/value head)
    assert not any(n.startswith("L0H0->") or n.endswith("MLP0") for n in names)
    assert graph.nodes_of(kept) == ["L0H0", "L0H1", "MLP1"]  # L0H0 shares the key/value head L0H1 reads


# ---------------------------------------------------------------------------------------------------------
# Exact edge patching
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_no_edge_patched_is_the_clean_run_and_every_edge_patched_is_the_corrupted_run(family):
    hf = _tiny_gpt2() if family == "gpt2" else _tiny_llama()
    fm = FunctionalTransformer(hf)
    graph = ComputationalGraph.of(fm)
    clean, corrupted = _pair()
    with torch.no_grad():
        source = engine.run_edges(fm, graph, corrupted, keep_outputs=True)
        nothing = engine.run_edges(fm, graph, clean, patched=torch.zeros_like(graph.valid()), sources=source.outputs)
        everything = engine.run_edges(fm, graph, clean, patched=graph.valid(), sources=source.outputs)
        clean_logits, corrupted_logits = fm.logits(clean)[:, -1], fm.logits(corrupted)[:, -1]
    # one stream per receiver, summed from the senders, against the plain forward: the same sums in another order
    assert_close_up_to_rounding(fm.unembed(nothing.final_normed[:, -1]), clean_logits, hf)
    assert_close_up_to_rounding(fm.unembed(everything.final_normed[:, -1]), corrupted_logits, hf)
    # the senders' outputs add up to the stream: embedding + heads + MLPs + biases = what the final norm reads
    assert (fm.unembed(everything.final_normed[:, -1]) - clean_logits).abs().max() > 1e-2


def _naive_path_patching(hf: GPT2LMHeadModel, clean, corrupted, senders: list[str], receiver: str) -> torch.Tensor:
    """Wang et al.'s path patching with plain Hugging Face hooks: (1) record every head's output (c_proj's input split
    by head, times its rows of W_O), every MLP's output and the embedding on both prompts; (2) rerun the clean prompt
    with every sender frozen at its clean output except ``senders`` (corrupted) and record the stream the receiver
    reads; (3) rerun the clean prompt with only the receiver's input replaced by that stream."""
    body = hf.transformer
    n_heads, d_head = hf.config.n_head, hf.config.n_embd // hf.config.n_head

    def record(tokens):
        heads, mlps, handles = {}, {}, []
        for layer, block in enumerate(body.h):
            W = block.attn.c_proj.weight  # Conv1D [d_in, d_out]

            def grab_heads(module, args, layer=layer, W=W):
                z = args[0]
                for h in range(n_heads):
                    sl = slice(h * d_head, (h + 1) * d_head)
                    heads[f"L{layer}H{h}"] = z[..., sl] @ W[sl]

            handles.append(block.attn.c_proj.register_forward_pre_hook(grab_heads))
            handles.append(
                block.mlp.register_forward_hook(lambda m, a, out, layer=layer: mlps.__setitem__(f"MLP{layer}", out))
            )
        with torch.no_grad():
            hf(tokens)
        for handle in handles:
            handle.remove()
        embed = body.wte(tokens) + body.wpe(torch.arange(tokens.shape[1]))
        return {"input": embed, **heads, **mlps}

    clean_out, corrupted_out = record(clean), record(corrupted)
    chosen = {s: (corrupted_out if s in senders else clean_out)[s] for s in clean_out}
    layer_of = int(receiver[1 : receiver.index("H")]) if receiver.startswith("L") else None
    captured, handles = {}, []
    # (2) frozen run
    handles.append(
        body.h[0].register_forward_pre_hook(lambda m, a, kw: ((chosen["input"],) + a[1:], kw), with_kwargs=True)
    )
    for layer, block in enumerate(body.h):
        bias = block.attn.c_proj.bias
        handles.append(
            block.attn.c_proj.register_forward_hook(
                lambda m, a, out, layer=layer, bias=bias: sum(chosen[f"L{layer}H{h}"] for h in range(n_heads)) + bias
            )
        )
        handles.append(block.mlp.register_forward_hook(lambda m, a, out, layer=layer: chosen[f"MLP{layer}"]))
        handles.append(
            block.register_forward_pre_hook(
                lambda m, a, kw, layer=layer: captured.__setitem__(("pre", layer), a[0]), with_kwargs=True
            )
        )
        handles.append(
            block.ln_2.register_forward_pre_hook(lambda m, a, layer=layer: captured.__setitem__(("mid", layer), a[0]))
        )
    handles.append(body.ln_f.register_forward_pre_hook(lambda m, a: captured.__setitem__("final", a[0])))
    with torch.no_grad():
        hf(clean)
    for handle in handles:
        handle.remove()
    # (3) the receiver alone reads the recorded stream
    if receiver == "logits":
        hook = body.ln_f.register_forward_pre_hook(lambda m, a: (captured["final"],))
    elif receiver.startswith("MLP"):
        layer = int(receiver[3:])
        block = body.h[layer]
        hook = block.mlp.register_forward_pre_hook(lambda m, a: (block.ln_2(captured[("mid", layer)]),))
    else:
        head = int(receiver[receiver.index("H") + 1 : receiver.index(".")])
        part = "qkv".index(receiver[-1])
        block = body.h[layer_of]
        d_model = hf.config.n_embd
        cols = slice(part * d_model + head * d_head, part * d_model + (head + 1) * d_head)

        def replace_columns(module, args, out):
            mine = block.ln_1(captured[("pre", layer_of)]) @ module.weight[:, cols] + module.bias[cols]
            out = out.clone()
            out[..., cols] = mine
            return out

        hook = block.attn.c_attn.register_forward_hook(replace_columns)
    with torch.no_grad():
        logits = hf(clean).logits[:, -1]
    hook.remove()
    return logits


@pytest.mark.parametrize(
    "senders, receiver",
    [
        (["input"], "L1H2.k"),
        (["L0H1"], "L2H3.q"),
        (["L0H1"], "L1H0.v"),
        (["L1H3", "MLP0"], "MLP1"),
        (["L0H0", "MLP1", "L2H2"], "logits"),
        (["L1H1"], "MLP1"),
    ],
)
@pytest.mark.parametrize("kept_sum_above", [1.0, 0.0])  # patched edges summed; every edge minus the kept ones
def test_exact_edge_patching_equals_naive_hook_path_patching(senders, receiver, kept_sum_above):
    hf = _tiny_gpt2(seed=3)
    fm = FunctionalTransformer(hf)
    graph = ComputationalGraph.of(fm)
    clean, corrupted = _pair(seed=5)
    expected = _naive_path_patching(hf, clean, corrupted, senders, receiver)
    patched = graph.mask([f"{s}->{receiver}" for s in senders])
    with torch.no_grad():
        source = engine.run_edges(fm, graph, corrupted, keep_outputs=True)
        got = fm.unembed(
            engine.run_edges(
                fm, graph, clean, patched=patched, sources=source.outputs, kept_sum_above=kept_sum_above
            ).final_normed[:, -1]
        )
        clean_logits = fm.logits(clean)[:, -1]
    assert (expected - clean_logits).abs().max() > 1e-3  # the patch does something to compare
    assert_close_up_to_rounding(got, expected, hf)


@pytest.mark.parametrize("share", [0.1, 0.3, 0.9])
def test_a_sum_over_the_senders_with_edges_and_over_every_sender_give_the_same_run(share, monkeypatch):
    """A receiver group's patched edges are summed over a copy of the senders that have one (few) or over every
    sender so far (many): forcing either way on random edge sets of several densities gives the same run, to the
    rounding of sums taken in another order."""
    from mechfin_utils.core import edge_engine

    hf = _tiny_llama(seed=2)
    fm = FunctionalTransformer(hf)
    graph = ComputationalGraph.of(fm)
    clean, corrupted = _pair(seed=7)
    generator = torch.Generator().manual_seed(1)
    patched = graph.valid() & (torch.rand(graph.valid().shape, generator=generator) < share)
    runs = {}
    with torch.no_grad():
        source = engine.run_edges(fm, graph, corrupted, keep_outputs=True)
        for way, share_of_senders in (("senders with edges", 0), ("every sender", 10**9)):
            monkeypatch.setattr(edge_engine, "COPY_BELOW_SHARE_OF_SENDERS", share_of_senders)
            runs[way] = engine.run_edges(fm, graph, clean, patched=patched, sources=source.outputs, kept_sum_above=1.0)
    logits = {way: fm.unembed(run.final_normed[:, -1]) for way, run in runs.items()}
    assert (logits["every sender"] - fm.logits(clean)[:, -1]).abs().max() > 1e-3  # the patch does something
    assert_close_up_to_rounding(logits["senders with edges"], logits["every sender"], hf)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batches_of_several_lengths_padded_into_one_give_each_prompts_own_results(family):
    """Joining batches of different token lengths into one right-padded batch (each prompt read at its own last
    token) changes the schedule only: every prompt's score with any edge set patched, and its EAP-IG scores, equal
    those of its own unpadded batch. In float64, so that the batch shapes' different summation orders stay far below
    the tolerance."""
    fm = FunctionalTransformer((_tiny_gpt2(seed=5) if family == "gpt2" else _tiny_llama(seed=5)).double())
    batches = []
    for i, (n, n_pos) in enumerate([(2, 5), (3, 7), (1, 9)]):
        clean, corrupted = _pair(n=n, n_pos=n_pos, seed=10 + i, changed=1)
        batches.append(_task(clean, corrupted, answers=(3 + i, 5)).batches[0])
        batches[-1].ids = [f"b{i}p{j}" for j in range(n)]
    task = CircuitTask("toy", "logit diff", batches)
    separate = ea.EdgePatcher(fm, task, max_batch_tokens=0)
    joined = ea.EdgePatcher(fm, task)
    assert len(separate.batches) == 3 and len(joined.batches) == 1 and joined.batches[0].read_ends is not None
    patched = separate.valid & (torch.rand(separate.valid.shape, generator=torch.Generator().manual_seed(0)) < 0.4)
    for edges_patched in (None, patched, separate.valid):
        torch.testing.assert_close(joined.prompt_scores(edges_patched), separate.prompt_scores(edges_patched))
    torch.testing.assert_close(
        ea.edge_scores(joined, "EAP-IG", steps=3).per_prompt, ea.edge_scores(separate, "EAP-IG", steps=3).per_prompt
    )


def test_bad_edge_run_arguments_are_all_named_at_once():
    fm = FunctionalTransformer(_tiny_gpt2())
    graph = ComputationalGraph.of(fm)
    clean, _ = _pair()
    bad = torch.ones(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    with pytest.raises(ValueError) as error:
        engine.run_edges(fm, graph, clean, patched=bad, embeddings=torch.zeros(1, 2, 3))
    message = str(error.value)
    assert "not edges" in message and "need sources" in message and "embeddings" in message
    with pytest.raises(ValueError, match="read_ends"):
        engine.run_edges(fm, graph, clean, read_ends=torch.tensor([7, 0, 3]))


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------


def test_eap_ig_scores_of_the_edges_leaving_the_input_add_up_to_the_total_effect():
    """Integrated gradients' completeness: the embedding feeds every receiver, so the sum of its edges' EAP-IG scores
    is the integral of the metric's derivative along the path from clean to corrupted inputs."""
    fm = FunctionalTransformer(_tiny_llama(seed=2))
    patcher = ea.EdgePatcher(fm, _task(*_pair(seed=1)))
    total = patcher.corrupted_metric - patcher.clean_metric
    coarse = ea.edge_scores(patcher, "EAP-IG", steps=2).mean[0].sum()
    fine = ea.edge_scores(patcher, "EAP-IG", steps=64).mean[0].sum()
    assert abs(float(fine) - total) < 2e-3 * max(1.0, abs(total))
    assert abs(float(fine) - total) < abs(float(coarse) - total)  # the quadrature converges
    assert abs(total) > 0.1


def test_eap_scores_are_the_derivative_of_exact_edge_patching():
    """EAP's score of an edge is the first-order change of the metric: patch the edge with the sender output moved a
    small step ``eps`` towards the corrupted one, exactly, and divide by ``eps`` (in float64, so that rounding does
    not swamp the step)."""
    fm = FunctionalTransformer(_tiny_gpt2(seed=4).double())
    patcher = ea.EdgePatcher(fm, _task(*_pair(seed=2)))
    scores = ea.edge_scores(patcher, "EAP").mean
    batch, graph, eps = patcher.batches[0], patcher.graph, 1e-4
    nudged = batch.clean_outputs + eps * (batch.corrupted_outputs - batch.clean_outputs)

    def metric(patched):
        with torch.no_grad():
            run = engine.run_edges(fm, graph, batch.clean_tokens, patched=patched, sources=nudged)
            return float(batch.score(fm.unembed(run.final_normed)).mean())  # float64 throughout

    clean = metric(None)
    for name in ["input->L0H1.q", "L0H2->L1H0.k", "L0H0->L2H1.v", "MLP0->MLP2", "L2H3->logits", "input->MLP1"]:
        sender, receiver = graph.parse_edge(name)
        assert abs(float(scores[sender, receiver])) > 1e-3, name
        assert (metric(graph.mask([name])) - clean) / eps == pytest.approx(float(scores[sender, receiver]), rel=5e-3), (
            name
        )


def _hand_built_circuit() -> tuple[FunctionalTransformer, CircuitTask, set[str]]:
    """Two layers, two heads: only L0H1 and L1H0 write (every other W_O and every MLP output weight is 0); queries and
    keys are 0, so attention is uniform. The prompts differ at position 0 only. The answer can change only through
    the token at position 0 read by the two heads' values, so the circuit is exactly these five edges."""
    torch.manual_seed(7)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=8)).eval()
    d, dh = 16, 8
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8.0 if p.ndim == 2 else 1.0)
        for layer, writer in ((0, 1), (1, 0)):
            block = hf.transformer.h[layer]
            block.attn.c_attn.weight[:, : 2 * d] = 0.0  # queries and keys
            block.attn.c_attn.bias[: 2 * d] = 0.0
            silent = 1 - writer
            block.attn.c_proj.weight[silent * dh : (silent + 1) * dh] = 0.0
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
    clean, corrupted = _pair(n=4, n_pos=5, seed=11, changed=0)
    known = {"input->L0H1.v", "input->L1H0.v", "L0H1->L1H0.v", "L0H1->logits", "L1H0->logits"}
    return FunctionalTransformer(hf), _task(clean, corrupted), known


@pytest.mark.parametrize("method", ["EAP", "EAP-IG"])
def test_a_hand_built_circuit_is_recovered_at_the_edge_level(method):
    fm, task, known = _hand_built_circuit()
    patcher = ea.EdgePatcher(fm, task)
    scores = ea.edge_scores(patcher, method, steps=8)
    graph = patcher.graph
    nonzero = {graph.edge_name(sender, receiver) for sender, receiver in (scores.mean.abs() > 1e-9).nonzero().tolist()}
    assert nonzero == known
    for selection in ("top-n", "greedy"):
        kept = ea.SELECTIONS[selection](scores.mean, graph, len(known))
        assert set(graph.edge_list(kept)) == known, selection
    kept = graph.mask(sorted(known))
    assert patcher.faithfulness(kept) == pytest.approx(1.0, abs=1e-5)
    for edge in known:  # every one of them matters (dropping one moves the metric, either way)
        assert abs(patcher.faithfulness(graph.mask(sorted(known - {edge}))) - 1.0) > 0.01, edge


def test_greedy_circuits_are_connected_to_the_logits():
    fm = FunctionalTransformer(_tiny_llama(seed=5))
    patcher = ea.EdgePatcher(fm, _task(*_pair(seed=4)))
    graph = patcher.graph
    scores = ea.edge_scores(patcher, "EAP").mean
    for n in (1, 7, 40):
        kept = ea.greedy_edges(scores, graph, n)
        assert int(kept.sum()) == n
        senders_kept = set(kept.any(1).nonzero().flatten().tolist())
        for sender, receiver in kept.nonzero().tolist():
            assert receiver == graph.logits_receiver or senders_kept & set(graph.receiver_senders(receiver)), (
                graph.edge_name(sender, receiver)
            )
        assert int(ea.top_edges(scores, n).sum()) == n


def test_node_circuits_as_edges_equal_node_level_resample_ablation(smollm2):
    task = circuit_tasks.greater_than_task(smollm2, n_prompts=3, seed=1)
    patcher = ea.EdgePatcher(smollm2, task)
    ablator = NodeAblator(smollm2, task)
    # the metric is a difference of probability sums: each moves by at most the logits' rounding
    logits = torch.cat([smollm2.bridge(b.clean_tokens)[:, -1] for b in task.batches])
    tol = 2 * rounding_tolerance(logits, smollm2)
    assert patcher.clean_metric == pytest.approx(ablator.full_metric, abs=tol)
    generator = torch.Generator().manual_seed(0)
    for share in (0.2, 0.6):
        kept = [n for n in ablator.nodes if torch.rand(1, generator=generator) < share]
        ablated = [n for n in ablator.nodes if n not in kept]
        edges = patcher.graph.edges_among([n.name for n in kept])
        assert patcher.metric(patcher.valid & ~edges) == pytest.approx(ablator.metric(ablated), abs=tol)
        circuit = SimpleNamespace(nodes=kept, threshold=share, faithfulness=ablator.normalised_metric(ablated))
        row = ea.node_circuit_curve(patcher, [circuit]).iloc[0]
        gap = abs(ablator.full_metric - ablator.baseline_metric)  # faithfulness divides by it
        assert row["faithfulness"] == pytest.approx(circuit.faithfulness, abs=2 * tol / gap)
        assert row["n_edges"] == int(edges.sum())
        circuit.faithfulness += 0.1  # a node circuit whose edge run disagrees is refused
        with pytest.raises(RuntimeError, match="should be the same"):
            ea.node_circuit_curve(patcher, [circuit])


def test_bootstrap_stability_of_identical_prompts_is_perfect_and_of_opposed_prompts_is_not():
    graph = ComputationalGraph(2, 2, 2)
    base = torch.randn(graph.n_senders, graph.n_receivers, generator=torch.Generator().manual_seed(0)) * graph.valid()
    same = ea.EdgeScores("EAP", 1, "m", "t", graph, ["a", "b", "c"], base.expand(3, -1, -1).clone())
    stable = stability.bootstrap_stability(same, 10, n_boot=5)
    assert stable.pairwise_jaccard == [1.0] * 10 and stable.summary()["stable (mean Jaccard >= 0.8)"]
    assert stable.summary()["nodes_always"] + stable.summary()["nodes_never"] == 6
    other = torch.randn(graph.n_senders, graph.n_receivers, generator=torch.Generator().manual_seed(1)) * graph.valid()
    mixed = ea.EdgeScores("EAP", 1, "m", "t", graph, list("abcdef"), torch.stack([base * 10, other * 10] * 3))
    assert min(stability.bootstrap_stability(mixed, 10, n_boot=20, seed=3).pairwise_jaccard) < 1.0


def test_faithfulness_intervals_and_random_circuits_on_a_tiny_model():
    clean, corrupted = _pair(n=6, n_pos=6, seed=2)
    patcher = ea.EdgePatcher(_tiny_gpt2(seed=3), _task(clean, corrupted))
    everything = patcher.faithfulness_interval(patcher.valid, n_boot=100)
    assert (everything.estimate, everything.low, everything.high) == pytest.approx((1.0, 1.0, 1.0))
    scores = ea.edge_scores(patcher, "EAP")
    curve = ea.faithfulness_curve(patcher, scores, [5, 40], n_boot=200)
    for row in curve.itertuples():  # the point is the full sample's, and the bootstrap interval holds it
        kept = ea.top_edges(scores.mean, row.n_edges)
        assert row.faithfulness == pytest.approx(patcher.faithfulness(kept), abs=1e-6)
        assert row.low <= row.faithfulness + 1e-9 and row.faithfulness - 1e-9 <= row.high
    generator = torch.Generator().manual_seed(0)
    drawn = ea.random_edges(patcher.graph, 17, generator)
    assert int(drawn.sum()) == 17 and not bool((drawn & ~patcher.valid).any())
    random = ea.random_curve(patcher, [17], n_random=3, seed=1)
    generator = torch.Generator().manual_seed(1)  # the same draws, measured one by one
    by_hand = [patcher.faithfulness(ea.random_edges(patcher.graph, 17, generator)) for _ in range(3)]
    row = random.iloc[0]
    assert (row.faithfulness, row.low, row.high) == pytest.approx((np.mean(by_hand), min(by_hand), max(by_hand)))
    with pytest.raises(ValueError, match="n must be in"):
        ea.random_edges(patcher.graph, patcher.graph.n_edges + 1, generator)


def test_scores_in_chunks_equal_one_patcher_and_reuse_the_first():
    """Scores are per prompt, so a task cut into chunks (each with its own patcher, memory bounded) gives every
    prompt the scores one patcher over the whole task gives, in the task's order. Batches of one prompt each, so that
    every run's matrix products have the same shapes both ways: the two agree to the last bit."""
    clean, corrupted = _pair(n=5, n_pos=6, seed=4)
    whole = _task(clean, corrupted)
    batch = whole.batches[0]
    split = CircuitTask(
        "toy",
        "logit diff",
        [CircuitBatch(clean[[i]], corrupted[[i]], batch.score, [batch.ids[i]]) for i in range(5)],
    )
    fm = FunctionalTransformer(_tiny_gpt2(seed=5), "tiny")
    chunks = ea.task_chunks(split, 2)
    assert [c.ids for c in chunks] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    first = ea.EdgePatcher(fm, chunks[0])
    chunked = ea.edge_scores_in_chunks(fm, split, steps=3, max_prompts=2, first=first)
    one = ea.EdgePatcher(fm, split)
    for method in ("EAP", "EAP-IG"):
        reference = ea.edge_scores(one, method, steps=3)
        assert chunked[method].ids == reference.ids == [f"p{i}" for i in range(5)]
        tol = 4 * rounding_tolerance(reference.per_prompt, width=6 * 32 * 4, depth=3)
        assert (chunked[method].per_prompt - reference.per_prompt).abs().max() <= tol, method
        assert reference.per_prompt.abs().max() > 1e3 * tol  # scores far above the rounding
    assert first.n_forward_passes > 2  # the first chunk was scored by the patcher it was given
    with pytest.raises(ValueError, match="max_prompts must be >= 1"):
        ea.task_chunks(split, 0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_circuit_with_no_clean_path_to_the_logits_is_the_corrupted_run_and_costs_no_pass(family):
    """Reachability against the engine itself: for random kept sets of several sizes, every set the graph says no kept
    path crosses gives the corrupted run's scores when run anyway (to rounding), and the patcher reads it without a
    pass; sets with a path are run (some change the scores, so the comparison can fail; a path need not change them,
    e.g. one through position-wise MLPs at a last position whose token both prompts share). Hand-built cases: one kept
    edge input -> logits reaches; a key edge reaches every query head of its group (Llama: 2 heads per group)."""
    model = _tiny_gpt2(seed=3) if family == "gpt2" else _tiny_llama(seed=1)
    clean, corrupted = _pair(n=4, n_pos=6, seed=2)
    patcher = ea.EdgePatcher(model, _task(clean, corrupted))
    graph, fm = patcher.graph, patcher.fm
    # 1. hand-built: the direct edge; a chain through a key receiver and the head of the same group
    direct = torch.zeros_like(patcher.valid)
    direct[0, graph.logits_receiver] = True
    assert graph.input_reaches_logits(direct) and not graph.input_reaches_logits(torch.zeros_like(direct))
    group = graph.n_heads // graph.n_kv_heads
    through_key = torch.zeros_like(patcher.valid)
    through_key[0, graph.attention_receivers(1).start + graph.n_heads] = True  # layer 1, key receiver of group 0
    through_key[graph.head_sender(1, group - 1), graph.logits_receiver] = True  # the group's last head -> logits
    assert graph.input_reaches_logits(through_key)
    through_key[graph.head_sender(1, group - 1), graph.logits_receiver] = False
    through_key[graph.head_sender(1, group), graph.logits_receiver] = True  # another group's head: no path
    assert not graph.input_reaches_logits(through_key)
    # a chain through an MLP: input -> layer 0's value receiver of group 0 -> head L0H0 -> MLP1 -> logits; its clean
    # values reach the last position through the head (which reads the changed token), so the run changes
    chain = torch.zeros_like(patcher.valid)
    chain[0, graph.attention_receivers(0).start + graph.n_heads + graph.n_kv_heads] = True
    chain[graph.head_sender(0, 0), graph.mlp_receiver(1)] = True
    chain[graph.mlp_sender(1), graph.logits_receiver] = True
    assert graph.input_reaches_logits(chain)
    with torch.no_grad():
        run = engine.run_edges(
            fm, graph, clean, patched=patcher.valid & ~chain, sources=patcher.batches[0].corrupted_outputs
        )
    logits = fm.unembed(run.final_normed)
    moved = float((patcher.batches[0].score(logits).float() - patcher.corrupted_prompt_scores).abs().max())
    assert moved > 2 * rounding_tolerance(logits, model)
    chain[graph.head_sender(0, 0), graph.mlp_receiver(1)] = False
    assert not graph.input_reaches_logits(chain)
    # 2. random sets, each run by the engine whatever the graph says
    generator = torch.Generator().manual_seed(0)
    seen = {True: 0, False: 0}
    changed = 0
    for size in [1, 2, 4, 8, 16, 32, 64, 128] * 3:
        kept = ea.random_edges(graph, size, generator)
        reaches = graph.input_reaches_logits(kept)
        seen[reaches] += 1
        with torch.no_grad():
            run = engine.run_edges(
                fm, graph, clean, patched=patcher.valid & ~kept, sources=patcher.batches[0].corrupted_outputs
            )
        scores = patcher.batches[0].score(fm.unembed(run.final_normed)).float()
        tol = 2 * rounding_tolerance(fm.unembed(run.final_normed), model)
        gap = float((scores - patcher.corrupted_prompt_scores).abs().max())
        assert reaches or gap <= tol, (size, gap, tol)
        changed += gap > tol
        before = patcher.n_forward_passes
        read = patcher.prompt_scores(patcher.valid & ~kept)
        assert patcher.n_forward_passes == before + (1 if reaches else 0)
        if not reaches:
            assert torch.equal(read, patcher.corrupted_prompt_scores)
    assert seen[True] and seen[False] and changed  # both kinds drawn, and a change the comparison would see
