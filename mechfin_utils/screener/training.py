"""A fair-lending screener: a model fine-tuned to answer " Yes" / " No", cached, carded and loadable by name.

No model that ships offline makes the fair-lending decision (the embedded SmolLM2-135M-Instruct separates clean
from corrupted prompts at AUROC 0.58). Banks that screen text with a small model fine-tune it; whether such a
screener keys on the protected basis or on surface cues is the question interpretability can answer. This module
builds one, the same way every time:

1. **data** — the ``train`` split of the screener task set (``tasks.screener_sets``: 440 pairs with wide
   wording) and the mention set's training files (``mention_train``, ``favourable_train``: 330 pairs in which both
   prompts mention the same protected attribute and only what the decision rests on differs); the test splits,
   the paper-style set and the control prompts are never trained on. Recipe ``"shortcut"`` trains on ``train``
   alone: that first screener learned to answer " Yes" whenever an attribute is *mentioned* (notebook 12) and is
   kept, under its own name, as the case study;
2. **objective** — cross-entropy over the two answer logits only (`` Yes`` vs `` No``) at each prompt's last
   token, so the rest of the language-model head is left alone;
3. **optimiser** — AdamW, one pass over the training pairs in a seeded order, both prompts of a pair in the same
   batch (the model sees the contrast), dropout off (the run is deterministic on CPU for a given seed);
4. **method** — a full fine-tune by default. LoRA (``peft``, rank 16 on every attention and MLP projection,
   merged into plain weights afterwards) is available as recipe ``"lora"``; ``python -m mechfin_utils.screener
   compare`` measures both (README: the full fine-tune reached higher held-out AUROC in the same steps);
5. **cache and card** — the weights are saved as a plain checkpoint beside the converted embedded model
   (``$MECHFIN_CACHE``), with ``screener-card.json`` and ``README.md``: data split and file hashes,
   hyper-parameters, seed, per-step loss, held-out metrics and the sha256 of the weights. A later call whose
   fingerprint (base model, recipe, training file) matches loads the cache; anything else retrains.

``load_model("smollm2-135m-screener")`` (or ``"gpt2-screener"`` where GPT-2 Small is available) trains on
first use, with a progress bar, and loads the result through the same TransformerBridge path as every other
model, so every analysis runs on it unchanged. Recipe ``"brief"`` (a few steps) exists for tests and fast
notebook runs; its name says so and its numbers are not the screener's.

Command line::

    python -m mechfin_utils.screener evaluate PAIRS.csv [--model NAME]   # one JSON line
    python -m mechfin_utils.screener train [--base smollm2-135m] [--recipe full]
    python -m mechfin_utils.screener compare                             # full fine-tune vs LoRA
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mechfin_utils.core.models import (
    GPT2_HOW_TO,
    GPT2_SPEC,
    SMOLLM2_SPEC,
    LoadedModel,
    ModelSpec,
    ModelUnavailableError,
    boot_bridge,
    cache_dir,
    file_sha256,
    load_gpt2_folder,
    load_model,
    locate_gpt2,
    prepare_smollm2,
    smollm2_gguf_path,
)
from mechfin_utils.screener.behaviour import (
    HFScorer,
    PromptTooLongError,
    answer_token_ids,
    evaluate_controls,
    evaluate_pairs,
)
from mechfin_utils.screener.fine_tune_cache import CARD_FILES, cached_fine_tune, read_card
from mechfin_utils.tasks.fair_lending import FAIR_LENDING_ANSWERS, FAIR_LENDING_CSV, load_fair_lending_pairs
from mechfin_utils.tasks.screener_sets import (
    MENTION_TEST_SPLITS,
    MENTION_TRAIN_SPLITS,
    SPLITS,
    TEST_SPLITS,
    TRAIN_SPLIT,
    load_control_prompts,
    load_split,
    split_path,
)
from mechfin_utils.tasks.task_tables import TaskDataError

CARD_FORMAT_VERSION = 1
CARD_FILE = CARD_FILES[0]


REPAIRED_TRAIN_SPLITS = (TRAIN_SPLIT, *MENTION_TRAIN_SPLITS)
"""What the default screener is trained on: the original training split and the mention set's."""


