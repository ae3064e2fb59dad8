"""What a patching sweep returns, and how each patched run becomes a value of the metric.

:class:`MetricReadout` turns the final-position states (or logits) of many patched runs into metric values. With
:class:`~mechfin_utils.core.metrics.NormalisedLogitDiff` it computes just the two answer logits of each prompt (not
the whole vocabulary) and keeps each prompt's logit difference; with any other callable it computes the logits and
calls the metric once per patch. :func:`store_values` writes the values into the result tensor at each cell's index.

:class:`PatchSweep` is the result with ``return_per_prompt=True``: the TransformerLens-equal values *and* each
prompt's patched logit difference, so that :meth:`PatchSweep.normalised` can renormalise any subset of prompts (a
bootstrap resample, :func:`mechfin_utils.methods.patching.sweeps.bootstrap_sweep`) without running anything again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.metrics import NormalisedLogitDiff, logit_diff, normalised_patching_metric
from mechfin_utils.methods.patching.components import PatchCell

Reduce = Literal["scalar", "mean", "none"]


# -----------------------------------------------------------------------------------------------------------
# Results
# -----------------------------------------------------------------------------------------------------------


@dataclass
class PatchSweep:
    """A sweep's TransformerLens-equal result with the per-prompt logit differences behind it.

    values:             ``[*axes]``, the normalised metric of the batch mean (what TransformerLens returns).
    logit_diff:         ``[*axes, batch]``, each prompt's patched ``logit(answer 0) - logit(answer 1)``.
    clean_logit_diff:   ``[batch]``, each prompt's clean-run logit difference.
    corrupted_logit_diff: ``[batch]``, each prompt's corrupted-run logit difference.
    axes, key, model_name: what was swept, on which model.
    """

    values: Tensor
    logit_diff: Tensor
    clean_logit_diff: Tensor
    corrupted_logit_diff: Tensor
    axes: tuple[str, ...]
    key: str
    model_name: str

    def normalised(self, prompts: Sequence[int] | Tensor | None = None) -> Tensor:
        """``(mean patched - mean corrupted) / (mean clean - mean corrupted)`` over ``prompts`` (indices,
        repeats allowed, e.g. a bootstrap resample; default all, which reproduces ``values``)."""
        if prompts is None:
            idx = torch.arange(self.clean_logit_diff.shape[0])
        else:
            idx = torch.as_tensor(prompts, dtype=torch.long)
            if idx.ndim != 1 or idx.numel() == 0:
                raise ValueError(
                    f"prompts must be a non-empty 1-D list of prompt indices, got shape {tuple(idx.shape)}"
                )
            batch = self.clean_logit_diff.shape[0]
            if bool(((idx < 0) | (idx >= batch)).any()):
                raise IndexError(f"prompts holds indices outside 0..{batch - 1}")
        return normalised_patching_metric(
            self.logit_diff[..., idx].mean(-1), self.clean_logit_diff[idx].mean(), self.corrupted_logit_diff[idx].mean()
        )


# -----------------------------------------------------------------------------------------------------------
# Reading the metric
# -----------------------------------------------------------------------------------------------------------


class MetricReadout:
    """Turns final-position states of ``[variants, batch]`` patched sequences into metric values.

    NormalisedLogitDiff: computes the two answer logits only; returns per-variant normalised values and
    per-prompt logit differences. Any other callable: full final-position logits, one metric call per variant.
    """

    def __init__(self, metric, reduce: Reduce, batch: int, per_prompt: bool):
        if reduce not in ("scalar", "mean", "none"):
            raise ValueError(f"reduce must be 'scalar', 'mean' or 'none', got {reduce!r}")
        self.metric, self.reduce, self.batch = metric, reduce, batch
        self.logit_diff = isinstance(metric, NormalisedLogitDiff)
        if self.logit_diff:
            if reduce != "scalar":
                raise ValueError(
                    "NormalisedLogitDiff returns the normalised batch mean (a scalar), so reduce must be 'scalar'; "
                    "for per-prompt values pass return_per_prompt=True"
                )
            answers = metric.answer_tokens
            if answers.ndim == 1:
                answers = answers.expand(batch, 2)
            if answers.shape != (batch, 2):
                raise ValueError(
                    f"metric.answer_tokens has shape {tuple(metric.answer_tokens.shape)}; the batch needs [{batch}, 2]"
                )
            self.answers = answers.cpu().long()
        elif per_prompt:
            raise ValueError(
                "return_per_prompt=True needs metric=NormalisedLogitDiff (per-prompt logit differences); for another "
                "metric return one value per prompt from it and pass reduce='none'"
            )
        elif not callable(metric):
            raise TypeError(f"metric must be NormalisedLogitDiff or a callable on logits, got {type(metric).__name__}")

    def tail(self) -> tuple[int, ...]:
        return (self.batch,) if self.reduce == "none" else ()

    def from_normed(
        self, fm: FunctionalTransformer, normed: Float[Tensor, "v batch d_model"]
    ) -> tuple[Tensor, Tensor | None]:
        if self.logit_diff:
            n_var = normed.shape[0]
            answers = self.answers.to(normed.device).repeat(n_var, 1)
            pair = fm.answer_logits(normed.reshape(-1, normed.shape[-1]), answers).view(n_var, self.batch, 2)
            return self._from_logit_diff(pair[..., 0] - pair[..., 1])
        return self.from_logits(fm.unembed(normed))

    def prompt_logit_diffs(
        self, fm: FunctionalTransformer, normed: Float[Tensor, "batch d_model"]
    ) -> Float[Tensor, " batch"]:
        """Each prompt's logit difference, from its final-normed residual (a NormalisedLogitDiff readout only)."""
        _, diffs = self.from_normed(fm, normed.unsqueeze(0))
        if diffs is None:
            raise ValueError("per-prompt logit differences need metric=NormalisedLogitDiff")
        return diffs[0]

    def from_logits(self, logits: Float[Tensor, "v batch d_vocab"]) -> tuple[Tensor, Tensor | None]:
        if self.logit_diff:
            answers = self.answers.to(logits.device)
            diffs = torch.stack([logit_diff(logits[v], answers) for v in range(logits.shape[0])])
            return self._from_logit_diff(diffs)
        values = [self._call(logits[v][:, None, :]) for v in range(logits.shape[0])]
        return torch.stack(values), None

    def _from_logit_diff(self, diffs: Float[Tensor, "v batch"]) -> tuple[Tensor, Tensor]:
        values = normalised_patching_metric(diffs.mean(-1), self.metric.clean, self.metric.corrupted)
        return values, diffs

    def _call(self, logits: Float[Tensor, "batch 1 d_vocab"]) -> Tensor:
        out = torch.as_tensor(self.metric(logits)).detach().float()
        if self.reduce == "scalar":
            if out.ndim != 0:
                raise ValueError(
                    f"metric must return a scalar under reduce='scalar', got shape {tuple(out.shape)}; return one value "
                    "per prompt and pass reduce='mean' or reduce='none'"
                )
            return out
        if out.shape != (self.batch,):
            raise ValueError(
                f"metric must return a [batch={self.batch}] tensor under reduce={self.reduce!r}, got {tuple(out.shape)}"
            )
        return out.mean() if self.reduce == "mean" else out


def store_values(
    cells: Sequence[PatchCell], values: Tensor, diffs: Tensor | None, store: Tensor, store_diffs: Tensor | None
) -> None:
    """Write each cell's value (and per-prompt logit differences) at its ``out_index`` of the result tensors."""
    for i, cell in enumerate(cells):
        store[cell.out_index] = values[i]
        if store_diffs is not None and diffs is not None:
            store_diffs[cell.out_index] = diffs[i]
