"""Edge-level circuits: exact edge patching, EAP and EAP-IG scores, top-n and greedy circuits, faithfulness curves.

Node-level pruning (:mod:`mechfin_utils.methods.circuits.nodes`) asks which heads and MLPs are needed. The field's standard is one
level finer: which *edges* of the computational graph (:mod:`mechfin_utils.core.graph`) -- sender output to receiver
input -- carry the behaviour. A model has tens of thousands of edges (70,651 for SmolLM2-135M), so testing each one by
patching is out of reach on a CPU; gradients score them all at once:

* **EAP** (Syed et al. 2023, edge attribution patching): the first-order estimate of what patching edge
  ``sender -> receiver`` does to the metric, ``(corrupted_sender - clean_sender) . dm/d(input_receiver)``, with the gradient taken once on the clean run.
  Two passes (one forward, one backward) for every edge of every prompt.
* **EAP-IG** (Hanna et al. 2024): the same product with the gradient averaged over ``steps`` runs whose input
  embeddings move from clean to corrupted (integrated gradients on the inputs; midpoints ``(k + 1/2) / steps``).
  It fixes EAP's failure where the metric saturates (a gradient of ~0 at the clean point), costs ``steps`` times
  more, and is the method the MIB benchmark ranks highest. Summed over the edges leaving the input, its scores add
  up to ``metric(corrupted) - metric(clean)`` (completeness; tested).

Scores are kept per prompt (the metric is a mean over prompts that run independently, so each prompt's gradient is
its own); a bootstrap over prompts (:func:`bootstrap_stability`) then costs no forward pass at all.

A **circuit** is a set of kept edges; every other edge is patched (its receiver reads the corrupted run's output of
that sender, :func:`mechfin_utils.core.engine.run_edges`). Its **faithfulness** is the normalised metric
``(metric(circuit) - metric(corrupted)) / (metric(clean) - metric(corrupted))``, measured by exact edge patching,
never by the scores. Circuits come from the scores by **top-n** (the ``n`` edges of largest ``|score|``) or **greedy**
selection (from the logits backwards, always the highest ``|score|`` edge into a node already in the circuit: no
edge into a node that cannot reach the output).

Typical use::

    task = circuit_tasks.greater_than_task(model, n_prompts=8)
    patcher = EdgePatcher(model, task)
    scores = edge_scores(patcher, "EAP-IG", steps=5)
    kept = top_edges(scores.mean, 200)
    patcher.faithfulness(kept), patcher.graph.edge_list(kept)[:10]
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechfin_utils.core import engine
from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.graph import ComputationalGraph
from mechfin_utils.core.stats import BootstrapResult, normalised_ci
from mechfin_utils.tasks.circuit_tasks import CircuitTask

Method = Literal["EAP", "EAP-IG"]
METHODS: tuple[str, ...] = ("EAP", "EAP-IG")


# ---------------------------------------------------------------------------------------------------------
# Exact edge patching of a task
# ---------------------------------------------------------------------------------------------------------


PAD_TOKEN = 0
"""Fills the right end of shorter prompts in a padded batch. Any id does: causal attention keeps every real position
from reading a later one, and each prompt is read at its own last positions."""

MAX_BATCH_TOKENS = 1024
"""Prompts x padded length of one padded batch: EAP-IG keeps a gradient per receiver and token (about 1.1 MB a token
on SmolLM2-135M), so this bounds its memory to a few GB while the batches stay large enough to run efficiently."""


@dataclass
class _EdgeBatch:
    """Consecutive batches of the task, padded on the right to one length and run as one. ``parts`` are each original
    batch's rows and score function; ``read_ends`` each prompt's own length (None: all of one length)."""

    clean_tokens: Int[Tensor, "n pos"]
    corrupted_tokens: Int[Tensor, "n pos"]
    parts: list[tuple[slice, Callable[[Tensor], Tensor]]]
    read_positions: int
    read_ends: Int[Tensor, " n"] | None
    clean_outputs: Float[Tensor, "n_senders n pos d_model"]
    corrupted_outputs: Float[Tensor, "n_senders n pos d_model"]

    def score(self, logits: Float[Tensor, "n read d_vocab"]) -> Float[Tensor, " n"]:
        """Each original batch's score on its own rows, in the task's order."""
        return torch.cat([score(logits[rows]) for rows, score in self.parts])


def padded_groups(batches: Sequence, max_tokens: int = MAX_BATCH_TOKENS) -> list[list]:
    """Consecutive task batches joined while the padded batch stays within ``max_tokens`` (prompts x longest length);
    batches that read a different number of positions are never joined. The task's prompt order is kept."""
    groups: list[list] = []
    for batch in batches:
        if groups:
            last = groups[-1]
            n = sum(b.batch_size for b in last) + batch.batch_size
            longest = max(int(b.clean_tokens.shape[1]) for b in [*last, batch])
            if last[0].read_positions == batch.read_positions and n * longest <= max_tokens:
                last.append(batch)
                continue
        groups.append([batch])
    return groups


