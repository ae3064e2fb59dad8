"""A model fine-tuned on number ordering (notebook 14, after Prakash et al. 2024): trained, cached, carded and loadable
by name.

Prakash et al. fine-tuned LLaMA-7B on arithmetic (Goat, with LoRA adapters) and asked whether entity tracking improved
through the circuit the base model already had. Notebook 14 asks it of SmolLM2-135M-Instruct and greater-than; this
module makes the fine-tuned model, the same way every time:

1. **data** -- :func:`mechfin_utils.tasks.number_ordering.build_corpus`: later dates in other centuries and rising
   two-digit counts, checked to share no template 3-gram, noun, year or prompt with ``data/greater_than.csv``;
2. **objective** -- next-token cross-entropy on the continuation's tokens only (the larger number), never on the
   prefix, so the model is taught the ordering and not the sentences;
3. **method** -- LoRA adapters (``peft``; rank 8 on every attention and MLP projection, as Goat's recipe adapts a
   pretrained model), merged into plain weights afterwards, AdamW, one pass over the corpus in a seeded order,
   dropout off (deterministic on CPU for a given seed and thread count); ``"ordering-full"`` fine-tunes every weight
   instead;
4. **cache and card** -- :func:`~mechfin_utils.screener.fine_tune_cache.cached_fine_tune`: plain weights beside the
   converted base model, ``fine-tune-card.json`` (fingerprint, corpus sha256 and families, the leak check, steps,
   seconds, per-step loss, weights sha256) and a ``README.md``.

``load_model("smollm2-135m-ordering")`` trains on first use (250 s on one thread of this 2-core machine) and loads through the same
bridge as every model; ``"smollm2-135m-ordering-brief"`` (a few steps, for tests and fast notebook runs) says in its
name that its numbers are not the fine-tune's.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from mechfin_utils.core.models import LoadedModel, ModelSpec, boot_bridge, cache_dir, file_sha256
from mechfin_utils.screener.fine_tune_cache import CARD_FILES, cached_fine_tune
from mechfin_utils.screener.training import Base, resolve_base
from mechfin_utils.tasks.circuit_tasks import GREATER_THAN_CSV, load_greater_than
from mechfin_utils.tasks.number_ordering import FAMILIES, OrderingExample, build_corpus, corpus_sha256

CARD_FILE = CARD_FILES[1]
CARD_FORMAT_VERSION = 1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class OrderingRecipe:
    """How the number-ordering model is trained: ``n_examples`` texts of the corpus drawn from ``corpus_seed``, in
    steps of ``examples_per_step``, once."""

    name: str
    method: Literal["lora", "full"]
    learning_rate: float
    n_examples: int
    examples_per_step: int = 16
    seed: int = 0
    corpus_seed: int = 0
    lora_rank: int = 8


ORDERING_RECIPES: dict[str, OrderingRecipe] = {
    "ordering": OrderingRecipe("ordering", "lora", learning_rate=1e-4, n_examples=960),
    "ordering-full": OrderingRecipe("ordering-full", "full", learning_rate=3e-5, n_examples=960),
    "ordering-brief": OrderingRecipe("ordering-brief", "lora", learning_rate=1e-3, n_examples=48),
}
"""``ordering``: the fine-tune notebook 14 studies (60 steps of 16 texts, learning rate 1e-4: measured on 128 held-out
greater-than prompts, 1e-3 left greater-than where it was (clean score 0.928 -> 0.925) and damaged the rest (facts'
p(answer) 0.41 -> 0.09, IOI -0.88), 2e-4 raised it 0.937 -> 0.975 with facts 0.40 -> 0.30, 1e-4 to 0.979 with facts
0.40 -> 0.37, top-1 kept, IOI -0.13); ``ordering-full``: the same data with every
weight trained; ``ordering-brief``: three steps, for tests and fast notebook runs."""


def ordering_spec(base: Base, recipe: OrderingRecipe) -> ModelSpec:
    suffix = recipe.name.removeprefix("ordering")
    label = "fine-tuned on number ordering" + (f" ({suffix[1:]} recipe, not the real one)" if suffix else "")
    return ModelSpec(
        slug=f"{base.key}-{recipe.name}",
        display_name=f"{base.spec.display_name}, {label}",
        prepend_bos=base.spec.prepend_bos,
    )


def ordering_folder(base: Base, recipe: OrderingRecipe) -> Path:
    return cache_dir() / ordering_spec(base, recipe).slug


def recipe_corpus(recipe: OrderingRecipe) -> list[OrderingExample]:
    """The recipe's training texts (leak-checked against every greater-than prompt when built)."""
    return build_corpus(recipe.n_examples, seed=recipe.corpus_seed)


