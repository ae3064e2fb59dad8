"""Tasks: every task set's loader, validated row by row, and the batches the methods run on.

``task_tables`` (reading a task CSV, errors that name file, line and row) <- ``fair_lending`` (the paper's
fair-lending and counterfactual pairs, with the legal categories) <- ``batching`` (tokenizer alignment and
padding-free batches) <- ``screener_sets`` (the screener's splits and control prompts) and ``circuit_tasks``
(greater-than and fair lending as circuit-discovery tasks) <- ``ioi`` (indirect-object identification) and
``addition`` (two-digit addition). Beside them: ``facts`` (factual prompts for causal tracing and editing),
``counterfact`` (the edit requests) and ``paper_claims`` (the published numbers each task is compared with).
Exported here: the entry points of every task.
"""

from mechfin_utils.tasks.addition import AdditionProblem, AdditionSet, addition_problems, addition_task
from mechfin_utils.tasks.batching import (
    AlignmentReport,
    Exclusion,
    TaskBatch,
    align_pairs,
    largest_template_batch,
    make_batches,
)
from mechfin_utils.tasks.circuit_tasks import (
    AnswerBatch,
    CircuitBatch,
    CircuitTask,
    fair_lending_task,
    greater_than_task,
    load_greater_than,
    task_from_answer_batches,
)
from mechfin_utils.tasks.counterfact import CounterfactEdit, EditRequest, load_counterfact, requests_known_to
from mechfin_utils.tasks.facts import TraceTask, factual_tasks, fair_lending_tasks, load_factual_prompts, locate_subject
from mechfin_utils.tasks.fair_lending import (
    ALL_BASES,
    COUNTERFACTUAL_ANSWERS,
    FAIR_LENDING_ANSWERS,
    CounterfactualPair,
    FairLendingPair,
    load_counterfactual_pairs,
    load_fair_lending_pairs,
)
from mechfin_utils.tasks.ioi import IOIPrompt, IOITask, ioi_task, load_ioi
from mechfin_utils.tasks.screener_sets import (
    SPLITS,
    TEST_SPLITS,
    TRAIN_SPLIT,
    ControlPrompt,
    load_control_prompts,
    load_split,
)
from mechfin_utils.tasks.task_tables import TaskDataError, raise_problems, read_task_rows, row_location

__all__ = [
    "AdditionProblem",
    "AdditionSet",
    "addition_problems",
    "addition_task",
    "CounterfactEdit",
    "EditRequest",
    "load_counterfact",
    "requests_known_to",
    "TraceTask",
    "factual_tasks",
    "fair_lending_tasks",
    "load_factual_prompts",
    "locate_subject",
    "ALL_BASES",
    "COUNTERFACTUAL_ANSWERS",
    "FAIR_LENDING_ANSWERS",
    "SPLITS",
    "TEST_SPLITS",
    "TRAIN_SPLIT",
    "AlignmentReport",
    "AnswerBatch",
    "CircuitBatch",
    "CircuitTask",
    "ControlPrompt",
    "CounterfactualPair",
    "Exclusion",
    "FairLendingPair",
    "IOIPrompt",
    "IOITask",
    "TaskBatch",
    "TaskDataError",
    "align_pairs",
    "fair_lending_task",
    "greater_than_task",
    "ioi_task",
    "largest_template_batch",
    "load_control_prompts",
    "load_counterfactual_pairs",
    "load_fair_lending_pairs",
    "load_greater_than",
    "load_ioi",
    "load_split",
    "make_batches",
    "raise_problems",
    "read_task_rows",
    "row_location",
    "task_from_answer_batches",
]
