"""Circuit discovery by iterative pruning (node-level ACDC), with the greater-than and fair-lending tasks.

**The model as a graph.** Every attention head and every MLP is a *node*; each reads the residual stream and
adds its output back to it. A *circuit* for a task is a subset of nodes that, on its own, reproduces the
model's behaviour on that task: run the model with every node *outside* the circuit ablated and the task
metric should stay close to the full model's.

**Ablation.** A node is ablated by replacing its output with the output it has on a *corrupted* prompt:

* ``"resample"`` (the default): each clean prompt gets the activations of its own paired corrupted prompt
  (ACDC's and Hanna et al.'s choice for greater-than: the "17YY" prompt gets the "1701" prompt's activations;
  for fair lending the prompt with the prohibited basis gets the one with the legitimate reason). We pick it
  because a pair differs only in the one fact the task is about, so an ablated node loses exactly that
  information and nothing else (position, template and noun stay in-distribution), and because ablating
  *every* node then gives exactly the corrupted run at the final position, a clean, checkable baseline.
* ``"mean"``: the mean of the node's output over the corrupted prompts of the same batch (same token length,
  so positions line up), position by position. Closer to "the node carries no prompt-specific information".

Heads are ablated at ``blocks.{L}.attn.hook_z`` (the per-head mixed values, before ``W_O``), so one head can be
replaced without touching the others; MLPs at ``blocks.{L}.hook_mlp_out``. :class:`NodeAblator` does exactly
this through the bridge's hooks (``backend="bridge"``), or computes the same thing faster with
:mod:`mechfin_utils.functional` (``backend="functional"``, the default for GPT-2 and Llama-family models): it
recomputes only the layers at and after the earliest ablated node and only the positions from the first
clean/corrupted difference on, and is tested to agree with the bridge path.

**Pruning** (Conmy et al. 2023, at node level). Walk the nodes from the output backwards, layer by layer (in
each layer the MLP first, since it reads the heads' output, then heads 0..H-1). For each node, ablate it *on top
of every node already removed*; if the task metric moves by less than a threshold ``tau`` the node is removed for
good, otherwise it is kept. One forward pass per node: 300 for SmolLM2 (30 layers x (9 heads + 1 MLP)), 156 for
GPT-2 Small. The metric is normalised so that thresholds mean the same thing on every task and model::

    normalised(S) = (metric(S ablated) - metric(all ablated)) / (metric(nothing ablated) - metric(all ablated))

so the full model scores 1 and the fully-ablated model 0; ``tau = 0.02`` removes a node when it changes the
result by less than 2 % of the full-vs-baseline gap. The found circuit's **faithfulness** is its normalised
metric (1 = recovers the full model's effect, 0 = no better than ablating everything); the raw ratio
``metric(circuit) / metric(full)`` is reported too. Two things to keep in mind when reading a sweep: each removal
may move the metric by up to ``tau``, and the moves add up, so faithfulness falls as ``tau`` grows (greedy
drift); and when the full-vs-baseline gap is small or noisy (a task the model barely does), every normalised
delta is large and almost nothing gets pruned; look at ``full_metric - baseline_metric`` first.

**Validation.** Knock out (ablate) the circuit's own nodes and nothing else: the metric should fall sharply.
Knock out as many random nodes from outside the circuit (seeded draws; by default the same number of heads and
of MLPs, or, when the circuit holds most MLPs, the same number of nodes of any kind): the metric should barely
move. :func:`knockout_test` reports both, with the mean and spread over the draws.

**Edges, and why pruning stops at nodes here.** ACDC proper prunes *edges*: the path from a sender's output to
one receiver's input (a head's query/key/value input, an MLP's input, the logits), patched by giving that one
receiver a residual stream in which only that sender's output is swapped. Doing this exactly needs a separate
input per receiving head (TransformerLens's split-QKV inputs; ambiguous for grouped-query attention such as
SmolLM2's, where 3 query heads share each key/value head) and one forward pass per edge: tens of thousands of
edges in a full model, hours on a CPU. We decided against it here: this module prunes nodes, exactly, with
one forward pass per node; the edges in a circuit (:attr:`Circuit.edges`) are the residual-stream connections
*implied* by its nodes (every kept node feeds every kept node downstream of it), not separately tested.

**Tasks.** :func:`greater_than_task` (Hanna et al. 2023; ``data/greater_than.csv``) and
:func:`fair_lending_task` (the paper's task, via :mod:`mechfin_utils.tasks`). Any other task is a
:class:`CircuitTask`: batches of (clean tokens, corrupted tokens, per-prompt score function of the logits).

Typical use::

    task = greater_than_task(model, n_prompts=16)
    ablator = NodeAblator(model, task)
    circuit = discover_circuit(ablator, threshold=0.02)
    circuit.faithfulness, len(circuit.nodes)
    knockout_test(ablator, circuit, n_random=10).summary()
    circuit_figure(circuit, model, "Greater-than circuit")
"""

from __future__ import annotations

import csv
import math
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Hashable, Iterable, Literal, Sequence, TypeVar

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.metrics import logit_diff

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
GREATER_THAN_CSV = DATA_DIR / "greater_than.csv"

AblationKind = Literal["resample", "mean"]
Criterion = Literal["abs", "drop"]
YearScheme = Literal["two-digit", "single-digit"]
ScoreFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, "batch"]]

N = TypeVar("N", bound=Hashable)


# ---------------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One node of the computational graph: attention head ``(layer, head)`` or the MLP of ``layer`` (head None)."""

    layer: int
    head: int | None = None

    @property
    def is_mlp(self) -> bool:
        return self.head is None

    @property
    def kind(self) -> str:
        return "mlp" if self.head is None else "head"

    @property
    def name(self) -> str:
        return f"MLP{self.layer}" if self.head is None else f"L{self.layer}H{self.head}"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Node({self.name})"

    @classmethod
    def parse(cls, name: str) -> "Node":
        """``"L5H3"`` -> head 3 of layer 5; ``"MLP5"`` -> the MLP of layer 5."""
        match = re.fullmatch(r"L(\d+)H(\d+)|MLP(\d+)", name.strip())
        if match is None:
            raise ValueError(f"{name!r} is not a node name (expected like 'L5H3' or 'MLP5')")
        if match.group(3) is not None:
            return cls(int(match.group(3)))
        return cls(int(match.group(1)), int(match.group(2)))

    def sort_key(self) -> tuple[int, int]:
        """Upstream first: by layer, heads before the MLP of the same layer (the MLP reads them)."""
        return (self.layer, (self.head if self.head is not None else 10**9))


def acdc_order(n_layers: int, n_heads: int) -> list[Node]:
    """All heads and MLPs, from the output backwards: layer ``n_layers-1`` first, in each layer the MLP first
    (it is downstream of that layer's heads), then heads ``0..n_heads-1`` (heads of one layer run in parallel,
    so their order among themselves is a convention)."""
    if n_layers < 1 or n_heads < 1:
        raise ValueError(f"need n_layers >= 1 and n_heads >= 1, got {n_layers}, {n_heads}")
    order = []
    for layer in reversed(range(n_layers)):
        order.append(Node(layer))
        order.extend(Node(layer, head) for head in range(n_heads))
    return order