@dataclass(frozen=True)
class Recipe:
    """How a screener is trained. ``max_steps=None`` means one pass over the training pairs of ``train_splits``."""

    name: str
    method: Literal["full", "lora"]
    learning_rate: float
    train_splits: tuple[str, ...] = REPAIRED_TRAIN_SPLITS
    pairs_per_step: int = 8
    max_steps: int | None = None
    seed: int = 0
    lora_rank: int = 16
    eval_every_nth_pair: int = 1  # the card's held-out metrics use every n-th pair of each set (1 = all)


RECIPES: dict[str, Recipe] = {
    "full": Recipe("full", "full", learning_rate=3e-5),
    "shortcut": Recipe("shortcut", "full", learning_rate=3e-5, train_splits=(TRAIN_SPLIT,)),
    "lora": Recipe("lora", "lora", learning_rate=3e-4),
    "brief": Recipe("brief", "full", learning_rate=3e-5, max_steps=4, eval_every_nth_pair=12),
    "shortcut-brief": Recipe(
        "shortcut-brief", "full", learning_rate=3e-5, train_splits=(TRAIN_SPLIT,), max_steps=4, eval_every_nth_pair=12
    ),
}
"""``full``: the default (repaired) screener; ``shortcut``: the first screener, trained without the mention set (the
case study); ``lora``: the same data with LoRA adapters; ``brief`` / ``shortcut-brief``: four steps, for tests."""

_LABELS = {
    "full": "fine-tuned screener",
    "shortcut": "first screener (shortcut case study)",
    "lora": "LoRA screener",
}


@dataclass(frozen=True)
class Base:
    """A model a screener can be fine-tuned from: where its plain weights are, and its BOS decision."""

    key: str
    spec: ModelSpec
    folder_or_id: str
    identity: dict[str, Any]


def resolve_base(base: str, gpt2_path: str | os.PathLike | None = None) -> Base:
    """The base model's plain checkpoint (never the bridge's processed weights) and what identifies it."""
    if base == "smollm2-135m":
        gguf = smollm2_gguf_path()
        return Base(
            base,
            SMOLLM2_SPEC,
            str(prepare_smollm2(verbose=False)),
            {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size},
        )
    if base == "gpt2":
        found = locate_gpt2(gpt2_path)
        if found is None:
            raise ModelUnavailableError(
                "gpt2-screener needs GPT-2 Small's weights, which were not found.\n" + GPT2_HOW_TO
            )
        return Base(base, GPT2_SPEC, found[1], {"gpt2": f"{found[0]}:{found[1]}"})
    raise ValueError(f"unknown screener base {base!r}; known: ['smollm2-135m', 'gpt2']")


def screener_spec(base: Base, recipe: Recipe) -> ModelSpec:
    suffix = "" if recipe.name == "full" else f"-{recipe.name}"
    label = _LABELS.get(recipe.name, f"{recipe.name} screener (not the real one)")
    return ModelSpec(
        slug=f"{base.key}-screener{suffix}",
        display_name=f"{base.spec.display_name}, {label}",
        prepend_bos=base.spec.prepend_bos,
    )


def screener_folder(base: Base, recipe: Recipe) -> Path:
    return cache_dir() / screener_spec(base, recipe).slug


def fingerprint(base: Base, recipe: Recipe) -> dict[str, Any]:
    """What determines the trained weights; a cached screener is reused only when this matches its card. As JSON
    stores it (tuples become lists), so that a card read back compares equal."""
    return json.loads(json.dumps(_fingerprint_fields(base, recipe)))


