"""Fine-tuned models in the mechfin model cache: trained once under a lock, reused only while their card's fingerprint
matches.

Every model mechfin fine-tunes (the fair-lending screeners, :mod:`~mechfin_utils.screener.training`; the
number-ordering model of notebook 14, :mod:`~mechfin_utils.screener.ordering`) lives in a folder of the model cache
(``$MECHFIN_CACHE``) beside the converted base model: plain weights (``model.safetensors``), the tokenizer, and a JSON
card that records what determines the weights (the *fingerprint*: base model, recipe, training data's sha256, torch
version), what training did (data, steps, seconds, loss) and the weights' sha256. :func:`cached_fine_tune` is the one
way such a folder is filled:

1. a card whose fingerprint equals the requested one, beside its weights file: reuse it, train nothing;
2. otherwise take the folder's lock (two notebooks or test workers never train into one folder at once), look again
   (another process may have just finished), and train;
3. a card whose fingerprint differs (another recipe, another corpus, another torch) is *stale*: the model is retrained
   over it, never loaded.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechfin_utils.core.models import exclusive

CARD_FILES = ("screener-card.json", "fine-tune-card.json")
"""The card's file name: the screeners' (the first fine-tunes, whose cached folders keep their name) and every later
fine-tune's."""


def read_card(folder: Path) -> dict[str, Any] | None:
    """The card in ``folder`` (either name of :data:`CARD_FILES`), or None when there is none or it is not JSON."""
    for name in CARD_FILES:
        path = Path(folder) / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                return None
    return None


def matching_card(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The card of ``folder`` when its fingerprint equals ``fingerprint`` and the weights are there; else None."""
    card = read_card(folder)
    if card is None or card.get("fingerprint") != fingerprint or not (Path(folder) / "model.safetensors").is_file():
        return None
    return card


def cached_fine_tune(
    folder: Path,
    fingerprint: dict[str, Any],
    train: Callable[[], dict[str, Any]],
    *,
    label: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Stages 1-3 of the module docstring: the card of the fine-tuned model in ``folder``, calling ``train()`` (which
    writes the weights and the card, and returns the card) only when no card there matches ``fingerprint``.
    ``fingerprint`` must be as JSON stores it (lists, not tuples), so that a card read back compares equal."""
    if json.loads(json.dumps(fingerprint)) != fingerprint:
        raise ValueError(f"{label}: the fingerprint must survive a JSON round trip (use lists, str keys)")
    if (card := matching_card(folder, fingerprint)) is not None:
        return card
    with exclusive(folder.with_name(folder.name + ".lock")):
        if (card := matching_card(folder, fingerprint)) is not None:
            return card
        if progress:
            print(f"Training {label} once (cached in {folder})...", file=sys.stderr)
        card = train()
    if card.get("fingerprint") != fingerprint:
        raise RuntimeError(f"{label}: training wrote a card whose fingerprint is not the one requested")
    return card