# ---------------------------------------------------------------------------------------------------------
# The pruning algorithm itself (no model involved: any nodes, any metric of a set of ablated nodes)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruningStep:
    """One decision: the metric before, the metric with ``node`` also ablated, and whether it was removed."""

    node: Hashable
    metric_before: float
    metric_if_removed: float
    removed: bool

    @property
    def delta(self) -> float:
        """``metric_if_removed - metric_before``: what ablating the node did, given the nodes already removed."""
        return self.metric_if_removed - self.metric_before


@dataclass
class PruningResult:
    """What :func:`prune_nodes` decided, step by step."""

    threshold: float
    criterion: str
    kept: list
    removed: list
    steps: list[PruningStep]
    start_metric: float
    final_metric: float

    @property
    def importance(self) -> dict:
        """``|delta|`` of every node at the moment it was considered (kept nodes have ``>= threshold``)."""
        return {step.node: abs(step.delta) for step in self.steps}

    def trace(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "node": str(s.node),
                    "metric_before": s.metric_before,
                    "metric_if_removed": s.metric_if_removed,
                    "delta": s.delta,
                    "removed": s.removed,
                }
                for s in self.steps
            ]
        )


def _is_removable(delta: float, threshold: float, criterion: Criterion) -> bool:
    if criterion == "abs":
        return abs(delta) < threshold
    return delta > -threshold  # "drop": only a fall of the metric by >= threshold keeps a node


def prune_nodes(
    nodes: Sequence[N],
    evaluate: Callable[[frozenset[N]], float],
    threshold: float,
    *,
    criterion: Criterion = "abs",
    on_step: Callable[[PruningStep], None] | None = None,
) -> PruningResult:
    """Greedy iterative pruning: the core of ACDC, independent of any model.

    Args:
        nodes: every candidate node, in the order to consider them (for a transformer: :func:`acdc_order`).
        evaluate: the task metric with exactly the given set of nodes ablated (``frozenset()`` = full model).
        threshold: ``tau >= 0``. A node is removed when ablating it on top of the nodes already removed
            changes the metric by less than ``tau``.
        criterion: ``"abs"`` (default): remove when ``|delta| < tau``, so a node that *raises* the metric a lot
            when ablated (one that works against the task) is kept too. ``"drop"``: remove unless the metric
            *falls* by at least ``tau`` (ACDC's rule for a loss-like metric, mirrored).
        on_step: called with each :class:`PruningStep` as soon as it is decided (progress display).

    Returns:
        A :class:`PruningResult`: kept and removed nodes (each in consideration order), every step's metric
        before and after, the starting metric (nothing ablated) and the final one (the circuit alone).
    """
    if criterion not in ("abs", "drop"):
        raise ValueError(f"criterion must be 'abs' or 'drop', got {criterion!r}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    nodes = list(nodes)
    if not nodes:
        raise ValueError("no nodes to prune")
    seen: set = set()
    for i, node in enumerate(nodes):
        if node in seen:
            raise ValueError(f"node {node} appears twice in the pruning order (second time at index {i})")
        seen.add(node)

    def checked(ablated: frozenset, node: Any) -> float:
        value = float(evaluate(ablated))
        if not math.isfinite(value):
            raise ValueError(f"the metric is {value} with {len(ablated)} nodes ablated (last added: {node})")
        return value

    removed: set = set()
    current = start = checked(frozenset(), None)
    steps, kept_order, removed_order = [], [], []
    for node in nodes:
        candidate = checked(frozenset(removed | {node}), node)
        remove = _is_removable(candidate - current, threshold, criterion)
        steps.append(PruningStep(node, current, candidate, remove))
        if on_step is not None:
            on_step(steps[-1])
        if remove:
            removed.add(node)
            removed_order.append(node)
            current = candidate
        else:
            kept_order.append(node)
    return PruningResult(float(threshold), criterion, kept_order, removed_order, steps, start, current)


# ---------------------------------------------------------------------------------------------------------
# Tasks: clean/corrupted token batches + a per-prompt score
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CircuitBatch:
    """Prompts of one token length: clean and paired corrupted tokens, and the per-prompt task score.

    ``score(logits)`` maps the logits of a run on ``clean_tokens`` (possibly with nodes ablated) to one number
    per prompt; larger means more of the clean behaviour. It is given the logits of the last
    ``read_positions`` positions only, ``[batch, read_positions, d_vocab]``, so it must index positions from
    the end (``logits[:, -1]``).
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    score: ScoreFn
    ids: list[str]
    read_positions: int = 1

    def __post_init__(self) -> None:
        if self.clean_tokens.ndim != 2 or self.clean_tokens.shape != self.corrupted_tokens.shape:
            raise ValueError(
                f"clean_tokens {tuple(self.clean_tokens.shape)} and corrupted_tokens "
                f"{tuple(self.corrupted_tokens.shape)} must both be [batch, pos] and equal"
            )
        if len(self.ids) != self.clean_tokens.shape[0]:
            raise ValueError(f"{len(self.ids)} ids for a batch of {self.clean_tokens.shape[0]} prompts")
        if not 1 <= self.read_positions <= self.clean_tokens.shape[1]:
            raise ValueError(
                f"read_positions must be in 1..{self.clean_tokens.shape[1]} (the prompt length), "
                f"got {self.read_positions}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.clean_tokens.shape[0])


@dataclass
class CircuitTask:
    """A task for circuit discovery: its batches, what its metric is, and what was left out (and why)."""

    name: str
    metric_name: str
    batches: list[CircuitBatch]
    excluded: list[tuple[str, str]] = field(default_factory=list)
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.batches:
            raise ValueError(f"task {self.name!r} has no batches")

    @property
    def n_prompts(self) -> int:
        return sum(b.batch_size for b in self.batches)

    @property
    def ids(self) -> list[str]:
        """Every prompt's id, in batch order (the order of :meth:`NodeAblator.prompt_scores`)."""
        return [i for b in self.batches for i in b.ids]

    def __repr__(self) -> str:
        lengths = sorted({int(b.clean_tokens.shape[1]) for b in self.batches})
        return (
            f"CircuitTask({self.name}: {self.n_prompts} prompts in {len(self.batches)} batches, token lengths "
            f"{lengths}, metric {self.metric_name}, {len(self.excluded)} excluded)"
        )


# --- greater-than ----------------------------------------------------------------------------------------

HANNA_GPT2_MLPS: tuple[int, ...] = (8, 9, 10, 11)
"""Hanna, Liu & Variengien (2023), GPT-2 Small: the MLPs of the greater-than circuit (9 and 10 carry most of
the computation); its attention heads sit in layers 5-9 (:data:`HANNA_GPT2_HEAD_LAYERS`) and move the start
year to the final position. GPT-2 Small only."""
HANNA_GPT2_HEAD_LAYERS: tuple[int, ...] = (5, 6, 7, 8, 9)


class GreaterThanDataError(ValueError):
    """A malformed row of the greater-than CSV; the message names the file, line, prompt_id and field."""


GREATER_THAN_COLUMNS = ("prompt_id", "noun", "century", "yy", "clean_prompt", "corrupted_prompt")
BASELINE_YY = 1


@dataclass(frozen=True)
class GreaterThanPrompt:
    """One row of ``data/greater_than.csv``: "The {noun} lasted from the year {century}{yy} to the year {century}"."""

    prompt_id: str
    noun: str
    century: str
    yy: int
    clean_prompt: str
    corrupted_prompt: str
    line: int = 0


def load_greater_than(path: str | Path | None = None) -> list[GreaterThanPrompt]:
    """Read and validate the greater-than prompts (default ``data/greater_than.csv``).

    Every rule raises :class:`GreaterThanDataError` naming the row: exact columns; no empty field; unique
    ``prompt_id``; ``yy`` an integer in 2..98 (01 is the corrupted baseline, 99 has no later two-digit year);
    ``century`` two digits; the clean prompt ends with the century and contains ``{century}{yy:02d}`` exactly
    once; the corrupted prompt is the clean one with that year replaced by ``{century}01``.
    """
    path = Path(path) if path is not None else GREATER_THAN_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run python data/build_greater_than.py)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != GREATER_THAN_COLUMNS:
            raise GreaterThanDataError(
                f"{path}: columns are {reader.fieldnames}, expected exactly {list(GREATER_THAN_COLUMNS)}"
            )
        prompts, seen = [], {}
        for line, row in enumerate(reader, start=2):
            where = f"{path.name} line {line} ({row.get('prompt_id') or 'no prompt_id'})"
            if None in row or any(v is None for v in row.values()):
                raise GreaterThanDataError(f"{where}: wrong number of fields")
            for column in GREATER_THAN_COLUMNS:
                if not row[column].strip():
                    raise GreaterThanDataError(f"{where}: field {column!r} is empty")
            if row["prompt_id"] in seen:
                raise GreaterThanDataError(
                    f"{where}: duplicate prompt_id (first on line {seen[row['prompt_id']]})"
                )
            seen[row["prompt_id"]] = line
            century = row["century"]
            if not re.fullmatch(r"\d\d", century):
                raise GreaterThanDataError(f"{where}: field 'century' must be two digits, got {century!r}")
            try:
                yy = int(row["yy"])
            except ValueError:
                raise GreaterThanDataError(f"{where}: field 'yy' must be an integer, got {row['yy']!r}") from None
            if not 2 <= yy <= 98:
                raise GreaterThanDataError(f"{where}: field 'yy' must be in 2..98, got {yy}")
            clean, corrupted = row["clean_prompt"], row["corrupted_prompt"]
            year = f"{century}{yy:02d}"
            if not clean.endswith(f" {century}") or clean.count(year) != 1:
                raise GreaterThanDataError(
                    f"{where}: field 'clean_prompt' must contain the year {year} once and end with ' {century}', "
                    f"got {clean!r}"
                )
            expected = clean.replace(year, f"{century}{BASELINE_YY:02d}")
            if corrupted != expected:
                raise GreaterThanDataError(
                    f"{where}: field 'corrupted_prompt' must be the clean prompt with {year} -> "
                    f"{century}{BASELINE_YY:02d}, i.e. {expected!r}; got {corrupted!r}"
                )
            prompts.append(GreaterThanPrompt(row["prompt_id"], row["noun"], century, yy, clean, corrupted, line))
    if not prompts:
        raise GreaterThanDataError(f"{path}: no rows")
    return prompts


