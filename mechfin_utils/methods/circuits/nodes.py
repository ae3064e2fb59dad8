"""Nodes of a transformer (heads and MLPs) and how to ablate any set of them: the ground under circuit discovery.

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
engine, :mod:`mechfin_utils.core.engine` (``backend="functional"``, the default for GPT-2 and Llama-family models): it
recomputes only the layers at and after the earliest ablated node and only the positions from the first
clean/corrupted difference on, and is tested to agree with the bridge path.

What is done with an ablator lives beside this module: pruning to a circuit
(:mod:`mechfin_utils.methods.circuits.pruning`) and validating one by knockout
(:mod:`mechfin_utils.methods.circuits.validation`). Tasks are in :mod:`mechfin_utils.tasks.circuit_tasks`
(greater-than, Hanna et al. 2023; fair lending, the paper's task): batches of (clean tokens, corrupted tokens,
per-prompt score function of the logits).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.core import engine
from mechfin_utils.core.functional import ForwardRecord, FunctionalTransformer
from mechfin_utils.core.head_labels import Node
from mechfin_utils.core.run_cache import load_tensor, run_cache_folder, store_tensor, weights_fingerprint
from mechfin_utils.tasks.circuit_tasks import CircuitBatch, CircuitTask

AblationKind = Literal["resample", "mean"]


# ---------------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------------


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
# Ablating nodes of a real model: the bridge's hooks, or the intervention engine
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
        The same computation, run only where it can change, on :class:`mechfin_utils.core.functional.FunctionalTransformer`
        (GPT-2 and Llama families): a run whose earliest ablated node is in layer ``L`` starts from the clean
        residual stream entering layer ``L`` (the layers below are untouched); with ``"resample"`` ablation the
        positions before the first token where clean and corrupted prompts differ are identical in the clean,
        corrupted and every ablated run, so their keys and values are reused and only later positions are
        recomputed; logits are computed only at the positions the score reads. In ACDC order the earliest
        ablated node is always the one being tested, so an average step costs about a quarter of a full pass.
        Agrees with the bridge backend to float rounding (~1e-5; tested).

    ``"auto"`` (default) picks ``"functional"`` when the architecture is supported, else ``"bridge"``.

    Within one ``make figures`` run (``$MECHFIN_SCORE_CACHE``, :mod:`mechfin_utils.core.run_cache`) the functional
    backend shares each ablated run's final residual state with the run's other notebooks: an ablator of the same
    weights, task tokens and ablation kind reads it instead of running it again (notebooks 05 and 10 prune
    greater-than on the same prompts). The scores are then computed from the stored state as from a fresh one.
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
        self._fm: FunctionalTransformer | None = None
        if backend in ("auto", "functional"):
            from mechfin_utils.core.functional import UnsupportedArchitecture

            try:
                self._fm = FunctionalTransformer.from_model(model)
            except UnsupportedArchitecture:
                if backend == "functional":
                    raise
        self.backend = "functional" if self._fm is not None else "bridge"
        self._shared = self._shared_folder() if self.backend == "functional" else None
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
        fm = self._fm
        assert fm is not None  # the functional backend has its model
        corrupted = fm.record(batch.corrupted_tokens, keep=("z", "mlp_out"))
        return _FunctionalBatch(
            first_pos=first,
            n_pos=n_pos,
            clean=fm.record(batch.clean_tokens, keep=("resid_pre", "k", "v")),
            reference_z=self._reference_activation(corrupted.kept("z"), 1)[:, :, first:],
            reference_mlp=self._reference_activation(corrupted.kept("mlp_out"), 1)[:, :, first:],
        )

    def _shared_folder(self) -> Path | None:
        """Where this ablator's runs are shared within a ``make figures`` run (None: not shared): keyed by the
        weights, the ablation kind and every batch's clean and corrupted tokens and read positions."""
        folder = run_cache_folder()
        if folder is None:
            return None
        digest = hashlib.sha256(f"{weights_fingerprint(self.model.hf_model)};{self.ablation};".encode())
        for batch in self.task.batches:
            for tokens in (batch.clean_tokens, batch.corrupted_tokens):
                digest.update(f"{tuple(tokens.shape)}:{batch.read_positions};".encode())
                digest.update(tokens.to(torch.int64).cpu().numpy().tobytes())
        return folder / "node-ablations" / digest.hexdigest()[:32]

    # --- runs --------------------------------------------------------------------------------------------

    def check_nodes(self, ablated: Iterable[Node]) -> list[Node]:
        """``ablated`` as a list, each checked to be a :class:`Node` of this model."""
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
            if node.head is None:  # an MLP
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
        head_index, mlp_layers = self._split(self.check_nodes(ablated))
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
        assert fm is not None  # the functional backend has its model
        shared = None
        if self._shared is not None:  # run already in this make figures run: read its final state
            names = ",".join(sorted(f"{n.layer}.{n.head}" for n in ablated))
            shared = self._shared / f"{batch_index}-{hashlib.sha256(names.encode()).hexdigest()[:32]}.pt"
            stored = load_tensor(shared)
            if stored is not None:
                return fm.unembed(stored)
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
            saved.clean.kept("resid_pre")[start][:, saved.first_pos :],
            torch.arange(batch),
            interventions,
        )
        (normed,) = engine.run(fm, [segment], saved.clean, n_read=read)
        if shared is not None:
            store_tensor(shared, normed)
        return fm.unembed(normed)

    def prompt_scores(self, ablated: Iterable[Node] = ()) -> Float[Tensor, " n_prompts"]:
        """Every prompt's score with ``ablated`` ablated, in batch order (looked up, not rerun, for a set already
        scored while :meth:`remembering`)."""
        ablated = self.check_nodes(ablated)
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