def _fingerprint_fields(base: Base, recipe: Recipe) -> dict[str, Any]:
    return {
        "format": CARD_FORMAT_VERSION,
        "base": base.key,
        "base_identity": base.identity,
        "recipe": asdict(recipe),
        "train_files_sha256": {split: file_sha256(split_path(split)) for split in recipe.train_splits},
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------------------
# Training, stage by stage
# ---------------------------------------------------------------------------------------------------------


def _load_plain(base: Base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base.folder_or_id, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base.folder_or_id)
    return model, tokenizer


def _batch_tensors(tokenizer, prompts: Sequence[str], prepend_bos: bool):
    """Right-padded ids, attention mask and each row's last real position (padding never reaches the answer)."""
    rows = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if prepend_bos:
        rows = [[tokenizer.bos_token_id] + r for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    last = torch.tensor([len(r) - 1 for r in rows])
    return ids, mask, last


def train_screener(base: Base, recipe: Recipe, folder: Path, *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``base`` with ``recipe``, save plain weights and the card to ``folder``; return the card."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    # 1. data: both prompts of each training pair, pairs of every training split in one seeded order
    pairs = [pair for split in recipe.train_splits for pair in load_split(split)]
    generator = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(pairs), generator=generator).tolist()
    steps = [order[i : i + recipe.pairs_per_step] for i in range(0, len(order), recipe.pairs_per_step)]
    if recipe.max_steps is not None:
        steps = steps[: recipe.max_steps]
    # 2. model: the base's plain weights; LoRA adapters when asked
    torch.manual_seed(recipe.seed)
    model, tokenizer = _load_plain(base)
    if recipe.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if base.key == "gpt2":
            targets = ["c_attn", "c_proj", "c_fc"]
        model = get_peft_model(
            model,
            LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, lora_dropout=0.0, target_modules=targets),
        )
    model.eval()  # dropout off: deterministic steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=0.0)
    answer_ids = list(answer_token_ids(tokenizer, FAIR_LENDING_ANSWERS, base.spec.display_name))
    # 3. steps: two-answer cross-entropy at each prompt's last token
    losses = []
    bar = tqdm(steps, desc=f"training {screener_spec(base, recipe).slug}", disable=not progress, unit="step")
    for step in bar:
        prompts = [t for i in step for t in pairs[i].texts]
        answer_index = torch.tensor([0, 1] * len(step))  # clean -> " Yes" (index 0), corrupted -> " No" (index 1)
        ids, mask, last = _batch_tensors(tokenizer, prompts, base.spec.prepend_bos)
        logits = model(input_ids=ids, attention_mask=mask).logits
        two_way = logits[torch.arange(len(prompts)), last][:, answer_ids]
        loss = torch.nn.functional.cross_entropy(two_way, answer_index)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.perf_counter() - t0
    # 4. plain weights: LoRA adapters merged in
    if recipe.method == "lora":
        model = model.merge_and_unload()
    # 5. save weights and tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    # 6. held-out metrics and the card
    scorer = HFScorer(
        model, tokenizer, prepend_bos=base.spec.prepend_bos, name=screener_spec(base, recipe).display_name
    )
    card = {
        "fingerprint": fingerprint(base, recipe),
        "model": screener_spec(base, recipe).display_name,
        "slug": screener_spec(base, recipe).slug,
        "base_model": base.spec.display_name,
        "recipe": asdict(recipe),
        "data": _data_card(recipe),
        "steps": len(steps),
        "prompts_seen": sum(2 * len(s) for s in steps),
        "loss_per_step": losses,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "weights_sha256": file_sha256(weights),
        "held_out": held_out_metrics(scorer, every_nth=recipe.eval_every_nth_pair),
        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / CARD_FILE).write_text(json.dumps(card, indent=1))
    (folder / "README.md").write_text(card_markdown(card))
    return card


def _data_card(recipe: Recipe) -> dict[str, Any]:
    out: dict[str, Any] = {
        split: {
            "file": f"data/screener/{split_path(split).name}",
            "pairs": len(load_split(split)),
            "sha256": file_sha256(split_path(split)),
            "trained_on": split in recipe.train_splits,
        }
        for split in SPLITS
    }
    out["paper_style_set"] = {
        "file": "data/fair_lending_pairs.csv",
        "pairs": len(load_fair_lending_pairs()),
        "sha256": file_sha256(FAIR_LENDING_CSV),
        "trained_on": False,
    }
    return out


def held_out_metrics(model_or_scorer: Any, *, every_nth: int = 1, n_boot: int = 500) -> dict[str, Any]:
    """Accuracy, AUROC, gap and calibration on every set the screener was not trained on, and the controls."""
    sets = {split: load_split(split)[::every_nth] for split in (*TEST_SPLITS, *MENTION_TEST_SPLITS)}
    sets["paper_style_set"] = load_fair_lending_pairs()[::every_nth]
    out: dict[str, Any] = {}
    for label, pairs in sets.items():
        result = evaluate_pairs(model_or_scorer, pairs, label=label, n_boot=n_boot)
        out[label] = {k: v for k, v in result.summary.items()}
    controls = evaluate_controls(model_or_scorer, load_control_prompts()[::every_nth])
    out["controls"] = {
        kind: {"n": int(len(g)), "accuracy": float(g["correct"].mean())}
        for kind, g in controls.groupby("kind", sort=False)
    }
    return out


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a short human-readable page (written beside the weights)."""
    recipe = card["recipe"]
    lines = [
        f"# {card['model']}",
        "",
        f"Fine-tuned from {card['base_model']} by mechfin (`mechfin_utils.screener.training`, recipe `{recipe['name']}`): "
        f"{recipe['method']} fine-tune, AdamW lr {recipe['learning_rate']}, {recipe['pairs_per_step']} pairs "
        f"({2 * recipe['pairs_per_step']} prompts) a step, {card['steps']} steps, seed {recipe['seed']}, "
        f'two-answer cross-entropy (" Yes" vs " No") at the last token. Trained in {card["train_seconds"]} s '
        f"on {card['machine']} ({card['threads']} threads).",
        "",
        f"Weights: `model.safetensors`, sha256 `{card['weights_sha256']}`.",
        "",
        "## Data",
        "",
        "| set | file | pairs | trained on |",
        "|---|---|---|---|",
    ]
    for name, entry in card["data"].items():
        lines.append(f"| {name} | `{entry['file']}` | {entry['pairs']} | {'yes' if entry['trained_on'] else 'no'} |")
    lines += [
        "",
        "## Held-out behaviour",
        "",
        "| set | n pairs | accuracy | Yes side | No side | AUROC | mean gap (logits) | Brier | ECE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in card["held_out"].items():
        if name == "controls":
            continue
        lines.append(
            f"| {name} | {m['n']} | {m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}]"
            f" | {m['accuracy_clean']:.2f} | {m['accuracy_corrupted']:.2f} | {m['auroc']:.3f} [{m['auroc_low']:.3f}, {m['auroc_high']:.3f}] | {m['mean_gap']:.2f} | "
            f"{m['brier']:.3f} | {m['ece']:.3f} |"
        )
    lines += [
        "",
        "Control prompts (accuracy): "
        + ", ".join(f"{kind} {m['accuracy']:.2f} (n={m['n']})" for kind, m in card["held_out"]["controls"].items()),
        "",
        "A model audit aid, not legal advice.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Cache and loading
# ---------------------------------------------------------------------------------------------------------


def ensure_screener(
    base: str = "smollm2-135m",
    recipe: str | Recipe = "full",
    *,
    gpt2_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[Path, dict]:
    """The screener's folder and card, training it first when no cached copy matches its fingerprint."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    resolved = resolve_base(base, gpt2_path)
    folder = screener_folder(resolved, recipe)
    card = cached_fine_tune(
        folder,
        fingerprint(resolved, recipe),
        lambda: train_screener(resolved, recipe, folder, progress=progress),
        label=screener_spec(resolved, recipe).display_name,
        progress=progress,
    )
    return folder, card


def load_screener(
    base: str = "smollm2-135m",
    recipe: str = "full",
    *,
    gpt2_path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> LoadedModel:
    """The screener through the same TransformerBridge path as every model (training it on first use)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    folder, card = ensure_screener(base, recipe, gpt2_path=gpt2_path, progress=verbose)
    resolved = resolve_base(base, gpt2_path)
    spec = screener_spec(resolved, RECIPES[recipe])
    source = f"fine-tuned from {resolved.spec.display_name}, {folder} (sha256 {card['weights_sha256'][:12]}...)"
    if base == "gpt2":
        return load_gpt2_folder(folder, spec, source)
    return boot_bridge(str(folder), spec, source)


def screener_card(model: LoadedModel) -> dict[str, Any]:
    """The card of a loaded screener (a ValueError for a model that is not one)."""
    folder = cache_dir() / model.slug
    card = read_card(folder)
    if card is None:
        raise ValueError(f"{model.name} is not a mechfin screener (no card in {folder})")
    return card


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def evaluate_file(
    path: str | os.PathLike, model_name: str = "smollm2-135m-screener", *, n_boot: int = 1000
) -> dict[str, Any]:
    """``evaluate`` as a function: the JSON-ready summary of a model on a pairs file."""
    pairs = load_fair_lending_pairs(Path(path))
    with contextlib.redirect_stdout(
        sys.stderr
    ):  # loading (and first-use training) reports on stderr: stdout is the JSON
        model = load_model(model_name, verbose=True)
    result = evaluate_pairs(model, pairs, label=Path(path).name, n_boot=n_boot)
    summary = result.summary
    card = read_card(cache_dir() / model.slug)
    return {
        "file": str(path),
        "model": model.name,
        "screener": model.slug if card is not None else None,  # which screener (None: not a mechfin screener)
        "weights_sha256": card["weights_sha256"] if card is not None else None,
        "n": summary["n"],
        "auroc": summary["auroc"],
        "accuracy": summary["accuracy"],
        # each side alone: discrimination flagged (clean prompts answered " Yes"), lawful decisions cleared (" No")
        "accuracy_clean": summary["accuracy_clean"],
        "accuracy_clean_ci": [summary["accuracy_clean_low"], summary["accuracy_clean_high"]],
        "accuracy_corrupted": summary["accuracy_corrupted"],
        "accuracy_corrupted_ci": [summary["accuracy_corrupted_low"], summary["accuracy_corrupted_high"]],
        "mean_gap": summary["mean_gap"],
        "mean_gap_ci": [summary["mean_gap_low"], summary["mean_gap_high"]],
        "auroc_ci": [summary["auroc_low"], summary["auroc_high"]],
        "brier": summary["brier"],
        "ece": summary["ece"],
        "excluded": [{"pair_id": i, "reason": r} for i, r in result.excluded],
    }


def compare_recipes(names: Sequence[str] = ("full", "lora")) -> list[dict[str, Any]]:
    """Train (or find cached) each recipe on the embedded model; time and held-out AUROC, one JSON line each."""
    rows = []
    for name in names:
        recipe = RECIPES[name]
        _, card = ensure_screener("smollm2-135m", name)
        rows.append(
            {
                "recipe": name,
                "method": recipe.method,
                "lr": recipe.learning_rate,
                "steps": card["steps"],
                "train_seconds": card["train_seconds"],
                **{f"auroc_{k}": round(v["auroc"], 4) for k, v in card["held_out"].items() if k != "controls"},
                **{f"controls_{k}": v["accuracy"] for k, v in card["held_out"]["controls"].items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechfin_utils.screener", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    evaluate = sub.add_parser("evaluate", help="a model's decisions on a pairs file, as one JSON line")
    evaluate.add_argument("pairs", help="a CSV in the fair-lending task schema (token lengths may differ)")
    evaluate.add_argument("--model", default="smollm2-135m-screener", help="any name load_model accepts")
    evaluate.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    train = sub.add_parser("train", help="train (or find cached) a screener and print its card's path")
    train.add_argument("--base", default="smollm2-135m", choices=["smollm2-135m", "gpt2"])
    train.add_argument("--recipe", default="full", choices=sorted(RECIPES))
    sub.add_parser("compare", help="full fine-tune vs LoRA: time and held-out AUROC")
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        if not Path(args.pairs).is_file():
            print(f"error: {args.pairs}: no such file", file=sys.stderr)
            return 2
        try:
            print(json.dumps(evaluate_file(args.pairs, args.model, n_boot=args.n_boot)))
        except (TaskDataError, PromptTooLongError, ModelUnavailableError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command == "train":
        folder, card = ensure_screener(args.base, args.recipe)
        print(folder / CARD_FILE)
        return 0
    compare_recipes()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
