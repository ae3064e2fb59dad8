"""CounterFact-style evaluation of knowledge edits (Meng et al. 2022), on the facts the embedded model knows.

``data/counterfact_edits.csv`` (built by ``data/build_counterfact.py``; data card: ``data/README.md``) gives every
kept fact a counterfactual target and three kinds of test prompt. For an edited model, per request:

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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .editing import EditRequest, padded_logits, target_token_ids
from .models import LoadedModel
from .stats import grouped_bootstrap
from .tasks import TaskDataError, _where, raise_problems, read_task_rows
from .trace_data import FACTUAL_PROMPTS_CSV, read_factual_candidates

COUNTERFACT_CSV = Path(__file__).resolve().parent.parent / "data" / "counterfact_edits.csv"
COUNTERFACT_COLUMNS = (
    "edit_id",
    "fact_id",
    "category",
    "subject",
    "prompt",
    "target_true",
    "target_new",
    "target_new_from",
    "paraphrases",
    "neighbours",
)
PARAPHRASE_SEPARATOR = " | "


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


@torch.no_grad()
def next_token_logits(model: LoadedModel, prompt: str) -> Float[Tensor, " d_vocab"]:
    """The logits of the token after ``prompt`` (with the model's BOS decision)."""
    return padded_logits(model, [model.token_ids(prompt)])[0, -1]


@dataclass(frozen=True)
class CounterfactEdit:
    """One edit request with its test prompts; ``neighbours`` are (prompt, that prompt's true answer)."""

    request: EditRequest
    category: str
    paraphrases: tuple[str, ...]
    neighbours: tuple[tuple[str, str], ...]


def load_counterfact(path: str | Path | None = None, facts_path: str | Path | None = None) -> list[CounterfactEdit]:
    """Every edit request of the file, validated; all bad rows are reported at once, each with its line.

    Checks beyond the shared task-file rules: the subject occurs in the prompt and in each paraphrase, both targets
    begin with a space and differ, and every neighbour id is a fact of ``factual_prompts.csv``.
    """
    path = Path(path) if path is not None else COUNTERFACT_CSV
    facts = read_factual_candidates(facts_path if facts_path is not None else FACTUAL_PROMPTS_CSV)
    fact_rows = {row.fact_id: (row.prompt, row.answer) for row in facts.itertuples()}
    rows, problems = read_task_rows(path, COUNTERFACT_COLUMNS, "edit_id")
    edits = []
    for line, row in rows:
        where = _where(path, line, "edit_id", row["edit_id"])
        paraphrases = tuple(p.strip() for p in row["paraphrases"].split(PARAPHRASE_SEPARATOR.strip()))
        neighbour_ids = [n.strip() for n in row["neighbours"].split(";") if n.strip()]
        found = []
        if row["subject"] not in row["prompt"]:
            found.append(f"field 'subject': {row['subject']!r} is not in the prompt {row['prompt']!r}")
        found += [
            f"field 'paraphrases': {p!r} does not contain the subject {row['subject']!r}"
            for p in paraphrases
            if row["subject"] not in p
        ]
        for column in ("target_true", "target_new"):
            if not row[column].startswith(" "):
                found.append(f"field {column!r}: {row[column]!r} must start with a space (the next token's)")
        if row["target_true"] == row["target_new"]:
            found.append(f"field 'target_new': equals target_true {row['target_true']!r}")
        unknown = [n for n in neighbour_ids if n not in fact_rows]
        if unknown:
            found.append(f"field 'neighbours': {unknown} are not fact ids of {Path(FACTUAL_PROMPTS_CSV).name}")
        if found:
            problems.append((line, f"{where}: " + "; ".join(found)))
            continue
        request = EditRequest(row["edit_id"], row["prompt"], row["subject"], row["target_new"], row["target_true"])
        edits.append(CounterfactEdit(request, row["category"], paraphrases, tuple(fact_rows[n] for n in neighbour_ids)))
    raise_problems(path, problems)
    return edits


def requests_known_to(model: LoadedModel, edits: Sequence[CounterfactEdit]) -> list[CounterfactEdit]:
    """The edits whose true answer is this model's top-1 next token on the edit prompt (edits of facts a model does
    not know measure nothing). The CSV is built from SmolLM2's filter; another model keeps its own subset."""
    if not edits:
        return []
    return [
        edit
        for edit in edits
        if next_token_logits(model, edit.request.prompt).argmax().item()
        == target_token_ids(model, edit.request.target_true, edit.request.edit_id)[0]
    ]


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
    # fluency: a greedy continuation of the edit prompt
    generated = generate_greedy(model, [request.prompt], n_generated)[0]
    return {
        "edit_id": request.edit_id,
        "efficacy": new_wins[0].item(),
        "p_new": scores[0, 0].exp().item(),
        "p_true": scores[0, 1].exp().item(),
        "generalisation": new_wins[1:].mean().item(),
        "specificity": kept.mean().item(),
        "fluency": ngram_entropy(generated),
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
    parts = []
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
    "COUNTERFACT_CSV",
    "CounterfactEdit",
    "METRICS",
    "TaskDataError",
    "answer_log_probs",
    "evaluate_edit",
    "generate_greedy",
    "next_token_logits",
    "ngram_entropy",
    "load_counterfact",
    "requests_known_to",
    "summarise",
]