def _pad(rows: Sequence[Tensor], length: int) -> Int[Tensor, "n pos"]:
    return torch.cat([torch.nn.functional.pad(r, (0, length - r.shape[1]), value=PAD_TOKEN) for r in rows])


class EdgePatcher:
    """Runs a :class:`~mechfin_utils.tasks.circuit_tasks.CircuitTask` with any set of edges patched, and scores it.

    On construction it records every sender's output on the clean and on the corrupted prompts of every batch,
    then measures the clean run (nothing patched) and the corrupted run (every edge patched; checked to equal a
    plain forward pass on the corrupted prompts). GPT-2 and Llama-family models (the functional forward pass).
    Consecutive batches of the task (one token length each) are joined into right-padded batches of up to
    ``max_batch_tokens`` prompts x tokens (:func:`padded_groups`), each prompt read at its own last token; 0 keeps
    every batch apart.
    """

    def __init__(self, model, task: CircuitTask, *, max_batch_tokens: int = MAX_BATCH_TOKENS):
        self.fm = model if isinstance(model, FunctionalTransformer) else FunctionalTransformer.from_model(model)
        self.model_name = self.fm.name
        self.task = task
        self.graph = ComputationalGraph.of(self.fm)
        self.valid = self.graph.valid()
        self.n_forward_passes = 0
        self._measured: dict[tuple[str, float], Tensor] = {}  # prompt scores of each patched set run so far
        self.batches: list[_EdgeBatch] = []
        plain_corrupted = []  # the corrupted prompts' scores from a plain run, to check the graph against
        with torch.no_grad():
            # Batches of several token lengths are padded on the right and run as one (far fewer, larger passes).
            for group in padded_groups(task.batches, max_batch_tokens):
                length = max(int(b.clean_tokens.shape[1]) for b in group)
                sizes = [b.batch_size for b in group]
                starts = np.cumsum([0, *sizes])
                lengths = torch.tensor([int(b.clean_tokens.shape[1]) for b in group]).repeat_interleave(
                    torch.tensor(sizes)
                )
                read_ends = None if bool((lengths == length).all()) else lengths
                clean_tokens = _pad([b.clean_tokens for b in group], length)
                corrupted_tokens = _pad([b.corrupted_tokens for b in group], length)
                n_read = group[0].read_positions
                clean = engine.run_edges(
                    self.fm, self.graph, clean_tokens, keep_outputs=True, n_read=n_read, read_ends=read_ends
                )
                corrupted = engine.run_edges(
                    self.fm, self.graph, corrupted_tokens, keep_outputs=True, n_read=n_read, read_ends=read_ends
                )
                assert clean.outputs is not None and corrupted.outputs is not None  # kept: keep_outputs=True
                edge_batch = _EdgeBatch(
                    clean_tokens,
                    corrupted_tokens,
                    [(slice(int(a), int(b)), batch.score) for a, b, batch in zip(starts[:-1], starts[1:], group)],
                    n_read,
                    read_ends,
                    clean.outputs,
                    corrupted.outputs,
                )
                self.batches.append(edge_batch)
                plain_corrupted.append(edge_batch.score(self.fm.unembed(corrupted.final_normed)).float())
        self.clean_prompt_scores = self.prompt_scores(None)
        self.corrupted_prompt_scores = self.prompt_scores(self.valid)
        self.clean_metric = float(self.clean_prompt_scores.mean())
        self.corrupted_metric = float(self.corrupted_prompt_scores.mean())
        plain = float(torch.cat(plain_corrupted).mean())
        if abs(plain - self.corrupted_metric) > 1e-3 * max(1.0, abs(plain)):
            raise RuntimeError(
                f"every edge patched gives {self.corrupted_metric:.6g}, the corrupted run {plain:.6g}: the graph is wrong"
            )
        if abs(self.clean_metric - self.corrupted_metric) < 1e-6:
            raise ValueError(
                f"{task.name} on {self.model_name}: clean and corrupted runs score the same "
                f"({self.clean_metric:.6g}); the normalised metric is undefined"
            )

    def prompt_scores(
        self, patched: Bool[Tensor, "n_senders n_receivers"] | None, *, kept_sum_above: float = 0.5, reuse: bool = True
    ) -> Float[Tensor, " n_prompts"]:
        """Every prompt's task score with the edges in ``patched`` patched (None: the clean run). ``kept_sum_above``
        chooses how the engine sums the patched edges (:func:`~mechfin_utils.core.edge_engine.run_edges`; the bench
        times both).

        A set that leaves no path of clean edges from the input to the logits is the corrupted run itself
        (:meth:`~mechfin_utils.core.graph.ComputationalGraph.input_reaches_logits`): its scores are the corrupted run's,
        read without a pass (small random circuits, the baseline every circuit is compared with, mostly are). A set
        already run on this patcher is read back, not run again (a curve's point and the headline circuit's interval).
        ``reuse=False`` runs the engine whatever the set (the bench times it)."""
        corrupted = getattr(self, "corrupted_prompt_scores", None)  # measured once, on construction
        if (
            reuse
            and patched is not None
            and corrupted is not None
            and not self.graph.input_reaches_logits(self.valid & ~patched)
        ):
            return corrupted.clone()
        key = (
            None
            if patched is None or not reuse
            else (hashlib.sha256(patched.numpy().tobytes()).hexdigest(), kept_sum_above)
        )
        if key in self._measured:  # the same set again (a curve's point and the headline circuit): read, not rerun
            return self._measured[key].clone()
        out = []
        with torch.no_grad():
            for batch in self.batches:
                run = engine.run_edges(
                    self.fm,
                    self.graph,
                    batch.clean_tokens,
                    patched=patched,
                    sources=batch.corrupted_outputs if patched is not None else None,
                    n_read=batch.read_positions,
                    read_ends=batch.read_ends,
                    kept_sum_above=kept_sum_above,
                )
                self.n_forward_passes += 1
                out.append(batch.score(self.fm.unembed(run.final_normed)).float())
        scores = torch.cat(out)
        if key is not None:
            self._measured[key] = scores.clone()
        return scores

    def metric(self, patched: Bool[Tensor, "n_senders n_receivers"] | None) -> float:
        return float(self.prompt_scores(patched).mean())

    def normalise(self, value: float) -> float:
        return (value - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)

    def faithfulness(self, kept: Bool[Tensor, "n_senders n_receivers"]) -> float:
        """The normalised metric with only ``kept`` edges clean (every other edge patched)."""
        return self.normalise(self.metric(self.valid & ~kept))

    def faithfulness_interval(
        self, kept: Bool[Tensor, "n_senders n_receivers"], *, n_boot: int = 1000, seed: int = 0
    ) -> BootstrapResult:
        """:meth:`faithfulness` with a 95% bootstrap interval over prompts (each resample renormalises by its own
        clean and corrupted means, :func:`~mechfin_utils.core.stats.normalised_ci`)."""
        circuit = self.prompt_scores(self.valid & ~kept)
        return normalised_ci(
            circuit.double().numpy(),
            self.corrupted_prompt_scores.double().numpy(),
            self.clean_prompt_scores.double().numpy(),
            n_boot=n_boot,
            seed=seed,
        )

    def __repr__(self) -> str:
        return (
            f"EdgePatcher({self.model_name}, {self.task.name}: {self.graph.n_edges} edges, clean "
            f"{self.clean_metric:.4f}, corrupted {self.corrupted_metric:.4f})"
        )


