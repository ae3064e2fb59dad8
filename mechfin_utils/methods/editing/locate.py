"""Locate: which layer to edit, and by how much it beats the next best.

ROME edits the MLP whose output, restored at the subject's last token, brings back most of the answer in a causal
trace (notebook 06), averaged over facts. With a handful of facts two layers can nearly tie, and the choice is then a
property of the sample, not of the model. :func:`choose_layer` takes the per-fact indirect effects ``[fact, layer]``
and returns the chosen layer with what a reader needs to judge it: the runner-up, the margin between them with a
bootstrap interval over facts, and how often a resample of the facts would have chosen each layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from jaxtyping import Float

from mechfin_utils.core.stats import bootstrap_distribution, paired_bootstrap_ci


@dataclass(frozen=True)
class LayerChoice:
    """The chosen layer (largest mean effect), the runner-up, the margin and its interval over facts."""

    layer: int
    runner_up: int
    effect: float
    runner_up_effect: float
    margin: float  # mean effect at layer - at runner-up
    margin_low: float
    margin_high: float
    share_choosing_layer: float  # share of bootstrap resamples of the facts whose argmax is ``layer``
    share_choosing_runner_up: float
    n_facts: int
    n_boot: int

    @property
    def clear(self) -> bool:
        """Whether the margin's interval excludes 0 (the layer beats the runner-up on any resample's evidence)."""
        return self.margin_low > 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clear": self.clear}


def choose_layer(
    effects: Float[np.ndarray, "fact layer"], *, n_boot: int = 2000, seed: int = 0, ci: float = 0.95
) -> LayerChoice:
    """The layer of largest mean effect over facts, the runner-up (second largest mean), the paired margin with a
    bootstrap interval over facts, and the share of resamples whose argmax is each of the two."""
    effects = np.asarray(effects, dtype=np.float64)
    if effects.ndim != 2 or effects.shape[0] < 2 or effects.shape[1] < 2:
        raise ValueError(f"effects must be [fact, layer] with at least 2 facts and 2 layers, got {effects.shape}")
    mean = effects.mean(0)
    layer, runner_up = (int(i) for i in np.argsort(-mean, kind="stable")[:2])
    margin = paired_bootstrap_ci(effects[:, layer], effects[:, runner_up], n_boot=n_boot, ci=ci, seed=seed)
    argmax = bootstrap_distribution(effects, n_boot=n_boot, seed=seed).argmax(1)  # [n_boot]
    return LayerChoice(
        layer=layer,
        runner_up=runner_up,
        effect=float(mean[layer]),
        runner_up_effect=float(mean[runner_up]),
        margin=float(margin.estimate),
        margin_low=float(margin.low),
        margin_high=float(margin.high),
        share_choosing_layer=float(np.mean(argmax == layer)),
        share_choosing_runner_up=float(np.mean(argmax == runner_up)),
        n_facts=int(effects.shape[0]),
        n_boot=int(n_boot),
    )
