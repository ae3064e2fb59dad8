"""CounterFact-style edit requests (Meng et al. 2022): what to edit into a model, and the prompts that test the edit.

An **edit request** (:class:`EditRequest`) asks that a prompt containing a subject ("The capital of France is",
subject "France") continue with a new object (" Berlin") instead of the true one (" Paris"). ROME, MEMIT and the
fine-tuning baseline (:mod:`mechfin_utils.methods.editing.edits`) take requests; the scoring of an edited model is
:mod:`mechfin_utils.methods.editing.evaluation`.

``data/counterfact_edits.csv`` (built by ``data/build_counterfact.py``; data card: ``data/README.md``) gives every
fact the embedded model knows a counterfactual target and three kinds of test prompt: the edit prompt, the relation's
**paraphrases** and **neighbours** (other facts of the same relation, with their own answers).

1. :func:`load_counterfact` reads the file and validates every row (all bad rows reported at once, each with its
   line), giving one :class:`CounterfactEdit` per row;
2. :func:`requests_known_to` keeps the edits of facts a given model knows (its top-1 next token is the true
   object): editing a fact the model does not know measures nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mechfin_utils.core.hook_points import next_token_logits, target_token_ids
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.paths import DATA_DIR
from mechfin_utils.tasks.facts import FACTUAL_PROMPTS_CSV, read_factual_candidates
from mechfin_utils.tasks.task_tables import raise_problems, read_task_rows, row_location

COUNTERFACT_CSV = DATA_DIR / "counterfact_edits.csv"
COUNTERFACT_COLUMNS = (
    "edit_id",
    "fact_id",
    "category",
    "subject",
    "prompt",
    "target_true",
    "target_new",
    "target_new_from",
    "paraphrases",
    "neighbours",
)
PARAPHRASE_SEPARATOR = " | "


@dataclass(frozen=True)
class EditRequest:
    """Make ``prompt`` (which contains ``subject``) continue with ``target_new`` instead of ``target_true``."""

    edit_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str


@dataclass(frozen=True)
class CounterfactEdit:
    """One edit request with its test prompts; ``neighbours`` are (prompt, that prompt's true answer)."""

    request: EditRequest
    category: str
    paraphrases: tuple[str, ...]
    neighbours: tuple[tuple[str, str], ...]


def load_counterfact(path: str | Path | None = None, facts_path: str | Path | None = None) -> list[CounterfactEdit]:
    """Every edit request of the file, validated; all bad rows are reported at once, each with its line.

    Checks beyond the shared task-file rules: the subject occurs in the prompt and in each paraphrase, both targets
    begin with a space and differ, and every neighbour id is a fact of ``factual_prompts.csv``.
    """
    path = Path(path) if path is not None else COUNTERFACT_CSV
    facts = read_factual_candidates(facts_path if facts_path is not None else FACTUAL_PROMPTS_CSV)
    fact_rows = {row.fact_id: (row.prompt, row.answer) for row in facts.itertuples()}
    rows, problems = read_task_rows(path, COUNTERFACT_COLUMNS, "edit_id")
    edits = []
    for line, row in rows:
        where = row_location(path, line, "edit_id", row["edit_id"])
        paraphrases = tuple(p.strip() for p in row["paraphrases"].split(PARAPHRASE_SEPARATOR.strip()))
        neighbour_ids = [n.strip() for n in row["neighbours"].split(";") if n.strip()]
        found = []
        if row["subject"] not in row["prompt"]:
            found.append(f"field 'subject': {row['subject']!r} is not in the prompt {row['prompt']!r}")
        found += [
            f"field 'paraphrases': {p!r} does not contain the subject {row['subject']!r}"
            for p in paraphrases
            if row["subject"] not in p
        ]
        for column in ("target_true", "target_new"):
            if not row[column].startswith(" "):
                found.append(f"field {column!r}: {row[column]!r} must start with a space (the next token's)")
        if row["target_true"] == row["target_new"]:
            found.append(f"field 'target_new': equals target_true {row['target_true']!r}")
        unknown = [n for n in neighbour_ids if n not in fact_rows]
        if unknown:
            found.append(f"field 'neighbours': {unknown} are not fact ids of {Path(FACTUAL_PROMPTS_CSV).name}")
        if found:
            problems.append((line, f"{where}: " + "; ".join(found)))
            continue
        request = EditRequest(row["edit_id"], row["prompt"], row["subject"], row["target_new"], row["target_true"])
        edits.append(CounterfactEdit(request, row["category"], paraphrases, tuple(fact_rows[n] for n in neighbour_ids)))
    raise_problems(path, problems)
    return edits


def requests_known_to(model: LoadedModel, edits: Sequence[CounterfactEdit]) -> list[CounterfactEdit]:
    """The edits whose true answer is this model's top-1 next token on the edit prompt (edits of facts a model does
    not know measure nothing). The CSV is built from SmolLM2's filter; another model keeps its own subset."""
    if not edits:
        return []
    return [
        edit
        for edit in edits
        if next_token_logits(model, edit.request.prompt).argmax().item()
        == target_token_ids(model, edit.request.target_true, edit.request.edit_id)[0]
    ]
