"""Circuit discovery by iterative pruning (node-level ACDC), with the greater-than and fair-lending tasks.

**The model as a graph.** Every attention head and every MLP is a *node*; each reads the residual stream and
adds its output back to it. A *circuit* for a task is a subset of nodes that, on its own, reproduces the
model's behaviour on that task: run the model with every node *outside* the circuit ablated and the task
metric should stay close to the full model's.

**Ablation.** A node is ablated by replacing its output with the output it has on a *corrupted* prompt:

* ``"resample"`` (the default): each clean prompt gets the activations of its own paired corrupted prompt
  (ACDC's and Hanna et al.'s choice for greater-than: the "17YY" prompt gets the "1701" prompt's activations;
  for fair lending the prompt with the prohibited basis gets the one with the legitimate reason). We pick it
  because a pair differs only in the one fact the task is about, so an ablated node loses exactly that
  information and nothing else (position, template and noun stay in-distribution), and because ablating
  *every* node then gives exactly the corrupted run at the final position, a clean, checkable baseline.
* ``"mean"``: the mean of the node's output over the corrupted prompts of the same batch (same token length,
  so positions line up), position by position. Closer to "the node carries no prompt-specific information".

Heads are ablated at ``blocks.{L}.attn.hook_z`` (the per-head mixed values, before ``W_O``), so one head can be
replaced without touching the others; MLPs at ``blocks.{L}.hook_mlp_out``. :class:`NodeAblator` does exactly
this through the bridge's hooks (``backend="bridge"``), or computes the same thing faster on the intervention
engine, :mod:`mechfin_utils.engine` (``backend="functional"``, the default for GPT-2 and Llama-family models): it
recomputes only the layers at and after the earliest ablated node and only the positions from the first
clean/corrupted difference on, and is tested to agree with the bridge path.

**Pruning** (Conmy et al. 2023, at node level). Walk the nodes from the output backwards, layer by layer (in
each layer the MLP first, since it reads the heads' output, then heads 0..H-1). For each node, ablate it *on top
of every node already removed*; if the task metric moves by less than a threshold ``tau`` the node is removed for
good, otherwise it is kept. One forward pass per node: 300 for SmolLM2 (30 layers x (9 heads + 1 MLP)), 156 for
GPT-2 Small. The metric is normalised so that thresholds mean the same thing on every task and model::

    normalised(S) = (metric(S ablated) - metric(all ablated)) / (metric(nothing ablated) - metric(all ablated))

so the full model scores 1 and the fully-ablated model 0; ``tau = 0.02`` removes a node when it changes the
result by less than 2 % of the full-vs-baseline gap. The found circuit's **faithfulness** is its normalised
metric (1 = recovers the full model's effect, 0 = no better than ablating everything); the raw ratio
``metric(circuit) / metric(full)`` is reported too. Two things to keep in mind when reading a sweep: each removal
may move the metric by up to ``tau``, and the moves add up, so faithfulness falls as ``tau`` grows (greedy
drift); and when the full-vs-baseline gap is small or noisy (a task the model barely does), every normalised
delta is large and almost nothing gets pruned; look at ``full_metric - baseline_metric`` first.

**Validation.** Knock out (ablate) the circuit's own nodes and nothing else: the metric should fall sharply.
Knock out as many random nodes from outside the circuit (seeded draws; by default the same number of heads and
of MLPs, or, when the circuit holds most MLPs, the same number of nodes of any kind): the metric should barely
move. :func:`knockout_test` reports both, with the mean and spread over the draws.

**Nodes here, edges in** :mod:`mechfin_utils.edge_attribution`. ACDC proper prunes *edges*: the path from a
sender's output to one receiver's input (a head's query/key/value input, an MLP's input, the logits). Testing every
edge by patching is tens of thousands of forward passes on a CPU, so this module prunes nodes, exactly, with one pass
per node, and :attr:`Circuit.edges` lists the residual-stream connections *implied* by the kept nodes. Edge-level
circuits are scored by gradients (EAP, EAP-IG) and checked by exact edge patching in
:mod:`mechfin_utils.edge_attribution`, where :func:`~mechfin_utils.edge_attribution.node_circuit_curve` puts this
module's circuits on the same axes (a node circuit as its edge set gives the same run as the node ablation; tested).

**Tasks** are in :mod:`mechfin_utils.circuit_tasks` (greater-than, Hanna et al. 2023; fair lending, the paper's
task): batches of (clean tokens, corrupted tokens, per-prompt score function of the logits). **Figures** are in
:mod:`mechfin_utils.circuit_plots`.

Typical use::

    task = circuit_tasks.greater_than_task(model, n_prompts=16)
    ablator = NodeAblator(model, task)
    circuit = discover_circuit(ablator, threshold=0.02)
    circuit.faithfulness, len(circuit.nodes)
    knockout_test(ablator, circuit, n_random=10).summary()
    circuit_plots.circuit_figure(circuit, model, "Greater-than circuit")
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils import engine
from mechfin_utils.circuit_tasks import CircuitBatch, CircuitTask
from mechfin_utils.functional import ForwardRecord

AblationKind = Literal["resample", "mean"]
Criterion = Literal["abs", "drop"]

N = TypeVar("N", bound=Hashable)


# ---------------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One node of the computational graph: attention head ``(layer, head)`` or the MLP of ``layer`` (head None)."""

    layer: int
    head: int | None = None

    @property
    def is_mlp(self) -> bool:
        return self.head is None

    @property
    def kind(self) -> str:
        return "mlp" if self.head is None else "head"

    @property
    def name(self) -> str:
        return f"MLP{self.layer}" if self.head is None else f"L{self.layer}H{self.head}"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Node({self.name})"

    @classmethod
    def parse(cls, name: str) -> Node:
        """``"L5H3"`` -> head 3 of layer 5; ``"MLP5"`` -> the MLP of layer 5."""
        match = re.fullmatch(r"L(\d+)H(\d+)|MLP(\d+)", name.strip())
        if match is None:
            raise ValueError(f"{name!r} is not a node name (expected like 'L5H3' or 'MLP5')")
        if match.group(3) is not None:
            return cls(int(match.group(3)))
        return cls(int(match.group(1)), int(match.group(2)))

    def sort_key(self) -> tuple[int, int]:
        """Upstream first: by layer, heads before the MLP of the same layer (the MLP reads them)."""
        return (self.layer, (self.head if self.head is not None else 10**9))


