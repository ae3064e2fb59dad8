"""Causal traces averaged over prompts by position category (ROME's summary).

One prompt's trace (:class:`~mechfin_utils.methods.tracing.causal_trace.TraceResult`) is a ``[pos, layer]``
map; prompts differ in length and in where their subject sits, so they are averaged by *what* each token is
rather than by its index. ROME's six categories (:func:`position_categories`): the first, middle and last
subject token; the first token after the subject; further tokens; the last token. Each prompt contributes its
own mean over the tokens of a category, and a category counts the prompts that have tokens there
(:func:`average_by_position_category` -> :class:`CategoryAverage`, ``mean[category, layer]``). ROME's finding
reads off this table: a peak at the last subject token in early-middle MLP layers, and at the last token in
late layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float, Int

from mechfin_utils.core.stats import BootstrapResult, bootstrap_ci

if TYPE_CHECKING:  # pragma: no cover
    from mechfin_utils.methods.tracing.causal_trace import TraceResult

POSITION_CATEGORIES: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def position_categories(subject_span: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    """ROME's six token categories for a prompt (a category may be empty).

    first / middle / last subject token; first subsequent token (right after the subject); further
    tokens (between that one and the last); last token. A one-token subject is both the first and the
    last subject token; when the subject ends the prompt, its last token is also the "last token".
    """
    start, stop = subject_span
    if not 0 <= start < stop <= n_tokens:
        raise ValueError(f"subject span {subject_span} does not fit a prompt of {n_tokens} tokens")
    last = n_tokens - 1
    after = [p for p in range(stop, last)]
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, stop - 1)),
        "last subject token": [stop - 1],
        "first subsequent token": after[:1],
        "further tokens": after[1:],
        "last token": [last],
    }


@dataclass
class CategoryAverage:
    """Indirect effect averaged per position category over prompts: ``mean[category, layer]``.

    A prompt contributes to a category when it has tokens there (its own mean over them); ``counts``
    says how many prompts each row averages. Rows with no prompt are NaN.
    """

    kind: str
    model_name: str
    score_name: str
    mean: Float[np.ndarray, "6 layer"]
    counts: Int[np.ndarray, " 6"]
    categories: tuple[str, ...] = POSITION_CATEGORIES
    mean_clean: float = float("nan")
    mean_corrupted: float = float("nan")
    per_prompt: Float[np.ndarray, "prompt 6 layer"] | None = None  # each prompt's own means (NaN: no such token)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the categories that hold at least one prompt, their counts and ``[category, layer]`` means
        (empty categories are left out rather than written as NaN)."""
        kept = [i for i, n in enumerate(self.counts) if n > 0]
        return {
            "kind": self.kind,
            "score": self.score_name,
            "categories": [self.categories[i] for i in kept],
            "counts": [int(self.counts[i]) for i in kept],
            "mean": self.mean[kept].tolist(),
            "mean_clean": self.mean_clean,
            "mean_corrupted": self.mean_corrupted,
        }

    def peak(self) -> tuple[str, int, float]:
        """``(category, layer, value)`` of the largest average indirect effect."""
        flat = np.nanargmax(self.mean)
        c, l = np.unravel_index(flat, self.mean.shape)
        return self.categories[c], int(l), float(self.mean[c, l])

    def interval(self, category: str, layer: int, *, n_boot: int = 1000, seed: int = 0) -> BootstrapResult | None:
        """A 95% bootstrap interval over prompts for ``mean[category, layer]`` (None with fewer than two prompts
        there, or when the per-prompt values were not kept)."""
        if self.per_prompt is None:
            return None
        column = self.per_prompt[:, self.categories.index(category), layer]
        column = column[~np.isnan(column)]
        return bootstrap_ci(column, n_boot=n_boot, seed=seed) if column.size >= 2 else None

    def peak_layer_interval(self, category: str, *, n_boot: int = 1000, seed: int = 0) -> tuple[int, int] | None:
        """Where the peak *is*, with its uncertainty: the layer of the largest mean effect at ``category`` in
        bootstrap resamples of the prompts, 2.5th and 97.5th percentiles (None with fewer than two prompts there,
        or when the per-prompt values were not kept). A peak layer whose interval spans half the model is not a
        location."""
        if self.per_prompt is None:
            return None
        rows = self.per_prompt[:, self.categories.index(category)]
        rows = rows[~np.isnan(rows[:, 0])]
        if rows.shape[0] < 2:
            return None
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, rows.shape[0], size=(n_boot, rows.shape[0]))
        layers = rows[picks].mean(axis=1).argmax(axis=1)
        low, high = np.percentile(layers, [2.5, 97.5])
        return int(np.floor(low)), int(np.ceil(high))

    def peak_summary(self, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        """The peak, the prompts it averages and its interval over them (None bounds with fewer than two)."""
        category, layer, value = self.peak()
        interval = self.interval(category, layer, n_boot=n_boot, seed=seed)
        return {
            "category": category,
            "layer": layer,
            "effect": value,
            "effect_low": None if interval is None else float(interval.low),
            "effect_high": None if interval is None else float(interval.high),
            "n_prompts": int(self.counts[self.categories.index(category)]),
        }


def average_by_position_category(results: Sequence[TraceResult]) -> CategoryAverage:
    """Average indirect effects over prompts by position category (all results of one kind and model)."""
    if not results:
        raise ValueError("no trace results to average")
    kinds = {r.kind for r in results}
    models = {r.model_name for r in results}
    layers = {r.n_layers for r in results}
    if len(kinds) > 1 or len(models) > 1 or len(layers) > 1:
        raise ValueError(f"results mix kinds {kinds} / models {models} / layer counts {layers}")
    n_layers = layers.pop()
    per_prompt = np.full((len(results), len(POSITION_CATEGORIES), n_layers), np.nan)
    for i, r in enumerate(results):
        cats = position_categories(r.subject_span, len(r.str_tokens))
        ie = r.indirect_effect
        for c, name in enumerate(POSITION_CATEGORIES):
            pos = cats[name]
            if not pos:
                continue
            block = ie[pos]
            if np.isnan(block).any():
                raise ValueError(f"{r.label}: category {name!r} has positions {pos} that were not traced")
            per_prompt[i, c] = block.mean(axis=0)
    counts = (~np.isnan(per_prompt[:, :, 0])).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(per_prompt, axis=0) / counts[:, None]
    mean[counts == 0] = np.nan
    return CategoryAverage(
        kind=results[0].kind,
        model_name=results[0].model_name,
        score_name=results[0].score_name,
        mean=mean,
        counts=counts,
        mean_clean=float(np.mean([r.clean_score for r in results])),
        mean_corrupted=float(np.mean([r.corrupted_score for r in results])),
        per_prompt=per_prompt,
    )
