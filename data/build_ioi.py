"""Write ``data/ioi.csv``: indirect-object identification prompts (Wang et al. 2022), a known-answer circuit task.

Every row is one prompt pair::

    clean:     "When Mary and John went to the store, John gave a drink to"      -> " Mary" (the indirect object)
    corrupted: "When Alice and Kevin went to the store, Laura gave a drink to"   (three unrelated names: "ABC")

In the clean prompt one name of the first clause (the subject, S) is repeated; the other (the indirect object,
IO) is the answer. The corrupted prompt keeps the sentence and replaces the three names by three others, so it
carries no information about which of the clean names is the answer (Wang et al.'s ABC distribution). The metric
is ``logit(IO) - logit(S)`` at the last position.

Rows: 8 templates (our own wording, in the style of Wang et al.'s) x both orders of the first clause (``ABBA``: IO
first; ``BABA``: S first) x 12 draws = 192 rows, names, places and objects drawn with a fixed seed. Names, places and
objects are common English words, each one token with its leading space under GPT-2's and SmolLM2's tokenizers
(checked when the lists were made; the per-model check that matters runs when the task is built and lists any row it
cannot use).

Run ``python data/build_ioi.py`` (or ``--check`` to verify that the committed file is what this writes).
Deterministic: a seeded ``random.Random``, no model, no tokenizer.
"""

from __future__ import annotations

import random
from pathlib import Path

import csv_build

OUTPUT = Path(__file__).resolve().parent / "ioi.csv"
SEED = 20221101  # Wang et al.'s arXiv submission month, as a fixed seed
DRAWS_PER_TEMPLATE_AND_ORDER = 12

TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {object} to",
    "While {A} and {B} were waiting at the {place}, {S} passed a {object} to",
    "Then {A} and {B} spent the afternoon at the {place}. {S} offered a {object} to",
    "When {A} and {B} got back from the {place}, {S} showed a {object} to",
    "Tonight {A} and {B} were working late at the {place}, so {S} brought a {object} to",
    "On Friday {A} and {B} met at the {place}, where {S} sold a {object} to",
    "Yesterday {A} and {B} walked to the {place}, and {S} lent a {object} to",
)
NAMES = (
    "Mary John Tom James Sarah Anna Paul Laura David Emma Mark Lisa Peter Kate Daniel Jessica Michael Rachel Robert "
    "Alice Steven Sophie George Helen Kevin Amy Brian Karen Eric Julia Adam Grace Frank Rose Henry Nancy Oliver Emily "
    "Jack Lucy"
).split()
PLACES = "store park office school station market library beach restaurant hospital garden house".split()
OBJECTS = "drink book letter ring gift key bag pen ticket note".split()
ORDERS = ("ABBA", "BABA")
COLUMNS = (
    "prompt_id",
    "template_id",
    "order",
    "io",
    "s",
    "place",
    "object",
    "clean_prompt",
    "corrupted_prompt",
)


def build_rows() -> list[dict[str, str]]:
    """All rows, in file order (template-major, then order, then draw)."""
    rng = random.Random(SEED)
    rows = []
    for t, template in enumerate(TEMPLATES):
        for order in ORDERS:
            for _ in range(DRAWS_PER_TEMPLATE_AND_ORDER):
                io_name, s_name, c1, c2, c3 = rng.sample(NAMES, 5)
                place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
                first, second = (io_name, s_name) if order == "ABBA" else (s_name, io_name)
                rows.append(
                    {
                        "prompt_id": f"ioi-{len(rows) + 1:04d}",
                        "template_id": f"T{t + 1}",
                        "order": order,
                        "io": io_name,
                        "s": s_name,
                        "place": place,
                        "object": obj,
                        "clean_prompt": template.format(A=first, B=second, S=s_name, place=place, object=obj),
                        "corrupted_prompt": template.format(A=c1, B=c2, S=c3, place=place, object=obj),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    return csv_build.main(
        __doc__.splitlines()[0], lambda: csv_build.render_csv(build_rows(), COLUMNS), OUTPUT, "data/build_ioi.py", argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