# ---------------------------------------------------------------------------------------------------------
# EAP and EAP-IG scores
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EdgeScores:
    """Per-prompt edge scores ``[n_prompts, n_senders, n_receivers]`` (0 off the graph's edges): each is the estimated
    change of that prompt's metric when the edge alone is patched (negative: the edge carries the clean behaviour)."""

    method: str
    steps: int
    model_name: str
    task_name: str
    graph: ComputationalGraph
    ids: list[str]
    per_prompt: Float[Tensor, "n_prompts n_senders n_receivers"]
    seconds: float = 0.0

    @property
    def mean(self) -> Float[Tensor, "n_senders n_receivers"]:
        return self.per_prompt.mean(0)

    def table(self, n: int = 20) -> pd.DataFrame:
        """The ``n`` edges of largest ``|score|``."""
        mean = self.mean
        flat = mean.abs().flatten().topk(n).indices
        rows = [divmod(int(i), self.graph.n_receivers) for i in flat]
        return pd.DataFrame(
            {
                "edge": [self.graph.edge_name(sender, receiver) for sender, receiver in rows],
                "score": [float(mean[sender, receiver]) for sender, receiver in rows],
            }
        )


def edge_scores(patcher: EdgePatcher, method: Method = "EAP-IG", steps: int = 5) -> EdgeScores:
    """EAP (``method="EAP"``, one gradient at the clean run) or EAP-IG (``steps`` gradients along the straight line
    from the clean to the corrupted input embeddings) scores of every edge, per prompt."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "EAP-IG" and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer for EAP-IG, got {steps!r}")
    fm, graph = patcher.fm, patcher.graph
    alphas = [0.0] if method == "EAP" else [(k + 0.5) / steps for k in range(steps)]
    started = time.perf_counter()
    per_prompt = []
    for batch in patcher.batches:
        # 1. The activation difference of every sender, and a zero offset at every receiver to read gradients from.
        diff = batch.corrupted_outputs - batch.clean_outputs  # [n_senders, n, pos, d_model]
        offsets = torch.zeros(
            graph.n_receivers, *batch.clean_tokens.shape, fm.d_model, dtype=diff.dtype, requires_grad=True
        )
        clean_embed, corrupted_embed = fm.embed(batch.clean_tokens).detach(), fm.embed(batch.corrupted_tokens).detach()
        # 2. Gradients of the summed score (each prompt's rows get that prompt's own gradient), averaged over alphas.
        grads = torch.zeros_like(offsets)
        for alpha in alphas:
            embeddings = clean_embed + alpha * (corrupted_embed - clean_embed)
            with torch.enable_grad():
                run = engine.run_edges(
                    fm,
                    graph,
                    batch.clean_tokens,
                    embeddings=embeddings,
                    receiver_offsets=offsets,
                    n_read=batch.read_positions,
                    read_ends=batch.read_ends,
                )
                total = batch.score(fm.unembed(run.final_normed)).sum()
                (grad,) = torch.autograd.grad(total, offsets)
            grads += grad
            patcher.n_forward_passes += 1
        grads /= len(alphas)
        # 3. Score = difference . gradient, summed over positions and the model dimension, per prompt.
        scores = torch.einsum("snpd,rnpd->nsr", diff, grads)  # s: sender, r: receiver, n: prompt, p: position
        per_prompt.append(scores * patcher.valid)
    return EdgeScores(
        method=method,
        steps=1 if method == "EAP" else steps,
        model_name=patcher.model_name,
        task_name=patcher.task.name,
        graph=graph,
        ids=patcher.task.ids,
        per_prompt=torch.cat(per_prompt).detach(),
        seconds=time.perf_counter() - started,
    )


def task_chunks(task: CircuitTask, max_prompts: int) -> list[CircuitTask]:
    """``task`` cut into consecutive tasks of whole batches, each of at most ``max_prompts`` prompts (a batch larger
    than that is a chunk of its own): the first chunk is the task's first prompts."""
    if max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    groups: list[list] = [[]]
    for batch in task.batches:
        if groups[-1] and sum(b.batch_size for b in groups[-1]) + batch.batch_size > max_prompts:
            groups.append([])
        groups[-1].append(batch)
    return [CircuitTask(task.name, task.metric_name, group, notes=task.notes) for group in groups]