def ordering_fingerprint(base: Base, recipe: OrderingRecipe, corpus: Sequence[OrderingExample]) -> dict[str, Any]:
    """What determines the weights; the cached model is reused only while its card holds exactly this."""
    return {
        "format": CARD_FORMAT_VERSION,
        "base": base.key,
        "base_identity": dict(base.identity),
        "recipe": asdict(recipe),
        "corpus_sha256": corpus_sha256(corpus),
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------------------
# Training, stage by stage
# ---------------------------------------------------------------------------------------------------------


def continuation_batch(
    tokenizer, examples: Sequence[OrderingExample], prepend_bos: bool
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 everywhere but the continuation's tokens).

    The prefix must tokenise to the same ids alone and inside the whole text, so that the labelled tokens are exactly
    the continuation's; an example where they do not is an error naming it."""
    rows, label_rows = [], []
    for example in examples:
        prefix = list(tokenizer(example.prefix, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(example.text, add_special_tokens=False)["input_ids"])
        if full[: len(prefix)] != prefix or len(full) == len(prefix):
            raise ValueError(
                f"{example.text!r}: the prefix {example.prefix!r} does not end on a token boundary of the whole text"
            )
        if prepend_bos:
            prefix, full = [tokenizer.bos_token_id, *prefix], [tokenizer.bos_token_id, *full]
        rows.append(full)
        label_rows.append([-100] * len(prefix) + full[len(prefix) :])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)], mask[i, : len(row)], labels[i, : len(row)] = (
            torch.tensor(row),
            1,
            torch.tensor(label_row),
        )
    return ids, mask, labels


def continuation_loss(model: torch.nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labelled (continuation) tokens: position ``p``'s logits predict token
    ``p + 1``."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def train_ordering(
    base: Base, recipe: OrderingRecipe, folder: Path, corpus: Sequence[OrderingExample], *, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune ``base`` on ``corpus`` with ``recipe``; save plain weights, tokenizer and card to ``folder``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    # 1. data: the corpus in one seeded order, cut into steps
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    steps = [order[i : i + recipe.examples_per_step] for i in range(0, len(order), recipe.examples_per_step)]
    # 2. model: the base's plain weights, with LoRA adapters when asked
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_pretrained(base.folder_or_id, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base.folder_or_id)
    if recipe.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
        )
        model = get_peft_model(model, config)
    model.eval()  # dropout off: deterministic steps
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate)
    # 3. steps: cross-entropy on the continuation's tokens
    losses, tokens_trained = [], 0
    bar = tqdm(steps, desc=f"training {ordering_spec(base, recipe).slug}", disable=not progress, unit="step")
    for step in bar:
        ids, mask, labels = continuation_batch(tokenizer, [corpus[i] for i in step], base.spec.prepend_bos)
        loss = continuation_loss(model, ids, mask, labels)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 5))
        tokens_trained += int((labels != -100).sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.perf_counter() - started
    # 4. plain weights: adapters merged in; saved with the tokenizer
    if recipe.method == "lora":
        model = model.merge_and_unload()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # 5. the card
    spec = ordering_spec(base, recipe)
    evaluation = load_greater_than()
    card = {
        "fingerprint": ordering_fingerprint(base, recipe, corpus),
        "model": spec.display_name,
        "slug": spec.slug,
        "base_model": base.spec.display_name,
        "recipe": asdict(recipe),
        "data": {
            "corpus": "mechfin_utils.tasks.number_ordering.build_corpus",
            "n_examples": len(corpus),
            "by_family": {family: sum(e.family == family for e in corpus) for family in FAMILIES},
            "corpus_sha256": corpus_sha256(corpus),
            "examples": [e.text for e in corpus[:4]],
            "kept_apart_from": {
                "file": f"data/{GREATER_THAN_CSV.name}",
                "sha256": file_sha256(GREATER_THAN_CSV),
                "prompts": len(evaluation),
                "checked": "no evaluation prompt, template 3-gram, noun or year of its century in any text",
            },
        },
        "steps": len(steps),
        "continuation_tokens_trained": tokens_trained,
        "loss_per_step": losses,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "weights_sha256": file_sha256(folder / "model.safetensors"),
        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / CARD_FILE).write_text(json.dumps(card, indent=1))
    (folder / "README.md").write_text(card_markdown(card))
    return card


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a short page beside the weights."""
    recipe, data = card["recipe"], card["data"]
    first, last = card["loss_per_step"][0], card["loss_per_step"][-1]
    return "\n".join(
        [
            f"# {card['model']}",
            "",
            f"Fine-tuned from {card['base_model']} by mechfin (`mechfin_utils.screener.ordering`, recipe "
            f"`{recipe['name']}`): {recipe['method']} (LoRA rank {recipe['lora_rank']} when LoRA), AdamW lr "
            f"{recipe['learning_rate']}, {recipe['examples_per_step']} texts a step, {card['steps']} steps, seed "
            f"{recipe['seed']}; cross-entropy on the continuation (the larger number) only. Loss {first:.3f} -> "
            f"{last:.3f}. Trained in {card['train_seconds']} s on {card['machine']} ({card['threads']} threads).",
            "",
            f"Data: {data['n_examples']} texts ({', '.join(f'{k}: {v}' for k, v in data['by_family'].items())}), "
            f"corpus sha256 `{data['corpus_sha256']}`. Kept apart from `{data['kept_apart_from']['file']}` "
            f"({data['kept_apart_from']['prompts']} prompts): {data['kept_apart_from']['checked']}.",
            "",
            f"Weights: `model.safetensors`, sha256 `{card['weights_sha256']}`.",
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------------------
# Cache and loading
# ---------------------------------------------------------------------------------------------------------


def ensure_ordering_model(
    base: str = "smollm2-135m", recipe: str | OrderingRecipe = "ordering", *, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """The fine-tuned model's folder and card, training it first when no cached card matches its fingerprint."""
    if isinstance(recipe, str):
        if recipe not in ORDERING_RECIPES:
            raise ValueError(f"unknown ordering recipe {recipe!r}; known: {sorted(ORDERING_RECIPES)}")
        recipe = ORDERING_RECIPES[recipe]
    resolved = resolve_base(base)
    folder = ordering_folder(resolved, recipe)
    corpus = recipe_corpus(recipe)
    chosen = recipe
    card = cached_fine_tune(
        folder,
        ordering_fingerprint(resolved, chosen, corpus),
        lambda: train_ordering(resolved, chosen, folder, corpus, progress=progress),
        label=ordering_spec(resolved, chosen).display_name,
        progress=progress,
    )
    return folder, card


def load_ordering_model(base: str = "smollm2-135m", recipe: str = "ordering", *, verbose: bool = True) -> LoadedModel:
    """The number-ordering model through the bridge, as every model (trained on first use)."""
    folder, card = ensure_ordering_model(base, recipe, progress=verbose)
    resolved = resolve_base(base)
    spec = ordering_spec(resolved, ORDERING_RECIPES[recipe])
    source = f"fine-tuned from {resolved.spec.display_name}, {folder} (sha256 {card['weights_sha256'][:12]}...)"
    return boot_bridge(str(folder), spec, source)