def year_scheme(model, prompt: GreaterThanPrompt) -> YearScheme | None:
    """How ``model``'s tokenizer continues this prompt with its two-digit year, or None if neither way.

    ``"two-digit"``: appending "YY" to the prompt adds exactly one token, the token "YY" (GPT-2: "17" + "32").
    ``"single-digit"``: it adds exactly the two digit tokens "Y", "Y" (SmolLM2 splits every digit).
    The check is on the prompt's own tokens, so a tokenizer that would merge the year with what precedes it
    is caught too.
    """
    base = model.token_ids(prompt.clean_prompt)
    text = f"{prompt.yy:02d}"
    full = model.token_ids(prompt.clean_prompt + text)
    added = full[len(base):]
    if full[: len(base)] != base:
        return None
    pieces = [model.tokenizer.decode([i]) for i in added]
    if pieces == [text]:
        return "two-digit"
    if pieces == [text[0], text[1]]:
        return "single-digit"
    return None


def _year_token_ids(model, scheme: YearScheme) -> Int[Tensor, "n_years"]:
    """Token ids of "00".."99" (two-digit) or "0".."9" (single-digit); each must be one token."""
    texts = [f"{y:02d}" for y in range(100)] if scheme == "two-digit" else [str(d) for d in range(10)]
    ids = []
    for text in texts:
        try:
            ids.append(model.single_token_id(text))
        except ValueError as err:
            raise ValueError(f"the greater-than metric ({scheme} years) needs {text!r} as one token: {err}") from None
    return torch.tensor(ids, dtype=torch.long)