def edge_scores_in_chunks(
    model,
    task: CircuitTask,
    methods: Sequence[Method] = ("EAP", "EAP-IG"),
    *,
    steps: int = 5,
    max_prompts: int = 32,
    first: EdgePatcher | None = None,
) -> dict[str, EdgeScores]:
    """:func:`edge_scores` of every prompt of a task too large for one :class:`EdgePatcher` in memory (a patcher keeps
    every sender's output on every prompt: about 25 MB a greater-than prompt on SmolLM2-135M). The task is cut into
    chunks of whole batches (:func:`task_chunks`), each gets its own patcher in turn, and each method's per-prompt
    scores are joined in the task's prompt order; scores are per prompt, so they equal one patcher's. ``first``: a
    patcher already built on the first chunk (it is reused)."""
    parts: dict[str, list[EdgeScores]] = {method: [] for method in methods}
    for i, chunk in enumerate(task_chunks(task, max_prompts)):
        patcher = first if i == 0 and first is not None and first.task.ids == chunk.ids else EdgePatcher(model, chunk)
        for method in methods:
            parts[method].append(edge_scores(patcher, method, steps=steps))
        del patcher
    return {
        method: dataclasses.replace(
            scores[0],
            task_name=task.name,
            ids=[i for part in scores for i in part.ids],
            per_prompt=torch.cat([part.per_prompt for part in scores]),
            seconds=sum(part.seconds for part in scores),
        )
        for method, scores in parts.items()
    }


