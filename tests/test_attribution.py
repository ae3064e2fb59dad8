"""Tests for mechfin_utils.methods.patching.attribution (attribution patching and its comparison with exact patching).

The reference for every attribution is TransformerLens's own patching code, used independently of ours:
attribution patching is the first-order Taylor term of activation patching, so for a *fractional* patch
``a_corrupted + t * (a_clean - a_corrupted)`` the exact patched metric must change at rate ``attribution``
as ``t -> 0``. Feeding ``transformer_lens.patching.get_act_patch_*`` a cache holding those fractional
activations gives that rate by a central finite difference, cell by cell, for every component type, on
the embedded SmolLM2 (grouped-query attention) and on the GPT-2-shape random model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
import transformer_lens.patching as tl_patching
from transformer_lens.ActivationCache import ActivationCache

from mechfin_utils.core.metrics import NormalisedLogitDiff, logit_diff
from mechfin_utils.methods.patching.attribution import (
    TRANSFORMER_LENS_KEYS,
    WHOLE_LAYER_KEYS,
    attribution_patch,
    compare_attribution_with_exact,
    gather_cells,
)
from mechfin_utils.methods.patching.components import COMPONENTS
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

# Two pairs of equal token length for both tokenizers (GPT-2 with BOS: 14 tokens; SmolLM2 without: 14).
CLEAN_PROMPTS = (
    "Loan denied because the applicant is female. Illegal? Answer:",
    "Loan denied because the applicant is pregnant. Illegal? Answer:",
)
CORRUPTED_PROMPTS = (
    "Loan denied because the applicant is bankrupt. Illegal? Answer:",
    "Loan denied because the applicant is unemployed. Illegal? Answer:",
)

FD_STEP = 0.02  # the fraction t of the clean-minus-corrupted difference in the finite difference

# Checked cell by cell against TransformerLens: every hook at its finest resolution. The coarser results
# (``*_all_pos``, pattern by destination) are sums of these, checked in test_coarser_results_are_sums_...;
# their TransformerLens axis conventions are checked in test_result_shapes_and_hooks_follow_transformer_lens.
SLOPE_KEYS = (
    "resid_pre",
    "resid_mid",
    "attn_out",
    "mlp_out",
    "attn_head_out_by_pos",
    "attn_head_q_by_pos",
    "attn_head_k_by_pos",
    "attn_head_v_by_pos",
    "attn_head_pattern_dest_src_pos",
)
# The largest cell of each, plus one random non-negligible cell where query and key/value head axes could be
# confused (every check is two full forward passes through TransformerLens, so they are kept few).
EXTRA_CELL_KEYS = ("attn_head_out_by_pos", "attn_head_k_by_pos")


@dataclass
class Case:
    model: object
    clean: torch.Tensor
    corrupted: torch.Tensor
    answers: torch.Tensor  # [2]: " Yes", " No"

    @property
    def bridge(self):
        return self.model.bridge

    def raw_metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean logit difference, not normalised: finite differences then need no clean/corrupted gap."""
        return logit_diff(logits, self.answers).mean()


@pytest.fixture(scope="module")
def case(any_model) -> Case:
    answers = torch.tensor([any_model.single_token_id(" Yes"), any_model.single_token_id(" No")])
    return Case(any_model, any_model.to_tokens(CLEAN_PROMPTS), any_model.to_tokens(CORRUPTED_PROMPTS), answers)


@pytest.fixture(scope="module")
def attributions(case):
    """Every component's attribution with the raw logit-difference metric (one forward + backward)."""
    return attribution_patch(case.model, case.clean, case.corrupted, case.raw_metric)


@dataclass
class Runs:
    clean_cache: ActivationCache
    corrupted_cache: ActivationCache
    clean_logits: torch.Tensor
    corrupted_logits: torch.Tensor