def greater_than_score(
    logits: Float[Tensor, "batch pos d_vocab"],
    yy: Int[Tensor, "batch"],
    scheme: YearScheme,
    year_token_ids: Int[Tensor, "n_years"],
) -> Float[Tensor, "batch"]:
    """Hanna et al.'s probability difference: P(year > YY) - P(year <= YY), per prompt.

    ``"two-digit"`` (GPT-2): the next token *is* the two-digit year; ``year_token_ids`` are the tokens
    "00".."99" and the score is ``sum_{y > YY} p(y) - sum_{y <= YY} p(y)`` at the last position. Probability
    on other tokens counts for neither side (as in Hanna et al.).

    ``"single-digit"`` (SmolLM2): the year comes as a tens digit then a units digit. The batch must hold the
    prompt *followed by the tens digit T of YY*: position -2 predicts the tens digit, p(d), and position -1
    predicts the units digit given T, p(u | T) (a causal model's prediction at -2 does not see the appended
    token, so one forward pass gives both). With ``s(u) = p(u | T) / sum_u' p(u' | T)`` (the units
    distribution renormalised over digits), the score is::

        sum_{d > T} p(d) + p(T) * sum_{u > U} s(u)  -  [ sum_{d < T} p(d) + p(T) * sum_{u <= U} s(u) ]

    i.e. the same difference over two-digit years ``q(du) = p(d) * s_d(u)``; only the tie decade d = T needs
    the units digit, because any year in a higher (lower) decade is later (earlier) whatever its units. Both
    scores lie in [-1, 1].
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, pos, d_vocab], got {tuple(logits.shape)}")
    yy = yy.to(logits.device)
    year_token_ids = year_token_ids.to(logits.device)
    if scheme == "two-digit":
        probs = logits[:, -1].softmax(-1)[:, year_token_ids]  # [batch, 100]
        years = torch.arange(100, device=logits.device)
        later = years[None, :] > yy[:, None]
        return (probs * later).sum(-1) - (probs * ~later).sum(-1)
    if scheme == "single-digit":
        if logits.shape[1] < 2:
            raise ValueError("single-digit scoring needs the prompt plus the appended tens digit (>= 2 positions)")
        tens = logits[:, -2].softmax(-1)[:, year_token_ids]  # [batch, 10]: p(d)
        units = logits[:, -1].softmax(-1)[:, year_token_ids]  # [batch, 10]: p(u | T)
        share = units / units.sum(-1, keepdim=True)
        digits = torch.arange(10, device=logits.device)
        t, u = yy // 10, yy % 10
        tie = tens.gather(1, t[:, None]).squeeze(1)
        later = (tens * (digits[None] > t[:, None])).sum(-1) + tie * (share * (digits[None] > u[:, None])).sum(-1)
        earlier = (tens * (digits[None] < t[:, None])).sum(-1) + tie * (share * (digits[None] <= u[:, None])).sum(-1)
        return later - earlier
    raise ValueError(f"scheme must be 'two-digit' or 'single-digit', got {scheme!r}")


def _chunks(items: list, max_batch: int | None) -> list[list]:
    if max_batch is None:
        return [items]
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
    return [items[i : i + max_batch] for i in range(0, len(items), max_batch)]


def _sample(items: list, n: int | None, seed: int, what: str) -> list:
    """``n`` items drawn without replacement (seeded), kept in their original order; all when n is None."""
    if n is None:
        return list(items)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {n!r}")
    if n > len(items):
        raise ValueError(f"{what}={n} but only {len(items)} usable prompts are available")
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]


def greater_than_task(
    model,
    prompts: Sequence[GreaterThanPrompt] | None = None,
    *,
    n_prompts: int | None = None,
    seed: int = 0,
    max_batch: int | None = None,
) -> CircuitTask:
    """The greater-than task for ``model``: clean "17YY" prompts, corrupted "1701" prompts, Hanna's metric.

    Each prompt is checked against the model's tokenizer (:func:`year_scheme`); a prompt whose year does not
    tokenise as two-digit or single-digit years, or whose clean and corrupted prompts differ in token length,
    is *excluded and listed* in ``task.excluded`` (never silently). All kept prompts must share one scheme.
    For single-digit tokenizers the tens digit of YY is appended to both prompts (see
    :func:`greater_than_score`). ``n_prompts`` draws that many of the usable prompts (seeded); prompts are
    grouped by token length into batches of at most ``max_batch``.
    """
    prompts = list(load_greater_than() if prompts is None else prompts)
    usable, excluded, schemes = [], [], {}
    for prompt in prompts:
        scheme = year_scheme(model, prompt)
        if scheme is None:
            pieces = model.to_str_tokens(prompt.clean_prompt + f"{prompt.yy:02d}")[-4:]
            excluded.append((prompt.prompt_id, f"year not split as two-digit or single-digit tokens: {pieces}"))
            continue
        clean, corrupted = model.token_ids(prompt.clean_prompt), model.token_ids(prompt.corrupted_prompt)
        if len(clean) != len(corrupted):
            excluded.append((prompt.prompt_id, f"clean {len(clean)} vs corrupted {len(corrupted)} tokens"))
            continue
        schemes[prompt.prompt_id] = scheme
        usable.append((prompt, clean, corrupted))
    if not usable:
        raise ValueError(f"no greater-than prompt is usable with {model.name}; first exclusions: {excluded[:3]}")
    found = sorted(set(schemes.values()))
    if len(found) > 1:
        examples = {s: next(p for p, sc in schemes.items() if sc == s) for s in found}
        raise ValueError(f"{model.name} tokenizes years inconsistently across prompts: {examples}")
    scheme: YearScheme = found[0]
    year_ids = _year_token_ids(model, scheme)
    chosen = _sample(usable, n_prompts, seed, "n_prompts")
    by_length: dict[int, list] = defaultdict(list)
    for prompt, clean, corrupted in chosen:
        if scheme == "single-digit":
            tens = int(year_ids[prompt.yy // 10])
            clean, corrupted = clean + [tens], corrupted + [tens]
        by_length[len(clean)].append((prompt, clean, corrupted))
    device = model.cfg.device
    batches = []
    for length in sorted(by_length):
        for chunk in _chunks(by_length[length], max_batch):
            yy = torch.tensor([p.yy for p, _, _ in chunk], dtype=torch.long)

            def score(logits: Tensor, yy: Tensor = yy) -> Tensor:
                return greater_than_score(logits, yy, scheme, year_ids)

            batches.append(
                CircuitBatch(
                    clean_tokens=torch.tensor([c for _, c, _ in chunk], dtype=torch.long, device=device),
                    corrupted_tokens=torch.tensor([c for _, _, c in chunk], dtype=torch.long, device=device),
                    score=score,
                    ids=[p.prompt_id for p, _, _ in chunk],
                    read_positions=2 if scheme == "single-digit" else 1,
                )
            )
    notes = (
        "next token is the two-digit year token"
        if scheme == "two-digit"
        else "years are single-digit tokens: the tens digit of YY is appended and the units share used at the tie"
    )
    return CircuitTask(
        name="greater-than",
        metric_name="P(year > YY) - P(year <= YY)",
        batches=batches,
        excluded=excluded,
        notes=f"{scheme} years ({notes})",
    )


# --- fair lending ----------------------------------------------------------------------------------------


def task_from_answer_batches(
    name: str, batches: Sequence[Any], *, excluded: Sequence[tuple[str, str]] = (), metric_name: str | None = None
) -> CircuitTask:
    """A :class:`CircuitTask` scored by ``logit(answer 0) - logit(answer 1)`` at the last position.

    ``batches`` are :class:`mechfin_utils.tasks.TaskBatch` objects (anything with ``clean_tokens``,
    ``corrupted_tokens`` and ``answer_tokens [batch, 2]``, clean answer first; ``ids`` if it has them).
    """
    out = []
    for i, batch in enumerate(batches):
        answers = batch.answer_tokens
        if answers.ndim != 2 or answers.shape != (batch.clean_tokens.shape[0], 2):
            raise ValueError(f"batch {i}: answer_tokens must be [batch, 2], got {tuple(answers.shape)}")

        def score(logits: Tensor, answers: Tensor = answers) -> Tensor:
            return logit_diff(logits, answers)

        ids = list(getattr(batch, "ids", None) or [f"{name}-{i}-{j}" for j in range(answers.shape[0])])
        out.append(CircuitBatch(batch.clean_tokens, batch.corrupted_tokens, score, ids))
    return CircuitTask(
        name=name, metric_name=metric_name or "logit diff (clean answer - corrupted answer)", batches=out,
        excluded=list(excluded),
    )


def fair_lending_task(
    model,
    *,
    n_pairs: int | None = None,
    seed: int = 0,
    max_batch: int | None = None,
    token_length: int | Literal["most_common"] | None = None,
    pairs: Sequence | None = None,
) -> CircuitTask:
    """The paper's task: prohibited-basis prompt (clean, " Yes") vs legitimate-reason prompt (corrupted, " No").

    Pairs come from :func:`mechfin_utils.tasks.load_fair_lending_pairs` (or ``pairs``) and are aligned to the
    model's tokenizer with :func:`~mechfin_utils.tasks.align_pairs` (unequal-length pairs are listed in
    ``task.excluded``). ``token_length`` optionally restricts the draw to aligned pairs of one token length
    (``"most_common"``: the commonest), so that the task is a single batch and each pruning step one forward
    pass; the pairs of other lengths are simply not drawn (``task.notes`` says how many were eligible). Then
    ``n_pairs`` pairs are drawn (seeded) and batched by token length with
    :func:`~mechfin_utils.tasks.make_batches`. Metric: ``logit(" Yes") - logit(" No")``.
    """
    from mechfin_utils.tasks import align_pairs, load_fair_lending_pairs, make_batches

    pairs = list(load_fair_lending_pairs() if pairs is None else pairs)
    report = align_pairs(model, pairs)
    excluded = [(e.pair.id, f"{e.reason}: {e.detail}") for e in report.excluded]
    eligible = list(report.kept)
    notes = f"{len(eligible)} aligned pairs"
    if token_length is not None:
        counts = Counter(report.lengths[p.id] for p in eligible)
        if token_length == "most_common":
            token_length = min(counts, key=lambda length: (-counts[length], length))
        if token_length not in counts:
            raise ValueError(f"no aligned pair has {token_length} tokens under {model.name}; lengths: {dict(counts)}")
        eligible = [p for p in eligible if report.lengths[p.id] == token_length]
        notes += f"; drawn from the {len(eligible)} of {token_length} tokens"
    chosen = _sample(eligible, n_pairs, seed, "n_pairs")
    batches = make_batches(model, chosen, max_batch)
    task = task_from_answer_batches(
        "fair-lending", batches, excluded=excluded, metric_name="logit(' Yes') - logit(' No')"
    )
    task.notes = notes
    return task


# ---------------------------------------------------------------------------------------------------------
# Ablating nodes of a real model through the bridge's hooks
# ---------------------------------------------------------------------------------------------------------


def _z_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _mlp_hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


Backend = Literal["auto", "functional", "bridge"]


def _first_differing_position(batch: CircuitBatch, index: int) -> int:
    """The first position at which any clean prompt of the batch differs from its corrupted partner."""
    differs = (batch.clean_tokens != batch.corrupted_tokens).any(0)
    if not bool(differs.any()):
        raise ValueError(f"batch {index} ({batch.ids[0]}...): clean and corrupted tokens are identical")
    return int(differs.nonzero()[0, 0])


@dataclass
class _FunctionalBatch:
    """What the functional backend keeps per batch (positions ``>= first_pos`` only where it can)."""

    first_pos: int
    n_pos: int
    clean_resid: Float[Tensor, "layer_plus_1 batch rows d_model"]  # clean residual entering each layer
    prefix_k: Float[Tensor, "layer batch prefix kv_head d_head"]
    prefix_v: Float[Tensor, "layer batch prefix kv_head d_head"]
    reference_z: Float[Tensor, "layer batch rows head d_head"]
    reference_mlp: Float[Tensor, "layer batch rows d_model"]


class NodeAblator:
    """Runs a task on a model with any set of nodes ablated, and scores it.

    On construction it runs every batch's corrupted prompts once and keeps each layer's per-head outputs
    ``z`` ``[batch pos n_heads d_head]`` (``hook_z``) and MLP outputs ``[batch pos d_model]`` (``hook_mlp_out``);
    for ``"mean"`` ablation, their mean over the batch. Then it measures the full model (nothing ablated) and
    the baseline (every node ablated). Each :meth:`metric` call re-runs the clean prompts with the stored
    activations swapped in for the ablated nodes. Two interchangeable backends do this:

    ``"bridge"``
        The reference: a full forward pass through the TransformerLens bridge with hooks on
        ``blocks.L.attn.hook_z`` (the ablated heads' slice replaced) and ``blocks.L.hook_mlp_out``. Works for
        any architecture the bridge supports.
    ``"functional"``
        The same computation, run only where it can change, on :class:`mechfin_utils.functional.FunctionalTransformer`
        (GPT-2 and Llama families): a run whose earliest ablated node is in layer ``L`` starts from the clean
        residual stream entering layer ``L`` (the layers below are untouched); with ``"resample"`` ablation the
        positions before the first token where clean and corrupted prompts differ are identical in the clean,
        corrupted and every ablated run, so their keys and values are reused and only later positions are
        recomputed; logits are computed only at the positions the score reads. In ACDC order the earliest
        ablated node is always the one being tested, so an average step costs about a quarter of a full pass.
        Agrees with the bridge backend to float rounding (~1e-5; tested).

    ``"auto"`` (default) picks ``"functional"`` when the architecture is supported, else ``"bridge"``.
    """

    def __init__(self, model, task: CircuitTask, ablation: AblationKind = "resample", backend: Backend = "auto"):
        if ablation not in ("resample", "mean"):
            raise ValueError(f"ablation must be 'resample' or 'mean', got {ablation!r}")
        if backend not in ("auto", "functional", "bridge"):
            raise ValueError(f"backend must be 'auto', 'functional' or 'bridge', got {backend!r}")
        self.model = model
        self.task = task
        self.ablation = ablation
        cfg = model.cfg
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.nodes: list[Node] = acdc_order(self.n_layers, self.n_heads)
        self.n_forward_passes = 0
        self._fm = None
        if backend in ("auto", "functional"):
            from mechfin_utils.functional import FunctionalTransformer, UnsupportedArchitecture

            try:
                self._fm = FunctionalTransformer.from_model(model)
            except UnsupportedArchitecture:
                if backend == "functional":
                    raise
        self.backend = "functional" if self._fm is not None else "bridge"
        with torch.no_grad():
            if self.backend == "functional":
                self._functional = [self._prepare_functional(b, i) for i, b in enumerate(task.batches)]
            else:
                self._reference = [self._prepare_bridge(b) for b in task.batches]
        self.full_metric = self.metric(())
        self.baseline_metric = self.metric(self.nodes)
        if abs(self.full_metric - self.baseline_metric) < 1e-6:
            raise ValueError(
                f"{task.name} on {model.name}: the full model ({self.full_metric:.6g}) and the fully-ablated model "
                f"({self.baseline_metric:.6g}) score the same, so the normalised metric is undefined"
            )

    # --- setup -------------------------------------------------------------------------------------------

    def _reference_activation(self, act: Tensor, batch_dim: int) -> Tensor:
        act = act.detach()
        if self.ablation == "mean":
            act = act.mean(batch_dim, keepdim=True).expand_as(act)
        return act

    def _prepare_bridge(self, batch: CircuitBatch) -> dict[str, Tensor]:
        wanted = {_z_hook_name(layer) for layer in range(self.n_layers)}
        wanted |= {_mlp_hook_name(layer) for layer in range(self.n_layers)}
        _, cache = self.model.bridge.run_with_cache(batch.corrupted_tokens, names_filter=lambda n: n in wanted)
        return {name: self._reference_activation(cache[name], 0) for name in wanted}

    def _prepare_functional(self, batch: CircuitBatch, index: int) -> _FunctionalBatch:
        n_pos = int(batch.clean_tokens.shape[1])
        first = _first_differing_position(batch, index) if self.ablation == "resample" else 0
        first = min(first, n_pos - batch.read_positions)
        clean = self._fm.record(batch.clean_tokens)
        corrupted = self._fm.record(batch.corrupted_tokens)
        return _FunctionalBatch(
            first_pos=first,
            n_pos=n_pos,
            clean_resid=clean.resid_pre[:, :, first:].contiguous(),
            prefix_k=clean.k[:, :, :first].contiguous(),
            prefix_v=clean.v[:, :, :first].contiguous(),
            reference_z=self._reference_activation(corrupted.z, 1)[:, :, first:],
            reference_mlp=self._reference_activation(corrupted.mlp_out, 1)[:, :, first:],
        )

    # --- runs --------------------------------------------------------------------------------------------

    def _check(self, ablated: Iterable[Node]) -> list[Node]:
        nodes = list(ablated)
        for node in nodes:
            if not isinstance(node, Node):
                raise TypeError(f"expected Node objects, got {node!r}")
            if not 0 <= node.layer < self.n_layers or (node.head is not None and not 0 <= node.head < self.n_heads):
                raise ValueError(f"{node} is not a node of {self.model.name} ({self.n_layers} x {self.n_heads} heads)")
        return nodes

    @staticmethod
    def _split(ablated: list[Node]) -> tuple[dict[int, Tensor], set[int]]:
        heads_by_layer: dict[int, set[int]] = defaultdict(set)
        mlp_layers = set()
        for node in ablated:
            if node.is_mlp:
                mlp_layers.add(node.layer)
            else:
                heads_by_layer[node.layer].add(node.head)
        index = {layer: torch.tensor(sorted(h), dtype=torch.long) for layer, h in heads_by_layer.items()}
        return index, mlp_layers

    def hooks(self, ablated: Iterable[Node], batch_index: int) -> list[tuple[str, Callable]]:
        """The bridge forward hooks that ablate ``ablated`` on batch ``batch_index`` (bridge backend only)."""
        if self.backend != "bridge":
            raise RuntimeError("hooks() belongs to the bridge backend; build the NodeAblator with backend='bridge'")
        reference = self._reference[batch_index]
        head_index, mlp_layers = self._split(self._check(ablated))
        hooks = [(_mlp_hook_name(layer), lambda act, hook: reference[hook.name]) for layer in sorted(mlp_layers)]
        for layer, index in head_index.items():

            def swap_heads(z: Tensor, hook, index: Tensor = index) -> Tensor:
                z = z.clone()
                z[:, :, index] = reference[hook.name][:, :, index].to(z.dtype)
                return z

            hooks.append((_z_hook_name(layer), swap_heads))
        return hooks

    def _bridge_logits(self, ablated: list[Node], batch_index: int) -> Tensor:
        batch = self.task.batches[batch_index]
        logits = self.model.bridge.run_with_hooks(batch.clean_tokens, fwd_hooks=self.hooks(ablated, batch_index))
        return logits[:, -batch.read_positions :]

    def _functional_logits(self, ablated: list[Node], batch_index: int) -> Tensor:
        fm, saved = self._fm, self._functional[batch_index]
        read = self.task.batches[batch_index].read_positions
        head_index, mlp_layers = self._split(ablated)
        start = min((n.layer for n in ablated), default=self.n_layers)
        first = saved.first_pos
        x = saved.clean_resid[start]
        for layer in range(start, self.n_layers):
            q, k, v = fm.qkv(layer, x, first, saved.n_pos)
            if first > 0:
                k = torch.cat([saved.prefix_k[layer], k], dim=1)
                v = torch.cat([saved.prefix_v[layer], v], dim=1)
            z, _ = fm.attend(layer, q, k, v, first)
            if layer in head_index:
                index = head_index[layer]
                z = z.clone()
                z[:, :, index] = saved.reference_z[layer][:, :, index]
            x = x + fm.attn_output(layer, z)
            x = x + (saved.reference_mlp[layer] if layer in mlp_layers else fm.mlp(layer, x))
        return fm.unembed(fm.final_norm(x[:, -read:]))

    def prompt_scores(self, ablated: Iterable[Node] = ()) -> Float[Tensor, "n_prompts"]:
        """Every prompt's score with ``ablated`` ablated, in batch order."""
        ablated = self._check(ablated)
        run = self._functional_logits if self.backend == "functional" else self._bridge_logits
        scores = []
        with torch.no_grad():
            for i, batch in enumerate(self.task.batches):
                logits = run(ablated, i)
                self.n_forward_passes += 1
                scores.append(batch.score(logits).float().cpu())
        return torch.cat(scores)

    def metric(self, ablated: Iterable[Node] = ()) -> float:
        """The task metric (mean score over all prompts) with the nodes in ``ablated`` ablated."""
        return float(self.prompt_scores(ablated).mean())

    def normalise(self, value: float) -> float:
        """``(value - baseline) / (full - baseline)``: 1 for the full model, 0 with every node ablated."""
        return (value - self.baseline_metric) / (self.full_metric - self.baseline_metric)

    def normalised_metric(self, ablated: Iterable[Node] = ()) -> float:
        return self.normalise(self.metric(ablated))

    def __repr__(self) -> str:
        return (
            f"NodeAblator({self.model.name}, {self.task.name}, {self.ablation} ablation, {self.backend} backend: "
            f"full {self.full_metric:.4f}, baseline {self.baseline_metric:.4f}, {len(self.nodes)} nodes)"
        )


# ---------------------------------------------------------------------------------------------------------
# Circuits: discovery, sweep, knockout validation
# ---------------------------------------------------------------------------------------------------------

OUTPUT_NODE = "logits"
INPUT_NODE = "embed"


@dataclass
class Circuit:
    """A discovered circuit: its nodes, how they were found, and how faithful it is.

    ``importance[node]`` is ``|delta|`` when the node was considered (normalised units: a fraction of the
    full-vs-baseline gap), for kept and removed nodes alike. ``faithfulness`` is the circuit-only model's
    normalised metric; ``raw_faithfulness`` is ``circuit_metric / full_metric``.
    """

    model_name: str
    task_name: str
    metric_name: str
    ablation: str
    threshold: float
    criterion: str
    n_layers: int
    n_heads: int
    nodes: list[Node]
    removed: list[Node]
    importance: dict[Node, float]
    full_metric: float
    baseline_metric: float
    circuit_metric: float
    faithfulness: float
    seconds: float = 0.0
    n_forward_passes: int = 0
    pruning: PruningResult | None = None

    @property
    def raw_faithfulness(self) -> float:
        return self.circuit_metric / self.full_metric if self.full_metric != 0 else float("nan")

    @property
    def n_heads_kept(self) -> int:
        return sum(not n.is_mlp for n in self.nodes)

    @property
    def n_mlps_kept(self) -> int:
        return sum(n.is_mlp for n in self.nodes)

    @property
    def edges(self) -> list[tuple[str, str]]:
        """Residual-stream connections implied by the kept nodes (not separately tested; see module docs).

        ``embed`` feeds every kept node, every kept node feeds ``logits``, and a kept node feeds every kept node
        that reads the residual stream after it writes (a head in layer L feeds the MLP of layer L and anything
        in later layers; an MLP in layer L feeds anything in later layers).
        """
        ordered = sorted(self.nodes, key=Node.sort_key)
        edges = [(INPUT_NODE, n.name) for n in ordered]
        for i, sender in enumerate(ordered):
            for receiver in ordered[i + 1 :]:
                if receiver.layer > sender.layer or (receiver.is_mlp and not sender.is_mlp):
                    edges.append((sender.name, receiver.name))
        edges.extend((n.name, OUTPUT_NODE) for n in ordered)
        return edges

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "task": self.task_name,
            "ablation": self.ablation,
            "threshold": self.threshold,
            "n_nodes": len(self.nodes),
            "n_heads": self.n_heads_kept,
            "n_mlps": self.n_mlps_kept,
            "of_nodes": self.n_layers * (self.n_heads + 1),
            "full_metric": self.full_metric,
            "baseline_metric": self.baseline_metric,
            "circuit_metric": self.circuit_metric,
            "faithfulness": self.faithfulness,
            "raw_faithfulness": self.raw_faithfulness,
            "seconds": self.seconds,
            "forward_passes": self.n_forward_passes,
        }

    def __repr__(self) -> str:
        return (
            f"Circuit({self.task_name} on {self.model_name}, tau={self.threshold}: {len(self.nodes)} nodes "
            f"({self.n_heads_kept} heads, {self.n_mlps_kept} MLPs), faithfulness {self.faithfulness:.3f})"
        )