# ---------------------------------------------------------------------------------------------------------
# Circuits from scores
# ---------------------------------------------------------------------------------------------------------


def top_edges(scores: Float[Tensor, "n_senders n_receivers"], n: int) -> Bool[Tensor, "n_senders n_receivers"]:
    """The ``n`` edges of largest ``|score|`` (cells off the graph score exactly 0 and come last)."""
    if not 0 <= n <= scores.numel():
        raise ValueError(f"n must be in [0, {scores.numel()}], got {n}")
    kept = torch.zeros(scores.numel(), dtype=torch.bool)
    kept[scores.abs().flatten().topk(n).indices] = True
    return kept.view_as(scores)


def greedy_edges(
    scores: Float[Tensor, "n_senders n_receivers"], graph: ComputationalGraph, n: int
) -> Bool[Tensor, "n_senders n_receivers"]:
    """Grow a circuit from the logits backwards: repeatedly add the highest-``|score|`` edge into a receiver of a node
    already in the circuit (the logits at first); its sender's receivers then join the candidates."""
    valid = graph.valid()
    if not 0 <= n <= int(valid.sum()):
        raise ValueError(f"n must be in [0, {int(valid.sum())}], got {n}")
    magnitude = scores.abs()
    receivers_of: dict[int, list[int]] = {}
    for receiver in range(graph.n_receivers - 1):
        for sender in graph.receiver_senders(receiver):
            receivers_of.setdefault(sender, []).append(receiver)
    kept = torch.zeros_like(valid)
    heap: list[tuple[float, int, int]] = []
    in_circuit: set[int] = set()

    def open_receiver(receiver: int) -> None:
        for sender in valid[:, receiver].nonzero().flatten().tolist():
            heapq.heappush(heap, (-float(magnitude[sender, receiver]), sender, receiver))

    open_receiver(graph.logits_receiver)
    count = 0
    while count < n and heap:
        _, sender, receiver = heapq.heappop(heap)
        kept[sender, receiver] = True
        count += 1
        if sender != 0 and sender not in in_circuit:
            in_circuit.add(sender)
            for next_receiver in receivers_of[sender]:
                if not any(other in in_circuit for other in graph.receiver_senders(next_receiver) if other != sender):
                    open_receiver(next_receiver)  # a shared key/value receiver opens once
    return kept


SELECTIONS: dict[str, Callable] = {
    "top-n": lambda scores, graph, n: top_edges(scores, n),
    "greedy": greedy_edges,
}


def _curve_row(patcher: EdgePatcher, method: str, kept: Tensor, detail: str, n_boot: int, seed: int) -> dict:
    """One point of a faithfulness curve: the circuit's size, its faithfulness and a 95% interval over prompts."""
    interval = patcher.faithfulness_interval(kept, n_boot=n_boot, seed=seed)
    return {
        "method": method,
        "n_edges": int(kept.sum()),
        "n_nodes": len(patcher.graph.nodes_of(kept)),
        "faithfulness": float(interval.estimate),
        "low": float(interval.low),
        "high": float(interval.high),
        "detail": detail,
    }


