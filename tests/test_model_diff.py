"""Base vs fine-tuned comparisons: weight change by hand, cross-model patching against a by-hand HF computation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mechfin_utils.methods.patching import cross_model as model_diff
from mechfin_utils.screener import training as screener
from mechfin_utils.tooling.testing import rounding_tolerance


def test_module_of_reads_llama_and_gpt2_names():
    assert model_diff.module_of("model.layers.3.self_attn.q_proj.weight") == (3, "attn_q")
    assert model_diff.module_of("model.layers.12.mlp.down_proj.weight") == (12, "mlp_out")
    assert model_diff.module_of("model.layers.0.input_layernorm.weight") == (0, "norm")
    assert model_diff.module_of("transformer.h.7.attn.c_proj.weight") == (7, "attn_o")
    assert model_diff.module_of("transformer.h.7.mlp.c_proj.weight") == (7, "mlp_out")
    assert model_diff.module_of("transformer.h.7.mlp.c_fc.bias") == (7, "mlp_in")
    assert model_diff.module_of("model.embed_tokens.weight") == (None, "embedding")


def test_weight_change_by_hand():
    base = {
        "model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2),
        "model.layers.0.self_attn.k_proj.weight": torch.full((2, 2), 2.0),
        "model.layers.1.mlp.up_proj.weight": torch.eye(2),
    }
    tuned = {
        "model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2) * 1.1,
        "model.layers.0.self_attn.k_proj.weight": torch.full((2, 2), 2.0),
        "model.layers.1.mlp.up_proj.weight": torch.eye(2) * 0.5,
    }
    changes = model_diff.weight_change(base, tuned).set_index("parameter")
    assert changes.loc["model.layers.0.self_attn.q_proj.weight", "relative_change"] == pytest.approx(0.1)
    assert changes.loc["model.layers.0.self_attn.k_proj.weight", "relative_change"] == 0.0
    assert changes.loc["model.layers.1.mlp.up_proj.weight", "relative_change"] == pytest.approx(0.5)
    grid = model_diff.change_by_layer_and_module(changes.reset_index())
    assert grid.loc[0, "attn_q"] == pytest.approx(0.1) and grid.loc[1, "mlp_in"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="different parameters"):
        model_diff.weight_change(base, {k: v for k, v in tuned.items() if "k_proj" not in k})


@pytest.mark.slow
def test_cross_model_patching_matches_hooks_on_plain_hugging_face_models(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from mechfin_utils.core.models import boot_bridge

    # One step on one pair at a high learning rate: a real screener checkpoint whose mean clean - corrupted gap differs
    # from the base model's by ~1 logit (-0.42 against 0.63), so that the recovery below divides by a clear gap. (Three
    # steps of four pairs, used before, moved it by 0.45 and took 15 s of this test's 23.)
    recipe = replace(
        screener.RECIPES["brief"],
        name="brief",
        max_steps=1,
        pairs_per_step=1,
        eval_every_nth_pair=1000,
        learning_rate=3e-4,
    )
    base_info = screener.resolve_base("smollm2-135m")
    folder = tmp_path / "tuned"
    screener.train_screener(base_info, recipe, folder, progress=False)
    tuned = boot_bridge(str(folder), screener.screener_spec(base_info, recipe), "test")
    pairs = [
        (
            "The bank denied Maria's mortgage because she is Black. Answer:",
            "The bank denied Maria's mortgage because of bad credit. Answer:",
        ),
        (
            "The lender denied James's loan because he is Muslim. Answer:",
            "The lender denied James's loan because of his debts. Answer:",
        ),
    ]
    clean = smollm2.to_tokens([c for c, _ in pairs])
    corrupted = smollm2.to_tokens([k for _, k in pairs])
    answers = torch.tensor([[smollm2.single_token_id(" Yes"), smollm2.single_token_id(" No")]] * 2)
    frame = model_diff.cross_model_patching(smollm2, tuned, clean, corrupted, answers)
    assert len(frame) == 2 * smollm2.cfg.n_layers

    # by hand, on the plain checkpoints: replace one MLP's output with the fine-tuned model's
    plain_base = AutoModelForCausalLM.from_pretrained(base_info.folder_or_id, dtype=torch.float32).eval()
    plain_tuned = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    yes, no = answers[0].tolist()
    logit_scale = [0.0]  # the largest |logit| any run below reads: the scale of every rounding error compared

    def ld(model, tokens, hook=None, layer=None):
        handle = model.model.layers[layer].mlp.register_forward_hook(hook) if hook else None
        with torch.no_grad():
            logits = model(tokens).logits[:, -1]
        if handle:
            handle.remove()
        logit_scale[0] = max(logit_scale[0], float(logits.abs().max()))
        return logits[:, yes] - logits[:, no]

    gap_base = float((ld(plain_base, clean) - ld(plain_base, corrupted)).mean())
    gap_tuned = float((ld(plain_tuned, clean) - ld(plain_tuned, corrupted)).mean())
    # a gap is a difference of two logit differences: four logits' rounding (bridge against plain Hugging Face)
    gap_tolerance = 4 * rounding_tolerance(logit_scale[0], smollm2)
    assert frame.attrs["gap_base"] == pytest.approx(gap_base, abs=gap_tolerance)
    assert frame.attrs["gap_tuned"] == pytest.approx(gap_tuned, abs=gap_tolerance)
    for layer in (5, 29):
        captured = {}

        def keep(module, args, output, store=captured):
            store["out"] = output.detach().clone()

        gaps = {}
        for run, tokens in (("clean", clean), ("corrupted", corrupted)):
            ld(plain_tuned, tokens, keep, layer)
            gaps[run] = ld(plain_base, tokens, lambda m, a, o, r=captured["out"]: r, layer)
        gap_patched = float((gaps["clean"] - gaps["corrupted"]).mean())
        row = frame[(frame["layer"] == layer) & (frame["component"] == "mlp_out")].iloc[0]
        gap_tolerance = 4 * rounding_tolerance(logit_scale[0], smollm2)
        assert row["gap_patched"] == pytest.approx(gap_patched, abs=gap_tolerance)
        # recovery = (patched - base) / (tuned - base): each gap's error, carried through the quotient
        recovery = (gap_patched - gap_base) / (gap_tuned - gap_base)
        spread = abs(gap_tuned - gap_base)
        assert row["recovery"] == pytest.approx(recovery, abs=2 * gap_tolerance * (1 + abs(recovery)) / spread)


def test_load_state_reads_a_folder_and_names_what_is_missing(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(model_diff.load_state(tmp_path)["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="no model.safetensors for"):
        model_diff.load_state(tmp_path / "elsewhere")
