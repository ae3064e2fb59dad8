"""Causal tracing and attention knockout: provable properties and independent reference computations.

Known answers used here (each follows from the definitions, not from a previous run):

* restoring every token's hidden state after layer 0 (or removing the noise at ``hook_embed``) gives the
  clean run back; so does restoring, at the last position, every layer's attention and MLP output (that
  position is never noised, so its residual stream is then exactly the clean one);
* a state at a position *before* the subject is identical in the clean and corrupted runs (causal
  attention), so restoring it changes nothing; noise of scale 0 makes every indirect effect 0;
* layer skipping is only an optimisation: same numbers as the plain path;
* knockout of zero layers changes nothing; knockout through the bridge's score hook equals a plain Hugging
  Face forward whose attention mask is edited in the same layers (independent code path, original weights);
* the ROME-style corrupted and restored scores equal a by-hand computation on the Hugging Face model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mechfin_utils.core.stats import bootstrap_ci
from mechfin_utils.methods import tracing
from mechfin_utils.methods.tracing.noise import input_embedding_matrix
from mechfin_utils.methods.tracing.prepared import EMBED_HOOK, check_trace_hooks, score_final_logits
from mechfin_utils.reporting import trace_plots
from mechfin_utils.tasks import facts
from mechfin_utils.tasks.facts import TraceTask, locate_subject
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

EIFFEL = TraceTask("eiffel", "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris")


@pytest.fixture(scope="module", autouse=True)
def _no_grad_one_thread():
    """No autograd; one intra-op thread (on a shared, oversubscribed CPU two threads made the many small
    forward passes here up to 20x slower; results only differ in float rounding). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eiffel_smollm2(smollm2):
    return tracing.prepare_trace(smollm2, EIFFEL)


# ---------------------------------------------------------------------------------------------------------
# Hooks, inputs, windows
# ---------------------------------------------------------------------------------------------------------


def test_trace_hooks_exist_and_hook_embed_is_the_embedding_table(any_model):
    check_trace_hooks(any_model)
    tokens = any_model.to_tokens(EIFFEL.prompt)
    _, cache = any_model.bridge.run_with_cache(tokens, names_filter=lambda n: n == "hook_embed")
    table = input_embedding_matrix(any_model)
    torch.testing.assert_close(cache["hook_embed"][0], table[tokens[0]], rtol=0, atol=0)
    assert tracing.embedding_noise_std(any_model) == pytest.approx(float(np.std(table.double().numpy())), rel=1e-5)


def test_locate_subject_by_offsets(smollm2, gpt2_random):
    for model in (smollm2, gpt2_random):
        start, stop = locate_subject(model, EIFFEL.prompt, EIFFEL.subject)
        ids = model.token_ids(EIFFEL.prompt)
        assert model.tokenizer.decode(ids[start:stop]).strip() == "Eiffel Tower"
        assert "Eiffel" not in model.tokenizer.decode(ids[:start]) + model.tokenizer.decode(ids[stop:])
    assert locate_subject(smollm2, EIFFEL.prompt, EIFFEL.subject) == (1, 4)  # The | E iffel Tower | is ...
    assert locate_subject(gpt2_random, EIFFEL.prompt, EIFFEL.subject) == (2, 6)  # BOS The | E iff el Tower |
    with pytest.raises(ValueError, match="row 7.*not a substring"):
        locate_subject(smollm2, EIFFEL.prompt, "Louvre", label="row 7")
    with pytest.raises(ValueError, match="row 8.*more than once"):
        locate_subject(smollm2, "Paris is Paris", "Paris", label="row 8")
    with pytest.raises(ValueError, match="eiffel: answer"):
        tracing.prepare_trace(smollm2, TraceTask("eiffel", EIFFEL.prompt, EIFFEL.subject, " Reykjavikborg"))


