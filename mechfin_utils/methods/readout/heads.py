"""Attention heads by name: the per-head results' columns picked by label, and the heads ranked by a value.

Per-head results in mechfin are arrays ``[batch, n_layers, n_heads]`` (a head's direct logit attribution per
prompt, the final position's attention to a phrase per prompt, ...) or their mean ``[n_layers, n_heads]``. A head
is named ``"L10H7"`` (layer 10, head 7): the one format, written by :func:`head_label` / :func:`head_labels` (the
labels in the order of ``values.reshape(batch, -1)``) and read by :func:`parse_head` (a label or a ``(layer, head)``
pair back into indices, checked against the model when its sizes are given), all three from
:mod:`mechfin_utils.core.head_labels` and exported here beside what uses them: :func:`select_heads` takes the named
heads' columns, and :func:`top_heads` ranks every head by a mean value. The interval tables built on these
(``head_table``, ``named_heads_table``) are in :mod:`mechfin_utils.reporting.readout_tables`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.core.arrays import as_checked_tensor
from mechfin_utils.core.head_labels import head_label, head_labels, parse_head

__all__ = ["head_label", "head_labels", "parse_head", "select_heads", "top_heads"]


def select_heads(
    per_prompt: Float[Tensor, "batch n_layers n_heads"], heads: Sequence[str]
) -> Float[Tensor, "batch n_selected"]:
    """The columns of the named heads (``"L10H7"``), in the order given."""
    per_prompt = as_checked_tensor(per_prompt, "per_prompt", ndim=3, allow_nan=True)
    _, n_layers, n_heads = per_prompt.shape
    if not len(heads):
        raise ValueError("heads is empty: name at least one head, e.g. 'L10H7'")
    pairs = [parse_head(label, n_layers, n_heads) for label in heads]
    return torch.stack([per_prompt[:, layer, head] for layer, head in pairs], dim=1)


def top_heads(
    values: Float[Tensor, "n_layers n_heads"],
    k: int = 10,
    *,
    order: Literal["abs", "positive", "negative"] = "abs",
) -> list[tuple[str, float]]:
    """The k heads with the largest values, as ``("L10H7", value)`` pairs, sorted.

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
    return [(head_label(*divmod(int(i), n_heads)), float(flat[i])) for i in chosen]
