"""Build data/counterfact_edits.csv: CounterFact-style edit requests for the facts SmolLM2 gets right.

Meng et al. (2022) evaluate an edit "subject -> new object" on four kinds of prompt; this file gives each kept fact
of ``factual_prompts.csv`` (``kept_smollm2_135m``) the same four:

* the **edit prompt** itself (efficacy): ``The capital of France is`` with the counterfactual target `` Berlin``;
* two hand-written **paraphrases** of the relation (generalisation): ``The capital city of France is``;
* up to five **neighbours**: other kept facts of the same relation, whose answers must not move (specificity);
* the edit prompt again as a **generation prompt** for fluency (n-gram entropy of a greedy continuation).

The counterfactual target (``target_new``) is the answer of the next kept fact of the same category whose answer
is one whole token (so `` Berlin``, never a word fragment such as `` Jak``) and differs from the true one, in file
order: deterministic, and always an object the model already associates with that relation. Categories with one
usable target or none, and facts with no neighbour, are left out (the script prints them; the data card lists them). No model is needed. Run from the
repository root:

    .venv/bin/python data/build_counterfact.py            # (re)write data/counterfact_edits.csv
    .venv/bin/python data/build_counterfact.py --check    # exit 1 if the committed file differs from a rebuild
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "data"))  # for csv_build, when imported from elsewhere (tests)

import csv_build  # noqa: E402

from mechfin_utils.tasks.counterfact import COUNTERFACT_COLUMNS, PARAPHRASE_SEPARATOR  # noqa: E402  (the loader's own schema)

FACTS = REPO_ROOT / "data" / "factual_prompts.csv"
OUT = REPO_ROOT / "data" / "counterfact_edits.csv"
N_NEIGHBOURS = 5

# Two paraphrases of each relation, written by hand; "{s}" is the subject, the answer comes next.
PARAPHRASES: dict[str, tuple[str, str]] = {
    "capital": ("The capital city of {s} is", "{s}'s capital is"),
    "landmark": ("The {s} can be found in the city of", "The {s} stands in the city of"),
    "headquarters": ("{s} is headquartered in the city of", "{s} has its main offices in the city of"),
    "maker": ("{s} is produced by the company", "{s} is a product of the company"),
    "language": ("The main language spoken in {s} is", "Most people in {s} speak"),
    "currency": ("The official currency of {s} is the", "In {s}, people pay with the"),
    "sport": ("{s} is best known for the sport of", "{s} became a star in the sport of"),
    "instrument": ("{s} was known for playing the", "{s} was a master of the"),
    "author": ("The author of {s} is", "{s} is a book by"),
    "founder": ("The founder of {s} is", "{s} was started by"),
}


def build(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The edit rows and a line per category left out (and why)."""
    kept = [r for r in rows if r["kept_smollm2_135m"] == "True"]
    out, dropped = [], []
    for category in dict.fromkeys(r["category"] for r in kept):
        facts = [r for r in kept if r["category"] == category]
        whole = [r for r in facts if r["answer"] == r["answer_text"]]  # one-token answers: usable as targets
        if len({r["answer"] for r in whole}) < 2:
            dropped.append(f"{category}: {len(facts)} kept facts, fewer than two distinct one-token answers")
            continue
        if category not in PARAPHRASES:
            raise SystemExit(f"{FACTS.name}: category {category!r} has no paraphrases in PARAPHRASES")
        for i, fact in enumerate(facts):
            later = [whole[(j + i) % len(whole)] for j in range(len(whole))]  # rotate: the next fact's answer first
            target = next(t for t in later if t["answer"] != fact["answer"] and t is not fact)
            subject = fact["subject"]
            neighbours = [r["fact_id"] for r in facts if r is not fact and r["answer"] != target["answer"]]
            if not neighbours:  # specificity needs a fact of the same relation whose answer is not the new one
                dropped.append(
                    f"{fact['fact_id']}: no other fact of its relation keeps an answer apart from the target"
                )
                continue
            out.append(
                {
                    "edit_id": f"edit-{fact['fact_id']}",
                    "fact_id": fact["fact_id"],
                    "category": category,
                    "subject": subject,
                    "prompt": fact["prompt"],
                    "target_true": fact["answer"],
                    "target_new": target["answer"],
                    "target_new_from": target["fact_id"],
                    "paraphrases": PARAPHRASE_SEPARATOR.join(p.format(s=subject) for p in PARAPHRASES[category]),
                    "neighbours": ";".join(neighbours[:N_NEIGHBOURS]),
                }
            )
    return out, dropped


def render() -> str:
    """The edit requests as CSV text; prints the facts left out, and why."""
    with FACTS.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    edits, dropped = build(rows)
    for line in dropped:
        print("  left out:", line)
    return csv_build.render_csv(edits, COUNTERFACT_COLUMNS)


def main(argv: Sequence[str] | None = None) -> int:
    return csv_build.main(__doc__.splitlines()[0], render, OUT, "data/build_counterfact.py", argv)


if __name__ == "__main__":
    raise SystemExit(main())
