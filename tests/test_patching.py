"""mechfin_utils.methods.patching.activation / functional against TransformerLens's own patching on the same bridge.

Every sweep is compared with ``transformer_lens.patching.get_act_patch_*`` run on ``LoadedModel.bridge`` with
the same prompts and the same metric, on the embedded model (SmolLM2: grouped-query attention, rotary,
RMSNorm) and on a GPT-2-shape model (random weights through the real GPT-2 loading path). TransformerLens
costs one full forward pass per cell, so it runs on a few sampled cells per sweep (its ``index_df``), chosen
on both sides of each prompt's first differing token and at the first and last layer.
"""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tl_patching

from mechfin_utils.core import engine
from mechfin_utils.core.functional import FunctionalTransformer, UnsupportedArchitecture, functional_model
from mechfin_utils.core.metrics import NormalisedLogitDiff, logit_diff, normalised_patching_metric
from mechfin_utils.methods import patching
from mechfin_utils.methods.patching import activation
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

# Prompts with a large clean - corrupted gap (SmolLM2: 15 logits), so that float32 rounding, which the normalised
# metric divides by that gap, stays far below the patching effects being compared. (The fair-lending prompts give the
# base model a gap of 0.3 logits: rounding would be a hundredth of the scale and small patches hard to tell from it.)
TEMPLATE = "The capital of {} is"
CLEAN_WORDS = ("France", "Japan")
CORRUPTED_WORDS = ("Italy", "Germany")
ANSWERS = ((" Paris", " Rome"), (" Tokyo", " Berlin"))  # per prompt: the clean answer, then the corrupted one

# Sweeps with a TransformerLens twin of the same name (resid_mid: compared under torch.no_grad(), see below).
TL_KEYS = [key for key, spec in patching.COMPONENTS.items() if not (key.endswith("_all_pos") and not spec.per_head)]


