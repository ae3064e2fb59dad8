"""What causal tracing runs on: a trace task, where its subject sits, and the prompts turned into tasks.

* :class:`TraceTask` is one prompt to trace: the text, the *subject* whose tokens get noised, the answer the
  score is about (and optionally a contrast token, for a logit difference); :func:`locate_subject` finds the
  subject's token span from the tokenizer's character offsets. The tracing methods
  (:mod:`mechfin_utils.methods.tracing`) take these; editing uses :func:`locate_subject` too;
* :func:`read_factual_candidates` reads ``data/factual_prompts.csv`` (built by ``data/build_factual_prompts.py``;
  its data card is ``data/README.md``), checking columns, ids and that every subject sits inside its prompt;
* :func:`filter_facts_for_model` keeps the facts whose answer is one token for a model and its top-1 next token,
  and reports every dropped row with its reason (nothing is dropped silently); :func:`load_factual_prompts`
  does both;
* :func:`factual_tasks` and :func:`fair_lending_tasks` turn rows into :class:`TraceTask` objects (for the
  fair-lending prompts the protected phrase plays the subject).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from mechfin_utils.core.models import LoadedModel

from mechfin_utils.core.paths import REPO_ROOT

FACTUAL_PROMPTS_CSV = REPO_ROOT / "data" / "factual_prompts.csv"

FACT_COLUMNS = ("fact_id", "category", "relation", "subject", "prompt", "answer", "answer_text")


# ---------------------------------------------------------------------------------------------------------
# A trace task, and where its subject sits
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceTask:
    """One prompt to trace.

    label:    names the row in every error message and figure (e.g. ``"fact 12"``).
    prompt:   the text fed to the model (the model's BOS decision is applied on top).
    subject:  a substring of ``prompt`` whose tokens are corrupted (for facts the subject, for the
              fair-lending prompts the protected-attribute phrase). It must occur exactly once.
    answer:   the token the score is about, one token with its leading space (``" Paris"``, ``" Yes"``).
    contrast: ``None`` -> score = probability of ``answer`` at the last position; a token (``" No"``) ->
              score = ``logit(answer) - logit(contrast)``.
    """

    label: str
    prompt: str
    subject: str
    answer: str
    contrast: str | None = None

    @property
    def score_name(self) -> str:
        if self.contrast is None:
            return f"p({self.answer.strip()})"
        return f"logit({self.answer.strip()}) - logit({self.contrast.strip()})"


def locate_subject(model: LoadedModel, prompt: str, subject: str, label: str = "prompt") -> tuple[int, int]:
    """Token span ``[start, stop)`` of ``subject`` inside ``prompt``, BOS included in the counting.

    Found from the tokenizer's character offsets: every token whose characters overlap the subject's
    characters belongs to the span (a token like ``" Eiffel"`` carries its leading space, so it overlaps a
    subject that starts at ``E``). The subject must occur exactly once in the prompt; otherwise the error
    names ``label``.
    """
    if not subject:
        raise ValueError(f"{label}: the subject is empty")
    start_char = prompt.find(subject)
    if start_char < 0:
        raise ValueError(f"{label}: subject {subject!r} is not a substring of the prompt {prompt!r}")
    if prompt.find(subject, start_char + 1) >= 0:
        raise ValueError(f"{label}: subject {subject!r} occurs more than once in the prompt {prompt!r}")
    stop_char = start_char + len(subject)
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    expected = model.token_ids(prompt)
    shift = len(expected) - len(ids)
    if expected[shift:] != ids or shift not in (0, 1):
        raise RuntimeError(f"{label}: tokenizer offsets do not match {model.name}'s token_ids for {prompt!r}")
    inside = [i for i, (a, b) in enumerate(offsets) if a < stop_char and b > start_char]
    if not inside:
        raise ValueError(f"{label}: no token of the prompt overlaps subject {subject!r}")
    return inside[0] + shift, inside[-1] + 1 + shift


# ---------------------------------------------------------------------------------------------------------
# The factual prompts
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FactFilterReport:
    """What :func:`load_factual_prompts` kept and dropped for a model, and why."""

    model_name: str
    n_candidates: int
    n_kept: int
    dropped: pd.DataFrame  # fact_id, prompt, answer, reason

    def __str__(self) -> str:
        lines = [f"{self.model_name}: kept {self.n_kept} of {self.n_candidates} candidate facts"]
        for row in self.dropped.itertuples():
            lines.append(f"  dropped {row.fact_id}: {row.reason}")
        return "\n".join(lines)


def read_factual_candidates(path: str | Path | None = None) -> pd.DataFrame:
    """All candidate facts from the CSV, validated (columns, unique ids, subject inside the prompt)."""
    import pandas as pd

    path = Path(path) if path is not None else FACTUAL_PROMPTS_CSV
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in FACT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    dup = frame["fact_id"][frame["fact_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: duplicated fact_id(s) {dup}")
    for row in frame.itertuples():
        if row.subject not in row.prompt:
            raise ValueError(f"{path}: row {row.fact_id}: subject {row.subject!r} is not in prompt {row.prompt!r}")
        if not row.answer.startswith(" ") or not row.answer_text.startswith(row.answer):
            raise ValueError(
                f"{path}: row {row.fact_id}: answer {row.answer!r} must start with a space and begin answer_text "
                f"{row.answer_text!r}"
            )
    return frame


@torch.no_grad()
def filter_facts_for_model(model: LoadedModel, candidates: pd.DataFrame) -> tuple[pd.DataFrame, FactFilterReport]:
    """Keep the facts whose answer is one token for ``model`` and is its top-1 next token.

    Returns the kept rows (with the model's top-1 probability added as ``p_answer``) and a report of
    every dropped row with its reason; nothing is dropped silently.
    """
    import pandas as pd

    rows = list(candidates.itertuples(index=False))
    # 1. every prompt's next-token logits, prompts of one token length batched together
    ids = [model.token_ids(row.prompt) for row in rows]
    final: dict[int, Tensor] = {}
    for length in sorted({len(i) for i in ids}):
        members = [k for k, i in enumerate(ids) if len(i) == length]
        logits = model.bridge(torch.tensor([ids[k] for k in members]))[:, -1].float()
        final.update(zip(members, logits))
    # 2. keep or drop each row, in file order
    kept, dropped, p_answer = [], [], []
    for k, row in enumerate(rows):
        try:
            answer_id = model.single_token_id(row.answer)
        except ValueError as err:
            dropped.append((row.fact_id, row.prompt, row.answer, f"answer is not one token: {err}"))
            continue
        logits = final[k]
        top = int(logits.argmax())
        if top != answer_id:
            dropped.append(
                (row.fact_id, row.prompt, row.answer, f"top-1 is {model.tokenizer.decode([top])!r}, not {row.answer!r}")
            )
            continue
        kept.append(row._asdict())
        p_answer.append(float(logits.softmax(-1)[answer_id]))
    kept_frame = pd.DataFrame(kept, columns=list(candidates.columns))
    kept_frame["p_answer"] = p_answer
    report = FactFilterReport(
        model_name=model.name,
        n_candidates=len(candidates),
        n_kept=len(kept_frame),
        dropped=pd.DataFrame(dropped, columns=["fact_id", "prompt", "answer", "reason"]),
    )
    return kept_frame, report


def load_factual_prompts(
    model: LoadedModel | None = None, path: str | Path | None = None, verbose: bool = True
) -> tuple[pd.DataFrame, FactFilterReport | None]:
    """The factual prompts, filtered for a model.

    ``model=None``: the rows marked kept for the embedded model (SmolLM2-135M-Instruct) in the CSV,
    without running anything (report ``None``). With a model: every candidate is re-checked for that
    model (single-token answer, top-1 correct), and the report lists what was dropped and why; it is
    printed when ``verbose``. The set is model-specific: GPT-2 keeps a different subset.
    """
    candidates = read_factual_candidates(path)
    if model is None:
        if "kept_smollm2_135m" not in candidates.columns:
            raise ValueError("the CSV has no kept_smollm2_135m column; pass a model to filter for")
        return candidates[candidates["kept_smollm2_135m"] == "True"].reset_index(drop=True), None
    kept, report = filter_facts_for_model(model, candidates)
    if verbose:
        print(
            f"{report.model_name}: kept {report.n_kept} of {report.n_candidates} candidate facts "
            f"({len(report.dropped)} dropped; see report.dropped)"
        )
    return kept, report


def factual_tasks(frame: pd.DataFrame) -> list[TraceTask]:
    """:class:`TraceTask` per fact row (score = probability of the answer token)."""
    return [
        TraceTask(label=f"fact {r.fact_id}", prompt=r.prompt, subject=r.subject, answer=r.answer)
        for r in frame.itertuples(index=False)
    ]


def _field(item: Any, name: str, label: str) -> str:
    if isinstance(item, Mapping):
        value = item.get(name)
    else:
        value = getattr(item, name, None)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{label}: needs a non-empty string field {name!r}, got {value!r}")
    return value


def fair_lending_tasks(
    pairs: Iterable[Any] | pd.DataFrame, score: Literal["logit_diff", "prob"] = "logit_diff"
) -> list[TraceTask]:
    """:class:`TraceTask` per fair-lending pair: the ``protected_phrase`` is the corrupted "subject".

    ``pairs``: :class:`mechfin_utils.tasks.fair_lending.FairLendingPair` objects (or any objects / mappings / DataFrame
    rows with ``clean_prompt`` and ``protected_phrase``; ``pair_id`` or ``id`` names the row when present).
    The answers are the pair's ``clean_answer`` / ``corrupted_answer`` when it has them, else `` Yes`` /
    `` No``. ``score="logit_diff"`` (default, the paper's metric): ``logit(Yes) - logit(No)``;
    ``score="prob"``: the probability of `` Yes``.
    """
    if score not in ("logit_diff", "prob"):
        raise ValueError(f"score must be 'logit_diff' or 'prob', got {score!r}")
    if hasattr(pairs, "to_dict") and hasattr(pairs, "columns"):
        pairs = pairs.to_dict("records")

    def get(item: Any, name: str) -> Any:
        return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)

    tasks = []
    for i, pair in enumerate(pairs):
        ident = get(pair, "pair_id")
        ident = get(pair, "id") if ident is None else ident
        label = f"pair {ident if ident is not None else i}"
        answer = get(pair, "clean_answer") or " Yes"
        contrast = get(pair, "corrupted_answer") or " No"
        tasks.append(
            TraceTask(
                label=label,
                prompt=_field(pair, "clean_prompt", label),
                subject=_field(pair, "protected_phrase", label),
                answer=answer,
                contrast=contrast if score == "logit_diff" else None,
            )
        )
    return tasks