def acdc_order(n_layers: int, n_heads: int) -> list[Node]:
    """All heads and MLPs, from the output backwards: layer ``n_layers-1`` first, in each layer the MLP first
    (it is downstream of that layer's heads), then heads ``0..n_heads-1`` (heads of one layer run in parallel,
    so their order among themselves is a convention)."""
    if n_layers < 1 or n_heads < 1:
        raise ValueError(f"need n_layers >= 1 and n_heads >= 1, got {n_layers}, {n_heads}")
    order = []
    for layer in reversed(range(n_layers)):
        order.append(Node(layer))
        order.extend(Node(layer, head) for head in range(n_heads))
    return order


# ---------------------------------------------------------------------------------------------------------
# The pruning algorithm itself (no model involved: any nodes, any metric of a set of ablated nodes)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruningStep:
    """One decision: the metric before, the metric with ``node`` also ablated, and whether it was removed."""

    node: Hashable
    metric_before: float
    metric_if_removed: float
    removed: bool

    @property
    def delta(self) -> float:
        """``metric_if_removed - metric_before``: what ablating the node did, given the nodes already removed."""
        return self.metric_if_removed - self.metric_before


@dataclass
class PruningResult:
    """What :func:`prune_nodes` decided, step by step."""

    threshold: float
    criterion: str
    kept: list
    removed: list
    steps: list[PruningStep]
    start_metric: float
    final_metric: float

    @property
    def importance(self) -> dict:
        """``|delta|`` of every node at the moment it was considered (kept nodes have ``>= threshold``)."""
        return {step.node: abs(step.delta) for step in self.steps}

    def trace(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "node": str(s.node),
                    "metric_before": s.metric_before,
                    "metric_if_removed": s.metric_if_removed,
                    "delta": s.delta,
                    "removed": s.removed,
                }
                for s in self.steps
            ]
        )