@pytest.fixture(scope="module")
def runs(case) -> Runs:
    """The clean and corrupted runs: logits, and activations at every hook the components read."""
    names = sorted({c.hook_name(layer) for c in COMPONENTS.values() for layer in range(case.bridge.cfg.n_layers)})
    with torch.no_grad():
        clean_logits, clean = case.bridge.run_with_cache(case.clean, names_filter=names)
        corrupted_logits, corrupted = case.bridge.run_with_cache(case.corrupted, names_filter=names)
    return Runs(clean, corrupted, clean_logits, corrupted_logits)


def _transformer_lens_sweep(key: str):
    return getattr(tl_patching, f"get_act_patch_{key}")


def _cells_to_check(values: torch.Tensor, n_random: int, seed: int) -> list[tuple[int, ...]]:
    """The largest-|attribution| cell plus a few random cells among those that are not negligible."""
    flat = values.flatten().abs()
    chosen = [int(flat.argmax())]
    pool = (flat > 0.05 * flat.max()).nonzero().flatten().tolist()
    rng = np.random.default_rng(seed)
    for i in rng.permutation(pool):
        if len(chosen) > n_random:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return [tuple(int(x) for x in np.unravel_index(i, tuple(values.shape))) for i in chosen]


def _slope_of_transformer_lens_patching(case, runs, key, index_df, grad_enabled=False) -> torch.Tensor:
    """d/dt at t=0 of TransformerLens's exact patching with activations a_corr + t (a_clean - a_corr)."""
    clean, corrupted = runs.clean_cache, runs.corrupted_cache
    component = COMPONENTS[key]
    names = [component.hook_name(layer) for layer in range(case.bridge.cfg.n_layers)]
    values = {}
    for t in (FD_STEP, -FD_STEP):
        fractional = ActivationCache({n: corrupted[n] + t * (clean[n] - corrupted[n]) for n in names}, case.bridge)
        with torch.set_grad_enabled(grad_enabled):
            values[t] = _transformer_lens_sweep(key)(
                case.bridge, case.corrupted, fractional, case.raw_metric, index_df=index_df, index_axis_names=None
            )
    return (values[FD_STEP] - values[-FD_STEP]) / (2 * FD_STEP)


def _assert_close_to_slope(estimate: torch.Tensor, slope: torch.Tensor, scale: float, what: str) -> None:
    # Float32 finite differences carry ~1e-5 of rounding in the metric, i.e. ~1e-3 of the slope; a wrong
    # axis, sign, position or batch weighting is off by the size of the values themselves.
    tolerance = 2e-2 * scale
    error = (estimate - slope).abs().max().item()
    assert error <= tolerance, f"{what}: attribution {estimate.tolist()} vs slope {slope.tolist()} (error {error:.2e})"


# -----------------------------------------------------------------------------------------------------------
# Shapes, zero, and the first-order identity against TransformerLens
# -----------------------------------------------------------------------------------------------------------


def test_result_shapes_and_hooks_follow_transformer_lens(case, attributions):
    cfg = case.bridge.cfg
    n_pos = case.clean.shape[1]
    for key in TRANSFORMER_LENS_KEYS:
        sweep = _transformer_lens_sweep(key)
        activation = sweep.keywords["activation_name"]
        assert COMPONENTS[key].site == activation, key
        # TransformerLens sizes each index axis like this (generic_activation_patch):
        heads = cfg.n_heads
        if activation in ("k", "v") and cfg.n_key_value_heads is not None:
            heads = cfg.n_key_value_heads
        sizes = {
            "layer": cfg.n_layers,
            "pos": n_pos,
            "dest_pos": n_pos,
            "src_pos": n_pos,
            "head": heads,
            "head_index": heads,
        }
        expected = tuple(sizes[axis] for axis in sweep.keywords["index_axis_names"])
        assert tuple(attributions[key].shape) == expected, key
    for key in WHOLE_LAYER_KEYS:
        assert tuple(attributions[key].shape) == (cfg.n_layers,)
    assert set(attributions) == set(COMPONENTS)


