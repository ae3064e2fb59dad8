"""The computational graph of a transformer: senders, receivers and every residual edge between them.

A transformer's residual stream is a sum. Every component reads it and adds its output back, so the input any
component reads is the embedding plus the outputs of everything upstream of it. Writing that sum out term by term
gives a graph (Elhage et al. 2021; the graph of ACDC, EAP and EAP-IG):

* **senders** (nodes that write): the token embedding (``input``), every attention head (``L3H2``: its output
  ``z_h W_O[h]``, without the attention bias), every MLP (``MLP3``);
* **receivers** (places that read): every head's *query* input (``L3H2.q``), every key/value head's *key* and *value*
  inputs (``L3H2.k``, ``L3H2.v``; on grouped-query models such as SmolLM2, where three query heads share one key/value
  head, ``L3KV0.k``, ``L3KV0.v``), every MLP's input (``MLP3``) and the unembedding (``logits``);
* **edges**: a sender to a receiver whenever the sender runs before the receiver reads: heads and MLPs of earlier
  layers, the same layer's heads for its MLP, everything for the logits, and the embedding for all.

An edge is *patched* by giving that one receiver the corrupted run's output of that one sender, while every other
receiver keeps what it had: a receiver reads its stream plus, for each sender patched into it, that sender's
corrupted output minus its current one. :func:`mechfin_utils.core.edge_engine.run_edges` computes this exactly;
patching every edge reproduces the corrupted run.

Senders and receivers are numbered so that an edge is a cell of a ``[n_senders, n_receivers]`` matrix
(:meth:`ComputationalGraph.valid`). Sender 0 is ``input``; layer ``l``'s heads are ``1 + l (H + 1) + h``, its MLP
``1 + l (H + 1) + H``. Layer ``l``'s receivers start at ``l (H + 2 KV + 1)``: ``H`` queries, ``KV`` keys, ``KV`` values,
then the MLP input; ``logits`` is last.

GPT-2 Small has 12 x (12 + 1) + 1 = 157 senders, 12 x (12 x 3 + 1) + 1 = 445 receivers and 32,491 edges (EAP-IG's
count); SmolLM2-135M has 301 senders, 481 receivers and 70,651 edges.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool
from torch import Tensor

from mechfin_utils.core.head_labels import head_label

if TYPE_CHECKING:
    from mechfin_utils.core.functional import FunctionalTransformer
    from mechfin_utils.core.models import LoadedModel

INPUT = "input"
LOGITS = "logits"


@dataclass(frozen=True)
class ComputationalGraph:
    """The senders, receivers and edges of a model with ``n_layers`` layers of ``n_heads`` query heads sharing
    ``n_kv_heads`` key/value heads, one MLP per layer."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1 or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"need n_layers, n_heads, n_kv_heads >= 1 with n_kv_heads dividing n_heads, got "
                f"{self.n_layers}, {self.n_heads}, {self.n_kv_heads}"
            )

    @classmethod
    def of(cls, model: FunctionalTransformer | LoadedModel) -> ComputationalGraph:
        """The graph of a ``FunctionalTransformer`` or a ``LoadedModel``."""
        from mechfin_utils.core.functional import FunctionalTransformer

        fm = model if isinstance(model, FunctionalTransformer) else FunctionalTransformer.from_model(model)
        return cls(fm.n_layers, fm.n_heads, fm.n_kv_heads)

    # --- sizes and numbering ----------------------------------------------------------------------------

    @property
    def senders_per_layer(self) -> int:
        return self.n_heads + 1

    @property
    def receivers_per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * self.senders_per_layer

    @property
    def n_receivers(self) -> int:
        return self.n_layers * self.receivers_per_layer + 1

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * self.senders_per_layer + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * self.senders_per_layer + self.n_heads

    def attention_receivers(self, layer: int) -> slice:
        """Layer ``layer``'s query, key and value receivers (in that order)."""
        start = layer * self.receivers_per_layer
        return slice(start, start + self.n_heads + 2 * self.n_kv_heads)

    def mlp_receiver(self, layer: int) -> int:
        return layer * self.receivers_per_layer + self.n_heads + 2 * self.n_kv_heads

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    def senders_before(self, receiver: int) -> int:
        """How many senders (a prefix of the numbering) write before ``receiver`` reads."""
        if receiver == self.logits_receiver:
            return self.n_senders
        layer, offset = divmod(receiver, self.receivers_per_layer)
        first = 1 + layer * self.senders_per_layer
        return first + self.n_heads if offset == self.receivers_per_layer - 1 else first

    def valid(self) -> Bool[Tensor, "n_senders n_receivers"]:
        """Which (sender, receiver) cells are edges."""
        limits = torch.tensor([self.senders_before(receiver) for receiver in range(self.n_receivers)])
        return torch.arange(self.n_senders)[:, None] < limits[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid().sum())

    def input_reaches_logits(self, kept: Bool[Tensor, "n_senders n_receivers"]) -> bool:
        """Whether a path of ``kept`` edges leads from the input to the logits.

        In a run where every other edge is patched (carries the corrupted run's output), a receiver whose kept
        edges all come from senders that no such path reaches reads exactly the corrupted run's input, so its node
        computes the corrupted output; by induction over the layers, if no kept path reaches the logits the run
        *is* the corrupted run. Stages, layer by layer: a receiver is reached when a kept edge comes from a reached
        sender (the input is reached); a head when its query or its group's key or value receiver is; an MLP when
        its receiver is."""
        # 1. the input, then each layer's heads and MLP, in the order they write
        reached = torch.zeros(self.n_senders, dtype=torch.bool)
        reached[0] = True
        group = self.n_heads // self.n_kv_heads
        for layer in range(self.n_layers):
            hit = (kept[:, self.attention_receivers(layer)] & reached[:, None]).any(0)
            q, k, v = hit.split([self.n_heads, self.n_kv_heads, self.n_kv_heads])
            first = self.head_sender(layer, 0)
            reached[first : first + self.n_heads] = q | k.repeat_interleave(group) | v.repeat_interleave(group)
            reached[self.mlp_sender(layer)] = bool((kept[:, self.mlp_receiver(layer)] & reached).any())
        # 2. the logits
        return bool((kept[:, self.logits_receiver] & reached).any())

    # --- names ---------------------------------------------------------------------------------------------

    def sender_name(self, sender: int) -> str:
        if sender == 0:
            return INPUT
        layer, offset = divmod(sender - 1, self.senders_per_layer)
        return f"MLP{layer}" if offset == self.n_heads else head_label(layer, offset)

    def receiver_name(self, receiver: int) -> str:
        if receiver == self.logits_receiver:
            return LOGITS
        layer, offset = divmod(receiver, self.receivers_per_layer)
        if offset == self.receivers_per_layer - 1:
            return f"MLP{layer}"
        if offset < self.n_heads:
            return f"{head_label(layer, offset)}.q"
        kind, group = divmod(offset - self.n_heads, self.n_kv_heads)
        letter = "kv"[kind]
        if self.n_kv_heads == self.n_heads:
            return f"{head_label(layer, group)}.{letter}"
        return f"L{layer}KV{group}.{letter}"

    def edge_name(self, sender: int, receiver: int) -> str:
        return f"{self.sender_name(sender)}->{self.receiver_name(receiver)}"

    def sender_names(self) -> list[str]:
        return [self.sender_name(sender) for sender in range(self.n_senders)]

    def receiver_names(self) -> list[str]:
        return [self.receiver_name(receiver) for receiver in range(self.n_receivers)]

    def parse_edge(self, name: str) -> tuple[int, int]:
        """``"L0H1->L3H2.q"`` -> ``(sender, receiver)``; a clear error for a name that is not an edge."""
        senders = {n: i for i, n in enumerate(self.sender_names())}
        receivers = {n: i for i, n in enumerate(self.receiver_names())}
        left, arrow, right = name.partition("->")
        if not arrow or left not in senders or right not in receivers:
            raise ValueError(f"{name!r} is not an edge of this graph (expected like 'L0H1->L3H2.q' or 'MLP2->logits')")
        sender, receiver = senders[left], receivers[right]
        if sender >= self.senders_before(receiver):
            raise ValueError(f"{name!r}: {left} does not run before {right} reads")
        return sender, receiver

    # --- nodes of receivers, masks of node sets -------------------------------------------------------------

    def receiver_senders(self, receiver: int) -> list[int]:
        """The sender node(s) that read through ``receiver``: its head, the query heads sharing a key/value
        head, its MLP; none for the logits."""
        if receiver == self.logits_receiver:
            return []
        layer, offset = divmod(receiver, self.receivers_per_layer)
        if offset == self.receivers_per_layer - 1:
            return [self.mlp_sender(layer)]
        if offset < self.n_heads:
            return [self.head_sender(layer, offset)]
        group = (offset - self.n_heads) % self.n_kv_heads
        rep = self.n_heads // self.n_kv_heads
        return [self.head_sender(layer, h) for h in range(group * rep, (group + 1) * rep)]

    def edges_among(self, nodes: Iterable[str]) -> Bool[Tensor, "n_senders n_receivers"]:
        """The edges a node-level circuit implies: from the input or a kept node to a receiver of a kept node or
        the logits. With these edges kept and every other edge patched, the run equals ablating (resample) every
        node outside ``nodes`` (tested against :class:`mechfin_utils.methods.circuits.nodes.NodeAblator`)."""
        names = self.sender_names()
        index = {n: i for i, n in enumerate(names)}
        unknown = [n for n in nodes if n not in index or n == INPUT]
        if unknown:
            raise ValueError(f"not head or MLP names of this graph: {unknown}")
        kept = torch.zeros(self.n_senders, dtype=torch.bool)
        kept[0] = True
        kept[[index[n] for n in nodes]] = True
        reads = torch.tensor(
            [
                receiver == self.logits_receiver or bool(kept[self.receiver_senders(receiver)].any())
                for receiver in range(self.n_receivers)
            ]
        )
        return kept[:, None] & reads[None, :] & self.valid()

    def nodes_of(self, edges: Bool[Tensor, "n_senders n_receivers"]) -> list[str]:
        """The heads and MLPs an edge set touches (as sender or through a receiver), upstream first."""
        touched = set(edges.any(1).nonzero().flatten().tolist())
        for receiver in edges.any(0).nonzero().flatten().tolist():
            touched.update(self.receiver_senders(receiver))
        return [self.sender_name(sender) for sender in sorted(touched - {0})]

    def edge_list(self, edges: Bool[Tensor, "n_senders n_receivers"]) -> list[str]:
        return [self.edge_name(sender, receiver) for sender, receiver in edges.nonzero().tolist()]

    def mask(self, names: Sequence[str]) -> Bool[Tensor, "n_senders n_receivers"]:
        """An edge mask from edge names."""
        out = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for name in names:
            out[self.parse_edge(name)] = True
        return out
