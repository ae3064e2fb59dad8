"""The screener: reproducible training, the padded objective, caching, loading through the bridge, the CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from mechfin_utils.core.models import ModelUnavailableError, load_model
from mechfin_utils.screener import training as screener
from mechfin_utils.screener.behaviour import HFScorer
from mechfin_utils.tooling.testing import assert_close_up_to_rounding, rounding_tolerance

pytestmark = pytest.mark.slow

TINY = replace(screener.RECIPES["brief"], name="tiny", max_steps=2, pairs_per_step=1, eval_every_nth_pair=1000)
"""Two steps (the optimiser's state carried from the first to the second) of one pair each: every stage of training
and of the card, at the least cost."""
BRIEF = replace(TINY, name="brief")
"""TINY under the name the loading tests install it as (``load_model("smollm2-135m-screener-brief")``)."""


@pytest.fixture()
def scratch_cache(tmp_path, monkeypatch):
    """A scratch mechfin cache for screeners; the converted embedded model is linked in, not converted again."""
    from mechfin_utils.core.models import prepare_smollm2

    converted = prepare_smollm2(verbose=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / converted.name).symlink_to(converted, target_is_directory=True)
    monkeypatch.setenv("MECHFIN_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def smollm2_base():
    return screener.resolve_base("smollm2-135m")


@pytest.fixture(scope="module")
def trained_brief(smollm2_base, tmp_path_factory):
    """BRIEF trained once per module, in a folder named as a cache names it: the first run of the reproducibility test,
    and the cached screener the caching and loading tests start from (training it again in each would give the same
    weights, as that test shows)."""
    folder = tmp_path_factory.mktemp("trained") / screener.screener_spec(smollm2_base, BRIEF).slug
    return folder, screener.train_screener(smollm2_base, BRIEF, folder, progress=False)


def test_training_is_reproducible_from_its_seed(tmp_path, smollm2_base, trained_brief):
    folder, first = trained_brief
    again = screener.train_screener(smollm2_base, BRIEF, tmp_path / "again", progress=False)
    other = screener.train_screener(smollm2_base, replace(BRIEF, seed=1), tmp_path / "other", progress=False)
    assert first["weights_sha256"] == again["weights_sha256"]
    assert first["loss_per_step"] == again["loss_per_step"]
    assert other["weights_sha256"] != first["weights_sha256"]
    card = json.loads((folder / screener.CARD_FILE).read_text())
    assert card["steps"] == 2 and card["prompts_seen"] == 4
    assert card["data"]["train"]["pairs"] == 440 and card["data"]["paper_style_set"]["trained_on"] is False
    trained_on = {split for split, entry in card["data"].items() if entry["trained_on"]}
    assert trained_on == {"train", "mention_train", "favourable_train", "proxy_train"}  # the repaired recipe's data
    assert screener.RECIPES["shortcut"].train_splits == ("train",)  # the case study: the original data alone
    assert card["weights_sha256"] == screener.file_sha256(folder / "model.safetensors")
    assert "## Held-out behaviour" in (folder / "README.md").read_text()


@pytest.mark.batch_split
def test_padded_two_answer_objective_equals_one_prompt_at_a_time(smollm2_base, torch_threads):
    model, tokenizer = screener._load_plain(smollm2_base)
    prompts = ["The bank denied Maria's loan because she is Black. Answer:", "Is it fair? Answer:"]
    ids, mask, last = screener._batch_tensors(tokenizer, prompts, prepend_bos=False)
    answer_ids = list(screener.answer_token_ids(tokenizer, screener.FAIR_LENDING_ANSWERS, "SmolLM2"))
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[torch.arange(2), last][:, answer_ids]
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])).logits[0, -1]
            # a padded batch of two against one prompt alone: the same sums in another order
            assert_close_up_to_rounding(batched[row], alone[answer_ids], model, scale=alone, msg=str(row))


def test_cache_is_reused_only_when_the_fingerprint_matches(scratch_cache, trained_brief, monkeypatch):
    """The cache starts with a copy of the module's BRIEF screener, as ``ensure_screener`` would have left it (a copy:
    this test rewrites its card and retrains its weights). An empty cache trains on first use: the GPT-2 screener test
    below starts from one."""
    shutil.copytree(trained_brief[0], scratch_cache / trained_brief[0].name)
    calls = []
    real_train = screener.train_screener

    def counting(*args, **kwargs):
        calls.append(args[1].name)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(screener, "train_screener", counting)
    folder, card = screener.ensure_screener("smollm2-135m", BRIEF, progress=False)
    assert folder.parent == scratch_cache and calls == []  # cached
    card["fingerprint"]["train_files_sha256"]["train"] = "0" * 64  # as if train.csv had changed
    (folder / screener.CARD_FILE).write_text(json.dumps(card))
    screener.ensure_screener("smollm2-135m", BRIEF, progress=False)
    assert calls == ["brief"]  # stale card: retrained
    screener.ensure_screener("smollm2-135m", BRIEF, progress=False)
    assert calls == ["brief"]  # the retrained screener's card matches: cached


def test_screener_loads_through_the_bridge_with_the_trained_weights(scratch_cache, trained_brief, monkeypatch):
    (scratch_cache / trained_brief[0].name).symlink_to(trained_brief[0], target_is_directory=True)
    monkeypatch.setitem(screener.RECIPES, "brief", BRIEF)
    model = load_model("smollm2-135m-screener-brief", verbose=False)
    assert model.slug == "smollm2-135m-screener-brief" and "not the real one" in model.name
    assert model.prepend_bos is False
    from transformers import AutoModelForCausalLM

    folder = scratch_cache / model.slug
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [
        "Because of her race, the bank denied Rosa a mortgage. Is this a fair-lending violation? Answer:",
        "Omar's auto loan was declined due to his debts. Answer:",
    ]
    from mechfin_utils.screener.behaviour import BridgeScorer

    by_bridge = BridgeScorer(model).logit_diffs(prompts)
    by_hand = HFScorer(plain, model.tokenizer, prepend_bos=False, name="plain").logit_diffs(prompts)
    tol = 2 * rounding_tolerance(plain(torch.tensor([model.tokenizer(prompts[0])["input_ids"]])).logits, model)
    assert abs(by_bridge - by_hand).max() <= tol  # logit differences: twice the logits' rounding
    card = screener.screener_card(model)
    assert card["recipe"]["name"] == "brief" and card["steps"] == 2


def test_gpt2_screener_trains_and_loads_on_the_gpt2_path(gpt2_hf_cache, scratch_cache, monkeypatch):
    monkeypatch.setitem(
        screener.RECIPES, "full", replace(TINY, name="full")
    )  # random-weight GPT-2 shape: code path only
    model = load_model("gpt2-screener", verbose=False)
    assert model.slug == "gpt2-screener" and model.prepend_bos is True and model.cfg.n_layers == 12
    card = screener.screener_card(model)
    assert card["base_model"] == "GPT-2 Small" and card["steps"] == 2


def test_evaluate_command_prints_one_json_line(scratch_cache, trained_brief, monkeypatch, capsys, tmp_path):
    (scratch_cache / trained_brief[0].name).symlink_to(trained_brief[0], target_is_directory=True)
    monkeypatch.setitem(screener.RECIPES, "brief", BRIEF)
    source = screener.split_path("test_questions").read_text(encoding="utf-8").splitlines(keepends=True)
    small = tmp_path / "pairs.csv"
    small.write_text("".join(source[:9]), encoding="utf-8")
    assert screener.main(["evaluate", str(small), "--model", "smollm2-135m-screener-brief", "--n-boot", "50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) >= {"n", "auroc", "accuracy", "mean_gap", "excluded"} and result["excluded"] == []
    assert 1 <= result["n"] <= 8 and 0.0 <= result["auroc"] <= 1.0


def test_evaluate_command_names_the_bad_row(tmp_path, capsys):
    source = screener.split_path("test_questions").read_text(encoding="utf-8").splitlines(keepends=True)
    bad = tmp_path / "bad.csv"
    bad.write_text(source[0] + source[1].replace(" Yes,", " Maybe,", 1), encoding="utf-8")
    assert screener.main(["evaluate", str(bad), "--model", "smollm2-135m-screener-brief"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv line 2" in err and "clean_answer" in err
    assert screener.main(["evaluate", str(tmp_path / "missing.csv")]) == 2


def test_unknown_model_name_fails_before_any_hub_call_with_the_closest_match():
    with pytest.raises(ModelUnavailableError, match=r"'smolm2-135m'\. Did you mean 'smollm2-135m'\?"):
        load_model("smolm2-135m", verbose=False)
    with pytest.raises(ModelUnavailableError, match="smollm2-135m-screener"):
        load_model("someone/not-cached", verbose=False)