def test_windows_and_categories():
    assert (
        tracing.default_trace_window(30) == 6
        and tracing.default_trace_window(12) == 3
        and tracing.default_trace_window(48) == 10
    )
    assert tracing.default_knockout_window(30) == 6 and tracing.default_knockout_window(12) == 2
    assert tracing.default_knockout_window(48) == 9
    assert tracing.layer_window(10, 6, 30) == (7, 8, 9, 10, 11, 12)
    assert tracing.layer_window(0, 6, 30) == (0, 1, 2) and tracing.layer_window(29, 6, 30) == (26, 27, 28, 29)
    assert tracing.layer_window(5, 1, 30) == (5,)
    assert tracing.layer_window(4, 5, 30) == (2, 3, 4, 5, 6)
    cats = tracing.position_categories((2, 6), 12)
    assert cats == {
        "first subject token": [2],
        "middle subject tokens": [3, 4],
        "last subject token": [5],
        "first subsequent token": [6],
        "further tokens": [7, 8, 9, 10],
        "last token": [11],
    }
    one = tracing.position_categories((1, 2), 4)
    assert one["first subject token"] == one["last subject token"] == [1] and one["middle subject tokens"] == []
    assert one["first subsequent token"] == [2] and one["further tokens"] == [] and one["last token"] == [3]


def test_average_by_position_category_matches_hand_computation():
    def result(span, n_tokens, ie, label):
        return tracing.TraceResult(label, "M", "mlp", 3, tuple("t" * n_tokens), span, "p", 0.9, 0.1, ie + 0.1, 2, 0.3)

    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 4))
    b = rng.normal(size=(6, 4))
    b[0] = np.nan  # a position before the subject, not traced
    avg = tracing.average_by_position_category([result((1, 5), 8, a, "a"), result((1, 2), 6, b, "b")])
    # a: first 1, middle 2-3, last 4, subsequent 5, further 6, last 7
    # b: first = last subject token 1, subsequent 2, further 3-4, last 5
    expected = np.stack(
        [
            (a[1] + b[1]) / 2,
            a[2:4].mean(0),
            (a[4] + b[1]) / 2,
            (a[5] + b[2]) / 2,
            (a[6] + b[3:5].mean(0)) / 2,
            (a[7] + b[5]) / 2,
        ]
    )
    np.testing.assert_allclose(avg.mean, expected, rtol=1e-12)
    assert avg.counts.tolist() == [2, 1, 2, 2, 2, 2]
    # the interval of a cell resamples the prompts that have it: here the two prompts' own means
    got = avg.interval("last token", 2, n_boot=200, seed=1)
    by_hand = bootstrap_ci(np.array([a[7, 2], b[5, 2]]), n_boot=200, seed=1)
    assert (got.estimate, got.low, got.high) == pytest.approx((by_hand.estimate, by_hand.low, by_hand.high))
    assert avg.interval("middle subject tokens", 0) is None  # one prompt: no interval
    peak = avg.peak_summary(n_boot=50)
    assert (
        peak["effect"] == pytest.approx(np.nanmax(avg.mean))
        and peak["n_prompts"] == avg.counts[list(avg.categories).index(peak["category"])]
    )
    with pytest.raises(ValueError, match="mix"):
        tracing.average_by_position_category(
            [
                result((1, 5), 8, a, "a"),
                tracing.TraceResult("c", "M", "attn", 3, tuple("t" * 8), (1, 5), "p", 0.9, 0.1, a, 2, 0.3),
            ]
        )


def test_noise_is_seeded_and_scaled():
    n1 = tracing.sample_subject_noise(4, 3, 500, std=0.4, seed=5)
    n2 = tracing.sample_subject_noise(4, 3, 500, std=0.4, seed=5)
    n3 = tracing.sample_subject_noise(4, 3, 500, std=0.4, seed=6)
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
    assert float(n1.std()) == pytest.approx(0.4, rel=0.03)
    assert torch.count_nonzero(tracing.sample_subject_noise(2, 2, 8, std=0.0)) == 0


# ---------------------------------------------------------------------------------------------------------
# Restorations: provable properties
# ---------------------------------------------------------------------------------------------------------