def test_identical_clean_and_corrupted_runs_give_exactly_zero(case):
    same = attribution_patch(case.model, case.corrupted, case.corrupted, case.raw_metric)
    for key, values in same.items():
        assert torch.count_nonzero(values) == 0, key
    assert same.clean_metric == same.corrupted_metric


@pytest.mark.parametrize("key", SLOPE_KEYS)
def test_attribution_is_the_slope_of_transformer_lens_patching(case, runs, attributions, key):
    values = attributions[key]
    cells = _cells_to_check(values, n_random=1 if key in EXTRA_CELL_KEYS else 0, seed=0)
    index_df = pd.DataFrame(cells, columns=list(_transformer_lens_sweep(key).keywords["index_axis_names"]))
    slope = _slope_of_transformer_lens_patching(case, runs, key, index_df)
    _assert_close_to_slope(gather_cells(values, index_df), slope, values.abs().max().item(), key)


def test_resid_mid_semantics_match_transformer_lens_with_and_without_gradients(case, runs, attributions):
    """Bridge quirk: TL's resid_mid patch reaches the skip connection only under no_grad (see module doc)."""
    stream = attributions["resid_mid"]  # default semantics, checked against TL under no_grad above
    mlp_input = attribution_patch(
        case.model, case.clean, case.corrupted, case.raw_metric, ("resid_mid",), resid_mid_semantics="mlp_input"
    )["resid_mid"]
    cells = _cells_to_check(mlp_input, n_random=0, seed=0)
    index_df = pd.DataFrame(cells, columns=["layer", "pos"])
    slope = _slope_of_transformer_lens_patching(case, runs, "resid_mid", index_df, grad_enabled=True)
    _assert_close_to_slope(gather_cells(mlp_input, index_df), slope, mlp_input.abs().max().item(), "mlp_input")
    # The two meanings really differ (so neither check above could pass for the other one).
    assert (stream - mlp_input).abs().max() > 0.2 * stream.abs().max()


# -----------------------------------------------------------------------------------------------------------
# Identities of the linear estimate
# -----------------------------------------------------------------------------------------------------------


def test_head_outputs_add_up_to_the_attention_output(case, attributions):
    """attn_out = sum_h z_h W_O[h] + b_O, so the gradient at z_h is W_O[h] @ the gradient at attn_out."""
    heads = attributions["attn_head_out_by_pos"]
    scale = heads.abs().sum(dim=-1)  # a sum over heads: rounding of its terms' scale
    assert_close_up_to_rounding(heads.sum(dim=-1), attributions["attn_out"], case.model, scale=scale)


def test_coarser_results_are_sums_of_finer_ones(case, attributions):
    a = attributions
    pairs = [
        (a["attn_head_pattern_dest_src_pos"], -1, a["attn_head_pattern_by_pos"]),
        (a["attn_head_pattern_by_pos"], -1, a["attn_head_pattern_all_pos"]),
        (a["resid_pre"], 1, a["resid_pre_all_pos"]),
        (a["resid_mid"], 1, a["resid_mid_all_pos"]),
        (a["attn_out"], 1, a["attn_out_all_pos"]),
        (a["mlp_out"], 1, a["mlp_out_all_pos"]),
    ] + [(a[f"attn_head_{s}_by_pos"], 1, a[f"attn_head_{s}_all_pos"]) for s in ("out", "q", "k", "v")]
    for finer, dim, coarser in pairs:
        # a sum over positions: rounding of its terms' scale
        assert_close_up_to_rounding(finer.sum(dim=dim), coarser, case.model, scale=finer.abs().sum(dim=dim))