def _is_removable(delta: float, threshold: float, criterion: Criterion) -> bool:
    if criterion == "abs":
        return abs(delta) < threshold
    return delta > -threshold  # "drop": only a fall of the metric by >= threshold keeps a node


def prune_nodes(
    nodes: Sequence[N],
    evaluate: Callable[[frozenset[N]], float],
    threshold: float,
    *,
    criterion: Criterion = "abs",
    on_step: Callable[[PruningStep], None] | None = None,
) -> PruningResult:
    """Greedy iterative pruning: the core of ACDC, independent of any model.

    Args:
        nodes: every candidate node, in the order to consider them (for a transformer: :func:`acdc_order`).
        evaluate: the task metric with exactly the given set of nodes ablated (``frozenset()`` = full model).
        threshold: ``tau >= 0``. A node is removed when ablating it on top of the nodes already removed
            changes the metric by less than ``tau``.
        criterion: ``"abs"`` (default): remove when ``|delta| < tau``, so a node that *raises* the metric a lot
            when ablated (one that works against the task) is kept too. ``"drop"``: remove unless the metric
            *falls* by at least ``tau`` (ACDC's rule for a loss-like metric, mirrored).
        on_step: called with each :class:`PruningStep` as soon as it is decided (progress display).

    Returns:
        A :class:`PruningResult`: kept and removed nodes (each in consideration order), every step's metric
        before and after, the starting metric (nothing ablated) and the final one (the circuit alone).
    """
    if criterion not in ("abs", "drop"):
        raise ValueError(f"criterion must be 'abs' or 'drop', got {criterion!r}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    nodes = list(nodes)
    if not nodes:
        raise ValueError("no nodes to prune")
    seen: set = set()
    for i, node in enumerate(nodes):
        if node in seen:
            raise ValueError(f"node {node} appears twice in the pruning order (second time at index {i})")
        seen.add(node)

    def checked(ablated: frozenset, node: Any) -> float:
        value = float(evaluate(ablated))
        if not math.isfinite(value):
            raise ValueError(f"the metric is {value} with {len(ablated)} nodes ablated (last added: {node})")
        return value

    removed: set = set()
    current = start = checked(frozenset(), None)
    steps, kept_order, removed_order = [], [], []
    for node in nodes:
        candidate = checked(frozenset(removed | {node}), node)
        remove = _is_removable(candidate - current, threshold, criterion)
        steps.append(PruningStep(node, current, candidate, remove))
        if on_step is not None:
            on_step(steps[-1])
        if remove:
            removed.add(node)
            removed_order.append(node)
            current = candidate
        else:
            kept_order.append(node)
    return PruningResult(float(threshold), criterion, kept_order, removed_order, steps, start, current)


# ---------------------------------------------------------------------------------------------------------
# Ablating nodes of a real model through the bridge's hooks
# ---------------------------------------------------------------------------------------------------------


def _z_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _mlp_hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


Backend = Literal["auto", "functional", "bridge"]


def _first_differing_position(batch: CircuitBatch, index: int) -> int:
    """The first position at which any clean prompt of the batch differs from its corrupted partner."""
    differs = (batch.clean_tokens != batch.corrupted_tokens).any(0)
    if not bool(differs.any()):
        raise ValueError(f"batch {index} ({batch.ids[0]}...): clean and corrupted tokens are identical")
    return int(differs.nonzero()[0, 0])


@dataclass
class _FunctionalBatch:
    """What the functional backend keeps per batch: the clean run, and the ablation values from ``first_pos`` on."""

    first_pos: int
    n_pos: int
    clean: ForwardRecord  # resid_pre, k, v of the clean prompts
    reference_z: Float[Tensor, "layer batch rows head d_head"]
    reference_mlp: Float[Tensor, "layer batch rows d_model"]


class NodeAblator:
    """Runs a task on a model with any set of nodes ablated, and scores it.

    On construction it runs every batch's corrupted prompts once and keeps each layer's per-head outputs
    ``z`` ``[batch pos n_heads d_head]`` (``hook_z``) and MLP outputs ``[batch pos d_model]`` (``hook_mlp_out``);
    for ``"mean"`` ablation, their mean over the batch. Then it measures the full model (nothing ablated) and
    the baseline (every node ablated). Each :meth:`metric` call re-runs the clean prompts with the stored
    activations swapped in for the ablated nodes. Two interchangeable backends do this:

    ``"bridge"``
        The reference: a full forward pass through the TransformerLens bridge with hooks on
        ``blocks.L.attn.hook_z`` (the ablated heads' slice replaced) and ``blocks.L.hook_mlp_out``. Works for
        any architecture the bridge supports.
    ``"functional"``
        The same computation, run only where it can change, on :class:`mechfin_utils.functional.FunctionalTransformer`
        (GPT-2 and Llama families): a run whose earliest ablated node is in layer ``L`` starts from the clean
        residual stream entering layer ``L`` (the layers below are untouched); with ``"resample"`` ablation the
        positions before the first token where clean and corrupted prompts differ are identical in the clean,
        corrupted and every ablated run, so their keys and values are reused and only later positions are
        recomputed; logits are computed only at the positions the score reads. In ACDC order the earliest
        ablated node is always the one being tested, so an average step costs about a quarter of a full pass.
        Agrees with the bridge backend to float rounding (~1e-5; tested).

    ``"auto"`` (default) picks ``"functional"`` when the architecture is supported, else ``"bridge"``.
    """

    def __init__(self, model, task: CircuitTask, ablation: AblationKind = "resample", backend: Backend = "auto"):
        if ablation not in ("resample", "mean"):
            raise ValueError(f"ablation must be 'resample' or 'mean', got {ablation!r}")
        if backend not in ("auto", "functional", "bridge"):
            raise ValueError(f"backend must be 'auto', 'functional' or 'bridge', got {backend!r}")
        self.model = model
        self.task = task
        self.ablation = ablation
        cfg = model.cfg
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.nodes: list[Node] = acdc_order(self.n_layers, self.n_heads)
        self.n_forward_passes = 0
        self._remembered: dict[frozenset, Tensor] | None = None
        self._fm = None
        if backend in ("auto", "functional"):
            from mechfin_utils.functional import FunctionalTransformer, UnsupportedArchitecture

            try:
                self._fm = FunctionalTransformer.from_model(model)
            except UnsupportedArchitecture:
                if backend == "functional":
                    raise
        self.backend = "functional" if self._fm is not None else "bridge"
        with torch.no_grad():
            if self.backend == "functional":
                self._functional = [self._prepare_functional(b, i) for i, b in enumerate(task.batches)]
            else:
                self._reference = [self._prepare_bridge(b) for b in task.batches]
        self.full_metric = self.metric(())
        self.baseline_metric = self.metric(self.nodes)
        if abs(self.full_metric - self.baseline_metric) < 1e-6:
            raise ValueError(
                f"{task.name} on {model.name}: the full model ({self.full_metric:.6g}) and the fully-ablated model "
                f"({self.baseline_metric:.6g}) score the same, so the normalised metric is undefined"
            )

    # --- setup -------------------------------------------------------------------------------------------

    def _reference_activation(self, act: Tensor, batch_dim: int) -> Tensor:
        act = act.detach()
        if self.ablation == "mean":
            act = act.mean(batch_dim, keepdim=True).expand_as(act)
        return act

    def _prepare_bridge(self, batch: CircuitBatch) -> dict[str, Tensor]:
        wanted = {_z_hook_name(layer) for layer in range(self.n_layers)}
        wanted |= {_mlp_hook_name(layer) for layer in range(self.n_layers)}
        _, cache = self.model.bridge.run_with_cache(batch.corrupted_tokens, names_filter=lambda n: n in wanted)
        return {name: self._reference_activation(cache[name], 0) for name in wanted}

    def _prepare_functional(self, batch: CircuitBatch, index: int) -> _FunctionalBatch:
        n_pos = int(batch.clean_tokens.shape[1])
        first = _first_differing_position(batch, index) if self.ablation == "resample" else 0
        first = min(first, n_pos - batch.read_positions)
        corrupted = self._fm.record(batch.corrupted_tokens, keep=("z", "mlp_out"))
        return _FunctionalBatch(
            first_pos=first,
            n_pos=n_pos,
            clean=self._fm.record(batch.clean_tokens, keep=("resid_pre", "k", "v")),
            reference_z=self._reference_activation(corrupted.z, 1)[:, :, first:],
            reference_mlp=self._reference_activation(corrupted.mlp_out, 1)[:, :, first:],
        )

    # --- runs --------------------------------------------------------------------------------------------

    def _check(self, ablated: Iterable[Node]) -> list[Node]:
        nodes = list(ablated)
        for node in nodes:
            if not isinstance(node, Node):
                raise TypeError(f"expected Node objects, got {node!r}")
            if not 0 <= node.layer < self.n_layers or (node.head is not None and not 0 <= node.head < self.n_heads):
                raise ValueError(f"{node} is not a node of {self.model.name} ({self.n_layers} x {self.n_heads} heads)")
        return nodes

    @staticmethod
    def _split(ablated: list[Node]) -> tuple[dict[int, Tensor], set[int]]:
        heads_by_layer: dict[int, set[int]] = defaultdict(set)
        mlp_layers = set()
        for node in ablated:
            if node.is_mlp:
                mlp_layers.add(node.layer)
            else:
                heads_by_layer[node.layer].add(node.head)
        index = {layer: torch.tensor(sorted(h), dtype=torch.long) for layer, h in heads_by_layer.items()}
        return index, mlp_layers

    def hooks(self, ablated: Iterable[Node], batch_index: int) -> list[tuple[str, Callable]]:
        """The bridge forward hooks that ablate ``ablated`` on batch ``batch_index`` (bridge backend only)."""
        if self.backend != "bridge":
            raise RuntimeError("hooks() belongs to the bridge backend; build the NodeAblator with backend='bridge'")
        reference = self._reference[batch_index]
        head_index, mlp_layers = self._split(self._check(ablated))
        hooks = [(_mlp_hook_name(layer), lambda act, hook: reference[hook.name]) for layer in sorted(mlp_layers)]
        for layer, index in head_index.items():

            def swap_heads(z: Tensor, hook, index: Tensor = index) -> Tensor:
                z = z.clone()
                z[:, :, index] = reference[hook.name][:, :, index].to(z.dtype)
                return z

            hooks.append((_z_hook_name(layer), swap_heads))
        return hooks

    def _bridge_logits(self, ablated: list[Node], batch_index: int) -> Tensor:
        batch = self.task.batches[batch_index]
        logits = self.model.bridge.run_with_hooks(batch.clean_tokens, fwd_hooks=self.hooks(ablated, batch_index))
        return logits[:, -batch.read_positions :]

    def _functional_logits(self, ablated: list[Node], batch_index: int) -> Tensor:
        """The same run on the intervention engine: ablated heads' ``z`` and ablated MLPs' outputs replaced
        by the reference values from ``first_pos`` on, starting at the earliest ablated layer."""
        fm, saved = self._fm, self._functional[batch_index]
        read = self.task.batches[batch_index].read_positions
        head_index, mlp_layers = self._split(ablated)
        start = min((n.layer for n in ablated), default=self.n_layers)
        positions = tuple(range(saved.first_pos, saved.n_pos))
        interventions = [
            engine.Replace("z", layer, positions, saved.reference_z[layer][:, :, index], heads=tuple(index.tolist()))
            for layer, index in head_index.items()
        ]
        interventions += [
            engine.Replace("mlp_out", layer, positions, saved.reference_mlp[layer]) for layer in mlp_layers
        ]
        batch = saved.clean.tokens.shape[0]
        segment = engine.Segment(
            start,
            saved.first_pos,
            saved.clean.resid_pre[start][:, saved.first_pos :],
            torch.arange(batch),
            interventions,
        )
        (normed,) = engine.run(fm, [segment], saved.clean, n_read=read)
        return fm.unembed(normed)

    def prompt_scores(self, ablated: Iterable[Node] = ()) -> Float[Tensor, " n_prompts"]:
        """Every prompt's score with ``ablated`` ablated, in batch order (looked up, not rerun, for a set already
        scored while :meth:`remembering`)."""
        ablated = self._check(ablated)
        key = frozenset(ablated)
        if self._remembered is not None and key in self._remembered:
            return self._remembered[key]
        run = self._functional_logits if self.backend == "functional" else self._bridge_logits
        scores = []
        with torch.no_grad():
            for i, batch in enumerate(self.task.batches):
                logits = run(ablated, i)
                self.n_forward_passes += 1
                scores.append(batch.score(logits).float().cpu())
        result = torch.cat(scores)
        if self._remembered is not None:
            self._remembered[key] = result
        return result

    @contextmanager
    def remembering(self):
        """Within this block, each distinct set of ablated nodes is run once: a threshold sweep's pruning walks
        visit the same sets until their first different decision, and those passes are shared (exact: the same
        set gives the same numbers)."""
        previous = self._remembered
        self._remembered = {} if previous is None else previous
        try:
            yield self
        finally:
            self._remembered = previous

    def metric(self, ablated: Iterable[Node] = ()) -> float:
        """The task metric (mean score over all prompts) with the nodes in ``ablated`` ablated."""
        return float(self.prompt_scores(ablated).mean())

    def normalise(self, value: float) -> float:
        """``(value - baseline) / (full - baseline)``: 1 for the full model, 0 with every node ablated."""
        return (value - self.baseline_metric) / (self.full_metric - self.baseline_metric)

    def normalised_metric(self, ablated: Iterable[Node] = ()) -> float:
        return self.normalise(self.metric(ablated))

    def __repr__(self) -> str:
        return (
            f"NodeAblator({self.model.name}, {self.task.name}, {self.ablation} ablation, {self.backend} backend: "
            f"full {self.full_metric:.4f}, baseline {self.baseline_metric:.4f}, {len(self.nodes)} nodes)"
        )


# ---------------------------------------------------------------------------------------------------------
# Circuits: discovery, sweep, knockout validation
# ---------------------------------------------------------------------------------------------------------

OUTPUT_NODE = "logits"
INPUT_NODE = "embed"


@dataclass
class Circuit:
    """A discovered circuit: its nodes, how they were found, and how faithful it is.

    ``importance[node]`` is ``|delta|`` when the node was considered (normalised units: a fraction of the
    full-vs-baseline gap), for kept and removed nodes alike. ``faithfulness`` is the circuit-only model's
    normalised metric; ``raw_faithfulness`` is ``circuit_metric / full_metric``.
    """

    model_name: str
    task_name: str
    metric_name: str
    ablation: str
    threshold: float
    criterion: str
    n_layers: int
    n_heads: int
    nodes: list[Node]
    removed: list[Node]
    importance: dict[Node, float]
    full_metric: float
    baseline_metric: float
    circuit_metric: float
    faithfulness: float
    seconds: float = 0.0
    n_forward_passes: int = 0
    pruning: PruningResult | None = None

    @property
    def raw_faithfulness(self) -> float:
        return self.circuit_metric / self.full_metric if self.full_metric != 0 else float("nan")

    @property
    def n_heads_kept(self) -> int:
        return sum(not n.is_mlp for n in self.nodes)

    @property
    def n_mlps_kept(self) -> int:
        return sum(n.is_mlp for n in self.nodes)

    @property
    def edges(self) -> list[tuple[str, str]]:
        """Residual-stream connections implied by the kept nodes (not separately tested; see module docs).

        ``embed`` feeds every kept node, every kept node feeds ``logits``, and a kept node feeds every kept node
        that reads the residual stream after it writes (a head in layer L feeds the MLP of layer L and anything
        in later layers; an MLP in layer L feeds anything in later layers).
        """
        ordered = sorted(self.nodes, key=Node.sort_key)
        edges = [(INPUT_NODE, n.name) for n in ordered]
        for i, sender in enumerate(ordered):
            for receiver in ordered[i + 1 :]:
                if receiver.layer > sender.layer or (receiver.is_mlp and not sender.is_mlp):
                    edges.append((sender.name, receiver.name))
        edges.extend((n.name, OUTPUT_NODE) for n in ordered)
        return edges

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "task": self.task_name,
            "ablation": self.ablation,
            "threshold": self.threshold,
            "n_nodes": len(self.nodes),
            "n_heads": self.n_heads_kept,
            "n_mlps": self.n_mlps_kept,
            "of_nodes": self.n_layers * (self.n_heads + 1),
            "full_metric": self.full_metric,
            "baseline_metric": self.baseline_metric,
            "circuit_metric": self.circuit_metric,
            "faithfulness": self.faithfulness,
            "raw_faithfulness": self.raw_faithfulness,
            "seconds": self.seconds,
            "forward_passes": self.n_forward_passes,
        }

    def __repr__(self) -> str:
        return (
            f"Circuit({self.task_name} on {self.model_name}, tau={self.threshold}: {len(self.nodes)} nodes "
            f"({self.n_heads_kept} heads, {self.n_mlps_kept} MLPs), faithfulness {self.faithfulness:.3f})"
        )


