"""Logit differences shared between the notebooks of one ``make figures`` run, so that no prompt is scored twice.

Notebooks 08 and 12 both judge the repaired screener on the same held-out sets (1,600 prompts) and the base model on
the mention sets: about two minutes of forward passes that the second notebook would repeat. When
``$MECHFIN_SCORE_CACHE`` names a folder (:mod:`mechfin_utils.core.run_cache`), :class:`~mechfin_utils.screener.behaviour.BridgeScorer` looks each prompt up
there before running the model and writes what it computed there after. ``make figures`` and ``make verify`` set it
to a folder of their own run (under ``figures/.staging/``, removed when the run ends); nothing else sets it, so a
notebook run by hand, the tests and every other caller compute every score.

**What a score is keyed by.** The sha256 of the model's weights as they are in memory (every parameter and buffer
of the Hugging Face model, so a fine-tuned, edited or differently loaded model never reads another's scores), the two
answer tokens, and the prompt's token ids. Only the plain forward pass is shared: a scorer with held components, or
a model with hooks attached, never reads or writes the cache.

**What it changes.** Nothing beyond float rounding: a prompt scored in another padded batch gets the same logit
difference up to the rounding of a larger matrix product (``behaviour``'s tests compare batches with single prompts
at the magnitudes involved). Each write is one whole file, moved into place with an atomic rename, so two notebooks
writing at once never leave a half-written entry; a reader sees every file complete or not at all.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path

from mechfin_utils.core.paths import write_atomically
from mechfin_utils.core.run_cache import SCORE_CACHE_ENV, run_cache_folder, weights_fingerprint


class RunScoreCache:
    """The scores one model (``fingerprint``) gave with one pair of answer tokens, in ``folder``.

    Stored as small JSON files ``<folder>/<fingerprint[:16]>-<yes>-<no>/<random>.json``, each holding the token ids
    and the logit differences of one call; :meth:`lookup` reads them all (a run writes a few dozen)."""

    def __init__(self, folder: Path, fingerprint: str, answer_ids: tuple[int, int]):
        self.folder = Path(folder) / f"{fingerprint[:16]}-{answer_ids[0]}-{answer_ids[1]}"

    def lookup(self, token_rows: Sequence[Sequence[int]]) -> dict[int, float]:
        """``{index into token_rows: logit difference}`` for the rows already scored in this run."""
        known: dict[tuple[int, ...], float] = {}
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            entry = json.loads(path.read_text())
            known.update(zip(map(tuple, entry["tokens"]), entry["logit_diffs"]))
        return {i: known[key] for i, row in enumerate(token_rows) if (key := tuple(row)) in known}

    def store(self, token_rows: Sequence[Sequence[int]], logit_diffs: Sequence[float]) -> None:
        """Add these rows' scores (one file, moved into place whole)."""
        if len(token_rows) != len(logit_diffs):
            raise ValueError(f"{len(token_rows)} token rows but {len(logit_diffs)} scores")
        if not token_rows:
            return
        rows = [list(map(int, r)) for r in token_rows]
        text = json.dumps({"tokens": rows, "logit_diffs": [float(v) for v in logit_diffs]})
        write_atomically(self.folder / f"{uuid.uuid4().hex}.json", text.encode())


__all__ = ["SCORE_CACHE_ENV", "RunScoreCache", "run_cache_folder", "weights_fingerprint"]
