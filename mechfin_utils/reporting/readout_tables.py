"""Tables of readout results over a task set: means with bootstrap intervals, per component, head or group.

The readouts (:mod:`mechfin_utils.methods.readout`) return one number per prompt and component (a layer's
share of the logit difference, a head's, a head's attention to a phrase). The notebooks report averages over
the task set with percentile-bootstrap intervals (:mod:`mechfin_utils.core.stats`), resampling *prompts*: all
components of a prompt stay together, so intervals of different components come from the same resamples.

* :func:`ci_table` -- the generic one: per component, mean, interval and the sign the interval supports;
* :func:`paired_ci_table` -- clean, corrupted and their per-pair gap side by side;
* :func:`head_table` -- chosen or top heads of a ``[batch, n_layers, n_heads]`` array, with ranks;
  :func:`named_heads_table` -- chosen heads with their rank by magnitude among all the model's heads;
* :func:`grouped_ci_table` -- the same within groups of prompts (e.g. per prohibited basis);
* :func:`compare_with_paper` -- the paper's claimed signs (:mod:`mechfin_utils.tasks.paper_claims`, GPT-2 Small
  only) next to this run's intervals;
* :func:`component_display_name` -- a component label of ``dla.layer_decomposition`` as figures show it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.core.arrays import as_checked_tensor
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.stats import bootstrap_ci
from mechfin_utils.methods.readout.dla import UNEMBED_BIAS_LABEL, layer_decomposition, over_batches
from mechfin_utils.methods.readout.heads import head_label, parse_head, select_heads, top_heads
from mechfin_utils.tasks.paper_claims import Sign

# ---------------------------------------------------------------------------------------------------------
# Per component
# ---------------------------------------------------------------------------------------------------------


def ci_table(
    labels: Sequence[str],
    values: Float[Tensor, "batch n_components"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean over prompts of each component, with its percentile-bootstrap interval.

    This is the one table every summary below builds on. Rows (prompts) are resampled jointly, so the
    resamples are the same for every component (and for every call with the same ``seed`` and row count).

    Returns:
        A DataFrame indexed by ``labels`` (index name ``component``) with columns ``n`` (prompts), ``mean``,
        ``low``, ``high`` and ``sign``: ``"positive"``/``"negative"`` when the interval excludes 0 on that
        side, ``"unclear"`` when it contains 0.
    """
    values = as_checked_tensor(values, "values", ndim=2)
    labels = [str(label) for label in labels]
    if len(labels) != values.shape[1]:
        raise ValueError(f"got {len(labels)} labels for {values.shape[1]} columns of values")
    if len(set(labels)) != len(labels):
        repeated = next(label for label in labels if labels.count(label) > 1)
        raise ValueError(f"labels repeat {repeated!r}; every component needs its own label")
    result = bootstrap_ci(values.numpy(), n_boot=n_boot, ci=ci, seed=seed)
    low, high = np.asarray(result.low), np.asarray(result.high)  # one per component
    sign = ["positive" if lo > 0 else "negative" if hi < 0 else "unclear" for lo, hi in zip(low, high)]
    return pd.DataFrame(
        {"n": result.n, "mean": result.estimate, "low": low, "high": high, "sign": sign},
        index=pd.Index(labels, name="component"),
    )