def faithfulness_curve(
    patcher: EdgePatcher,
    scores: EdgeScores,
    counts: Sequence[int],
    selection: str = "top-n",
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Faithfulness (exact edge patching) of the circuits of ``counts`` edges chosen from ``scores``, each with a 95%
    bootstrap interval over prompts (``low``, ``high``)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {selection!r}")
    rows = []
    for n in counts:
        kept = SELECTIONS[selection](scores.mean, patcher.graph, int(n))
        rows.append(_curve_row(patcher, f"{scores.method} {selection}", kept, "", n_boot, seed))
    return pd.DataFrame(rows)


def random_edges(
    graph: ComputationalGraph, n: int, generator: torch.Generator
) -> Bool[Tensor, "n_senders n_receivers"]:
    """``n`` edges of the graph drawn uniformly without replacement."""
    valid = graph.valid()
    cells = valid.flatten().nonzero().flatten()
    if not 0 <= n <= cells.numel():
        raise ValueError(f"n must be in [0, {cells.numel()}], got {n}")
    kept = torch.zeros(valid.numel(), dtype=torch.bool)
    kept[cells[torch.randperm(cells.numel(), generator=generator)[:n]]] = True
    return kept.view_as(valid)


def random_curve(patcher: EdgePatcher, counts: Sequence[int], *, n_random: int = 5, seed: int = 0) -> pd.DataFrame:
    """The baseline every circuit is compared with: ``n_random`` circuits of each size drawn uniformly from the
    graph's edges, measured by the same exact patching. ``faithfulness`` is their mean; ``low`` and ``high`` their
    smallest and largest (the spread between random draws, not a bootstrap over prompts)."""
    if n_random < 1:
        raise ValueError(f"n_random must be at least 1, got {n_random}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in counts:
        drawn = [random_edges(patcher.graph, int(n), generator) for _ in range(n_random)]
        values = [patcher.faithfulness(kept) for kept in drawn]
        rows.append(
            {
                "method": "random",
                "n_edges": int(n),
                "n_nodes": float(np.mean([len(patcher.graph.nodes_of(kept)) for kept in drawn])),  # mean over draws
                "faithfulness": float(np.mean(values)),
                "low": float(np.min(values)),
                "high": float(np.max(values)),
                "detail": f"{n_random} random circuits: mean, min-max",
            }
        )
    return pd.DataFrame(rows)


def method_curves(
    patcher: EdgePatcher,
    scores: Sequence[EdgeScores],
    counts: Sequence[int],
    *,
    greedy: Sequence[str] = ("EAP-IG",),
    node_circuits: Sequence = (),
    node_check: bool = True,
    n_random: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Every method on the same axes: top-n circuits of each score set, greedy circuits of the methods in ``greedy``,
    node-level circuits and ``n_random`` random circuits of each size (none when 0), all measured by exact edge
    patching; ``low`` and ``high`` bound each point (see :func:`faithfulness_curve` and :func:`random_curve`)."""
    parts = [faithfulness_curve(patcher, s, counts, "top-n", n_boot=n_boot, seed=seed) for s in scores]
    parts += [
        faithfulness_curve(patcher, s, counts, "greedy", n_boot=n_boot, seed=seed) for s in scores if s.method in greedy
    ]
    if node_circuits:
        parts.append(node_circuit_curve(patcher, node_circuits, n_boot=n_boot, seed=seed, check=node_check))
    if n_random:
        parts.append(random_curve(patcher, counts, n_random=n_random, seed=seed))
    return pd.concat(parts, ignore_index=True)


def smallest_faithful(curves: pd.DataFrame, method: str, min_faithfulness: float = 0.8) -> int:
    """The fewest edges at which ``method``'s circuit reaches ``min_faithfulness`` (the largest tried if none does)."""
    rows = curves[curves["method"] == method].sort_values("n_edges")
    if rows.empty:
        raise ValueError(f"no rows for method {method!r}; methods: {sorted(set(curves['method']))}")
    good = rows[rows["faithfulness"] >= min_faithfulness]
    return int((good if not good.empty else rows).iloc[0 if not good.empty else -1]["n_edges"])


def node_circuit_curve(
    patcher: EdgePatcher, circuits: Sequence, *, n_boot: int = 1000, seed: int = 0, check: bool = True
) -> pd.DataFrame:
    """Node-level circuits (from :func:`mechfin_utils.methods.circuits.nodes.threshold_sweep`) as edge sets, each checked by exact
    edge patching: the edges among the kept nodes, every other edge patched. That is the same run as ablating every
    node outside the circuit, so the two faithfulness values must agree (a RuntimeError says if they do not).
    ``check=False`` skips that comparison, for node circuits found on other prompts (a subset of the task: node
    pruning costs a forward pass per node) and measured here on all of them."""
    rows = []
    for circuit in circuits:
        kept = patcher.graph.edges_among([node.name for node in circuit.nodes])
        row = _curve_row(patcher, "node-level pruning", kept, f"tau={circuit.threshold:g}", n_boot, seed)
        if check and abs(row["faithfulness"] - circuit.faithfulness) > 1e-3:
            raise RuntimeError(
                f"node circuit at tau={circuit.threshold}: faithfulness {circuit.faithfulness:.4f} by node ablation but "
                f"{row['faithfulness']:.4f} as edges; the two runs should be the same"
            )
        row["n_nodes"] = len(circuit.nodes)
        rows.append(row)
    return pd.DataFrame(rows)
