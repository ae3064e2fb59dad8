"""A task in a base model and in its fine-tuned version: did the task improve, and does the improvement run through the
base model's circuit?

Prakash et al. (2024, "Fine-tuning enhances existing mechanisms") answer "through the same circuit" when the base
model's circuit, found before fine-tuning, still carries the fine-tuned model's behaviour, and the fine-tuned model's
own circuit is mostly the same edges. Every measurement here is read against its own noise, because two circuits
chosen from a few dozen prompts differ even when they come from one model (:mod:`~mechfin_utils.methods.circuits.stability`):

1. **behaviour** -- :func:`task_scores`: each prompt's task score (clean, corrupted, and their difference) under a
   model, by a plain forward pass; the change is a paired bootstrap over prompts (``core.stats.paired_bootstrap_ci``);
2. **overlap** -- :func:`circuit_overlap`: the Jaccard overlap of the two models' top-n circuits at one size, beside
   the overlap of each model's circuit with itself across bootstrap resamples of the prompts (its own noise at this
   n) and the overlap of the two models' circuits across the same resamples. Cross-model overlap as high as the
   self-overlaps means the data cannot tell the two circuits apart; far below them, the circuits differ;
3. **transfer** -- :func:`circuit_transfer`: every circuit run inside every model by exact edge patching
   (faithfulness with a bootstrap interval over prompts), random circuits of the same size beside them, and the paired
   difference between the base model's circuit and the fine-tuned model's own circuit inside the fine-tuned model.

Which components carry the gain is cross-model activation patching
(:func:`mechfin_utils.methods.patching.cross_model.cross_model_task_patching`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechfin_utils.core.functional import FunctionalTransformer, functional_model
from mechfin_utils.core.stats import BootstrapResult, bootstrap_distribution, normalised_ci
from mechfin_utils.methods.circuits.edges import EdgePatcher, EdgeScores, random_edges, top_edges
from mechfin_utils.methods.circuits.stability import bootstrap_circuits, jaccard
from mechfin_utils.tasks.circuit_tasks import CircuitTask

# ---------------------------------------------------------------------------------------------------------
# 1. Behaviour
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def task_scores(model, task: CircuitTask) -> pd.DataFrame:
    """Every prompt's task score under ``model`` (a plain forward pass per batch): columns ``prompt_id``, ``clean``,
    ``corrupted`` and ``gap`` (clean - corrupted), in the task's prompt order."""
    fm = model if isinstance(model, FunctionalTransformer) else functional_model(model)
    rows: dict[str, list[float]] = {"clean": [], "corrupted": []}
    for batch in task.batches:
        for run, tokens in (("clean", batch.clean_tokens), ("corrupted", batch.corrupted_tokens)):
            rows[run] += batch.score(fm.logits(tokens)[:, -batch.read_positions :]).double().tolist()
    frame = pd.DataFrame({"prompt_id": task.ids, **rows})
    return frame.assign(gap=frame["clean"] - frame["corrupted"])


# ---------------------------------------------------------------------------------------------------------
# 2. Overlap against each circuit's own noise
# ---------------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    low, high = np.quantile(values, [0.05, 0.95])
    return {"mean": float(np.mean(values)), "p05": float(low), "p95": float(high)}


@dataclass
class CircuitOverlap:
    """Two models' top-n circuits of one task at one size ``n_edges``, and the noise to read their overlap against.

    ``jaccard``: the two circuits chosen from every prompt. Over ``n_boot`` bootstrap resamples of the prompts (the
    same resamples for both models): ``self_base`` and ``self_tuned``, the Jaccard of one model's circuits from two
    different resamples (every pair); ``cross``, the Jaccard of the base model's circuit from one resample with the
    fine-tuned model's from another (every pair), so that cross and self compare alike."""

    n_edges: int
    n_prompts: int
    n_boot: int
    jaccard: float
    self_base: list[float]
    self_tuned: list[float]
    cross: list[float]

    def summary(self) -> dict[str, float | int]:
        """Means and 5th-95th percentiles of the three overlaps, and ``cross_over_self``: the mean cross overlap over
        the geometric mean of the two self-overlaps (1: the two circuits are as alike as one circuit is to itself
        under resampling; well below 1: they differ beyond the sample's noise)."""
        own = float(np.sqrt(np.mean(self.self_base) * np.mean(self.self_tuned)))
        out: dict[str, float | int] = {"n_edges": self.n_edges, "n_prompts": self.n_prompts, "n_boot": self.n_boot}
        out["jaccard"] = self.jaccard
        for name, values in (("self_base", self.self_base), ("self_tuned", self.self_tuned), ("cross", self.cross)):
            out |= {f"{name}_{key}": value for key, value in _spread(values).items()}
        out["cross_over_self"] = float(np.mean(self.cross)) / own if own > 0 else float("nan")
        return out