def test_metric_values_and_normalised_scale(case, runs, attributions):
    clean_diff = logit_diff(runs.clean_logits, case.answers).mean()
    corrupted_diff = logit_diff(runs.corrupted_logits, case.answers).mean()
    # logit differences from another forward (with gradients): twice the logits' rounding
    tol = 2 * rounding_tolerance((runs.clean_logits, runs.corrupted_logits), case.model)
    assert abs(float(attributions.clean_metric - clean_diff)) <= tol
    assert abs(float(attributions.corrupted_metric - corrupted_diff)) <= tol

    # The normalised metric is the raw one shifted and divided by the gap: attributions scale by 1/gap.
    metric = NormalisedLogitDiff(runs.clean_logits, runs.corrupted_logits, case.answers)
    keys = ("attn_head_out_by_pos", "mlp_out")
    normalised = attribution_patch(case.model, case.clean, case.corrupted, metric, keys, clean_cache=runs.clean_cache)
    for key in keys:
        expected = attributions[key] / (clean_diff - corrupted_diff)
        assert_close_up_to_rounding(normalised[key], expected, case.model, msg=key)
    assert normalised.clean_metric is None  # no clean forward when the cache is given
    assert abs(normalised.corrupted_metric.item()) <= tol / abs(float(clean_diff - corrupted_diff))


@pytest.mark.batch_split
def test_per_prompt_attributions_equal_single_prompt_runs(gpt2_random, torch_threads):
    model = gpt2_random
    answers = torch.tensor([model.single_token_id(" Yes"), model.single_token_id(" No")])
    clean, corrupted = model.to_tokens(CLEAN_PROMPTS), model.to_tokens(CORRUPTED_PROMPTS)
    keys = ("resid_pre", "attn_head_out_by_pos", "attn_head_pattern_by_pos", "attn_head_v_all_pos")

    def per_prompt(logits):
        return logit_diff(logits, answers)

    together = attribution_patch(model, clean, corrupted, per_prompt, keys, reduce="none")
    alone = attribution_patch(model, clean[1:], corrupted[1:], per_prompt, keys, reduce="mean")  # batch of 1
    assert together.corrupted_metric.shape == (2,)
    for key in keys:
        assert together[key].shape[-1] == 2
        expected = alone[key]
        assert_close_up_to_rounding(together[key][..., 1], expected, model, msg=key)  # batch of two against one
        assert (together[key][..., 0] - expected).abs().max() > 1e-2 * expected.abs().max()  # prompts differ


# -----------------------------------------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------------------------------------


def test_bad_arguments_are_rejected_with_the_argument_named(gpt2_random):
    model = gpt2_random
    answers = torch.tensor([model.single_token_id(" Yes"), model.single_token_id(" No")])
    clean, corrupted = model.to_tokens(CLEAN_PROMPTS), model.to_tokens(CORRUPTED_PROMPTS)

    def metric(logits):
        return logit_diff(logits, answers).mean()

    with pytest.raises(ValueError, match="clean_tokens has shape .* but corrupted_tokens"):
        attribution_patch(model, clean, corrupted[:, :-1], metric)
    with pytest.raises(ValueError, match="corrupted_tokens must be an integer tensor"):
        attribution_patch(model, clean, corrupted.float(), metric)
    with pytest.raises(ValueError, match="clean_tokens must be an integer tensor"):
        attribution_patch(model, clean[0], corrupted, metric)
    with pytest.raises(ValueError, match="unknown components \\['attn_head_z'\\]"):
        attribution_patch(model, clean, corrupted, metric, ("resid_pre", "attn_head_z"))
    with pytest.raises(TypeError, match="not the string"):
        attribution_patch(model, clean, corrupted, metric, "resid_pre")
    with pytest.raises(ValueError, match="more than once"):
        attribution_patch(model, clean, corrupted, metric, ("mlp_out", "mlp_out"))
    with pytest.raises(ValueError, match="reduce must be"):
        attribution_patch(model, clean, corrupted, metric, reduce="sum")
    with pytest.raises(ValueError, match="resid_mid_semantics"):
        attribution_patch(model, clean, corrupted, metric, resid_mid_semantics="ln2")
    with pytest.raises(KeyError, match="clean_cache lacks"):
        attribution_patch(model, clean, corrupted, metric, ("mlp_out",), clean_cache={})
    with pytest.raises(TypeError, match="LoadedModel or a TransformerBridge"):
        attribution_patch(object(), clean, corrupted, metric)
    with pytest.raises(ValueError, match="reduce='none' needs one value per prompt"):
        attribution_patch(model, clean, corrupted, metric, ("mlp_out",), reduce="none")
    with pytest.raises(ValueError, match="reduce='scalar' needs a scalar"):
        attribution_patch(model, clean, corrupted, lambda logits: logit_diff(logits, answers), ("mlp_out",))
    with pytest.raises(ValueError, match="does not depend differentiably"):
        attribution_patch(model, clean, corrupted, lambda logits: metric(logits).detach(), ("mlp_out",))

    model.bridge.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            attribution_patch(model, clean, corrupted, metric)
    finally:
        model.bridge.eval()
    model.bridge.requires_grad_(False)
    try:
        with pytest.raises(RuntimeError, match="not tracking gradients"):
            attribution_patch(model, clean, corrupted, metric, ("mlp_out",))
    finally:
        model.bridge.requires_grad_(True)