def test_known_restorations_smollm2(smollm2, eiffel_smollm2):
    p = eiffel_smollm2
    n_layers, last = smollm2.cfg.n_layers, p.last_position
    noise = tracing.sample_subject_noise(2, 3, smollm2.cfg.d_model, 3 * tracing.embedding_noise_std(smollm2), seed=1)
    all_positions = range(p.n_tokens)
    restorations = [
        tracing.Restoration(()),  # corrupted
        tracing.Restoration.of("hidden", [0], all_positions),  # every token after layer 0 -> clean
        tracing.Restoration(tuple(("hook_embed", q) for q in p.subject_positions)),  # noise removed -> clean
        tracing.Restoration(
            tuple((f"blocks.{l}.hook_{k}_out", last) for l in range(n_layers) for k in ("attn", "mlp"))
        ),
        tracing.Restoration.of("hidden", [0, 12, 29], [0]),  # position 0 ("The") precedes the subject
        tracing.Restoration.of("mlp", range(n_layers), [0]),
        tracing.Restoration.of("hidden", [29], [p.subject_positions[-1]]),  # last layer, not last position
    ]
    scores = tracing.run_with_restorations(smollm2, p, noise, restorations)
    logits = smollm2.bridge(p.tokens[None])[:, -1]
    clean = float(score_final_logits(p, logits)[0])
    corrupted = scores[:, 0]
    assert clean > 0.5 and corrupted.max() < 0.5 * clean  # the noise really destroys the answer
    # a probability moves by at most its logits' rounding (engine against bridge: the same sums in another order)
    for column in (1, 2, 3):
        assert_close_up_to_rounding(scores[:, column], torch.full((2,), clean), smollm2, scale=logits, msg=str(column))
    for column in (4, 5, 6):
        assert_close_up_to_rounding(scores[:, column], corrupted, smollm2, scale=logits, msg=str(column))


def test_zero_noise_gives_zero_indirect_effect(smollm2, eiffel_smollm2):
    p = eiffel_smollm2
    out = tracing.causal_trace(
        smollm2,
        p,
        kinds=("hidden", "attn"),
        n_samples=1,
        noise_std=0.0,
        positions=[p.subject_positions[-1], p.last_position],
    )
    hidden = out["hidden"]
    tol = rounding_tolerance(smollm2.bridge(p.tokens[None])[:, -1], smollm2)  # probabilities: logit rounding
    assert hidden.corrupted_score == pytest.approx(hidden.clean_score, abs=tol)
    for result in out.values():
        traced = result.indirect_effect[[p.subject_positions[-1], p.last_position]]
        assert np.isfinite(traced).all() and np.abs(traced).max() <= 2 * tol
        assert np.isnan(result.restored[0]).all()  # not requested -> not run, and says so


