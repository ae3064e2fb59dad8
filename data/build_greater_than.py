"""Write ``data/greater_than.csv``: the greater-than task (Hanna et al. 2023) used for circuit discovery.

Every row is one prompt pair built from one template::

    clean:     "The {noun} lasted from the year 17{YY} to the year 17"
    corrupted: "The {noun} lasted from the year 1701 to the year 17"

A model that has learned the task continues the clean prompt with a year *later* than 17YY; in the corrupted
prompt the start year is the "01" baseline, so the clean prompt's YY is no longer informative. The two prompts
differ only in the two year digits, so under a tokenizer that splits "17YY" into "17" + "YY" (GPT-2) or into
single digits (SmolLM2) they have the same token length and are aligned position by position.

Rows: every noun in ``NOUNS`` x every YY in 02..98 (01 is the baseline itself, and 99 has no later two-digit
year), in that order. The nouns are our own choice of nouns for things that last a span of years; each is a
single token (with its leading space) for both GPT-2 and SmolLM2, checked when the list was made (the per-model
check that matters is done at load time by ``mechfin_utils.methods.circuits.nodes``, which reports any row it cannot use).

Run ``python data/build_greater_than.py`` (or ``--check`` to verify the committed file is what this writes).
The output is deterministic: no randomness, no model, no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import csv_build

OUTPUT = Path(__file__).resolve().parent / "greater_than.csv"

TEMPLATE = "The {noun} lasted from the year {century}{yy:02d} to the year {century}"
CENTURY = "17"
BASELINE_YY = 1
YEARS = range(2, 99)  # 02..98
NOUNS = (
    "war",
    "dynasty",
    "expedition",
    "siege",
    "reign",
    "voyage",
    "treaty",
    "campaign",
    "rebellion",
    "famine",
    "drought",
    "occupation",
    "alliance",
    "embargo",
    "crusade",
    "revolt",
    "migration",
    "plague",
    "monarchy",
    "blockade",
)
COLUMNS = ("prompt_id", "noun", "century", "yy", "clean_prompt", "corrupted_prompt")


def build_rows() -> list[dict[str, str]]:
    """All rows, in file order (noun-major, then YY ascending)."""
    rows = []
    for noun in NOUNS:
        for yy in YEARS:
            rows.append(
                {
                    "prompt_id": f"gt-{len(rows) + 1:04d}",
                    "noun": noun,
                    "century": CENTURY,
                    "yy": str(yy),
                    "clean_prompt": TEMPLATE.format(noun=noun, century=CENTURY, yy=yy),
                    "corrupted_prompt": TEMPLATE.format(noun=noun, century=CENTURY, yy=BASELINE_YY),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    return csv_build.main(
        __doc__.splitlines()[0],
        lambda: csv_build.render_csv(build_rows(), COLUMNS),
        OUTPUT,
        "data/build_greater_than.py",
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
