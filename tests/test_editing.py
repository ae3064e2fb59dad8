"""ROME / MEMIT: the update's defining equation, exact restoring, a hand-built known answer, MEMIT = ROME on one edit.

Every test that edits the session's shared model restores it (``hook_points.restoring``), and checks that it did.
"""

from __future__ import annotations

import pytest
import torch

from mechfin_utils.core import hook_points
from mechfin_utils.methods.editing import edits as editing
from mechfin_utils.methods.editing import evaluation as edit_eval
from mechfin_utils.methods.editing import key_statistics
from mechfin_utils.methods.editing.edits import ValueParams, ValueResult
from mechfin_utils.tasks.counterfact import EditRequest
from mechfin_utils.tasks.facts import locate_subject
from mechfin_utils.tooling.testing import FLOAT32_EPS, assert_close_up_to_rounding

FRANCE = EditRequest("edit-capital-france", "The capital of France is", "France", " Berlin", " Paris")
FAST = ValueParams(steps=12)
LAYER = 3  # SmolLM2's causal trace peaks at MLP 3 at the subject's last token (notebook 06)


class _ReferenceKeysRead(Exception):
    """Ends a by-hand forward once its deepest wanted keys are read: the layers above cannot change them."""


def _keys_one_text_at_a_time(model, layers, corpus) -> dict[int, list[torch.Tensor]]:
    """The reference keys: each text alone (no padding, no batch), read at every layer's hook point in one forward,
    in float64, ``{layer: [keys of text 0, keys of text 1, ...]}``. The forward ends after the deepest layer in
    ``layers`` (an exception raised by that layer's hook): running the rest of the model would cost several times
    more and could not change a key already read."""
    deepest = max(layers)
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def reader(layer):
        def read(module, args, output):
            keys[layer].append(output[0].double())
            if layer == deepest:
                raise _ReferenceKeysRead

        return read

    handles = [hook_points.key_point(model, layer).register_forward_hook(reader(layer)) for layer in layers]
    try:
        with torch.no_grad():
            for row in corpus:
                with pytest.raises(_ReferenceKeysRead):
                    model.hf_model(input_ids=torch.tensor([row]))
    finally:
        for handle in handles:
            handle.remove()
    assert all(len(seen) == len(corpus) for seen in keys.values())
    return keys


@pytest.fixture(scope="module")
def corpus(smollm2):
    """What the key statistics read: 32 seeded rows of ordinary (non-special) tokens, 56-72 long, so that batches are
    padded; ~2,000 keys in all, ~1,000 in the first half (below d_mlp 1,536). The tests here check the arithmetic on
    any text; the model's own writing (notebook 09's corpus, :func:`key_statistics.self_generated_corpus`, tested
    below) would cost ~16 s of generation for the same checks."""
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor(sorted(smollm2.tokenizer.all_special_ids))
    ordinary = torch.arange(len(smollm2.tokenizer))
    ordinary = ordinary[~torch.isin(ordinary, special)]
    lengths = torch.randint(56, 73, (32,), generator=generator).tolist()
    return [ordinary[torch.randint(len(ordinary), (n,), generator=generator)].tolist() for n in lengths]


@pytest.fixture(scope="module")
def covariance(smollm2, corpus):
    return key_statistics.key_covariance(smollm2, LAYER, corpus)


@pytest.fixture(scope="module")
def keys_by_hand(smollm2, corpus):
    """The reference keys of layers 0, LAYER and LAYER + 2 (the first, the edited and a deeper one), read once per
    module with the worker's own thread count."""
    return _keys_one_text_at_a_time(smollm2, [0, LAYER, LAYER + 2], corpus)


@pytest.mark.batch_split
def test_key_covariance_matches_a_by_hand_second_moment(smollm2, corpus, keys_by_hand, torch_threads):
    """Keys read at the hook point on unpadded forwards, one text at a time, then E[k kᵀ] by hand: the batched,
    padded, stopped-early estimate equals it. The estimate is computed here, under each thread count, against the
    one reference."""
    covariance = key_statistics.key_covariance(smollm2, LAYER, corpus)
    stacked = torch.cat(keys_by_hand[LAYER])
    assert covariance.n_tokens == stacked.shape[0] == sum(len(r) for r in corpus)
    by_hand = stacked.T @ stacked / stacked.shape[0]
    # keys from padded batches against one text at a time: a product of two keys carries twice their rounding
    assert_close_up_to_rounding(covariance.matrix.double(), by_hand, smollm2, scale=2 * by_hand.abs().max())


