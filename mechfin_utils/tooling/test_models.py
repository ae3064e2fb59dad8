"""The small stand-in models ``make test`` runs on, trained once by ``make setup`` (its last step).

Fast mode runs on briefly trained stand-ins whose names say so and whose numbers are never reported: the two brief
screeners (notebooks 08, 10 and 12, and the unit tests that load a screener by name), the brief Mamba and
transformer of notebook 13 and the brief number-ordering fine-tune of notebook 14. Each is trained on first use and cached with a card wherever it is first needed; inside
``make test`` that costs about two minutes of worker time on a fresh machine (about a minute of the run), some of it
one worker waiting on the other's training lock (a fresh clone's ``make test``: 652 s with them inside, 568 s
without). Trained here, with both cores and nothing else running, they cost about 80 s once. Already cached: a
second.
"""

from __future__ import annotations

import argparse
import time

from mechfin_utils.screener import fact_models, ordering, training

BRIEF_SCREENERS = ("brief", "shortcut-brief")
"""The screener recipes fast mode loads (``smollm2-135m-screener-brief``, ``smollm2-135m-screener-shortcut-brief``)."""

BRIEF_FACT_RECIPE = "brief"
"""The recipe of notebook 13's two models in fast mode."""

BRIEF_ORDERING_RECIPE = "ordering-brief"
"""The number-ordering fine-tune notebook 14 loads in fast mode (``smollm2-135m-ordering-brief``)."""


def prepare_test_models(base: str = "smollm2-135m", *, progress: bool = False) -> list[str]:
    """Train (or find cached) every stand-in model ``make test`` loads; one line per model: its folder and the
    seconds its training took when it was trained."""
    lines = []
    for recipe in BRIEF_SCREENERS:
        folder, card = training.ensure_screener(base, recipe, progress=progress)
        lines.append(f"{folder.name}: trained in {card['train_seconds']} s ({card['trained_at']})")
    for arch in fact_models.ARCHITECTURES:
        folder, card = fact_models.ensure_fact_model(arch, BRIEF_FACT_RECIPE, progress=progress)
        lines.append(f"{folder.name}: trained in {card['train_seconds']} s ({card['trained_at']})")
    folder, card = ordering.ensure_ordering_model(base, BRIEF_ORDERING_RECIPE, progress=progress)
    lines.append(f"{folder.name}: trained in {card['train_seconds']} s ({card['trained_at']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mechfin_utils.tooling.test_models", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--base", default="smollm2-135m", help="the base model of the brief screeners")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    for line in prepare_test_models(args.base, progress=True):
        print(line)
    print(f"stand-in models for make test ready in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
