"""CounterFact-style evaluation of knowledge edits (Meng et al. 2022), on the facts the embedded model knows.

The edit requests and their test prompts are task data (:mod:`mechfin_utils.tasks.counterfact`: every kept fact
of ``data/counterfact_edits.csv`` with a counterfactual target and three kinds of test prompt). This module scores
an edited model on them, per request:

* **efficacy** — on the edit prompt, does the new object beat the true one (``P(new) > P(true)``)?
* **generalisation** — the share of the relation's paraphrases on which it does;
* **specificity** — the share of *neighbours* (other facts of the same relation) that keep their own answer over
  the new object: an edit that turns every capital into "Berlin" fails here;
* **fluency** — the n-gram entropy of a greedy continuation of the edit prompt (low = repetitive).

:func:`evaluate_edit` measures one edited model on one request; :func:`summarise` gives each method's means with
bootstrap intervals over requests. Comparing with the unedited model's row shows what an edit changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.core.hook_points import padded_logits, target_token_ids
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.stats import grouped_bootstrap
from mechfin_utils.tasks.counterfact import CounterfactEdit

# Reading the model: the probabilities, continuations and n-gram entropy the scores are made of


@torch.no_grad()
def answer_log_probs(
    model: LoadedModel, prompts: Sequence[str], answers: Sequence[Sequence[str]]
) -> Float[Tensor, "prompt answer"]:
    """Log-probability of each answer's *first* token after each prompt: ``[n_prompts, n_answers]``."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
    rows = [model.token_ids(p) for p in prompts]
    log_probs = torch.log_softmax(padded_logits(model, rows).float(), dim=-1)
    out = torch.empty(len(prompts), len(answers[0]))
    for i, (row, options) in enumerate(zip(rows, answers)):
        ids = [target_token_ids(model, a, prompts[i])[0] for a in options]
        out[i] = log_probs[i, len(row) - 1, ids]
    return out


@torch.no_grad()
def generate_greedy(model: LoadedModel, prompts: Sequence[str], n_tokens: int = 30) -> list[list[int]]:
    """Greedy continuations (token ids, prompt excluded) of each prompt, one at a time (no padding effects)."""
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        ids = torch.tensor([model.token_ids(prompt)])
        generated = model.hf_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n_tokens,
            pad_token_id=pad,
        )
        out.append(generated[0, ids.shape[1] :].tolist())
    return out


def ngram_entropy(tokens: Sequence[int], weights: dict[int, float] | None = None) -> float:
    """ROME's fluency score: the weighted mean (2/3 bigram, 4/3 trigram, normalised) of n-gram entropies in bits.

    Repetitive text ("Berlin Berlin Berlin") scores low; varied text high.
    """
    weights = weights or {2: 2 / 3, 3: 4 / 3}
    total = 0.0
    for n, w in weights.items():
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if not grams:
            continue
        counts: dict[tuple, int] = {}
        for g in grams:
            counts[g] = counts.get(g, 0) + 1
        probabilities = [c / len(grams) for c in counts.values()]
        total += w * -sum(p * math.log2(p) for p in probabilities)
    return total / sum(weights.values())


def evaluate_edit(model: LoadedModel, edit: CounterfactEdit, *, n_generated: int = 30) -> dict:
    """The four CounterFact measurements of ``model`` (edited or not) on one request, plus the probabilities."""
    request = edit.request
    pair = (request.target_new, request.target_true)
    # efficacy and generalisation: new vs true after the edit prompt and each paraphrase
    prompts = [request.prompt, *edit.paraphrases]
    scores = answer_log_probs(model, prompts, [pair] * len(prompts))
    new_wins = (scores[:, 0] > scores[:, 1]).float()
    # specificity: each neighbour keeps its own answer over the new object
    neighbour_prompts = [p for p, _ in edit.neighbours]
    neighbour_scores = answer_log_probs(model, neighbour_prompts, [(a, request.target_new) for _, a in edit.neighbours])
    kept = (neighbour_scores[:, 0] > neighbour_scores[:, 1]).float()
    # fluency: a greedy continuation of the edit prompt (n_generated=0: not measured, NaN)
    generated = generate_greedy(model, [request.prompt], n_generated)[0] if n_generated > 0 else []
    return {
        "edit_id": request.edit_id,
        "efficacy": new_wins[0].item(),
        "p_new": scores[0, 0].exp().item(),
        "p_true": scores[0, 1].exp().item(),
        "generalisation": new_wins[1:].mean().item(),
        "specificity": kept.mean().item(),
        "fluency": ngram_entropy(generated) if generated else float("nan"),
        "continuation": model.tokenizer.decode(generated),
    }


METRICS = ("efficacy", "generalisation", "specificity", "fluency")


def summarise(results: pd.DataFrame, by: str = "method", *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per ``by`` group (e.g. method), each metric's mean over requests with a 95% bootstrap interval (NaN bounds
    for a group of one request)."""
    missing = [c for c in (by, *METRICS) if c not in results.columns]
    if missing:
        raise ValueError(f"summarise: results lack column(s) {missing}")
    sizes = results.groupby(by).size()
    resampled = results[results[by].isin(sizes[sizes >= 2].index)]
    single = results[results[by].isin(sizes[sizes < 2].index)]
    parts: list[pd.DataFrame] = []
    for metric in METRICS:
        if len(resampled):
            table = grouped_bootstrap(resampled, by, metric, n_boot=n_boot, seed=seed).set_index(by)
        else:
            table = pd.DataFrame(columns=["n", "estimate", "low", "high"])
        # a group of one request keeps its value, with no interval (one observation has no spread to resample)
        lone = pd.DataFrame(
            {"n": 1, "estimate": single[metric].to_numpy(float), "low": float("nan"), "high": float("nan")},
            index=pd.Index(single[by].to_numpy(), name=by),
        )
        table = pd.concat([table, lone]).sort_index()
        table = table.rename(columns={"estimate": metric, "low": f"{metric}_low", "high": f"{metric}_high"})
        parts.append(table if not parts else table.drop(columns="n"))
    return pd.concat(parts, axis=1)


__all__ = [
    "METRICS",
    "answer_log_probs",
    "evaluate_edit",
    "generate_greedy",
    "ngram_entropy",
    "summarise",
]