def discover_circuit(
    ablator: NodeAblator,
    threshold: float,
    *,
    criterion: Criterion = "abs",
    on_step: Callable[[PruningStep], None] | None = None,
) -> Circuit:
    """Prune ``ablator``'s model on its task at threshold ``tau`` (normalised units) and return the circuit.

    Costs one forward pass per batch per node (plus one to measure the circuit alone in raw units).
    """
    start_passes, t0 = ablator.n_forward_passes, time.perf_counter()
    result = prune_nodes(ablator.nodes, ablator.normalised_metric, threshold, criterion=criterion, on_step=on_step)
    circuit_metric = ablator.metric(result.removed)
    return Circuit(
        model_name=ablator.model.name,
        task_name=ablator.task.name,
        metric_name=ablator.task.metric_name,
        ablation=ablator.ablation,
        threshold=float(threshold),
        criterion=criterion,
        n_layers=ablator.n_layers,
        n_heads=ablator.n_heads,
        nodes=sorted(result.kept, key=Node.sort_key),
        removed=sorted(result.removed, key=Node.sort_key),
        importance=result.importance,
        full_metric=ablator.full_metric,
        baseline_metric=ablator.baseline_metric,
        circuit_metric=circuit_metric,
        faithfulness=result.final_metric,
        seconds=time.perf_counter() - t0,
        n_forward_passes=ablator.n_forward_passes - start_passes,
        pruning=result,
    )