def paired_ci_table(
    labels: Sequence[str],
    clean: Float[Tensor, "batch n_components"],
    corrupted: Float[Tensor, "batch n_components"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`ci_table` for the clean run, the corrupted run and their per-pair difference, side by side.

    Row ``i`` of ``clean`` and ``corrupted`` must be the two prompts of pair ``i`` (as from
    :func:`~mechfin_utils.methods.readout.dla.over_batches`). The difference ``clean - corrupted`` is taken per
    pair before resampling (a paired bootstrap). Columns: ``n``, then ``clean``, ``clean_low``, ``clean_high``
    and the same for ``corrupted`` and ``gap``.
    """
    clean = as_checked_tensor(clean, "clean", ndim=2)
    corrupted = as_checked_tensor(corrupted, "corrupted", ndim=2)
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must be paired: same shape"
        )
    parts = []
    for name, values in (("clean", clean), ("corrupted", corrupted), ("gap", clean - corrupted)):
        table = ci_table(labels, values, n_boot=n_boot, ci=ci, seed=seed)[["mean", "low", "high"]]
        parts.append(table.rename(columns={"mean": name, "low": f"{name}_low", "high": f"{name}_high"}))
    out = pd.concat(parts, axis=1)
    out.insert(0, "n", clean.shape[0])
    return out


def grouped_ci_table(
    labels: Sequence[str],
    values: Float[Tensor, "batch n_components"],
    groups: Sequence[str],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`ci_table` within each group of prompts (e.g. per prohibited basis), as one long table.

    ``groups[i]`` names the group of row ``i``. Groups come in sorted order; group ``g`` is resampled with
    seed ``seed + g``. A group with a single prompt keeps its value as the mean, with no interval (NaN
    ``low``/``high`` and ``sign`` ``"unclear"``): one observation has no spread to resample.

    Returns:
        Columns ``group``, ``component``, ``n``, ``mean``, ``low``, ``high``, ``sign``; use
        ``.pivot(index="group", columns="component", values="mean")`` for a group x component grid.
    """
    values = as_checked_tensor(values, "values", ndim=2, allow_nan=True)  # each group's ci_table checks its own rows
    groups = [str(group) for group in groups]
    if len(groups) != values.shape[0]:
        raise ValueError(f"got {len(groups)} groups for {values.shape[0]} rows of values")
    labels = [str(label) for label in labels]
    frames = []
    for index, group in enumerate(sorted(set(groups))):
        rows = torch.tensor([i for i, g in enumerate(groups) if g == group])
        if len(rows) == 1:
            table = pd.DataFrame(
                {"n": 1, "mean": values[rows[0]].numpy(), "low": float("nan"), "high": float("nan"), "sign": "unclear"},
                index=pd.Index(labels, name="component"),
            )
        else:
            table = ci_table(labels, values[rows], n_boot=n_boot, ci=ci, seed=seed + index)
        frames.append(table.reset_index().assign(group=group))
    columns = ["group", "component", "n", "mean", "low", "high", "sign"]
    return pd.concat(frames, ignore_index=True)[columns]


# ---------------------------------------------------------------------------------------------------------
# Per head
# ---------------------------------------------------------------------------------------------------------


HeadOrder = Literal["abs", "positive", "negative", "extremes"]


def head_table(
    per_prompt: Float[Tensor, "batch n_layers n_heads"],
    heads: Sequence[str] | None = None,
    *,
    k: int = 10,
    order: HeadOrder = "abs",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Chosen heads with their mean over prompts, bootstrap interval and rank among all heads.

    ``per_prompt`` is one value per prompt and head (``head_attribution(...).heads``, or the attention
    from the final position to a phrase). The heads are the ``heads`` given (``"L10H7"``), else the top ``k``
    by the mean under ``order`` (see :func:`top_heads`; ``"extremes"`` takes the ``k`` most positive and
    the ``k`` most negative). ``rank`` is each head's place among all heads under ``order`` (for
    ``"extremes"`` and ``"abs"``: by magnitude), 1 being the top.

    Returns:
        A DataFrame indexed by head label with columns ``layer``, ``head_index``, ``rank`` and those of
        :func:`ci_table`, in the order of selection.
    """
    per_prompt = as_checked_tensor(per_prompt, "per_prompt", ndim=3, allow_nan=True)  # ci_table checks the chosen
    if order not in ("abs", "positive", "negative", "extremes"):
        raise ValueError(f"order must be 'abs', 'positive', 'negative' or 'extremes', got {order!r}")
    batch, n_layers, n_heads = per_prompt.shape
    mean = per_prompt.mean(0)
    if heads is None:
        if order == "extremes":
            if not isinstance(k, int) or not 1 <= 2 * k <= mean.numel():
                raise ValueError(f"k must be an integer in [1, {mean.numel() // 2}] for order='extremes', got {k!r}")
            chosen = [h for h, _ in top_heads(mean, k, order="positive")]
            chosen += [h for h, _ in reversed(top_heads(mean, k, order="negative"))]
        else:
            chosen = [h for h, _ in top_heads(mean, k, order=order)]
    else:
        chosen = [head_label(*parse_head(h, n_layers, n_heads)) for h in heads]  # (10, 7) or "L10H7" -> "L10H7"
    rank_order = "abs" if order == "extremes" else order
    ranking = [h for h, _ in top_heads(mean, mean.numel(), order=rank_order)]
    rank = {h: i + 1 for i, h in enumerate(ranking)}
    table = ci_table(chosen, select_heads(per_prompt, chosen), n_boot=n_boot, ci=ci, seed=seed)
    table.index.name = "head"
    positions = [parse_head(h) for h in chosen]
    table.insert(0, "rank", [rank[h] for h in chosen])
    table.insert(0, "head_index", [h for _, h in positions])
    table.insert(0, "layer", [layer for layer, _ in positions])
    return table


def named_heads_table(
    head_values: Float[Tensor, "batch n_layers n_heads"],
    heads: Sequence[str],
    model: LoadedModel,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Chosen heads' per-prompt values (e.g. ``dla.head_attribution(...).heads``) summarised with intervals.

    Columns: head, mean (over prompts), low, high (percentile bootstrap over prompts), rank_by_abs (1 = the head
    with the largest |mean| among all the model's heads).
    """
    if not isinstance(head_values, Tensor) or head_values.ndim != 3:
        shape = tuple(head_values.shape) if isinstance(head_values, Tensor) else type(head_values).__name__
        raise ValueError(f"head_values must be [batch, n_layers, n_heads]; got {shape}")
    expected = (model.cfg.n_layers, model.cfg.n_heads)
    if tuple(head_values.shape[1:]) != expected:
        raise ValueError(f"head_values has {tuple(head_values.shape[1:])} layers x heads; {model.name} has {expected}")
    chosen = [parse_head(h, model.cfg.n_layers, model.cfg.n_heads) for h in heads]
    if not chosen:
        raise ValueError("heads is empty")
    interval = bootstrap_ci(head_values, n_boot=n_boot, ci=ci, seed=seed)
    estimate, low, high = (np.asarray(x) for x in (interval.estimate, interval.low, interval.high))  # [layer, head]
    mean = torch.as_tensor(estimate)
    order = mean.abs().flatten().argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, order.numel() + 1)
    rank = rank.reshape(mean.shape)
    return pd.DataFrame(
        {
            "head": [head_label(L, H) for L, H in chosen],
            "mean": [float(estimate[L, H]) for L, H in chosen],
            "low": [float(low[L, H]) for L, H in chosen],
            "high": [float(high[L, H]) for L, H in chosen],
            "rank_by_abs": [int(rank[L, H]) for L, H in chosen],
        }
    )


# ---------------------------------------------------------------------------------------------------------
# Against the paper, and names for figures
# ---------------------------------------------------------------------------------------------------------


def compare_with_paper(table: pd.DataFrame, claims: dict[str, Sign]) -> pd.DataFrame:
    """The paper's claimed sign for each component next to this run's mean and interval.

    ``table`` is a :func:`ci_table`/:func:`head_table` result (index: labels; columns ``mean``, ``low``,
    ``high``; a ``rank`` column is carried over when present). ``verdict`` is ``"agrees"`` when this run's
    interval lies on the claimed side of 0, ``"opposite"`` when it lies on the other side, and ``"unclear"``
    when it contains 0.
    """
    rows = []
    for label, claimed in claims.items():
        if claimed not in ("positive", "negative"):
            raise ValueError(f"claim for {label!r} must be 'positive' or 'negative', got {claimed!r}")
        if label not in table.index:
            raise KeyError(f"{label!r} is not in the table (first labels: {list(table.index[:5])})")
        row = table.loc[label]
        observed = "positive" if row["low"] > 0 else "negative" if row["high"] < 0 else "unclear"
        verdict = "unclear" if observed == "unclear" else "agrees" if observed == claimed else "opposite"
        entry = {
            "component": label,
            "paper": claimed,
            "this_run": row["mean"],
            "low": row["low"],
            "high": row["high"],
            "verdict": verdict,
        }
        if "rank" in table.columns:
            entry["rank"] = int(row["rank"])
        rows.append(entry)
    return pd.DataFrame(rows).set_index("component")


def component_display_name(label: str) -> str:
    """A label of :func:`~mechfin_utils.methods.readout.dla.layer_decomposition` for figures:
    ``"3_attn_out"`` -> ``"attn 3"``, ``"3_mlp_out"`` -> ``"MLP 3"``, ``"unembed_bias"`` -> ``"unembed bias"``,
    ``"pos_embed"`` -> ``"pos embed"``."""
    parts = label.split("_")
    if len(parts) == 3 and parts[0].isdigit() and parts[2] == "out" and parts[1] in ("attn", "mlp"):
        return f"{'attn' if parts[1] == 'attn' else 'MLP'} {parts[0]}"
    if label in ("embed", "pos_embed", UNEMBED_BIAS_LABEL):
        return label.replace("_", " ")
    raise ValueError(f"{label!r} is not a component label of layer_decomposition")


def dla_gap_components(model, batches, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per layer component (embeddings, each attention and MLP output), its direct logit attribution on clean
    minus corrupted prompts (the protected-basis signal it writes directly), mean over pairs with a bootstrap
    interval; columns ``label, mean, low, high``, in layer order."""
    parts = over_batches(layer_decomposition, model, batches)
    labels, clean = parts["clean"]
    _, corrupted = parts["corrupted"]
    table = ci_table(labels, clean - corrupted, n_boot=n_boot, seed=seed)
    table = table.reset_index().rename(columns={table.index.name or "index": "component"})
    table["label"] = [component_display_name(label) for label in table["component"]]
    return table