class Case:
    """One model with the test prompts, its metric, TransformerLens's clean cache, and cell sampling."""

    def __init__(self, model):
        self.model = model
        self.bridge = model.bridge
        self.clean = model.to_tokens([TEMPLATE.format(w) for w in CLEAN_WORDS])
        self.corrupted = model.to_tokens([TEMPLATE.format(w) for w in CORRUPTED_WORDS])
        assert self.clean.shape == self.corrupted.shape, "test prompts must tokenise to one length"
        self.answers = torch.tensor([[model.single_token_id(word) for word in pair] for pair in ANSWERS])
        with torch.no_grad():
            clean_logits, self.clean_cache = self.bridge.run_with_cache(self.clean)
            self.corrupted_logits = self.bridge(self.corrupted)
        self.clean_logits = clean_logits
        self.metric = NormalisedLogitDiff(clean_logits, self.corrupted_logits, self.answers)
        # Two float32 runs of the same model that sum in another order (ours and TransformerLens's, another batch
        # split, another CPU) agree to rounding of the logits' scale; a logit difference doubles that, and the
        # normalised metric divides it by the clean - corrupted gap (small for the base model on these prompts).
        self.logit_diff_tolerance = 2 * rounding_tolerance((clean_logits, self.corrupted_logits), model)
        self.tolerance = self.logit_diff_tolerance / abs(float(self.metric.clean - self.metric.corrupted))
        self.divergence = int(patching.divergence_positions(self.clean, self.corrupted).min())
        cfg = self.bridge.cfg
        self.n_layers, self.n_pos = cfg.n_layers, self.clean.shape[1]
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads

    def shape(self, key: str) -> tuple[int, ...]:
        return patching.result_shape(patching.COMPONENTS[key], self.n_layers, self.n_pos, self.n_heads, self.n_kv_heads)

    def sample(self, key: str, n: int = 4, seed: int = 0) -> pd.DataFrame:
        """``n`` distinct cells: ``n - 1`` after the prompts' first difference, the last one before it (a no-op).

        The cells after the difference are the ``n - 1`` largest effects (by our sweep, which is cheap) among
        ``4 (n - 1)`` drawn at random (16 per cell for single attention-pattern entries), the first and last layer among the draws: a comparison with TransformerLens
        on cells whose effect is below float32 rounding would prove nothing."""
        per_cell = 16 if patching.COMPONENTS[key].scope == "dest_src" else 4  # one pattern entry rarely matters
        drawn = self._draw(key, per_cell * (n - 1) + 1, seed)
        after, before = drawn.iloc[:-1], drawn.iloc[-1:]
        effects = self.ours(key, index_df=after).abs()
        strongest = after.iloc[sorted(effects.argsort(descending=True)[: n - 1].tolist())]
        return pd.concat([strongest, before], ignore_index=True)

    def _draw(self, key: str, n: int, seed: int) -> pd.DataFrame:
        """``n`` distinct random cells, the last before the divergence, the first two at the first/last layer."""
        spec = patching.COMPONENTS[key]
        shape = self.shape(key)
        rng = random.Random(f"{key}-{seed}")
        cells: list[tuple[int, ...]] = []
        while len(cells) < n:
            cell = [rng.randrange(size) for size in shape]
            if len(cells) < 2:
                cell[0] = (0, self.n_layers - 1)[len(cells)]
            named = dict(zip(spec.axes, cell))
            pos_axis = "pos" if "pos" in named else ("dest_pos" if "dest_pos" in named else None)
            if pos_axis is not None:
                lo, hi = (0, self.divergence) if len(cells) == n - 1 else (self.divergence, self.n_pos)
                cell[spec.axes.index(pos_axis)] = rng.randrange(lo, hi)
                if "src_pos" in named:
                    cell[spec.axes.index("src_pos")] = rng.randrange(0, cell[spec.axes.index(pos_axis)] + 1)
            if tuple(cell) not in cells:
                cells.append(tuple(cell))
        return pd.DataFrame(cells, columns=list(spec.axes))

    def transformer_lens(self, key: str, index_df: pd.DataFrame, metric=None, **kwargs):
        tl_df = (
            index_df.rename(columns={"head": "head_index"}) if patching.COMPONENTS[key].site == "pattern" else index_df
        )
        sweep = getattr(tl_patching, f"get_act_patch_{key}")
        with torch.no_grad():
            return sweep(
                self.bridge,
                self.corrupted,
                self.clean_cache,
                metric or self.metric,
                index_df=tl_df,
                index_axis_names=None,
                **kwargs,
            )

    def ours(self, key: str, **kwargs):
        kwargs.setdefault("progress", False)
        return patching.activation_patch(
            self.model, self.clean, self.corrupted, kwargs.pop("metric", self.metric), key, **kwargs
        )


_CASES: dict[int, Case] = {}


def _case_of(model) -> Case:
    if id(model) not in _CASES:
        _CASES[id(model)] = Case(model)
    return _CASES[id(model)]


@pytest.fixture(scope="session", params=["smollm2", "gpt2_random_biased"])
def case(request) -> Case:
    """The embedded model, and a GPT-2-shape model with random weights *and* random biases and LayerNorm
    parameters (loaded through the GPT-2 folder path): freshly initialised GPT-2 has zero biases and
    near-uniform attention, on which bias handling goes untested and query patches move nothing measurable."""
    return _case_of(request.getfixturevalue(request.param))


@pytest.fixture(scope="session")
def gpt2_case(gpt2_random_biased) -> Case:
    return _case_of(gpt2_random_biased)


# -----------------------------------------------------------------------------------------------------------
# The functional forward pass
# -----------------------------------------------------------------------------------------------------------


def test_functional_forward_matches_bridge(case):
    fm = functional_model(case.model)
    with torch.no_grad():
        ours = fm.logits(case.clean)
        theirs = case.bridge(case.clean)
    assert_close_up_to_rounding(ours, theirs, case.model, msg="logits")
    record = fm.record(case.clean)
    for ours_name, hook in [
        ("resid_pre", "hook_resid_pre"),
        ("resid_mid", "hook_resid_mid"),
        ("attn_out", "hook_attn_out"),
        ("mlp_out", "hook_mlp_out"),
        ("z", "attn.hook_z"),
        ("v", "attn.hook_v"),
        ("pattern", "attn.hook_pattern"),
    ]:
        for layer in (0, case.n_layers - 1):
            got = getattr(record, ours_name)[layer]
            want = case.clean_cache[f"blocks.{layer}.{hook}"]
            assert got.shape == want.shape, ours_name
            # late residual values reach ~8,600 (a few massive dimensions): rounding is relative to that scale
            assert_close_up_to_rounding(got, want, case.model, msg=f"{ours_name}, layer {layer}")