def circuit_overlap(
    base: EdgeScores, tuned: EdgeScores, n_edges: int, *, n_boot: int = 30, seed: int = 0
) -> CircuitOverlap:
    """The overlap of ``base``'s and ``tuned``'s top-``n_edges`` circuits (scores of the same prompts, in the same order,
    on one graph), with the bootstrap noise of :class:`CircuitOverlap`. No forward pass."""
    if base.ids != tuned.ids:
        raise ValueError(
            f"the score sets cover different prompts ({len(base.ids)} for {base.model_name}, {len(tuned.ids)} for "
            f"{tuned.model_name}, or another order): overlap needs the same prompts"
        )
    if base.per_prompt.shape != tuned.per_prompt.shape:
        raise ValueError(f"score shapes differ: {tuple(base.per_prompt.shape)} vs {tuple(tuned.per_prompt.shape)}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    base_circuits = bootstrap_circuits(base, n_edges, n_boot=n_boot, seed=seed)
    tuned_circuits = bootstrap_circuits(tuned, n_edges, n_boot=n_boot, seed=seed)
    pairs = list(itertools.combinations(range(n_boot), 2))
    return CircuitOverlap(
        n_edges=int(n_edges),
        n_prompts=int(base.per_prompt.shape[0]),
        n_boot=int(n_boot),
        jaccard=jaccard(top_edges(base.mean, n_edges), top_edges(tuned.mean, n_edges)),
        self_base=[jaccard(base_circuits[i], base_circuits[j]) for i, j in pairs],
        self_tuned=[jaccard(tuned_circuits[i], tuned_circuits[j]) for i, j in pairs],
        cross=[jaccard(base_circuits[i], tuned_circuits[j]) for i, j in pairs],
    )


# ---------------------------------------------------------------------------------------------------------
# 3. Every circuit inside every model
# ---------------------------------------------------------------------------------------------------------


def normalised_difference(
    a: Float[np.ndarray, " n"],
    b: Float[np.ndarray, " n"],
    zero: Float[np.ndarray, " n"],
    one: Float[np.ndarray, " n"],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> BootstrapResult:
    """The difference of two normalised metrics on the same prompts, ``(mean(a) - mean(b)) / (mean(one) - mean(zero))``
    (two circuits' faithfulness in one model), with a 95% interval resampling the prompts jointly for both."""
    boot = bootstrap_distribution(np.stack([a, b, zero, one], axis=1), n_boot=n_boot, seed=seed)  # [n_boot, 4]
    span = boot[:, 3] - boot[:, 2]
    usable = span != 0
    if usable.sum() < n_boot / 2:
        raise ValueError(f"mean(one) - mean(zero) is 0 in {int((~usable).sum())} of {n_boot} resamples")
    low, high = np.quantile((boot[usable, 0] - boot[usable, 1]) / span[usable], [0.025, 0.975])
    estimate = (np.mean(a) - np.mean(b)) / (np.mean(one) - np.mean(zero))
    return BootstrapResult(float(estimate), float(low), float(high), n=len(a), n_boot=int(n_boot))


@dataclass
class CircuitTransfer:
    """What :func:`circuit_transfer` measured: ``table`` (one row per model and circuit), each circuit's per-prompt
    scores inside each model (``prompt_scores[(model, circuit)]``), and the patchers."""

    table: pd.DataFrame
    prompt_scores: dict[tuple[str, str], Float[Tensor, " n_prompts"]]
    patchers: dict[str, EdgePatcher]

    def difference(self, model: str, circuit: str, reference: str, *, n_boot: int = 1000, seed: int = 0):
        """Faithfulness of ``circuit`` minus that of ``reference`` inside ``model``, with a paired interval."""
        patcher = self.patchers[model]
        return normalised_difference(
            self.prompt_scores[(model, circuit)].double().numpy(),
            self.prompt_scores[(model, reference)].double().numpy(),
            patcher.corrupted_prompt_scores.double().numpy(),
            patcher.clean_prompt_scores.double().numpy(),
            n_boot=n_boot,
            seed=seed,
        )


def circuit_transfer(
    patchers: Mapping[str, EdgePatcher],
    circuits: Mapping[str, Bool[Tensor, "n_senders n_receivers"]],
    *,
    n_random: int = 3,
    n_boot: int = 1000,
    seed: int = 0,
) -> CircuitTransfer:
    """Every circuit of ``circuits`` (name -> kept edges) inside every model of ``patchers`` (name -> an
    :class:`EdgePatcher` of that model on the same prompts and graph), by exact edge patching: faithfulness with a 95%
    bootstrap interval over prompts; then ``n_random`` random circuits of each circuit size in each model (rows
    ``circuit = "random"``: their mean, and their smallest and largest as ``low`` and ``high``)."""
    graphs = {name: (p.graph.n_senders, p.graph.n_receivers) for name, p in patchers.items()}
    if len(set(graphs.values())) != 1:
        raise ValueError(f"the models' graphs differ: {graphs}; circuits transfer only between one architecture")
    id_sets = {name: p.task.ids for name, p in patchers.items()}
    if any(ids != next(iter(id_sets.values())) for ids in id_sets.values()):
        raise ValueError("the patchers run different prompts: circuits must be compared on the same prompts")
    shape = next(iter(patchers.values())).valid.shape
    for name, kept in circuits.items():
        if kept.shape != shape:
            raise ValueError(f"circuit {name!r} has shape {tuple(kept.shape)}, the graph {tuple(shape)}")
    rows, scores = [], {}
    generator = torch.Generator().manual_seed(seed)
    for model, patcher in patchers.items():
        zero, one = patcher.corrupted_prompt_scores.double().numpy(), patcher.clean_prompt_scores.double().numpy()
        for circuit, kept in circuits.items():
            scores[(model, circuit)] = values = patcher.prompt_scores(patcher.valid & ~kept)
            interval = normalised_ci(values.double().numpy(), zero, one, n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "model": model,
                    "circuit": circuit,
                    "n_edges": int(kept.sum()),
                    "faithfulness": float(interval.estimate),
                    "low": float(interval.low),
                    "high": float(interval.high),
                }
            )
        for size in sorted({int(kept.sum()) for kept in circuits.values()}):
            drawn = [patcher.faithfulness(random_edges(patcher.graph, size, generator)) for _ in range(n_random)]
            rows.append(
                {
                    "model": model,
                    "circuit": "random",
                    "n_edges": size,
                    "faithfulness": float(np.mean(drawn)),
                    "low": float(np.min(drawn)),
                    "high": float(np.max(drawn)),
                }
            )
    return CircuitTransfer(pd.DataFrame(rows), scores, dict(patchers))