def discover_circuit(
    ablator: NodeAblator,
    threshold: float,
    *,
    criterion: Criterion = "abs",
    on_step: Callable[[PruningStep], None] | None = None,
) -> Circuit:
    """Prune ``ablator``'s model on its task at threshold ``tau`` (normalised units) and return the circuit.

    Costs one forward pass per batch per node (plus one to measure the circuit alone in raw units).
    """
    start_passes, t0 = ablator.n_forward_passes, time.perf_counter()
    result = prune_nodes(ablator.nodes, ablator.normalised_metric, threshold, criterion=criterion, on_step=on_step)
    circuit_metric = ablator.metric(result.removed)
    return Circuit(
        model_name=ablator.model.name,
        task_name=ablator.task.name,
        metric_name=ablator.task.metric_name,
        ablation=ablator.ablation,
        threshold=float(threshold),
        criterion=criterion,
        n_layers=ablator.n_layers,
        n_heads=ablator.n_heads,
        nodes=sorted(result.kept, key=Node.sort_key),
        removed=sorted(result.removed, key=Node.sort_key),
        importance=result.importance,
        full_metric=ablator.full_metric,
        baseline_metric=ablator.baseline_metric,
        circuit_metric=circuit_metric,
        faithfulness=result.final_metric,
        seconds=time.perf_counter() - t0,
        n_forward_passes=ablator.n_forward_passes - start_passes,
        pruning=result,
    )


