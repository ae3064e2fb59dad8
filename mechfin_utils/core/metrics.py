"""Task metrics, all read at the final position of each prompt.

The paper's metric is the logit difference ``logit(" Yes") - logit(" No")``. Logits are only defined up to
a shared constant, so only differences between them mean anything; the logit difference is also exactly
the log-odds between the two answers under the model, ``log p(Yes) - log p(No)``.

For patching, results are rescaled so that the corrupted run scores 0 and the clean run 1:

    normalised = (metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))

A component that restores the clean behaviour fully scores 1; one that does nothing scores 0; negative
values mean the patch pushed the answer further toward the corrupted one.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _final_logits(logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch d_vocab"]) -> Tensor:
    if logits.ndim == 3:
        return logits[:, -1, :]
    if logits.ndim == 2:
        return logits
    raise ValueError(f"logits must be [batch, pos, d_vocab] or [batch, d_vocab], got shape {tuple(logits.shape)}")


def _check_answers(answer_tokens: Tensor, batch: int) -> Tensor:
    if answer_tokens.ndim == 1 and answer_tokens.shape[0] == 2:
        answer_tokens = answer_tokens.expand(batch, 2)
    if answer_tokens.ndim != 2 or answer_tokens.shape[1] != 2 or answer_tokens.shape[0] != batch:
        raise ValueError(
            f"answer_tokens must be [batch={batch}, 2] (correct, incorrect) or [2]; got {tuple(answer_tokens.shape)}"
        )
    return answer_tokens


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch d_vocab"],
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
) -> Float[Tensor, " batch"]:
    """``logit(answer_tokens[:, 0]) - logit(answer_tokens[:, 1])`` at the final position, per prompt."""
    final = _final_logits(logits)
    answers = _check_answers(answer_tokens.to(final.device), final.shape[0])
    picked = final.gather(1, answers)
    return picked[:, 0] - picked[:, 1]


def normalised_prob_ratio(
    logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch d_vocab"],
    answer_tokens: Int[Tensor, "batch 2"] | Int[Tensor, " 2"],
) -> Float[Tensor, " batch"]:
    """``p(a) / (p(a) + p(b))``: the probability of the first answer renormalised over the two answers.

    Equals ``sigmoid(logit_diff)``; 0.5 means the model is indifferent between the two answers, and it
    ignores how much probability mass goes to other tokens.
    """
    return torch.sigmoid(logit_diff(logits, answer_tokens))


def normalised_patching_metric(
    patched: Float[Tensor, ...], clean: Float[Tensor, ""] | float, corrupted: Float[Tensor, ""] | float
) -> Float[Tensor, ...]:
    """Rescale a metric so that ``corrupted -> 0`` and ``clean -> 1``.

    Raises when clean and corrupted are (numerically) equal: the normalised metric is then undefined,
    which is exactly the situation where patching results must not be read at all.
    """
    clean_t = torch.as_tensor(clean, dtype=torch.float32)
    corrupted_t = torch.as_tensor(corrupted, dtype=torch.float32)
    gap = clean_t - corrupted_t
    if torch.any(gap.abs() < 1e-6):
        raise ValueError(
            f"clean ({clean_t.tolist()}) and corrupted ({corrupted_t.tolist()}) metrics are equal: "
            "the normalised patching metric is undefined"
        )
    return (patched - corrupted_t.to(patched.device)) / gap.to(patched.device)


class NormalisedLogitDiff:
    """A patching metric callable: mean logit difference over the batch, normalised (corrupted 0, clean 1).

    Built from the clean and corrupted logits once; calling it on patched logits returns a scalar tensor
    (differentiable, so it also serves attribution patching). ``answer_tokens`` is [batch, 2] with the
    clean answer first (e.g. `` Yes`` then `` No``).
    """

    def __init__(self, clean_logits: Tensor, corrupted_logits: Tensor, answer_tokens: Tensor):
        self.answer_tokens = answer_tokens
        self.clean = logit_diff(clean_logits, answer_tokens).mean().detach()
        self.corrupted = logit_diff(corrupted_logits, answer_tokens).mean().detach()
        normalised_patching_metric(torch.tensor(0.0), self.clean, self.corrupted)  # raises if undefined

    def __call__(self, logits: Tensor) -> Float[Tensor, ""]:
        return normalised_patching_metric(logit_diff(logits, self.answer_tokens).mean(), self.clean, self.corrupted)

    def __repr__(self) -> str:
        return f"NormalisedLogitDiff(clean={self.clean.item():.4f}, corrupted={self.corrupted.item():.4f})"
