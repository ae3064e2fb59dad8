"""Two small models trained here on the synthetic facts, the same way: a Mamba and a Llama-shaped transformer.

Sharma, Atkinson & Bau (2024) carried causal tracing and ROME from transformers to Mamba-2.8b and compared it with
Pythia-2.8b. No Mamba weights load offline, so notebook 13 asks the same questions of models trained here, on the
facts of :mod:`mechfin_utils.tasks.synthetic_facts`, where what each model was taught is known exactly. This module
trains them, the same way every time, and caches them like the screener (:mod:`mechfin_utils.screener.training`):

1. **data** -- the world of ``recipe.n_subjects`` invented people (seed ``recipe.seed``), its trained statements only
   (held-out paraphrases are never seen), tokenised by :mod:`mechfin_utils.tasks.fact_tokenizer`;
2. **models** -- ``MambaForCausalLM`` (Hugging Face's pure-PyTorch path; ``mamba_ssm`` is not needed) and
   ``LlamaForCausalLM`` of the same width and about the same number of parameters: a Mamba block holds about half a
   transformer block's weights, so the Mamba has twice the layers (as Mamba-2.8b's 64 layers against Pythia-2.8b's
   32). Embeddings tied to the unembedding in both;
3. **objective and budget** -- next-token cross-entropy on every token of documents made of one or two statements
   (``[BOS] s1 s2``; a step holds one kind, each with probability 1/2), the same seeded batches for both
   architectures, AdamW with a linear warm-up and cosine decay, the same steps, batch and learning rate
   (:class:`FactRecipe`);
4. **cache and card** -- plain weights and the tokenizer in ``$MECHFIN_CACHE/<slug>/`` with ``fact-model-card.json``
   and ``README.md`` (data counts and the statements' sha256, architecture and parameter count, recipe, steps,
   seconds, threads, loss curve, accuracy on trained and held-out prompts with 95% bootstrap intervals over facts, the
   weights' sha256). A lock file makes a second process wait for the first's training and then read its cache; a
   card whose fingerprint (architecture, recipe, data, torch and transformers versions) differs is retrained.

Recipe ``"brief"`` (a few hundred small steps, seconds) exists for tests and fast notebook runs: its name says so,
and its numbers are not the models'. :func:`load_fact_model` returns a
:class:`~mechfin_utils.core.models.LoadedModel` (through the TransformerLens bridge, like every model in mechfin), so
the project's tracer and ROME run on the Llama unchanged; :func:`fact_accuracy` scores what a model knows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mechfin_utils.core.models import LoadedModel, ModelSpec, boot_bridge, cache_dir, exclusive, file_sha256
from mechfin_utils.core.stats import bootstrap_ci
from mechfin_utils.tasks.fact_tokenizer import build_fact_tokenizer, check_world_tokenisation
from mechfin_utils.tasks.synthetic_facts import Fact, FactWorld, generate_world, training_statements

CARD_FILE = "fact-model-card.json"
CARD_FORMAT_VERSION = 2  # 2: a step holds documents of one kind
Architecture = Literal["mamba", "llama"]
ARCHITECTURES: tuple[Architecture, ...] = ("mamba", "llama")


@dataclass(frozen=True)
class FactRecipe:
    """How both models are trained: the world, the shapes and the shared optimisation budget."""

    name: str
    n_subjects: int
    d_model: int
    llama_layers: int
    llama_heads: int
    llama_mlp: int
    mamba_layers: int
    mamba_state: int
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float = 0.01
    seed: int = 0


RECIPES: dict[str, FactRecipe] = {
    "full": FactRecipe(
        "full",
        n_subjects=48,
        d_model=96,
        llama_layers=5,
        llama_heads=4,
        llama_mlp=256,
        mamba_layers=8,
        mamba_state=8,
        steps=300,
        batch_size=64,
        learning_rate=3e-3,
        warmup_steps=25,
    ),
    "brief": FactRecipe(
        "brief",
        n_subjects=12,
        d_model=64,
        llama_layers=3,
        llama_heads=2,
        llama_mlp=128,
        mamba_layers=4,
        mamba_state=8,
        steps=150,
        batch_size=32,
        learning_rate=3e-3,
        warmup_steps=10,
    ),
}
"""``full``: the models of notebook 13; ``brief``: small and short, for tests and fast mode only."""


def fact_world(recipe: FactRecipe | str) -> FactWorld:
    """The world a recipe trains on."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    return generate_world(recipe.n_subjects, seed=recipe.seed)