def test_engine_without_an_intervention_reproduces_the_corrupted_run(case):
    """Continuing the corrupted run from its own cached state, at any layer and first position, in one
    packed pass with several segments, must give back its final state: "patching nothing" gives 0."""
    fm = functional_model(case.model)
    record = fm.record(case.corrupted)
    batch = case.corrupted.shape[0]
    for start in (0, case.n_layers // 2, case.n_layers - 1, case.n_layers):
        segments = [
            engine.Segment(start, p, record.resid_pre[start][:, p:], torch.arange(batch))
            for p in (0, 3, case.n_pos - 1)
        ]
        for out in engine.run(fm, segments, record):
            assert_close_up_to_rounding(out[:, -1], record.final_normed, case.model)


def test_unsupported_architecture_is_refused():
    with pytest.raises(UnsupportedArchitecture, match="Linear"):
        FunctionalTransformer(torch.nn.Linear(2, 2))


# -----------------------------------------------------------------------------------------------------------
# Equality with TransformerLens, every sweep, both models
# -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", TL_KEYS)
def test_matches_transformer_lens(case, key):
    cells = case.sample(key)
    ours = case.ours(key, index_df=cells)
    theirs = case.transformer_lens(key, cells)
    assert ours.shape == theirs.shape == (len(cells),)
    assert (ours - theirs).abs().max().item() <= case.tolerance, (key, ours, theirs)
    assert theirs.abs().max().item() > 10 * case.tolerance, f"{key}: the sampled cells are all ~0: a vacuous comparison"
    if patching.COMPONENTS[key].scope != "all":
        assert (
            ours[-1].abs().item() <= case.tolerance
        )  # the sampled no-op cell (before the prompts' first difference): 0 up to the functional-vs-bridge readout rounding


def test_resid_mid_is_the_residual_stream(case):
    """resid_mid at (L, p) patches the stream between attention and MLP: = resid_pre at (L+1, p) (checked
    with TransformerLens); at the last layer and position it hands the clean final state to the unembedding (1)."""
    cells = pd.DataFrame(
        [(0, case.divergence), (case.n_layers - 2, case.n_pos - 1), (case.n_layers // 2, case.divergence + 1)],
        columns=["layer", "pos"],
    )
    ours = case.ours("resid_mid", index_df=cells)
    theirs = case.transformer_lens("resid_pre", cells.assign(layer=cells.layer + 1))
    assert (ours - theirs).abs().max().item() <= case.tolerance
    last = case.ours(
        "resid_mid",
        index_df=pd.DataFrame(
            [(case.n_layers - 1, case.n_pos - 1), (case.n_layers - 1, case.n_pos - 2)], columns=["layer", "pos"]
        ),
    )
    assert last.tolist() == pytest.approx([1.0, 0.0], abs=case.tolerance)


def test_transformer_lens_bridge_resid_mid_depends_on_the_grad_mode(gpt2_case):
    """Why resid_mid is documented with care: on the 4.3 bridge hook_resid_mid is ln2.hook_in. Under
    torch.no_grad() TransformerLens's in-place patch reaches the skip connection too (= our residual-stream
    sweep); with gradients enabled it reaches only the MLP input (= the mlp_out sweep). If this starts failing,
    TransformerLens changed: re-check the resid_mid documentation in mechfin_utils.methods.patching.activation and .attribution."""
    case = gpt2_case
    cells = pd.DataFrame([(2, case.divergence), (7, case.n_pos - 1)], columns=["layer", "pos"])
    ours_mid = case.ours("resid_mid", index_df=cells)
    no_grad_mid = case.transformer_lens("resid_mid", cells)  # case.transformer_lens runs under torch.no_grad()
    with torch.enable_grad():
        tl_df = dict(index_df=cells, index_axis_names=None)
        grad_mid = tl_patching.get_act_patch_resid_mid(
            case.bridge, case.corrupted, case.clean_cache, case.metric, **tl_df
        )
        grad_mlp = tl_patching.get_act_patch_mlp_out(
            case.bridge, case.corrupted, case.clean_cache, case.metric, **tl_df
        )
    assert (no_grad_mid - ours_mid).abs().max().item() <= case.tolerance
    assert (grad_mid - grad_mlp).abs().max().item() <= case.tolerance
    assert (grad_mid - ours_mid).abs().max().item() > 1e-3


# -----------------------------------------------------------------------------------------------------------
# Full sweeps: shapes, endpoints, per-prompt values
# -----------------------------------------------------------------------------------------------------------


def test_full_sweep_shapes_and_last_position_against_transformer_lens(case):
    """Prompts that differ only in their last token make every full sweep cheap (every earlier position is
    a no-op), so all of them run in full here: shapes as TransformerLens's, values at the last position
    checked against it, all else 0 (to float32 rounding). On a grouped-query model (SmolLM2) the per-head sweeps run
    for keys and values only, the sites whose heads are grouped: queries, head outputs and patterns index query heads
    exactly as on GPT-2's case, which sweeps them all (on 30 layers they took 10 of this test's 25 s)."""
    grouped_query = case.n_kv_heads != case.n_heads
    clean = case.corrupted.clone()
    clean[:, -1] = (clean[:, -1] + 1) % case.bridge.cfg.d_vocab
    with torch.no_grad():
        clean_logits, clean_cache = case.bridge.run_with_cache(clean)
    metric = NormalisedLogitDiff(clean_logits, case.corrupted_logits, case.answers)
    expected_kv = case.n_kv_heads
    for key, spec in patching.COMPONENTS.items():
        if spec.scope == "dest_src":
            continue  # n_pos x n_pos cells per head at the last destination alone: too slow for a unit test
        if grouped_query and spec.per_head and spec.site not in ("k", "v"):
            continue
        full = patching.activation_patch(case.model, clean, case.corrupted, metric, key, progress=False)
        assert full.shape == case.shape(key), key
        if "head" in spec.axes and spec.site in ("k", "v"):
            assert full.shape[spec.axes.index("head")] == expected_kv
        pos_axis = next((spec.axes.index(a) for a in ("pos", "dest_pos") if a in spec.axes), None)
        if pos_axis is not None:
            earlier = full.narrow(pos_axis, 0, case.n_pos - 1)
            assert earlier.abs().max().item() <= case.tolerance, (
                key
            )  # 0 up to float32 rounding of the functional readout vs the bridge
    # TransformerLens at the last position, a few layers, for the by-position block sweeps.
    last = pd.DataFrame([(0, case.n_pos - 1), (case.n_layers - 1, case.n_pos - 1)], columns=["layer", "pos"])
    for key in ("resid_pre", "attn_out", "mlp_out"):
        ours = patching.activation_patch(case.model, clean, case.corrupted, metric, key, index_df=last, progress=False)
        with torch.no_grad():
            theirs = getattr(tl_patching, f"get_act_patch_{key}")(
                case.bridge, case.corrupted, clean_cache, metric, index_df=last, index_axis_names=None
            )
        assert (ours - theirs).abs().max().item() <= case.tolerance, key


def test_patching_the_whole_residual_stream_restores_the_clean_run(case):
    for key in ("resid_pre_all_pos", "resid_mid_all_pos"):
        values = case.ours(key)
        assert values.shape == (case.n_layers,)
        assert values.tolist() == pytest.approx([1.0] * case.n_layers, abs=case.tolerance), key


def test_identical_prompts_give_exactly_the_corrupted_metric(gpt2_case):
    """Patching clean activations that equal the corrupted ones changes nothing: every sweep is 0 on a metric
    normalised against the real clean/corrupted values."""
    case = gpt2_case
    clean_value = logit_diff(case.clean_logits, case.answers).mean()
    corrupted_value = logit_diff(case.corrupted_logits, case.answers).mean()

    def metric(logits):
        return normalised_patching_metric(logit_diff(logits, case.answers).mean(), clean_value, corrupted_value)

    for key in ("resid_pre", "attn_head_out_by_pos", "attn_head_v_all_pos", "attn_head_pattern_by_pos"):
        values = patching.activation_patch(case.model, case.corrupted, case.corrupted, metric, key, progress=False)
        assert values.abs().max().item() <= case.tolerance, (
            key
        )  # 0 up to float32 rounding of the functional readout vs the bridge


def test_per_prompt_logit_differences(case):
    cells = case.sample("attn_head_out_by_pos", n=3, seed=1)
    sweep = case.ours("attn_head_out_by_pos", index_df=cells, return_per_prompt=True)
    batch = case.clean.shape[0]
    assert sweep.logit_diff.shape == (len(cells), batch)
    # The TransformerLens-equal value is the normalised mean of the per-prompt values ...
    assert (sweep.normalised() - sweep.values).abs().max().item() <= case.tolerance
    # ... the per-prompt values are TransformerLens's with a per-prompt metric (reduce="none") ...
    theirs = case.transformer_lens(
        "attn_head_out_by_pos", cells, metric=lambda logits: logit_diff(logits, case.answers), reduce="none"
    )
    assert (sweep.logit_diff - theirs.values).abs().max().item() <= case.logit_diff_tolerance
    # ... and the clean/corrupted anchors are the bridge's.
    clean_anchor = logit_diff(case.clean_logits, case.answers)
    assert (sweep.clean_logit_diff - clean_anchor).abs().max().item() <= case.logit_diff_tolerance
    corrupted_anchor = logit_diff(case.corrupted_logits, case.answers)
    assert (sweep.corrupted_logit_diff - corrupted_anchor).abs().max().item() <= case.logit_diff_tolerance
    # A resample (prompt 1 twice) renormalises with that resample's own anchors.
    resample = [1, 1]
    want = (sweep.logit_diff[:, 1] - sweep.corrupted_logit_diff[1]) / (
        sweep.clean_logit_diff[1] - sweep.corrupted_logit_diff[1]
    )
    gap = abs(float(sweep.clean_logit_diff[1] - sweep.corrupted_logit_diff[1]))
    assert (sweep.normalised(resample) - want).abs().max().item() <= case.logit_diff_tolerance / gap


def test_any_metric_callable_gets_the_final_logits(gpt2_case):
    """A metric that needs the whole vocabulary (log-probability of the clean answer) goes through the full
    unembedding at the final position; reduce='none' keeps one value per prompt, as in TransformerLens."""
    case = gpt2_case

    def log_prob_clean_answer(logits):
        return logits[:, -1].log_softmax(-1)[torch.arange(logits.shape[0]), case.answers[:, 0]]

    cells = case.sample("attn_head_q_by_pos", n=3, seed=2)
    ours = case.ours("attn_head_q_by_pos", index_df=cells, metric=log_prob_clean_answer, reduce="none")
    theirs = case.transformer_lens("attn_head_q_by_pos", cells, metric=log_prob_clean_answer, reduce="none").values
    assert ours.shape == theirs.shape == (len(cells), case.clean.shape[0])
    assert (ours - theirs).abs().max().item() <= case.logit_diff_tolerance  # a log-probability: logit rounding
    mean = case.ours("attn_head_q_by_pos", index_df=cells, metric=lambda lg: log_prob_clean_answer(lg).mean())
    assert (mean - theirs.mean(-1)).abs().max().item() <= case.logit_diff_tolerance


@pytest.mark.batch_split
def test_batch_size_only_changes_the_schedule(gpt2_case, torch_threads):
    case = gpt2_case
    cells = pd.concat([case.sample("attn_head_k_by_pos", n=4, seed=s) for s in range(2)]).drop_duplicates()
    big = case.ours("attn_head_k_by_pos", index_df=cells)
    small = case.ours("attn_head_k_by_pos", index_df=cells, batch_size=1)
    assert (big - small).abs().max().item() <= case.tolerance


# -----------------------------------------------------------------------------------------------------------
# The bridge fallback
# -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bridge_engine_references(gpt2_case) -> dict[str, tuple[pd.DataFrame, torch.Tensor]]:
    """Per sweep the bridge engine is checked on: three sampled cells and TransformerLens's values there, computed once
    (with the worker's own thread count), so that each thread count of the test runs only the engine under test."""
    case = gpt2_case
    references = {}
    for key in ("resid_pre", "attn_head_v_by_pos", "attn_head_pattern_dest_src_pos", "attn_head_out_all_pos"):
        cells = case.sample(key, n=3, seed=3)
        references[key] = (cells, case.transformer_lens(key, cells))
    return references


@pytest.mark.batch_split
def test_bridge_engine_equals_transformer_lens(gpt2_case, bridge_engine_references, torch_threads):
    case = gpt2_case
    for key, (cells, theirs) in bridge_engine_references.items():
        ours = case.ours(key, index_df=cells, engine="bridge", batch_size=4)
        # the same hooks, but four patched runs in one batch: rounding of another batch shape
        assert (ours - theirs).abs().max().item() <= case.tolerance, key


def test_unsupported_architecture_falls_back_to_the_bridge_with_a_warning(gpt2_case, monkeypatch):
    case = gpt2_case
    cells = case.sample("mlp_out", n=2, seed=4)
    expected = case.ours("mlp_out", index_df=cells)

    def refuse(model):
        raise UnsupportedArchitecture("pretend architecture")

    monkeypatch.setattr(activation, "functional_model", refuse)  # the name activation_patch looks up
    with pytest.warns(UserWarning, match="bridge path"):
        fallback = case.ours("mlp_out", index_df=cells)
    assert (fallback - expected).abs().max().item() <= case.tolerance
    with pytest.raises(UnsupportedArchitecture):
        case.ours("mlp_out", index_df=cells, engine="functional")
    with pytest.raises(ValueError, match="resid_mid"):
        case.ours("resid_mid", index_df=cells, engine="bridge")


# -----------------------------------------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_argument_named(gpt2_case):
    case = gpt2_case
    with pytest.raises(ValueError, match="clean_tokens has shape .* corrupted_tokens"):
        patching.activation_patch(case.model, case.clean[:, :-1], case.corrupted, case.metric, "resid_pre")
    with pytest.raises(TypeError, match="clean_tokens"):
        patching.activation_patch(case.model, ["a prompt"], case.corrupted, case.metric, "resid_pre")
    with pytest.raises(ValueError, match="component"):
        case.ours("resid_post")
    with pytest.raises(ValueError, match="batch_size"):
        case.ours("resid_pre", batch_size=0)
    with pytest.raises(ValueError, match="index_df columns"):
        case.ours("attn_head_out_by_pos", index_df=pd.DataFrame([(0, 1)], columns=["layer", "pos"]))
    with pytest.raises(IndexError, match="index_df row 0: head=99"):
        case.ours("attn_head_out_by_pos", index_df=pd.DataFrame([(0, 1, 99)], columns=["layer", "pos", "head"]))
    with pytest.raises(ValueError, match="reduce must be 'scalar'"):
        case.ours("resid_pre", reduce="none")
    with pytest.raises(ValueError, match="return_per_prompt"):
        case.ours("resid_pre", metric=lambda logits: logits[:, -1, 0].mean(), return_per_prompt=True)
    with pytest.raises(ValueError, match=r"\[batch=2\]"):
        case.ours(
            "resid_pre",
            metric=lambda logits: logits[:, -1, 0].mean(),
            reduce="none",
            index_df=pd.DataFrame([(0, case.n_pos - 1)], columns=["layer", "pos"]),
        )
    # A metric built from other prompts' logits would normalise every value wrongly.
    swapped = NormalisedLogitDiff(
        case.corrupted_logits
        + 1.0 * torch.nn.functional.one_hot(case.answers[:, 0], case.clean_logits.shape[-1])[:, None],
        case.corrupted_logits,
        case.answers,
    )
    with pytest.raises(ValueError, match="metric was built from clean logits"):
        case.ours("resid_pre", metric=swapped, index_df=pd.DataFrame([(0, case.n_pos - 1)], columns=["layer", "pos"]))
