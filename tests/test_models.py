"""Model loading: the embedded model, the GPT-2 path through a Hugging Face cache, 'auto', BOS decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mechfin_utils.core.models import (
    GPT2_SPEC,
    SMOLLM2_SPEC,
    ModelUnavailableError,
    load_model,
    locate_gpt2,
    prepare_smollm2,
)
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

PROMPTS = [
    "The bank denied the mortgage application because the applicant is Hispanic. Is this a fair-lending violation? Answer:",
    "When John and Mary went to the store, John gave a drink to",
    "The loan officer reviewed the debt-to-income ratio and",
    "Credit unions in the United States are regulated by",
]
REPO = Path(__file__).resolve().parent.parent


def _assert_bridge_log_probs_match_hf(model, reference, prompt: str) -> None:
    """The bridge's log-probabilities equal an independently loaded plain transformers model's, up to float32
    rounding: a log-probability is a logit minus a log-sum of logits, so twice the logits' rounding.

    (``model.hf_model`` is not a reference: compatibility mode folds and centres its weights in place.)
    """
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        logits = reference(tokens).logits
        bridge = model.bridge(tokens).log_softmax(-1)
    worst = (bridge - logits.log_softmax(-1)).abs().max().item()
    assert worst <= 2 * rounding_tolerance(logits, model), (prompt, worst)


@pytest.fixture(scope="module")
def plain_smollm2(unprocessed_hf_reference):
    return unprocessed_hf_reference("smollm2")


@pytest.fixture(scope="module")
def plain_gpt2(unprocessed_hf_reference):
    return unprocessed_hf_reference("gpt2_random")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_embedded_bridge_matches_transformers(smollm2, plain_smollm2, prompt):
    _assert_bridge_log_probs_match_hf(smollm2, plain_smollm2, prompt)


def test_embedded_checkpoint_equals_the_gguf(plain_smollm2):
    """The converted checkpoint holds exactly the dequantised GGUF weights, and gives the GGUF model's logits.

    The weights are compared bit for bit (that is what the conversion claims). The logits are compared with
    the same attention implementation on both sides, to float32 rounding: different kernels (eager vs SDPA)
    sum in different orders and differ in the last bits, which says nothing about the conversion.
    """
    from transformers import AutoModelForCausalLM

    from mechfin_utils.core.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours, theirs = plain_smollm2.state_dict(), direct.state_dict()
    assert sorted(ours) == sorted(theirs)
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"converted weights differ from the GGUF's: {different[:5]}"
    tokens = torch.tensor([[504, 2761, 3264, 260, 18001, 2350]])
    with torch.no_grad():
        want = direct(tokens).logits
        assert_close_up_to_rounding(plain_smollm2(tokens).logits, want, plain_smollm2)


def test_embedded_model_shape_and_spec(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab) == (30, 9, 576, 49152)
    assert smollm2.spec == SMOLLM2_SPEC and smollm2.name == "SmolLM2-135M-Instruct"


def test_embedded_model_is_the_pretrained_one(smollm2):
    """Genuine weights, not random: the IOI logit difference measured for SmolLM2 (prepend_bos=False) is ~4.605."""
    tokens = smollm2.to_tokens(PROMPTS[1])
    with torch.no_grad():
        last = smollm2.bridge(tokens)[0, -1]
    diff = (last[smollm2.single_token_id(" Mary")] - last[smollm2.single_token_id(" John")]).item()
    assert diff == pytest.approx(4.605, abs=0.01)


def test_embedded_bos_decision(smollm2):
    """SmolLM2: no BOS (the bridge default would prepend <|im_start|>, a chat marker); equals bridge tokens."""
    ids = smollm2.token_ids("Hello world")
    assert ids[0] != smollm2.tokenizer.bos_token_id
    assert (
        smollm2.to_tokens("Hello world").tolist()[0]
        == smollm2.bridge.to_tokens("Hello world", prepend_bos=False).tolist()[0]
    )


def test_conversion_is_cached(smollm2):
    stamp = prepare_smollm2(verbose=False) / "mechfin-conversion.json"
    assert json.loads(stamp.read_text())["format"] >= 1


def test_gpt2_path_through_hf_cache(gpt2_random):
    """The real user call `load_model("gpt2")` loads from the HF cache, with the genuine GPT-2 tokenizer."""
    assert gpt2_random.spec == GPT2_SPEC
    cfg = gpt2_random.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab, cfg.n_ctx) == (12, 12, 768, 50257, 1024)
    # (the bridge sets add_bos_token on the tokenizer; mechfin always tokenises with add_special_tokens=False)
    assert gpt2_random.tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert gpt2_random.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]  # BOS = <|endoftext|>
    assert gpt2_random.single_token_id(" Yes") == 3363 and gpt2_random.single_token_id(" No") == 1400


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_gpt2_bridge_matches_transformers(gpt2_random, plain_gpt2, prompt):
    _assert_bridge_log_probs_match_hf(gpt2_random, plain_gpt2, prompt)


def test_gpt2_from_folder(tmp_path, gpt2_random):
    """A folder the user names (transformers-5 style config without n_ctx) loads and equals the cached model."""
    from mechfin_utils.tooling.testing import write_gpt2_checkpoint

    folder = write_gpt2_checkpoint(tmp_path / "gpt2", seed=0)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("n_ctx")
    (folder / "config.json").write_text(json.dumps(raw))
    model = load_model("gpt2", gpt2_path=folder, verbose=False)
    tokens = model.to_tokens(PROMPTS[1])
    with torch.no_grad():
        assert_close_up_to_rounding(model.bridge(tokens), gpt2_random.bridge(tokens), model)


def test_bad_gpt2_folder_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(ModelUnavailableError, match="not a GPT-2 checkpoint folder"):
        load_model("gpt2", gpt2_path=tmp_path, verbose=False)
    with pytest.raises(ModelUnavailableError, match="not a GPT-2 checkpoint folder"):
        load_model("auto", gpt2_path=tmp_path, verbose=False)


def test_single_token_id_names_the_text(smollm2):
    with pytest.raises(ValueError, match="'fair-lending violation' is .* tokens"):
        smollm2.single_token_id("fair-lending violation")


def test_to_tokens_refuses_unequal_lengths(smollm2):
    with pytest.raises(ValueError, match="row 1"):
        smollm2.to_tokens(["Yes", "This is much longer"])


def test_empty_model_name():
    with pytest.raises(ValueError, match="model name"):
        load_model("", verbose=False)


def _run_fresh(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    """Run code in a fresh Python whose HF_HOME is set before start (as a user would)."""
    env = {k: v for k, v in os.environ.items() if k != "MECHFIN_GPT2_PATH"}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_gpt2_offline_absent_says_how_to_provide_it(tmp_path):
    out = _run_fresh(
        "from mechfin_utils.core.models import load_model\n"
        "try:\n    load_model('gpt2')\nexcept Exception as e:\n    print(type(e).__name__); print(e)\n",
        tmp_path / "empty-hf-home",
    )
    assert "ModelUnavailableError" in out.stdout, out.stderr[-2000:]
    assert "MECHFIN_GPT2_PATH" in out.stdout and "gpt2_path" in out.stdout


def test_auto_prefers_gpt2_and_says_why(gpt2_hf_cache, tmp_path):
    code = "from mechfin_utils.core.models import resolve_auto; print(resolve_auto())"
    with_gpt2 = _run_fresh(code, gpt2_hf_cache)
    without = _run_fresh(code, tmp_path / "empty-hf-home")
    assert "('gpt2', 'GPT-2 Small found offline (hf-cache: gpt2)')" in with_gpt2.stdout, with_gpt2.stderr[-2000:]
    assert "smollm2-135m" in without.stdout and "not available offline" in without.stdout


def test_locate_gpt2_prefers_named_folder(tmp_path, gpt2_hf_cache):
    from mechfin_utils.tooling.testing import write_gpt2_checkpoint

    folder = write_gpt2_checkpoint(tmp_path / "g", seed=1, n_layer=1)
    assert locate_gpt2(folder) == ("folder", str(folder))
    assert locate_gpt2() == ("hf-cache", "gpt2")


def test_exclusive_makes_a_second_holder_wait_for_the_first(tmp_path):
    """Two holders of one cache lock (two test workers, two notebooks) take turns: the second enters only after
    the first has left, so a conversion or a training run is never written by two processes at once."""
    import threading

    from mechfin_utils.core.models import exclusive

    lock = tmp_path / "cache" / "folder.lock"
    events: list[str] = []
    first_inside = threading.Event()

    def first() -> None:
        with exclusive(lock):
            events.append("first in")
            first_inside.set()
            time.sleep(0.3)
            events.append("first out")

    worker = threading.Thread(target=first)
    worker.start()
    assert first_inside.wait(5)
    with exclusive(lock):
        events.append("second in")
    worker.join()
    assert events == ["first in", "first out", "second in"]
