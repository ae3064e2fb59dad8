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

Heads are labelled as everywhere in mechfin, ``"L10H7"`` for layer 10, head 7
(:mod:`mechfin_utils.core.head_labels`; the papers write it ``10.7``); signs are ``"positive"`` (toward " Yes") or
``"negative"``.
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
    "L11H4": "positive",
    "L8H9": "positive",
    "L6H3": "positive",
    "L0H6": "negative",
    "L11H0": "negative",
    "L10H7": "negative",
}
HEAD_PATCHING: dict[str, Sign] = {
    "L10H2": "positive",
    "L10H7": "positive",
    "L11H3": "positive",
    "L9H6": "negative",
    "L10H6": "negative",
}

GREATER_THAN_MLPS: tuple[int, ...] = (8, 9, 10, 11)
GREATER_THAN_HEAD_LAYERS: tuple[int, ...] = (5, 6, 7, 8, 9)

IOI_LOGIT_DIFF = 3.55
IOI_HEADS: dict[str, tuple[str, ...]] = {
    "name mover": ("L9H9", "L9H6", "L10H0"),
    "negative name mover": ("L10H7", "L11H10"),
    "S-inhibition": ("L7H3", "L7H9", "L8H6", "L8H10"),
    "induction": ("L5H5", "L6H9"),
    "duplicate token": ("L0H1", "L3H0"),
    "previous token": ("L2H2", "L4H11"),
}

_LAYER_WORDS = {"mlp_out": "MLP", "attn_out": "attention layer"}


def describe(claims: dict[str, Sign]) -> str:
    """The claims in words, for notebook text: ``"positive L11H4, L8H9, L6H3; negative L0H6, L11H0, L10H7"``; layer
    labels read ``"MLP 2"`` / ``"attention layer 0"``."""
    parts = []
    for sign in ("positive", "negative"):
        labels = [_readable(label) for label, claimed in claims.items() if claimed == sign]
        if labels:
            parts.append(f"{sign} {', '.join(labels)}")
    return "; ".join(parts)


def _readable(label: str) -> str:
    layer, _, kind = label.partition("_")
    return f"{_LAYER_WORDS[kind]} {layer}" if kind in _LAYER_WORDS else label