def test_every_layer_and_prefix_from_one_pass_match_by_hand(smollm2, corpus, keys_by_hand):
    """Several layers and corpus prefixes from one pass (stopped at the deepest layer) against each layer's keys read
    by hand, one text at a time: every estimate is E[k kᵀ] over its layer's keys of the first n texts; a prefix with
    too few key vectors for an invertible C (half this corpus: ~1,000 keys for d_mlp 1,536) is None."""
    layers, stops = [0, LAYER, LAYER + 2], [len(corpus) // 2, len(corpus)]
    estimates = key_statistics.layer_prefix_covariances(smollm2, layers, corpus, stops)
    assert sorted(estimates) == layers and all(sorted(e) == stops for e in estimates.values())
    for layer in layers:
        keys = keys_by_hand[layer]
        d_mlp = keys[0].shape[1]
        for stop in stops:
            stacked = torch.cat(keys[:stop])
            estimate = estimates[layer][stop]
            if stacked.shape[0] <= d_mlp:
                assert estimate is None, (layer, stop)
                continue
            by_hand = stacked.T @ stacked / stacked.shape[0]
            assert estimate.layer == layer and estimate.n_tokens == stacked.shape[0]
            assert_close_up_to_rounding(estimate.matrix.double(), by_hand, smollm2, scale=2 * by_hand.abs().max())
    assert estimates[LAYER][len(corpus)] is not None and estimates[LAYER][len(corpus) // 2] is None


def test_generated_corpus_is_cached_and_reused(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_CACHE", str(tmp_path))
    first = key_statistics.self_generated_corpus(smollm2, n_sequences=2, n_tokens=5, seed=1)
    assert list((tmp_path / "corpora").glob("smollm2-135m-*.pt"))

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(smollm2.hf_model, "generate", no_generation)
    assert key_statistics.self_generated_corpus(smollm2, n_sequences=2, n_tokens=5, seed=1) == first
    assert [len(r) for r in first] == [len(smollm2.token_ids(o)) + 5 for o in key_statistics.CORPUS_OPENERS[:2]]


# ---------------------------------------------------------------------------------------------------------
# The update itself, on hand-built matrices
# ---------------------------------------------------------------------------------------------------------


def test_rank_one_update_solves_the_constrained_least_squares_problem():
    """ROME's closed form equals a direct solve of its defining problem: minimise tr(ΔW C ΔWᵀ) subject to
    (W + ΔW) k = v, written as the KKT linear system for ΔW's rows and solved by torch.linalg.solve."""
    generator = torch.Generator().manual_seed(0)
    d_out, d_in, n = 3, 5, 40
    keys = torch.randn(d_in, n, generator=generator, dtype=torch.float64)
    c = keys @ keys.T / n
    weight = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    k = torch.randn(d_in, generator=generator, dtype=torch.float64)
    v = torch.randn(d_out, generator=generator, dtype=torch.float64)
    closed = editing.rank_one_update(weight @ k, v, k, torch.linalg.solve(c, k))
    # KKT, per output row r: [2C  k; kᵀ 0] [δ_r; μ] = [0; v_r − (W k)_r]
    kkt = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
    kkt[:d_in, :d_in], kkt[:d_in, d_in], kkt[d_in, :d_in] = 2 * c, k, k
    rhs = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
    rhs[d_in] = v - weight @ k
    direct = torch.linalg.solve(kkt, rhs)[:d_in].T
    torch.testing.assert_close(closed, direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((weight + closed) @ k, v, rtol=1e-10, atol=1e-12)


def test_hand_built_memory_edit_rewrites_one_key_and_leaves_an_unrelated_key_unchanged():
    """A memory with keys e1..e4 (C diagonal): editing e1 → v maps e1 to v and e2, e3, e4 exactly as before."""
    c = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    weight = torch.arange(8, dtype=torch.float64).reshape(2, 4)
    eye = torch.eye(4, dtype=torch.float64)
    v = torch.tensor([10.0, -10.0], dtype=torch.float64)
    edited = weight + editing.rank_one_update(weight @ eye[0], v, eye[0], torch.linalg.solve(c, eye[0]))
    assert torch.equal(edited @ eye[0], v)
    for unrelated in eye[1:]:
        assert torch.equal(edited @ unrelated, weight @ unrelated)


def test_rank_one_update_refuses_a_key_orthogonal_to_its_direction():
    with pytest.raises(ValueError, match="orthogonal"):
        editing.rank_one_update(torch.zeros(2), torch.ones(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))


def test_ngram_entropy_known_values():
    assert edit_eval.ngram_entropy([7] * 20) == 0.0  # one repeated token: no uncertainty
    # 1 2 3 4: three distinct bigrams (log2 3) and two distinct trigrams (1 bit), weighted 2/3 and 4/3
    expected = (2 / 3 * torch.log2(torch.tensor(3.0)).item() + 4 / 3 * 1.0) / 2
    assert edit_eval.ngram_entropy([1, 2, 3, 4]) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------
# On the embedded model
# ---------------------------------------------------------------------------------------------------------


def test_output_matrix_is_the_parameter_the_mlp_applies(any_model):
    """``output_matrix @ key + bias`` is the MLP's output: both read at the bridge's hook points during a forward
    of the Hugging Face model, so the matrix, its orientation and the bias are the ones the forward applies."""
    layer = 1
    rows = [any_model.token_ids("The capital of France is")]
    seen_in, seen_out = [], []
    proj = hook_points.output_projection(any_model, layer)
    h1 = hook_points.key_point(any_model, layer).register_forward_hook(lambda m, a, o: seen_in.append(o))
    h2 = hook_points.mlp_output_point(any_model, layer).register_forward_hook(lambda m, a, o: seen_out.append(o))
    with torch.no_grad():
        any_model.hf_model(input_ids=torch.tensor(rows))
    h1.remove(), h2.remove()
    bias = proj.bias if proj.bias is not None else 0
    expected = seen_in[0][0] @ hook_points.output_matrix(any_model, layer).T + bias
    assert_close_up_to_rounding(expected, seen_out[0][0], any_model)


def test_rome_maps_the_key_to_the_value_changes_the_answer_and_restores_exactly(smollm2, covariance):
    prompt_rows = [smollm2.token_ids(FRANCE.prompt)]
    with torch.no_grad():
        before = smollm2.bridge(torch.tensor(prompt_rows))[0, -1]
    with hook_points.restoring(smollm2, [LAYER]):
        edit = editing.rome(smollm2, FRANCE, LAYER, covariance, [""], FAST)
        # the defining equation, read through the forward pass: the edited MLP outputs v* at the subject's last token
        seen = []
        handle = hook_points.mlp_output_point(smollm2, LAYER).register_forward_hook(lambda m, a, o: seen.append(o))
        with torch.no_grad():
            logits = smollm2.hf_model(input_ids=torch.tensor(prompt_rows)).logits[0, -1]
            bridged = smollm2.bridge(torch.tensor(prompt_rows))[0, -1]
        handle.remove()
        subject_last = locate_subject(smollm2, FRANCE.prompt, FRANCE.subject)[1] - 1
        assert_close_up_to_rounding(seen[0][0, subject_last], edit.value.target, smollm2)
        berlin, paris = smollm2.single_token_id(" Berlin"), smollm2.single_token_id(" Paris")
        assert logits[berlin] > logits[paris], "the edit did not make Berlin beat Paris"
        assert_close_up_to_rounding(bridged, logits, smollm2)  # the bridge sees the edited weights
    with torch.no_grad():
        after = smollm2.bridge(torch.tensor(prompt_rows))[0, -1]
    assert torch.equal(before, after), "restoring did not give back the exact logits"


def test_memit_on_one_layer_and_one_edit_agrees_with_rome(smollm2, covariance):
    """With one request, one layer, the same change of the residual and a vanishing prior, MEMIT's least-squares
    update is ROME's rank-one update (Sherman–Morrison); here both use the bare prompt only."""
    with hook_points.restoring(smollm2, [LAYER]):
        rome_edit = editing.rome(smollm2, FRANCE, LAYER, covariance, [""], FAST)
    delta = rome_edit.value.target - rome_edit.value.initial  # the same change in the residual stream
    block_out = editing._block_output_at_subject(smollm2, hook_points.block_output_point(smollm2, LAYER), FRANCE, [""])
    with hook_points.restoring(smollm2, [LAYER]) as saved:
        targets = [ValueResult(block_out, block_out + delta)]
        editing.memit(smollm2, [FRANCE], [LAYER], {LAYER: covariance}, [""], targets=targets, prior_weight=2e-6)
        memit_update = hook_points.output_matrix(smollm2, LAYER).detach() - saved.saved[LAYER]
    torch.testing.assert_close(memit_update, rome_edit.update, rtol=1e-3, atol=1e-6)


def test_bad_edit_arguments_are_named(smollm2, covariance):
    with pytest.raises(ValueError, match="layer must be an integer in \\[0, 30\\)"):
        hook_points.output_matrix(smollm2, 30)
    with pytest.raises(ValueError, match="the covariance is of 'mlp' at layer 3, the edit is of 'mlp' at layer 4"):
        editing.rome(smollm2, FRANCE, 4, covariance, [""], FAST)
    bad = EditRequest("edit-x", "The capital of France is", "Germany", " Berlin", " Paris")
    with pytest.raises(ValueError, match="edit-x.*'Germany' is not a substring"):
        editing.subject_key(smollm2, LAYER, bad, [""])
    with pytest.raises(ValueError, match="no covariance for layer 5"):
        editing.memit(smollm2, [FRANCE], [LAYER, 5], {LAYER: covariance}, [""])


def test_rome_on_the_gpt2_path_maps_the_key_to_the_value(gpt2_random):
    """The GPT-2 code path (Conv1D stores W transposed, c_proj has a bias): W' k* + b = v*, read through the
    forward. Random weights: only the equation is checked, never what the model says."""
    layer = 2
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, gpt2_random.cfg.d_vocab, (36, 100), generator=generator).tolist()  # > d_mlp key vectors
    covariance = key_statistics.key_covariance(gpt2_random, layer, rows)
    request = EditRequest("edit-gpt2", "The capital of France is", "France", " Berlin", " Paris")
    with hook_points.restoring(gpt2_random, [layer]):
        edit = editing.rome(gpt2_random, request, layer, covariance, [""], ValueParams(steps=3))
        seen = []
        handle = hook_points.mlp_output_point(gpt2_random, layer).register_forward_hook(lambda m, a, o: seen.append(o))
        with torch.no_grad():
            gpt2_random.hf_model(input_ids=torch.tensor([gpt2_random.token_ids(request.prompt)]))
        handle.remove()
        subject_last = locate_subject(gpt2_random, request.prompt, request.subject)[1] - 1
        assert_close_up_to_rounding(seen[0][0, subject_last], edit.value.target, gpt2_random)


def test_fine_tune_keeps_every_entry_within_its_bound_and_restores(smollm2):
    """FT-L changes only the chosen matrix, each entry by at most ``max_change``; restoring gives it back exactly."""
    other = hook_points.output_matrix(smollm2, LAYER + 1).detach().clone()
    with hook_points.restoring(smollm2, [LAYER]) as saved:
        history = editing.fine_tune(smollm2, FRANCE, LAYER, [""], steps=3, learning_rate=1e-2, max_change=2e-3)
        change = hook_points.output_matrix(smollm2, LAYER).detach() - saved.saved[LAYER]
        # (w + d) - w in float32 carries one rounding step of the largest weight
        slack = 2 * FLOAT32_EPS * float(saved.saved[LAYER].abs().max())
        assert change.abs().max() <= 2e-3 + slack and change.abs().max() > 0
        assert torch.equal(hook_points.output_matrix(smollm2, LAYER + 1).detach(), other)
        assert [h["step"] for h in history] == [0, 1, 2] and history[-1]["loss"] < history[0]["loss"]
    assert torch.equal(hook_points.output_matrix(smollm2, LAYER).detach(), saved.saved[LAYER])
    assert all(p.requires_grad for p in smollm2.hf_model.parameters())  # gradients switched back on everywhere


def test_the_essence_term_is_kl_of_the_edited_from_the_original_distribution():
    # ROME's equation keeps the edited distribution close to the original: sum_x p_edited(x) log(p_edited / p_orig)
    # a peaked edited distribution against a flat original: the two directions are far apart (0.9 against 1.6)
    edited = torch.log_softmax(torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64), -1)
    original = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.1]], dtype=torch.float64), -1)
    by_hand = (edited.exp() * (edited - original)).sum(-1).mean()
    reverse = (original.exp() * (original - edited)).sum(-1).mean()
    assert float(editing.kl_edited_from_original(edited, original)) == pytest.approx(float(by_hand), rel=1e-12)
    assert abs(float(by_hand) - float(reverse)) > 0.3  # the two directions differ here: the test tells them apart