def fact_model_spec(arch: Architecture, recipe: FactRecipe) -> ModelSpec:
    """Names that say what the model is: small, trained here, on synthetic facts (and "brief" when it is)."""
    layers = recipe.mamba_layers if arch == "mamba" else recipe.llama_layers
    kind = "Mamba" if arch == "mamba" else "Llama-shaped transformer"
    brief = "" if recipe.name == "full" else f", {recipe.name} (fast mode only)"
    return ModelSpec(
        slug=f"fact-{arch}" + ("" if recipe.name == "full" else f"-{recipe.name}"),
        display_name=f"{kind} ({layers} layers, d {recipe.d_model}) trained here on synthetic facts{brief}",
        prepend_bos=True,
    )


# ---------------------------------------------------------------------------------------------------------
# 2. The models
# ---------------------------------------------------------------------------------------------------------


def build_model(arch: Architecture, recipe: FactRecipe, tokenizer: Any) -> Any:
    """A freshly initialised ``MambaForCausalLM`` or ``LlamaForCausalLM`` for ``recipe`` (seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

    shared = {
        "vocab_size": len(tokenizer),
        "hidden_size": recipe.d_model,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    if arch == "mamba":
        config = MambaConfig(
            num_hidden_layers=recipe.mamba_layers,
            state_size=recipe.mamba_state,
            expand=2,
            conv_kernel=4,
            use_cache=False,
            **shared,
        )
        return MambaForCausalLM(config)
    if arch == "llama":
        config = LlamaConfig(
            num_hidden_layers=recipe.llama_layers,
            num_attention_heads=recipe.llama_heads,
            num_key_value_heads=recipe.llama_heads,
            intermediate_size=recipe.llama_mlp,
            max_position_embeddings=64,
            **shared,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def n_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once (tied embeddings once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------------------
# 3. Training
# ---------------------------------------------------------------------------------------------------------


def _padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def document_batches(n_statements: int, recipe: FactRecipe) -> list[list[tuple[int, int | None]]]:
    """Per step, ``batch_size`` documents as (first statement, second statement or None), seeded: the same batches
    for both architectures. A step holds documents of one kind, one statement or two (each with probability 1/2), so
    that a batch of single statements is not padded to the length of a pair: Hugging Face's pure-PyTorch Mamba scan
    costs about the square of the padded length in its backward pass."""
    generator = torch.Generator().manual_seed(recipe.seed)
    batches = []
    for _ in range(recipe.steps):
        first = torch.randint(n_statements, (recipe.batch_size,), generator=generator).tolist()
        second = torch.randint(n_statements, (recipe.batch_size,), generator=generator).tolist()
        paired = bool(torch.rand(1, generator=generator) < 0.5)
        batches.append([(a, b if paired else None) for a, b in zip(first, second)])
    return batches


def learning_rate_at(step: int, recipe: FactRecipe) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to a tenth of it."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_fact_model(arch: Architecture, recipe: FactRecipe, folder: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train ``arch`` with ``recipe``, save weights, tokenizer and card to ``folder``; return the card."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    # 1. data: the trained statements, tokenised once; the seeded documents of every step
    world = fact_world(recipe)
    tokenizer = build_fact_tokenizer(world)
    check_world_tokenisation(tokenizer, world)
    statements = training_statements(world)
    encoded = [list(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in statements]
    batches = document_batches(len(statements), recipe)
    # 2. model
    torch.manual_seed(recipe.seed)
    model = build_model(arch, recipe, tokenizer)
    model.train()
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.98), weight_decay=recipe.weight_decay
    )
    # 3. steps: next-token cross-entropy on every real token (gradients on, whatever the caller's mode)
    spec = fact_model_spec(arch, recipe)
    bar = tqdm(batches, desc=f"training {spec.slug}", disable=not progress, unit="step")
    losses: list[float] = []
    with torch.enable_grad():
        for step, batch in enumerate(bar):
            rows = [[tokenizer.bos_token_id, *encoded[a], *(encoded[b] if b is not None else [])] for a, b in batch]
            ids, mask = _padded(rows, tokenizer.pad_token_id)
            labels = ids.masked_fill(mask == 0, -100)
            for group in optimiser.param_groups:
                group["lr"] = learning_rate_at(step, recipe)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.perf_counter() - t0
    model.eval()
    # 4. save, then measure and write the card
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    accuracy = {
        split: fact_accuracy(model, tokenizer, world.facts, split=split, seed=recipe.seed)
        for split in ("trained", "held_out")
    }
    chance = chance_accuracy(world, world.facts)
    card = {
        "fingerprint": fingerprint(arch, recipe),
        "model": spec.display_name,
        "slug": spec.slug,
        "architecture": arch,
        "parameters": n_parameters(model),
        "config": json.loads(model.config.to_json_string()),
        "recipe": asdict(recipe),
        "data": {**world.describe(), "statements_sha256": _statements_sha256(world)},
        "steps": recipe.steps,
        "tokens_seen": int(sum(len(r) + 1 for batch in batches for r in _lengths(batch, encoded))),
        "loss_every_10_steps": losses[::10],
        "final_loss_mean_last_20": float(np.mean(losses[-20:])),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "weights_sha256": file_sha256(folder / "model.safetensors"),
        "accuracy": {split: {k: v for k, v in result.items() if k != "per_fact"} for split, result in accuracy.items()},
        "chance_accuracy": chance,
        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / CARD_FILE).write_text(json.dumps(card, indent=1))
    (folder / "README.md").write_text(card_markdown(card))
    return card


def _lengths(batch: Sequence[tuple[int, int | None]], encoded: Sequence[Sequence[int]]) -> list[list[int]]:
    return [[*encoded[a], *(encoded[b] if b is not None else [])] for a, b in batch]


def _statements_sha256(world: FactWorld) -> str:
    return hashlib.sha256("\n".join(training_statements(world)).encode()).hexdigest()


def fingerprint(arch: Architecture, recipe: FactRecipe) -> dict[str, Any]:
    """What determines the trained weights; a cached model is reused only when its card's fingerprint matches."""
    import transformers

    fields = {
        "format": CARD_FORMAT_VERSION,
        "architecture": arch,
        "recipe": asdict(recipe),
        "statements_sha256": _statements_sha256(fact_world(recipe)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return json.loads(json.dumps(fields))


# ---------------------------------------------------------------------------------------------------------
# What a model knows
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def last_position_logits(hf_model: Any, rows: Sequence[Sequence[int]], pad: int, batch_size: int = 128) -> torch.Tensor:
    """``[n_rows, d_vocab]``: each row's next-token logits (right-padded batches; a pad is never read)."""
    out = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        ids, mask = _padded(chunk, pad)
        logits = hf_model(input_ids=ids, attention_mask=mask).logits
        out.append(logits[torch.arange(len(chunk)), torch.tensor([len(r) - 1 for r in chunk])])
    return torch.cat(out)


def fact_accuracy(
    hf_model: Any,
    tokenizer: Any,
    facts: Sequence[Fact],
    *,
    split: Literal["trained", "held_out"] = "trained",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 accuracy on the facts' trained or held-out prompts: per fact the share of its prompts whose next token
    is the object, then the mean over facts with a 95% bootstrap interval over facts (the unit that varies), and
    ``per_fact`` (fact id -> share) for choosing the facts a model knows."""
    rows, owners, answers = [], [], []
    for i, fact in enumerate(facts):
        prompts = fact.train_prompts if split == "trained" else fact.held_out_prompts
        for prompt in prompts:
            rows.append([tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            owners.append(i)
            answers.append(tokenizer(fact.answer, add_special_tokens=False)["input_ids"][0])
    predicted = last_position_logits(hf_model, rows, tokenizer.pad_token_id).argmax(-1)
    correct = (predicted == torch.tensor(answers)).double()
    per_fact = torch.zeros(len(facts), dtype=torch.float64).index_add_(0, torch.tensor(owners), correct)
    per_fact /= torch.bincount(torch.tensor(owners), minlength=len(facts)).double()
    values = per_fact.numpy()
    interval = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {
        "split": split,
        "n_facts": len(facts),
        "n_prompts": len(rows),
        "accuracy": float(interval.estimate),
        "accuracy_low": float(interval.low),
        "accuracy_high": float(interval.high),
        "per_fact": {fact.fact_id: float(v) for fact, v in zip(facts, values)},
    }


def chance_accuracy(world: FactWorld, facts: Sequence[Fact]) -> float:
    """The accuracy of guessing an object of the right relation uniformly: a model that learned the relations but
    not the facts."""
    return float(np.mean([1 / len(world.relation(f.relation).objects) for f in facts]))


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a short page beside the weights."""
    recipe = card["recipe"]
    acc = card["accuracy"]
    lines = [
        f"# {card['model']}",
        "",
        f"Trained from scratch by mechfin (`mechfin_utils.screener.fact_models`, recipe `{recipe['name']}`) on "
        f"{card['data']['training statements']} statements of {card['data']['facts']} synthetic facts "
        f"({card['data']['subjects']} invented people, {card['data']['relations']} relations; statements sha256 "
        f"`{card['data']['statements_sha256'][:16]}`...). {card['parameters']:,} parameters; {card['steps']} steps of "
        f"{recipe['batch_size']} documents, AdamW lr {recipe['learning_rate']}, seed {recipe['seed']}; "
        f"{card['train_seconds']} s on {card['machine']} ({card['threads']} threads).",
        "",
        f"Weights: `model.safetensors`, sha256 `{card['weights_sha256']}`.",
        "",
        "| prompts | facts | accuracy (95% CI over facts) | chance |",
        "|---|---|---|---|",
    ]
    for split, m in acc.items():
        lines.append(
            f"| {split} | {m['n_facts']} | {m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}] "
            f"| {card['chance_accuracy']:.3f} |"
        )
    lines += ["", "A small model trained here for teaching and testing; not Mamba-2.8b, not a pretrained model.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# 4. Cache and loading
# ---------------------------------------------------------------------------------------------------------


def fact_model_folder(arch: Architecture, recipe: FactRecipe) -> Path:
    return cache_dir() / fact_model_spec(arch, recipe).slug


def read_card(folder: Path) -> dict[str, Any] | None:
    path = folder / CARD_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def ensure_fact_model(
    arch: Architecture, recipe: str | FactRecipe = "full", *, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """The model's folder and card, training it first when no cached copy matches its fingerprint (one process at a
    time: a second waits on the lock, then reads the first's cache)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
        recipe = RECIPES[recipe]
    folder = fact_model_folder(arch, recipe)

    def cached() -> dict[str, Any] | None:
        card = read_card(folder)
        matches = card is not None and card.get("fingerprint") == fingerprint(arch, recipe)
        return card if matches and (folder / "model.safetensors").is_file() else None

    if (card := cached()) is not None:
        return folder, card
    with exclusive(folder.with_name(folder.name + ".lock")):
        if (card := cached()) is not None:
            return folder, card
        if progress:
            print(
                f"Training {fact_model_spec(arch, recipe).display_name} once (cached in {folder})...", file=sys.stderr
            )
        return folder, train_fact_model(arch, recipe, folder, progress=progress)


def load_fact_model(arch: Architecture, recipe: str | FactRecipe = "full", *, verbose: bool = True) -> LoadedModel:
    """The trained model (training it on first use) through the TransformerLens bridge, like every mechfin model."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) and recipe in RECIPES else recipe
    folder, card = ensure_fact_model(arch, recipe, progress=verbose)
    assert isinstance(recipe, FactRecipe)
    spec = fact_model_spec(arch, recipe)
    loaded = boot_bridge(str(folder), spec, source=f"trained here, {folder} (sha256 {card['weights_sha256'][:12]}...)")
    if verbose:
        print(f"Loaded {spec.display_name}: {card['parameters']:,} parameters, trained in {card['train_seconds']} s")
    return loaded


def fact_model_card(model: LoadedModel) -> dict[str, Any]:
    """The card of a loaded fact model (a ValueError for any other model)."""
    card = read_card(cache_dir() / model.slug)
    if card is None:
        raise ValueError(f"{model.name} is not a mechfin fact model (no card in {cache_dir() / model.slug})")
    return card