def threshold_sweep(
    ablator: NodeAblator, thresholds: Sequence[float], *, criterion: Criterion = "abs"
) -> tuple[pd.DataFrame, list[Circuit]]:
    """Discover a circuit at each threshold: a table of size vs faithfulness (one row each) and the circuits."""
    if not thresholds:
        raise ValueError("thresholds is empty")
    with ablator.remembering():  # the walks share their passes up to their first different decision
        circuits = [discover_circuit(ablator, t, criterion=criterion) for t in thresholds]
    return pd.DataFrame([c.summary() for c in circuits]), circuits


def choose_circuit(circuits: Sequence[Circuit], min_faithfulness: float = 0.8) -> Circuit:
    """From a threshold sweep, the smallest circuit whose faithfulness is at least ``min_faithfulness``
    (ties: the larger threshold); when none reaches it, the most faithful one (ties: the smaller).

    The rule a reader would apply to the size-vs-faithfulness plot, written down so the notebook's choice is
    reproducible rather than eyeballed.
    """
    if not circuits:
        raise ValueError("circuits is empty: run threshold_sweep first")
    if not 0 <= min_faithfulness <= 1:
        raise ValueError(f"min_faithfulness must be in [0, 1], got {min_faithfulness!r}")
    good = [c for c in circuits if c.faithfulness >= min_faithfulness]
    if good:
        return min(good, key=lambda c: (len(c.nodes), -c.threshold))
    return max(circuits, key=lambda c: (c.faithfulness, -len(c.nodes)))