@pytest.mark.batch_split
@pytest.mark.parametrize("model_name", ["smollm2", "gpt2_random_biased"])
def test_engine_equals_bridge_hooks(request, model_name, torch_threads):
    """Restorations and knockouts on the intervention engine equal full bridge forward passes with hooks."""
    model = request.getfixturevalue(model_name)
    p = tracing.prepare_trace(model, EIFFEL)
    n_layers = model.cfg.n_layers
    noise = tracing.sample_subject_noise(
        2, len(p.subject_positions), model.cfg.d_model, 3 * tracing.embedding_noise_std(model), seed=3
    )
    restorations = (
        [tracing.Restoration(())]
        + [
            tracing.Restoration.of(kind, tracing.layer_window(layer, 3, n_layers), [pos])
            for kind, layer, pos in [
                ("hidden", 0, p.subject_positions[0]),
                ("hidden", n_layers // 2, p.subject_positions[-1]),
                ("hidden", n_layers - 1, p.last_position),
                ("mlp", n_layers - 2, p.last_position),
                ("attn", 2, p.last_position),
                ("attn", n_layers - 1, p.subject_positions[-1]),
            ]
        ]
        + [tracing.Restoration(((EMBED_HOOK, pos),)) for pos in p.subject_positions]
    )  # noise removed
    engine = tracing.run_with_restorations(model, p, noise, restorations, batch_size=1, backend="engine")
    hooks = tracing.run_with_restorations(model, p, noise, restorations, batch_size=64, backend="bridge")
    scale = float(hooks.abs().max())
    assert_close_up_to_rounding(engine, hooks, model)  # batches of 1 against 64, engine against hooks
    assert (hooks[:, :1] - hooks[:, 1:]).abs().max() > 1e-3 * scale  # the restorations matter
    last = p.last_position
    knockouts = [
        tracing.Knockout((), last, (1,)),
        tracing.Knockout(tuple(range(3, 9)), last, tuple(p.subject_positions)),
        tracing.Knockout((0, n_layers - 1), last, (last,)),
        tracing.Knockout((1, 2), last - 1, (0, 2)),
    ]
    assert_close_up_to_rounding(
        tracing.run_with_knockouts(model, p, knockouts, batch_size=2, backend="engine"),
        tracing.run_with_knockouts(model, p, knockouts, backend="bridge"),
        model,
        scale=model.bridge(p.tokens[None])[:, -1],  # scores are logit differences: the logits' scale
    )


def test_restoration_matches_a_by_hand_huggingface_computation(smollm2, eiffel_smollm2, unprocessed_hf_reference):
    """Corrupted and restored scores, recomputed with plain PyTorch hooks on the original HF model."""
    ref = unprocessed_hf_reference("smollm2")
    p = eiffel_smollm2
    layer, pos = 8, p.subject_positions[1]  # "iffel": restoring it there brings much of " Paris" back
    noise = tracing.sample_subject_noise(1, 3, smollm2.cfg.d_model, 3 * tracing.embedding_noise_std(smollm2), seed=11)
    scores = tracing.run_with_restorations(
        smollm2, p, noise, [tracing.Restoration(()), tracing.Restoration.of("hidden", [layer], [pos])]
    )[0]

    tokens = p.tokens[None]
    captured = {}

    def capture(module, args, output):
        captured["h"] = (output[0] if isinstance(output, tuple) else output).clone()

    handle = ref.model.layers[layer].register_forward_hook(capture)
    ref(tokens)
    handle.remove()
    embeds = ref.model.embed_tokens(tokens).clone()
    embeds[0, p.subject_span[0] : p.subject_span[1]] += noise[0]
    corrupted = ref(inputs_embeds=embeds).logits[0, -1].softmax(-1)[p.answer_id]

    def restore(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, pos] = captured["h"][0, pos]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = ref.model.layers[layer].register_forward_hook(restore)
    restored = ref(inputs_embeds=embeds).logits[0, -1].softmax(-1)[p.answer_id]
    handle.remove()
    tol = rounding_tolerance(ref(tokens).logits[0, -1], smollm2)  # probabilities: the logits' rounding bounds them
    assert float(scores[0]) == pytest.approx(float(corrupted), abs=tol)
    assert float(scores[1]) == pytest.approx(float(restored), abs=tol)
    assert abs(float(restored) - float(corrupted)) > 0.05  # the restoration matters, so the check has teeth


# ---------------------------------------------------------------------------------------------------------
# Attention knockout
# ---------------------------------------------------------------------------------------------------------


def _reference_knockout(ref, layer_modules, tokens, layers, query, keys):
    """Plain HF forward with the attention mask of ``layers`` edited so ``query`` cannot see ``keys``."""

    def edit(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        n = tokens.shape[1]
        if mask is None:
            mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min).triu(1)
        mask = mask.clone()
        if mask.dtype == torch.bool:
            mask[..., query, keys] = False
        else:
            mask[..., query, keys] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [layer_modules[l].register_forward_pre_hook(edit, with_kwargs=True) for l in layers]
    try:
        return ref(tokens).logits[0, -1]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "model_name, middle_layers", [("smollm2", range(18, 24)), ("gpt2_random_biased", range(4, 10))]
)
def test_knockout_matches_masked_huggingface_forward(request, unprocessed_hf_reference, model_name, middle_layers):
    """Score = logit(" Paris") - logit(" London"); the reference edits HF's own attention mask per layer."""
    model = request.getfixturevalue(model_name)
    ref = unprocessed_hf_reference(model_name)
    if hasattr(ref, "model"):  # Llama
        attn_modules = [layer.self_attn for layer in ref.model.layers]
    else:  # GPT-2
        attn_modules = [block.attn for block in ref.transformer.h]
    p = tracing.prepare_trace(model, TraceTask("eiffel", EIFFEL.prompt, EIFFEL.subject, " Paris", " London"))
    last, subject = p.last_position, tuple(p.subject_positions)
    others = tuple(q for q in range(last) if q not in subject)
    n_layers = model.cfg.n_layers
    knockouts = [
        tracing.Knockout((), last, subject, "no layers"),
        tracing.Knockout(tuple(middle_layers), last, subject, "last -> subject, middle layers"),
        tracing.Knockout(tuple(range(n_layers)), last, others, "last -> everything but subject and itself"),
        tracing.Knockout((0, n_layers - 1), last, (last,), "last -> last, first and last layer"),
    ]
    got = tracing.run_with_knockouts(model, p, knockouts, batch_size=3)

    def ref_score(logits):
        return float(logits[p.answer_id] - logits[p.contrast_id])

    clean_logits = ref(p.tokens[None]).logits[0, -1]
    ref_clean = ref_score(clean_logits)
    tol = 2 * rounding_tolerance(clean_logits, model)  # a difference of two logits
    assert float(got[0]) == pytest.approx(ref_clean, abs=tol)  # zero layers: nothing changes
    for row in (1, 2, 3):
        ko = knockouts[row]
        expected = ref_score(_reference_knockout(ref, attn_modules, p.tokens[None], ko.layers, ko.query, list(ko.keys)))
        assert float(got[row]) == pytest.approx(expected, abs=tol), ko.label
        assert abs(expected - ref_clean) > 10 * tol, ko.label  # the knockout matters well beyond the tolerance
    with pytest.raises(ValueError, match="blocks every key"):
        tracing.run_with_knockouts(model, p, [tracing.Knockout((0,), 2, (0, 1, 2))])


