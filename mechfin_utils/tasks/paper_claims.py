"""What the papers report for GPT-2 Small: the one place the notebooks and modules read published findings from.

Every number here is a claim *about GPT-2 Small* on the papers' own prompts. mechfin shows a paper-versus-this-run
table only when the model is GPT-2 Small itself (``Notebook.is_gpt2``); on any other model these layer and head
numbers name different components and mean nothing, and the notebooks say so.

Golgoon, Filom & Kannan (2024), arXiv 2407.11215 ("the paper"), on their unpublished fair-lending prompts, metric
``logit(" Yes") - logit(" No")`` at the last position:

* :data:`MEAN_LOGIT_DIFF` -- the mean metric on clean prompts (0.81; the paper's "probability ratio" 2.26,
  :data:`PROBABILITY_RATIO`, is e to that mean);
* :data:`LAYER_DLA` -- per-layer direct logit attribution: MLP 2 and MLP 4 push toward " Yes", MLP 10 and
  attention layer 0 toward " No" (labels as :func:`mechfin_utils.methods.readout.dla.layer_decomposition` writes them);
* :data:`HEAD_DLA` -- the largest positive and negative heads by direct logit attribution;
* :data:`HEAD_PATCHING` -- the heads activation patching singles out (the abstract's list).

Hanna, Liu & Variengien (2023), greater-than on GPT-2 Small: :data:`GREATER_THAN_MLPS` (the circuit's MLPs; 9
and 10 carry most of the computation) and :data:`GREATER_THAN_HEAD_LAYERS` (the layers of its attention heads,
which move the start year to the final position).

Wang et al. (2022), "Interpretability in the wild" (indirect-object identification, IOI), on GPT-2 Small with their
templates: :data:`IOI_LOGIT_DIFF` (mean ``logit(IO) - logit(S)``, about 3.55) and :data:`IOI_HEADS` (the circuit's
head classes: name movers, negative name movers, S-inhibition, induction, duplicate-token and previous-token heads).

Heads are written ``"layer.head"``; signs are ``"positive"`` (toward " Yes") or ``"negative"``.
"""

from __future__ import annotations

from typing import Literal

Sign = Literal["positive", "negative"]

MEAN_LOGIT_DIFF = 0.81
"""The paper's mean logit difference for GPT-2 Small on its clean prompts."""
PROBABILITY_RATIO = 2.26
"""The paper's "probability ratio" p(Yes) / p(No): e to the mean logit difference (e^0.81 = 2.25; 2.26 from the
unrounded mean)."""

LAYER_DLA: dict[str, Sign] = {
    "2_mlp_out": "positive",
    "4_mlp_out": "positive",
    "10_mlp_out": "negative",
    "0_attn_out": "negative",
}
HEAD_DLA: dict[str, Sign] = {
    "11.4": "positive",
    "8.9": "positive",
    "6.3": "positive",
    "0.6": "negative",
    "11.0": "negative",
    "10.7": "negative",
}
HEAD_PATCHING: dict[str, Sign] = {
    "10.2": "positive",
    "10.7": "positive",
    "11.3": "positive",
    "9.6": "negative",
    "10.6": "negative",
}

GREATER_THAN_MLPS: tuple[int, ...] = (8, 9, 10, 11)
GREATER_THAN_HEAD_LAYERS: tuple[int, ...] = (5, 6, 7, 8, 9)

IOI_LOGIT_DIFF = 3.55
IOI_HEADS: dict[str, tuple[str, ...]] = {
    "name mover": ("9.9", "9.6", "10.0"),
    "negative name mover": ("10.7", "11.10"),
    "S-inhibition": ("7.3", "7.9", "8.6", "8.10"),
    "induction": ("5.5", "6.9"),
    "duplicate token": ("0.1", "3.0"),
    "previous token": ("2.2", "4.11"),
}

_LAYER_WORDS = {"mlp_out": "MLP", "attn_out": "attention layer"}


def describe(claims: dict[str, Sign]) -> str:
    """The claims in words, for notebook text: ``"positive 11.4, 8.9, 6.3; negative 0.6, 11.0, 10.7"``; layer labels
    read ``"MLP 2"`` / ``"attention layer 0"``."""
    parts = []
    for sign in ("positive", "negative"):
        labels = [_readable(label) for label, claimed in claims.items() if claimed == sign]
        if labels:
            parts.append(f"{sign} {', '.join(labels)}")
    return "; ".join(parts)


def _readable(label: str) -> str:
    layer, _, kind = label.partition("_")
    return f"{_LAYER_WORDS[kind]} {layer}" if kind in _LAYER_WORDS else label
