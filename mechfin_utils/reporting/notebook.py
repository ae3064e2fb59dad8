"""What every notebook does first: turn its papermill parameters into a model, a task set and a figure writer.

A notebook's parameters cell holds ``model``, ``n_pairs``, ``seed``, ``fast`` and ``gpt2_path``; its next cell
is ``nb = start("02", model=model, ...)``. ``fast`` (default: the ``MECHFIN_FAST`` environment variable, which
``make test`` sets) shrinks the work so the notebook runs in seconds under nbval; figures made in fast mode
are for checking that code runs, not for reading. A notebook that compares a base model with its screener turns
its ``model`` and ``screener`` parameters into the two names with :func:`resolve_base_and_screener`.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mechfin_utils.core.models import SCREENERS, LoadedModel, load_model, resolve_auto
from mechfin_utils.reporting.figures import clear_notebook_outputs, save_figure, save_html, save_results
from mechfin_utils.tasks.batching import AlignmentReport, TaskBatch, align_pairs, largest_template_batch, make_batches
from mechfin_utils.tasks.fair_lending import (
    CounterfactualPair,
    FairLendingPair,
    load_counterfactual_pairs,
    load_fair_lending_pairs,
)

FAST_N_PAIRS = 22  # two per basis
# The attribution notebooks (01-03, 07) read per-pair means over a stratified sample of this many pairs, six per
# basis: sized so that `make figures` for a model and its screener fits 15 minutes on 2 cores. Notebook 00 scores
# every pair; pass n_pairs (up to every aligned pair) for tighter intervals.
ANALYSIS_N_PAIRS = 66
FAST_N_BOOT = 200
FULL_N_BOOT = 1000  # bootstrap resamples for every interval in make figures (ROME and most papers use 1000)


def resolve_fast(fast: bool | None) -> bool:
    """``fast`` as given, else ``MECHFIN_FAST`` (``1``/``true``/``yes``) from the environment."""
    if fast is not None:
        if not isinstance(fast, bool):
            raise ValueError(f"fast must be True, False or None, got {fast!r}")
        return fast
    return os.environ.get("MECHFIN_FAST", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_base_and_screener(
    model: str, screener: str, *, fast: bool, gpt2_path: str | None = None
) -> tuple[str, str]:
    """The base model's and the screener's names from the parameters of a notebook that compares the two (08, 10).

    ``model`` is the base model (``"auto"`` picks it as :func:`~mechfin_utils.core.models.load_model` would) or a
    screener's name, which then stands for that screener compared with its own base model. ``screener`` ``""``
    means ``"<base>-screener"``, and in fast mode the briefly trained ``"<base>-screener-brief"``.
    """
    base = resolve_auto(gpt2_path or None)[0] if model == "auto" else model
    if base in SCREENERS:  # given a screener: compare it with its own base model
        base, screener = SCREENERS[base][0], screener or base
    return base, screener or f"{base}-screener" + ("-brief" if fast else "")


def stratified_sample(pairs: Sequence, n: int | None, seed: int = 0) -> list:
    """Up to ``n`` pairs spread evenly over the bases (round robin over shuffled per-basis lists), in file order.

    ``n=None`` keeps all. Every basis is represented once ``n`` is at least the number of bases.
    """
    if n is None or n >= len(pairs):
        return list(pairs)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n_pairs must be a positive integer or None, got {n!r}")
    rng = random.Random(seed)
    by_basis: dict[str, list] = defaultdict(list)
    for pair in pairs:
        by_basis[pair.basis].append(pair)
    queues = []
    for basis in sorted(by_basis):
        group = list(by_basis[basis])
        rng.shuffle(group)
        queues.append(group)
    chosen: list = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    order = {id(p): i for i, p in enumerate(pairs)}
    return sorted(chosen, key=lambda p: order[id(p)])


@dataclass
class NotebookSession:
    """The state a notebook works with: the model, the aligned task set, and where its figures go."""

    notebook: str
    model: LoadedModel
    fast: bool
    seed: int
    report: AlignmentReport
    pairs: list[FairLendingPair]
    max_batch: int
    saved: list[str] = field(default_factory=list)

    @property
    def n_boot(self) -> int:
        """Bootstrap resamples: fewer in fast mode."""
        return FAST_N_BOOT if self.fast else FULL_N_BOOT

    @property
    def is_gpt2(self) -> bool:
        """True only for GPT-2 Small itself (the paper's model): the paper-vs-this-run tables need it."""
        return self.model.slug == "gpt2"

    def batches(self) -> list[TaskBatch]:
        """The chosen pairs grouped by token length (no padding), at most ``max_batch`` pairs each."""
        return make_batches(self.model, self.pairs, self.max_batch)

    def template_batch(self, max_batch: int | None = None) -> TaskBatch:
        """The largest group sharing template and length: positions mean the same thing in every row."""
        return largest_template_batch(self.model, self.pairs, max_batch or self.max_batch)

    def counterfactual_batches(self, n_pairs: int | None = None) -> tuple[AlignmentReport, list[TaskBatch]]:
        """The counterfactual decision family, aligned for this model (report + batches of kept pairs)."""
        pairs: list[CounterfactualPair] = load_counterfactual_pairs()
        report = align_pairs(self.model, pairs)
        kept = stratified_sample(report.kept, n_pairs, self.seed)
        return report, make_batches(self.model, kept, self.max_batch)

    def save(self, fig, name: str, results: dict[str, Any] | None = None, **kwargs):
        """Write a figure through the one figure helper (PNG + SVG + offline HTML) and note its numbers."""
        paths = save_figure(fig, model=self.model, notebook=self.notebook, name=name, results=results, **kwargs)
        self.saved.append(name)
        return paths

    def save_html(self, html, name: str, title: str | None = None):
        path = save_html(html, model=self.model, notebook=self.notebook, name=name, title=title)
        self.saved.append(name)
        return path

    def record(self, key: str, value: Any):
        """Store a number (or table) in this notebook's results JSON beside its figures."""
        return save_results(self.model, self.notebook, key, value)


def start(
    notebook: str,
    *,
    model: str | LoadedModel = "auto",
    n_pairs: int | None = None,
    seed: int = 0,
    fast: bool | None = None,
    gpt2_path: str | None = None,
    max_batch: int = 16,
    default_n_pairs: int | None = None,
) -> NotebookSession:
    """Load the model, align the fair-lending task set for its tokenizer, and report what was kept.

    Args:
        notebook: the notebook's two-digit number (figures go to ``figures/<model>/<notebook>_<name>.*``).
        model: ``"auto"``, ``"gpt2"``, ``"smollm2-135m"``, a Hugging Face id, or an already loaded model.
        n_pairs: how many pairs to use (spread evenly over the bases); None = ``default_n_pairs``.
        seed: seeds the pair sample and everything random downstream.
        fast: small, quick run (default: ``$MECHFIN_FAST``); ``n_pairs`` defaults to 22 (two per basis) then.
        gpt2_path: a local GPT-2 checkpoint folder ("" means none).
        max_batch: pairs per forward pass.
        default_n_pairs: the notebook's own sample size when ``n_pairs`` is None (None: every pair that aligns);
            fast mode uses ``FAST_N_PAIRS`` instead.
    """
    fast = resolve_fast(fast)
    if n_pairs is None:
        n_pairs = FAST_N_PAIRS if fast else default_n_pairs
    loaded = model if isinstance(model, LoadedModel) else load_model(model, gpt2_path=gpt2_path or None)
    report = align_pairs(loaded, load_fair_lending_pairs())
    pairs = stratified_sample(report.kept, n_pairs, seed)
    print(
        f"Task set for {loaded.name}: {len(report.kept)} of {report.n_total} pairs align "
        f"({len(report.excluded)} excluded: clean and corrupted differ in token length); using {len(pairs)}"
        + (" [fast mode]" if fast else "")
    )
    clear_notebook_outputs(loaded, notebook)  # this run's figures and results replace the last run's, none survive
    session = NotebookSession(
        notebook=notebook, model=loaded, fast=fast, seed=seed, report=report, pairs=pairs, max_batch=max_batch
    )
    session.record(
        "run",
        {
            "fast": fast,
            "seed": seed,
            "n_pairs_used": len(pairs),
            "n_pairs_aligned": len(report.kept),
            "n_pairs_total": report.n_total,
        },
    )
    return session
