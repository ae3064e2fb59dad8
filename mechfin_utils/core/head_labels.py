"""Components by name: heads in one format, ``"L10H7"`` (layer 10, head 7), written by one function and read by one;
MLPs as ``"MLP10"``; and :class:`Node`, the one type for "a head or a whole MLP of one layer" (circuit nodes, the
components patched at the answer position).

Every head label mechfin writes comes from :func:`head_label` (or :func:`head_labels`, all of a model's heads):
the direct-logit-attribution and readout tables, the papers' claims (:mod:`mechfin_utils.tasks.paper_claims`),
circuit nodes, the computational graph's node and edge names (``"L0H1->L3H2.q"``), the attention views and the
results JSON. Every label it reads goes through :func:`parse_head`, which checks the head against the model when
the model's sizes are given and names the label and the expected format when it is not one.

Why ``"L10H7"``: it cannot be read as a number (``"10.7"`` is a decimal to a spreadsheet, and ``"10.10"`` and
``"10.1"`` are the same number), it sits unambiguously next to numbers in tables, and it is how ACDC, the edge
attribution papers and TransformerLens's examples write heads. The papers mechfin follows write ``"10.7"``; the
notebooks quote them so in prose, and label the heads ``"L10H7"`` everywhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEAD_LABEL_FORMAT = "L<layer>H<head>"
"""The one head-label format, in words (``"L10H7"`` is layer 10, head 7)."""

_HEAD_LABEL = re.compile(r"L(\d+)H(\d+)")
_DOTTED = re.compile(r"(\d+)\.(\d+)")


def head_label(layer: int, head: int) -> str:
    """``(10, 7)`` -> ``"L10H7"``: the label of head ``head`` of layer ``layer``."""
    return f"L{int(layer)}H{int(head)}"


def head_labels(n_layers: int, n_heads: int) -> list[str]:
    """Every head's label, layer by layer: the order of ``values.reshape(batch, -1)`` for ``values`` shaped
    ``[batch, n_layers, n_heads]`` (``["L0H0", "L0H1", ..., "L{n_layers-1}H{n_heads-1}"]``)."""
    return [head_label(layer, head) for layer in range(n_layers) for head in range(n_heads)]


def parse_head(
    label: str | tuple[int, int], n_layers: int | None = None, n_heads: int | None = None
) -> tuple[int, int]:
    """``"L10H7"`` (or ``(10, 7)``) -> ``(10, 7)``; with ``n_layers``/``n_heads`` the head must exist in that model.

    Raises:
        ValueError: naming the label and the expected format (``"L<layer>H<head>"``) when it is neither such a label
            nor a ``(layer, head)`` pair of non-negative integers, or the head the model does not have.
    """
    if isinstance(label, (tuple, list)) and len(label) == 2 and all(isinstance(v, int) and v >= 0 for v in label):
        layer, head = int(label[0]), int(label[1])
    else:
        match = _HEAD_LABEL.fullmatch(label.strip()) if isinstance(label, str) else None
        if match is None:
            hint = ""
            dotted = _DOTTED.fullmatch(label.strip()) if isinstance(label, str) else None
            if dotted is not None:  # the papers' way of writing a head
                layer, head = map(int, dotted.groups())
                hint = f"; for layer {layer}, head {head} write {head_label(layer, head)!r}"
            raise ValueError(
                f"head label {label!r} is not of the form {HEAD_LABEL_FORMAT!r} (e.g. 'L10H7' for layer 10, head 7) "
                f"nor a (layer, head) pair{hint}"
            )
        layer, head = int(match.group(1)), int(match.group(2))
    if n_layers is not None and layer >= n_layers:
        raise ValueError(f"head {label!r}: layer {layer} does not exist (the model has {n_layers} layers)")
    if n_heads is not None and head >= n_heads:
        raise ValueError(f"head {label!r}: head {head} does not exist (the model has {n_heads} heads per layer)")
    return layer, head


@dataclass(frozen=True)
class Node:
    """One component: attention head ``(layer, head)``, or the whole MLP of ``layer`` (head None). A node of the
    circuits' computational graph, and what :mod:`mechfin_utils.methods.patching.final_position` patches."""

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
        return f"MLP{self.layer}" if self.head is None else head_label(self.layer, self.head)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Node({self.name})"

    @classmethod
    def parse(cls, name: str) -> Node:
        """``"L5H3"`` -> head 3 of layer 5 (a head label, read by :func:`mechfin_utils.core.head_labels.parse_head`);
        ``"MLP5"`` -> the MLP of layer 5."""
        text = name.strip() if isinstance(name, str) else ""
        if text.startswith("MLP") and text[3:].isdigit():
            return cls(int(text[3:]))
        try:
            return cls(*parse_head(text))
        except ValueError:
            raise ValueError(
                f"{name!r} is not a node name (expected a head like 'L5H3' or an MLP like 'MLP5')"
            ) from None

    def sort_key(self) -> tuple[int, int]:
        """Upstream first: by layer, heads before the MLP of the same layer (the MLP reads them)."""
        return (self.layer, (self.head if self.head is not None else 10**9))