# -----------------------------------------------------------------------------------------------------------
# compare_attribution_with_exact and gather_cells, on synthetic arrays with known answers
# -----------------------------------------------------------------------------------------------------------


def _with_exact_correlation(x: np.ndarray, rho: float, seed: int) -> np.ndarray:
    """y whose sample Pearson correlation with x is exactly rho (noise orthogonalised against x)."""
    xc = x - x.mean()
    noise = np.random.default_rng(seed).normal(size=x.shape)
    noise -= noise.mean()
    noise -= (noise @ xc) / (xc @ xc) * xc
    noise *= np.linalg.norm(xc) / np.linalg.norm(noise)
    return rho * xc + np.sqrt(1 - rho**2) * noise


def _ranks(v: np.ndarray) -> np.ndarray:
    ranks = np.empty(v.size)
    ranks[np.argsort(v)] = np.arange(v.size)
    return ranks


def test_compare_reports_known_correlations():
    x = np.random.default_rng(0).normal(size=(6, 7))
    exact = {
        "linear": torch.tensor(x),
        "rho": torch.tensor(x),
        "monotone": torch.tensor(x),
        "anti": x,  # numpy works too
    }
    attribution = {
        "linear": torch.tensor(3.0 * x - 0.5),
        "rho": torch.tensor(_with_exact_correlation(x.ravel(), 0.6, seed=1).reshape(x.shape)),
        "monotone": torch.tensor(np.exp(2 * x)),
        "anti": -x,
    }
    table = compare_attribution_with_exact(attribution, exact, top_k=5).set_index("component")
    assert list(table.index) == ["linear", "rho", "monotone", "anti"]
    assert (table["n_cells"] == 42).all()
    assert table.loc["linear", "pearson"] == pytest.approx(1.0, abs=1e-12)
    assert table.loc["linear", "spearman"] == pytest.approx(1.0, abs=1e-12)
    assert table.loc["rho", "pearson"] == pytest.approx(0.6, abs=1e-12)
    rho_values = attribution["rho"].numpy().ravel()
    assert table.loc["rho", "spearman"] == pytest.approx(
        np.corrcoef(_ranks(rho_values), _ranks(x.ravel()))[0, 1], abs=1e-12
    )
    assert table.loc["monotone", "spearman"] == pytest.approx(1.0, abs=1e-12)
    assert table.loc["monotone", "pearson"] == pytest.approx(
        np.corrcoef(np.exp(2 * x).ravel(), x.ravel())[0, 1], abs=1e-12
    )
    assert table.loc["monotone", "pearson"] < 0.95
    assert table.loc["anti", "pearson"] == pytest.approx(-1.0, abs=1e-12)
    assert table.loc["anti", "sign_agreement"] == 0.0
    assert table.loc["anti", "top_k_overlap"] == 1.0  # same magnitudes, so the same cells lead
    assert table.loc["linear", "max_abs_error"] == pytest.approx(np.abs(2 * x - 0.5).max())
    assert table.loc["linear", "mean_abs_error"] == pytest.approx(np.abs(2 * x - 0.5).mean())
    assert table.loc["linear", "max_abs_exact"] == pytest.approx(np.abs(x).max())