def test_layer_choice_names_the_runner_up_and_a_margin_that_says_whether_it_is_clear():
    import numpy as np

    from mechfin_utils.methods.editing.locate import choose_layer

    rng = np.random.default_rng(0)
    clear = np.tile([0.1, 0.6, 0.2, 0.05], (12, 1)) + rng.normal(0, 0.02, (12, 4))
    choice = choose_layer(clear, n_boot=500)
    assert (choice.layer, choice.runner_up) == (1, 2) and choice.clear and choice.share_choosing_layer == 1.0
    assert choice.margin == pytest.approx(float((clear[:, 1] - clear[:, 2]).mean()))
    tied = np.tile([0.1, 0.4, 0.4, 0.05], (12, 1)) + rng.normal(0, 0.05, (12, 4))
    near = choose_layer(tied, n_boot=500)
    assert {near.layer, near.runner_up} == {1, 2} and not near.clear
    assert 0.1 < near.share_choosing_layer < 0.9 and near.share_choosing_layer + near.share_choosing_runner_up > 0.99
    with pytest.raises(ValueError, match="at least 2 facts"):
        choose_layer(clear[:1])


def test_an_edit_given_the_same_corpus_twice_over_does_not_move_and_fewer_templates_do(smollm2, corpus):
    """Known answer: a corpus whose second half repeats its first gives the same ``C`` from half of it as from all
    of it, so the half-corpus edit is the reference edit (cosine 1, every score the same). Refitting with only the
    bare prompt as template changes ``k̄`` and ``v*``, so that edit must differ. The model is restored after each.

    The edit is the first request the model knows, found one request at a time (the first of ``requests_known_to``
    over the whole file, without a forward pass for each of its ~80 requests). Four value steps, not twelve: the
    claims hold for any fit, every setting using the same one, and a half-finished edit (p_new ~0.24 against ~0.98)
    leaves the scores compared far from saturation, where a different update would show."""
    from mechfin_utils.methods.editing import convergence
    from mechfin_utils.tasks import counterfact

    edit = next(e for e in counterfact.load_counterfact() if counterfact.requests_known_to(smollm2, [e]))
    prefixes = editing.context_prefixes(smollm2, 2, seed=0)
    before = hook_points.snapshot(smollm2, [LAYER])
    result = convergence.edit_convergence(
        smollm2,
        [edit],
        LAYER,
        [*corpus, *corpus],
        {0: prefixes[:1], 2: prefixes},
        fractions=(0.5,),
        params=ValueParams(steps=4),
    )
    assert list(result.references) == [edit.request.edit_id]  # the reference edit, kept for reapply
    table = result.table
    now = hook_points.snapshot(smollm2, [LAYER])
    assert torch.equal(now.saved[LAYER], before.saved[LAYER])
    rows = table.set_index("varied")
    assert list(rows.index) == ["reference", "corpus", "templates"]
    assert rows.loc["corpus", "corpus_tokens"] * 2 == rows.loc["reference", "corpus_tokens"]
    assert rows.loc["corpus", "cosine_to_reference"] > 1 - 1e-5
    for score in ("p_new", "p_true"):  # the same update up to the covariance's float32 rounding
        assert abs(rows.loc["corpus", score] - rows.loc["reference", score]) < 1e-3 * rows.loc["reference", score]
    assert rows.loc["templates", "cosine_to_reference"] < 0.999
    summary = convergence.convergence_summary(table).set_index("varied")
    assert summary.loc["corpus", "largest_change_efficacy"] == 0.0
    assert summary.loc["templates", "mean_cosine_to_reference"] == rows.loc["templates", "cosine_to_reference"]


def test_covariances_given_for_the_fractions_are_checked_not_recomputed():
    """Covariances computed once for a notebook are used as given when they hold every prefix a check needs (no model
    pass: the model argument is not touched), and refused, naming the missing prefix, when they do not."""
    corpus = [[1, 2, 3]] * 8
    given = {4: None, 8: None}
    sizes, used = key_statistics.fraction_covariances(None, 0, corpus, (0.5,), given)
    assert sizes == {0.5: 4} and used is given
    with pytest.raises(ValueError, match=r"edit_convergence: the covariances given have none over the first \[2\]"):
        key_statistics.fraction_covariances(None, 0, corpus, (0.25, 0.5), given, caller="edit_convergence")