def threshold_sweep(
    ablator: NodeAblator, thresholds: Sequence[float], *, criterion: Criterion = "abs"
) -> tuple[pd.DataFrame, list[Circuit]]:
    """Discover a circuit at each threshold: a table of size vs faithfulness (one row each) and the circuits."""
    if not thresholds:
        raise ValueError("thresholds is empty")
    circuits = [discover_circuit(ablator, t, criterion=criterion) for t in thresholds]
    return pd.DataFrame([c.summary() for c in circuits]), circuits


def choose_circuit(circuits: Sequence[Circuit], min_faithfulness: float = 0.8) -> Circuit:
    """From a threshold sweep, the smallest circuit whose faithfulness is at least ``min_faithfulness``
    (ties: the larger threshold); when none reaches it, the most faithful one (ties: the smaller).

    The rule a reader would apply to the size-vs-faithfulness plot, written down so the notebook's choice is
    reproducible rather than eyeballed.
    """
    if not circuits:
        raise ValueError("circuits is empty: run threshold_sweep first")
    if not 0 <= min_faithfulness <= 1:
        raise ValueError(f"min_faithfulness must be in [0, 1], got {min_faithfulness!r}")
    good = [c for c in circuits if c.faithfulness >= min_faithfulness]
    if good:
        return min(good, key=lambda c: (len(c.nodes), -c.threshold))
    return max(circuits, key=lambda c: (c.faithfulness, -len(c.nodes)))


