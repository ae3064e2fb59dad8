"""Attention heads by name: one label format, ``"L.H"``, parsed by one function, and the heads ranked by a value.

Per-head results in mechfin are arrays ``[batch, n_layers, n_heads]`` (a head's direct logit attribution per
prompt, the final position's attention to a phrase per prompt, ...) or their mean ``[n_layers, n_heads]``. A head
is named ``"10.7"`` (layer 10, head 7): :func:`head_labels` lists the labels in the order of
``values.reshape(batch, -1)``, :func:`parse_head` turns a label (or a ``(layer, head)`` pair) back into indices,
checked against the model when its sizes are given, :func:`select_heads` takes the named heads' columns, and
:func:`top_heads` ranks every head by a mean value. The interval tables built on these (``head_table``,
``named_heads_table``) are in :mod:`mechfin_utils.reporting.readout_tables`; :func:`as_float_rows` is the check
they share (a per-prompt array of the expected number of dimensions, as float64 on the CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor


def as_float_rows(values, argument: str, ndim: int) -> Tensor:
    """A float tensor of ``ndim`` dimensions on the CPU (numpy and lists are accepted too)."""
    tensor = values.detach() if isinstance(values, Tensor) else torch.as_tensor(values)
    if tensor.ndim != ndim:
        raise ValueError(f"{argument} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    return tensor.to(device="cpu", dtype=torch.float64)


def head_labels(n_layers: int, n_heads: int) -> list[str]:
    """``"L.H"`` labels in the order of ``values.reshape(batch, -1)`` for ``values`` ``[batch, n_layers, n_heads]``."""
    return [f"{layer}.{head}" for layer in range(n_layers) for head in range(n_heads)]


def parse_head(
    label: str | tuple[int, int], n_layers: int | None = None, n_heads: int | None = None
) -> tuple[int, int]:
    """``"10.7"`` (or ``(10, 7)``) -> ``(10, 7)``; with ``n_layers``/``n_heads`` the head must exist in that model."""
    if isinstance(label, (tuple, list)) and len(label) == 2 and all(isinstance(v, int) and v >= 0 for v in label):
        layer, head = int(label[0]), int(label[1])
    else:
        parts = label.strip().split(".") if isinstance(label, str) else []
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise ValueError(f"head label {label!r} is not of the form 'layer.head' (e.g. '10.7') or (layer, head)")
        layer, head = int(parts[0]), int(parts[1])
    if n_layers is not None and layer >= n_layers:
        raise ValueError(f"head {label!r}: layer {layer} does not exist (the model has {n_layers} layers)")
    if n_heads is not None and head >= n_heads:
        raise ValueError(f"head {label!r}: head {head} does not exist (the model has {n_heads} heads per layer)")
    return layer, head


def select_heads(
    per_prompt: Float[Tensor, "batch n_layers n_heads"], heads: Sequence[str]
) -> Float[Tensor, "batch n_selected"]:
    """The columns of the named heads (``"L.H"``), in the order given."""
    per_prompt = as_float_rows(per_prompt, "per_prompt", 3)
    _, n_layers, n_heads = per_prompt.shape
    if not len(heads):
        raise ValueError("heads is empty: name at least one head as 'layer.head'")
    pairs = [parse_head(label, n_layers, n_heads) for label in heads]
    return torch.stack([per_prompt[:, layer, head] for layer, head in pairs], dim=1)


def top_heads(
    values: Float[Tensor, "n_layers n_heads"],
    k: int = 10,
    *,
    order: Literal["abs", "positive", "negative"] = "abs",
) -> list[tuple[str, float]]:
    """The k heads with the largest values, as ``("L.H", value)`` pairs, sorted.

    ``values`` is one number per head (e.g. ``head_attribution(...).heads.mean(0)``). ``order="abs"``
    ranks by magnitude (either sign; the value keeps its sign), ``"positive"`` by largest value
    (pushing toward the first answer), ``"negative"`` by most negative.
    """
    if not isinstance(values, Tensor) or values.ndim != 2:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"values must be [n_layers, n_heads] (average over the batch first, e.g. .mean(0)); got {shape}"
        )
    if order not in ("abs", "positive", "negative"):
        raise ValueError(f"order must be 'abs', 'positive' or 'negative', got {order!r}")
    n_heads = values.shape[1]
    if not isinstance(k, int) or not 1 <= k <= values.numel():
        raise ValueError(f"k must be an integer in [1, {values.numel()}] (the number of heads), got {k!r}")
    flat = values.detach().flatten().float().cpu()
    key = {"abs": flat.abs(), "positive": flat, "negative": -flat}[order]
    chosen = torch.argsort(key, descending=True, stable=True)[:k]
    return [(f"{int(i) // n_heads}.{int(i) % n_heads}", float(flat[i])) for i in chosen]