def test_attention_knockout_sweep_shapes_and_groups(smollm2, eiffel_smollm2):
    p = eiffel_smollm2
    groups = tracing.knockout_groups(p)
    assert groups == {"subject": [1, 2, 3], "non_subject": [0, 4, 5, 6, 7, 8], "last": [9]}
    result = tracing.attention_knockout(smollm2, p, window=10, groups=("subject", "last"))
    assert result.knocked_out.shape == (2, smollm2.cfg.n_layers) and result.window == 10
    assert np.isfinite(result.relative_change).all() and (result.relative_change >= -1).all()
    direct = tracing.run_with_knockouts(smollm2, p, [tracing.Knockout(tracing.layer_window(7, 10, 30), 9, (1, 2, 3))])
    tol = rounding_tolerance(smollm2.bridge(p.tokens[None])[:, -1], smollm2)  # one sweep batch against another
    assert float(direct[0]) == pytest.approx(float(result.knocked_out[0, 7]), abs=tol)


# ---------------------------------------------------------------------------------------------------------
# Data: the factual prompts and the fair-lending pairs
# ---------------------------------------------------------------------------------------------------------


def test_kept_facts_are_the_embedded_models_top1(smollm2):
    kept, report = facts.load_factual_prompts()
    candidates = facts.read_factual_candidates()
    assert report is None and 0 < len(kept) <= len(candidates)
    assert (candidates["kept_smollm2_135m"] == "True").sum() == len(kept)
    for _length, group in kept.groupby(kept["prompt"].map(lambda t: len(smollm2.token_ids(t)))):
        logits = smollm2.bridge(smollm2.to_tokens(list(group["prompt"])))[:, -1]
        top1 = logits.argmax(-1).tolist()
        answers = [smollm2.single_token_id(a) for a in group["answer"]]
        assert top1 == answers, list(group["fact_id"])
    for row in kept.itertuples():
        locate_subject(smollm2, row.prompt, row.subject, label=row.fact_id)  # subject found by offsets
    # filtering every candidate again (prompts batched by token length) keeps exactly the CSV's rows, in order
    refiltered, report = facts.filter_facts_for_model(smollm2, candidates)
    assert list(refiltered["fact_id"]) == list(kept["fact_id"]) and report.n_kept + len(report.dropped) == len(
        candidates
    )


def test_filter_for_another_model_reports_every_drop(gpt2_random, smollm2):
    candidates = facts.read_factual_candidates().head(6).copy()
    candidates.loc[candidates.index[0], "answer"] = " Reykjavikborgar"  # not one GPT-2 token
    candidates.loc[candidates.index[0], "answer_text"] = " Reykjavikborgar"
    kept, report = facts.filter_facts_for_model(gpt2_random, candidates)
    assert report.n_candidates == 6 and report.n_kept == len(kept) and len(report.dropped) + len(kept) == 6
    assert "not one token" in report.dropped.iloc[0]["reason"]
    # the random-weight model's top-1 is never the fact: every other row is dropped with its top-1 named
    assert all("top-1 is" in r for r in report.dropped["reason"].iloc[1:])
    kept_s, report_s = facts.filter_facts_for_model(smollm2, candidates.iloc[1:])
    expected = candidates.iloc[1:]["kept_smollm2_135m"] == "True"
    assert sorted(kept_s["fact_id"]) == sorted(candidates.iloc[1:][expected]["fact_id"])


def test_bad_fact_rows_are_named(tmp_path):
    frame = facts.read_factual_candidates().head(3).copy()
    frame.loc[frame.index[1], "subject"] = "Atlantis"
    path = tmp_path / "facts.csv"
    frame.to_csv(path, index=False)
    bad_id = frame.iloc[1]["fact_id"]
    with pytest.raises(ValueError, match=f"row {bad_id}: subject 'Atlantis'"):
        facts.read_factual_candidates(path)