def test_compare_top_k_overlap_and_signs_by_hand():
    exact = {"c": torch.tensor([10.0, -9.0, 8.0, 1.0, 0.5, -0.2])}
    attribution = {"c": torch.tensor([10.0, 0.1, 8.0, -9.0, -0.5, -0.3])}
    row = compare_attribution_with_exact(attribution, exact, top_k=3).iloc[0]
    # exact's top 3 by |value|: cells 0, 1, 2; attribution's: 0, 3, 2 -> two shared.
    assert row["top_k"] == 3
    assert row["top_k_overlap"] == pytest.approx(2 / 3)
    # signs agree at cells 0, 2, 5 (not 1, 3, 4); over exact's top 3 (cells 0, 1, 2): at 0 and 2.
    assert row["sign_agreement"] == pytest.approx(3 / 6)
    assert row["sign_agreement_top_k"] == pytest.approx(2 / 3)
    assert row["max_abs_error"] == pytest.approx(10.0)
    # top_k larger than the number of cells is capped
    assert compare_attribution_with_exact(attribution, exact, top_k=50).iloc[0]["top_k"] == 6


def test_compare_rejects_what_it_cannot_compare():
    a = {"x": torch.zeros(3, 4), "y": torch.ones(2)}
    with pytest.raises(ValueError, match="'x': attribution shape \\(3, 4\\) != exact shape \\(4, 3\\)"):
        compare_attribution_with_exact(a, {"x": torch.zeros(4, 3)})
    with pytest.raises(KeyError, match="'z' is missing from attribution"):
        compare_attribution_with_exact(a, {"z": torch.zeros(2)})
    with pytest.raises(KeyError, match="'y' is missing from exact"):
        compare_attribution_with_exact(a, {"x": torch.zeros(3, 4)}, components=["x", "y"])
    with pytest.raises(ValueError, match=r"exact\['y'\] has a non-finite value \(nan\) at index \(1,\)"):
        compare_attribution_with_exact(a, {"y": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="top_k"):
        compare_attribution_with_exact(a, {"y": torch.ones(2)}, top_k=0)
    constant = compare_attribution_with_exact({"y": torch.ones(2)}, {"y": torch.tensor([1.0, 2.0])}).iloc[0]
    assert np.isnan(constant["pearson"]) and np.isnan(constant["spearman"])


def test_gather_cells_picks_transformer_lens_index_rows():
    values = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    index_df = pd.DataFrame({"layer": [1, 0, 1], "head_index": [2, 0, 1], "dest_pos": [3, 1, 0]})
    assert gather_cells(values, index_df).tolist() == [values[1, 2, 3], values[0, 0, 1], values[1, 1, 0]]
    with pytest.raises(IndexError, match="row 1: head_index=3 is outside axis 1 of size 3"):
        gather_cells(values, pd.DataFrame({"layer": [0, 0], "head_index": [0, 3], "dest_pos": [0, 0]}))
    with pytest.raises(ValueError, match="2 columns"):
        gather_cells(values, index_df[["layer", "dest_pos"]])


def test_one_component_registry_names_transformer_lens_hooks():
    """Exact and attribution patching share one registry; its hooks are TransformerLens's own names and each
    reduction keeps exactly the result's axes (plus the batch)."""
    from transformer_lens.utilities import get_act_name

    from mechfin_utils.methods.patching import activation, attribution

    assert attribution.COMPONENTS is activation.COMPONENTS is COMPONENTS
    for key, component in COMPONENTS.items():
        assert component.hook_name(7) == get_act_name(component.site, 7), key
        kept = component.reduction.split("->")[1].split()
        assert kept == ["batch", *[a for a in component.axes if a != "layer"]] or (
            component.site == "pattern"
            and kept == ["batch", "head", *[a for a in component.axes if a not in ("layer", "head")]]
        ), key