@dataclass
class KnockoutReport:
    """Knocking out the circuit vs knocking out as many random nodes from outside it (normalised metric)."""

    model_name: str
    task_name: str
    nodes: list[Node]
    circuit_knockout: float
    random_knockouts: list[float]
    random_sets: list[list[Node]]
    match_kinds: bool
    seed: int

    @property
    def random_mean(self) -> float:
        return float(torch.tensor(self.random_knockouts).mean())

    @property
    def random_std(self) -> float:
        values = torch.tensor(self.random_knockouts)
        return float(values.std()) if len(values) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        values = self.random_knockouts
        return {
            "model": self.model_name,
            "task": self.task_name,
            "n_nodes_knocked_out": len(self.nodes),
            "circuit_knockout": self.circuit_knockout,
            "random_mean": self.random_mean,
            "random_std": self.random_std,
            "random_min": min(values),
            "random_max": max(values),
            "n_random": len(values),
            "match_kinds": self.match_kinds,
            "seed": self.seed,
        }


def knockout_test(
    ablator: NodeAblator,
    circuit: Circuit | Collection[Node],
    *,
    n_random: int = 10,
    seed: int = 0,
    match_kinds: bool | Literal["auto"] = True,
) -> KnockoutReport:
    """Ablate the circuit's nodes (only them), then ``n_random`` seeded random sets drawn from outside it.

    With ``match_kinds`` (default) each random set has as many heads and as many MLPs as the circuit: MLPs and
    heads differ a lot in how much they matter, so matching the mix keeps the comparison fair; it raises when
    the outside has too few heads or MLPs (a circuit holding most MLPs). ``match_kinds=False`` draws the same
    *number* of nodes from everything outside, whatever their kind; ``"auto"`` matches kinds when the outside
    allows it and otherwise draws from everything outside (``report.match_kinds`` says which was done).
    Values are the normalised metric: 1 = unchanged, 0 = as bad as ablating everything.
    """
    if isinstance(circuit, Circuit):
        if circuit.model_name != ablator.model.name or circuit.task_name != ablator.task.name:
            raise ValueError(
                f"circuit is for {circuit.task_name} on {circuit.model_name}, the ablator for "
                f"{ablator.task.name} on {ablator.model.name}"
            )
        nodes = list(circuit.nodes)
    else:
        nodes = ablator._check(circuit)
    if not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be a positive integer, got {n_random!r}")
    if match_kinds not in (True, False, "auto"):
        raise ValueError(f"match_kinds must be True, False or 'auto', got {match_kinds!r}")
    inside = set(nodes)
    outside = [n for n in ablator.nodes if n not in inside]
    rng = random.Random(seed)
    if match_kinds == "auto":
        outside_heads = sum(not n.is_mlp for n in outside)
        match_kinds = (
            sum(not n.is_mlp for n in inside) <= outside_heads
            and sum(n.is_mlp for n in inside) <= len(outside) - outside_heads
        )
    if match_kinds:
        outside_heads = [n for n in outside if not n.is_mlp]
        outside_mlps = [n for n in outside if n.is_mlp]
        k_heads, k_mlps = sum(not n.is_mlp for n in inside), sum(n.is_mlp for n in inside)
        if k_heads > len(outside_heads) or k_mlps > len(outside_mlps):
            raise ValueError(
                f"the circuit has {k_heads} heads and {k_mlps} MLPs but only {len(outside_heads)} heads and "
                f"{len(outside_mlps)} MLPs lie outside it: no random set of the same make-up exists "
                "(use match_kinds=False, or a larger threshold)"
            )
        draw = lambda: rng.sample(outside_heads, k_heads) + rng.sample(outside_mlps, k_mlps)  # noqa: E731
    else:
        if len(inside) > len(outside):
            raise ValueError(f"the circuit has {len(inside)} nodes but only {len(outside)} lie outside it")
        draw = lambda: rng.sample(outside, len(inside))  # noqa: E731
    random_sets = [sorted(draw(), key=Node.sort_key) for _ in range(n_random)]
    return KnockoutReport(
        model_name=ablator.model.name,
        task_name=ablator.task.name,
        nodes=sorted(inside, key=Node.sort_key),
        circuit_knockout=ablator.normalised_metric(nodes),
        random_knockouts=[ablator.normalised_metric(s) for s in random_sets],
        random_sets=random_sets,
        match_kinds=match_kinds,
        seed=seed,
    )