@dataclass
class KnockoutReport:
    """Knocking out the circuit vs knocking out as many random nodes from outside it (normalised metric)."""

    model_name: str
    task_name: str
    nodes: list[Node]
    circuit_knockout: float
    random_knockouts: list[float]
    random_sets: list[list[Node]]
    match_kinds: bool
    seed: int

    @property
    def random_mean(self) -> float:
        return float(torch.tensor(self.random_knockouts).mean())

    @property
    def random_std(self) -> float:
        values = torch.tensor(self.random_knockouts)
        return float(values.std()) if len(values) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        values = self.random_knockouts
        return {
            "model": self.model_name,
            "task": self.task_name,
            "n_nodes_knocked_out": len(self.nodes),
            "circuit_knockout": self.circuit_knockout,
            "random_mean": self.random_mean,
            "random_std": self.random_std,
            "random_min": min(values),
            "random_max": max(values),
            "n_random": len(values),
            "match_kinds": self.match_kinds,
            "seed": self.seed,
        }


def knockout_test(
    ablator: NodeAblator,
    circuit: Circuit | Collection[Node],
    *,
    n_random: int = 10,
    seed: int = 0,
    match_kinds: bool | Literal["auto"] = True,
) -> KnockoutReport:
    """Ablate the circuit's nodes (only them), then ``n_random`` seeded random sets drawn from outside it.

    With ``match_kinds`` (default) each random set has as many heads and as many MLPs as the circuit: MLPs and
    heads differ a lot in how much they matter, so matching the mix keeps the comparison fair; it raises when
    the outside has too few heads or MLPs (a circuit holding most MLPs). ``match_kinds=False`` draws the same
    *number* of nodes from everything outside, whatever their kind; ``"auto"`` matches kinds when the outside
    allows it and otherwise draws from everything outside (``report.match_kinds`` says which was done).
    Values are the normalised metric: 1 = unchanged, 0 = as bad as ablating everything.
    """
    if isinstance(circuit, Circuit):
        if circuit.model_name != ablator.model.name or circuit.task_name != ablator.task.name:
            raise ValueError(
                f"circuit is for {circuit.task_name} on {circuit.model_name}, the ablator for "
                f"{ablator.task.name} on {ablator.model.name}"
            )
        nodes = list(circuit.nodes)
    else:
        nodes = ablator._check(circuit)
    if not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be a positive integer, got {n_random!r}")
    if match_kinds not in (True, False, "auto"):
        raise ValueError(f"match_kinds must be True, False or 'auto', got {match_kinds!r}")
    inside = set(nodes)
    outside = [n for n in ablator.nodes if n not in inside]
    rng = random.Random(seed)
    if match_kinds == "auto":
        outside_heads = sum(not n.is_mlp for n in outside)
        match_kinds = sum(not n.is_mlp for n in inside) <= outside_heads and sum(n.is_mlp for n in inside) <= len(outside) - outside_heads
    if match_kinds:
        outside_heads = [n for n in outside if not n.is_mlp]
        outside_mlps = [n for n in outside if n.is_mlp]
        k_heads, k_mlps = sum(not n.is_mlp for n in inside), sum(n.is_mlp for n in inside)
        if k_heads > len(outside_heads) or k_mlps > len(outside_mlps):
            raise ValueError(
                f"the circuit has {k_heads} heads and {k_mlps} MLPs but only {len(outside_heads)} heads and "
                f"{len(outside_mlps)} MLPs lie outside it: no random set of the same make-up exists "
                "(use match_kinds=False, or a larger threshold)"
            )
        draw = lambda: rng.sample(outside_heads, k_heads) + rng.sample(outside_mlps, k_mlps)  # noqa: E731
    else:
        if len(inside) > len(outside):
            raise ValueError(f"the circuit has {len(inside)} nodes but only {len(outside)} lie outside it")
        draw = lambda: rng.sample(outside, len(inside))  # noqa: E731
    random_sets = [sorted(draw(), key=Node.sort_key) for _ in range(n_random)]
    return KnockoutReport(
        model_name=ablator.model.name,
        task_name=ablator.task.name,
        nodes=sorted(inside, key=Node.sort_key),
        circuit_knockout=ablator.normalised_metric(nodes),
        random_knockouts=[ablator.normalised_metric(s) for s in random_sets],
        random_sets=random_sets,
        match_kinds=match_kinds,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def size_faithfulness_figure(table: pd.DataFrame, model, task_name: str):
    """Circuit size against faithfulness over a threshold sweep (one point per threshold, labelled tau)."""
    import plotly.graph_objects as go

    needed = {"threshold", "n_nodes", "faithfulness", "of_nodes"}
    if not needed <= set(table.columns):
        raise ValueError(f"table needs the columns of threshold_sweep's table, missing {sorted(needed - set(table.columns))}")
    fig = go.Figure(
        go.Scatter(
            x=table["n_nodes"], y=table["faithfulness"], mode="lines+markers+text",
            text=[f"tau={t:g}" for t in table["threshold"]], textposition="top right",
            hovertemplate="%{text}: %{x} nodes, faithfulness %{y:.3f}<extra></extra>", name="circuit",
        )
    )
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="full model")
    fig.add_hline(y=0.0, line_dash="dot", line_color="grey", annotation_text="everything ablated")
    fig.update_layout(
        title=f"{task_name}: circuit size vs faithfulness — {model.name}",
        xaxis_title=f"nodes kept (of {int(table['of_nodes'].iloc[0])})", yaxis_title="faithfulness (normalised metric)",
        plot_bgcolor="white",
    )
    return fig