def test_fair_lending_pairs_trace_with_protected_phrase_as_subject(smollm2):
    tasks_module = pytest.importorskip("mechfin_utils.tasks.fair_lending")
    pairs = tasks_module.load_fair_lending_pairs()[:2]
    hand_written = [
        {
            "pair_id": "hw-1",
            "clean_prompt": "The bank denied Ann's loan because she is Black. "
            "Is this a fair-lending violation? Answer:",
            "protected_phrase": "because she is Black",
        }
    ]
    tasks = facts.fair_lending_tasks(pairs) + facts.fair_lending_tasks(pd.DataFrame(hand_written))
    assert [t.label for t in tasks] == [f"pair {pairs[0].pair_id}", f"pair {pairs[1].pair_id}", "pair hw-1"]
    assert tasks[0].score_name == "logit(Yes) - logit(No)"
    assert facts.fair_lending_tasks(hand_written, score="prob")[0].contrast is None
    task = tasks[2]
    p = tracing.prepare_trace(smollm2, task)
    assert smollm2.tokenizer.decode(p.tokens[p.subject_span[0] : p.subject_span[1]].tolist()).strip() == task.subject
    clean_ld = smollm2.bridge(p.tokens[None])[0, -1]
    clean_ld = float(clean_ld[p.answer_id] - clean_ld[p.contrast_id])
    noise = tracing.sample_subject_noise(
        1, len(p.subject_positions), smollm2.cfg.d_model, 3 * tracing.embedding_noise_std(smollm2)
    )
    scores = tracing.run_with_restorations(
        smollm2,
        p,
        noise,
        [
            tracing.Restoration(()),
            tracing.Restoration.of("hidden", [0], range(p.n_tokens)),
            tracing.Restoration.of("hidden", [5], [0]),
        ],
    )[0]
    tol = 2 * rounding_tolerance(smollm2.bridge(p.tokens[None])[0, -1], smollm2)  # a logit difference
    assert float(scores[1]) == pytest.approx(clean_ld, abs=tol)
    assert float(scores[2]) == pytest.approx(float(scores[0]), abs=tol)
    with pytest.raises(ValueError, match="pair 0: needs a non-empty string field 'protected_phrase'"):
        facts.fair_lending_tasks([{"clean_prompt": "x"}])


def test_trace_dataset_averages_and_plots_carry_the_model_name(smollm2):
    tasks = [
        TraceTask("fr", "The capital of France is", "France", " Paris"),
        TraceTask("de", "The capital of Germany is", "Germany", " Berlin"),
    ]
    run = tracing.trace_dataset(smollm2, tasks, kinds=("mlp",), n_samples=1, knockout=False)
    traces, avg = run.traces["mlp"], run.averages["mlp"]
    assert [t.label for t in traces] == ["fr", "de"] and run.knockout_mean is None
    # one-token subjects: first = last subject token; "is" is the last token; no subsequent/further tokens
    assert avg.counts.tolist() == [2, 0, 2, 0, 0, 2]
    subject_rows = np.stack([t.indirect_effect[t.subject_span[0]] for t in traces])
    np.testing.assert_allclose(avg.mean[0], subject_rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(avg.mean[5], np.stack([t.indirect_effect[-1] for t in traces]).mean(0), rtol=1e-12)
    assert np.isnan(avg.mean[1]).all()
    figures = [
        trace_plots.plot_trace_heatmap(traces[0]),
        trace_plots.plot_category_average(avg),
        trace_plots.plot_knockout(np.zeros((3, 30)), smollm2.name, 6),
    ]
    assert all(fig.layout.title.text.startswith(smollm2.name) for fig in figures)


def test_category_average_as_dict_leaves_out_empty_categories():
    import json

    mean = np.full((len(tracing.POSITION_CATEGORIES), 2), np.nan)
    mean[0], mean[5] = [0.1, 0.2], [0.3, 0.4]
    counts = np.array([3, 0, 0, 0, 0, 3])
    average = tracing.CategoryAverage(
        kind="mlp", model_name="Toy", score_name="p(x)", mean=mean, counts=counts, mean_clean=0.9, mean_corrupted=0.1
    )
    out = average.as_dict()
    assert out["categories"] == [tracing.POSITION_CATEGORIES[0], tracing.POSITION_CATEGORIES[5]] and out["counts"] == [
        3,
        3,
    ]
    assert out["mean"] == [[0.1, 0.2], [0.3, 0.4]]
    json.dumps(out, allow_nan=False)  # JSON-ready: no NaN left