def knockout_figure(report: KnockoutReport, model):
    """The circuit's knockout next to each random knockout (points) and their mean +- one standard deviation."""
    import plotly.graph_objects as go

    if report.model_name != model.name:
        raise ValueError(f"this knockout was run on {report.model_name}, not {model.name}")
    kind = "same number of heads and MLPs" if report.match_kinds else "same number of nodes, any kind"
    fig = go.Figure()
    fig.add_trace(go.Bar(x=["circuit"], y=[report.circuit_knockout], name="circuit knocked out", marker_color="#d62728"))
    fig.add_trace(go.Bar(x=["random, outside the circuit"], y=[report.random_mean], name="random sets (mean)",
                         marker_color="#7f7f7f", error_y=dict(type="data", array=[report.random_std])))
    fig.add_trace(go.Scatter(x=["random, outside the circuit"] * len(report.random_knockouts), y=report.random_knockouts,
                             mode="markers", marker=dict(color="black", size=6), name="each random set"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="full model")
    fig.update_layout(
        title=(f"{report.task_name}: knocking out the circuit's {len(report.nodes)} nodes vs {len(report.random_knockouts)} "
               f"random sets ({kind}) — {model.name}"),
        yaxis_title="normalised metric (1 = unchanged, 0 = everything ablated)", plot_bgcolor="white", showlegend=True,
    )
    return fig


def _node_xy(name: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    if name == INPUT_NODE:
        return (-1.0, (n_heads - 1) / 2)
    if name == OUTPUT_NODE:
        return (float(n_layers), (n_heads - 1) / 2)
    node = Node.parse(name)
    return (float(node.layer) + (0.35 if node.is_mlp else 0.0), float(-1.5 if node.is_mlp else node.head))


def circuit_figure(circuit: Circuit, model, title: str | None = None, max_edges: int = 2000):
    """A plotly figure of the circuit: nodes laid out by layer (x) and head (y; MLPs on the row below the
    heads), kept nodes coloured by importance (|delta| when pruned, in units of the full-vs-baseline gap),
    the other candidate nodes as faint dots, and the circuit's implied residual edges.

    Implied edges grow with the square of the circuit's size; past ``max_edges`` (a circuit of ~60 nodes)
    they are a grey wash that says nothing and makes the SVG tens of MB, so they are left out and the
    subtitle says how many there are. The title always carries ``model.name``; a circuit found on a
    different model is refused.
    """
    import plotly.graph_objects as go

    if circuit.model_name != model.name:
        raise ValueError(f"this circuit was found on {circuit.model_name}, not {model.name}")
    base = title or f"{circuit.task_name} circuit (tau={circuit.threshold:g})"
    full_title = base if model.name in base else f"{base} — {model.name}"
    n_layers, n_heads = circuit.n_layers, circuit.n_heads
    xy = lambda name: _node_xy(name, n_layers, n_heads)  # noqa: E731

    edges = circuit.edges
    drawn = edges if len(edges) <= max_edges else []
    edge_x, edge_y = [], []
    for sender, receiver in drawn:
        (x0, y0), (x1, y1) = xy(sender), xy(receiver)
        edge_x += [x0, x1, None]
        edge_y += [y0, y1, None]
    traces = [
        go.Scatter(x=edge_x, y=edge_y, mode="lines", line=dict(width=0.5, color="rgba(120,120,120,0.15)"),
                   hoverinfo="skip", name="implied residual edges")
    ]
    kept = set(circuit.nodes)
    others = [n for n in acdc_order(n_layers, n_heads) if n not in kept]
    traces.append(
        go.Scatter(
            x=[xy(n.name)[0] for n in others], y=[xy(n.name)[1] for n in others], mode="markers",
            marker=dict(size=5, color="rgba(180,180,180,0.5)"), name="pruned",
            text=[f"{n.name}: |delta| {circuit.importance.get(n, float('nan')):.3g} (pruned)" for n in others],
            hoverinfo="text",
        )
    )
    ordered = sorted(circuit.nodes, key=Node.sort_key)
    traces.append(
        go.Scatter(
            x=[xy(n.name)[0] for n in ordered], y=[xy(n.name)[1] for n in ordered], mode="markers+text",
            marker=dict(size=14, color=[circuit.importance.get(n, 0.0) for n in ordered], colorscale="Viridis",
                        showscale=True, colorbar=dict(title="|delta|"), line=dict(width=1, color="black"),
                        symbol=["square" if n.is_mlp else "circle" for n in ordered]),
            text=[n.name for n in ordered], textposition="top center", textfont=dict(size=9),
            hovertext=[f"{n.name}: |delta| {circuit.importance.get(n, 0.0):.3g}" for n in ordered],
            hoverinfo="text", name="circuit",
        )
    )
    ends = [INPUT_NODE, OUTPUT_NODE]
    traces.append(
        go.Scatter(x=[xy(e)[0] for e in ends], y=[xy(e)[1] for e in ends], mode="markers+text", text=ends,
                   textposition="top center", marker=dict(size=16, color="black", symbol="diamond"),
                   name="input / output", hoverinfo="text")
    )
    fig = go.Figure(traces)
    fig.update_layout(
        title=(f"{full_title}<br><sup>{len(circuit.nodes)} of {n_layers * (n_heads + 1)} nodes, faithfulness "
               f"{circuit.faithfulness:.2f}, {circuit.ablation} ablation, metric {circuit.metric_name}"
               + ("" if drawn is edges else f"; its {len(edges):,} implied edges are not drawn") + "</sup>"),
        xaxis=dict(title="layer", tickmode="linear", dtick=1 if n_layers <= 16 else 2, zeroline=False),
        yaxis=dict(title="head", zeroline=False, tickvals=[-1.5, *range(n_heads)],
                   ticktext=["MLP", *[str(h) for h in range(n_heads)]]),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
        plot_bgcolor="white",
        height=420 + 12 * n_heads,
        width=max(700, 45 * n_layers + 200),
    )
    return fig
