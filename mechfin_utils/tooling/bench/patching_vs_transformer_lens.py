"""``make bench``'s first table: mechfin's exact activation patching against TransformerLens's, on the same model,
prompts and metric.

For every (model, component) pair, from one process (:func:`bench_component`):

* **TransformerLens** (``transformer_lens.patching.get_act_patch_<key>``): its time for the whole sweep. It runs one
  full forward pass per cell, so its time is linear in the number of cells: it is timed on a random sample of cells
  (``tl_cells``) and extrapolated, or on every cell (``tl_cells=None``; hours on two cores for the head-by-position
  sweeps);
* **mechfin** (:func:`mechfin_utils.methods.patching.activation.activation_patch`): the whole sweep, timed;
* **max |difference|** between the two on the cells TransformerLens ran, on the normalised metric and in logits (the
  normalised metric divides by the clean-corrupted gap, so on a model that barely separates the two prompts, float32
  rounding of ~1e-6 logits shows up ~1/gap times larger there);
* **peak memory** of each sweep, and the **FLOP floor** of the sweep in seconds (:mod:`~mechfin_utils.tooling.bench.machine`,
  :mod:`~mechfin_utils.tooling.bench.flop_floor`).

The inputs (:func:`task_inputs`) are the fair-lending task set's prompts: the largest group of pairs that share
template and token length for the model's tokenizer, with the normalised logit-difference metric.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from mechfin_utils.core.functional import functional_model
from mechfin_utils.core.metrics import NormalisedLogitDiff
from mechfin_utils.methods import patching
from mechfin_utils.reporting.tables import markdown_table
from mechfin_utils.tooling.bench.flop_floor import floor_flops
from mechfin_utils.tooling.bench.machine import timed


@dataclass
class BenchRow:
    model: str
    component: str
    batch: int
    n_pos: int
    cells: int
    tl_cells_run: int
    tl_seconds: float
    tl_extrapolated: bool
    mechfin_seconds: float
    speedup: float
    max_abs_diff: float
    max_abs_diff_logits: float
    tl_peak_mb: float | None
    mechfin_peak_mb: float | None
    floor_gflop: float
    floor_seconds: float
    x_floor: float


def task_inputs(model, batch: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], NormalisedLogitDiff]:
    """The task set's largest same-template, same-length group for this tokenizer: tokens, answers, metric."""
    from mechfin_utils.tasks.batching import align_pairs, largest_template_batch
    from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs

    report = align_pairs(model, load_fair_lending_pairs())
    group = largest_template_batch(model, report, max_batch=batch)
    with torch.no_grad():
        metric = NormalisedLogitDiff(
            model.bridge(group.clean_tokens), model.bridge(group.corrupted_tokens), group.answer_tokens
        )
    return group.clean_tokens, group.corrupted_tokens, metric


def _sample_cells(key: str, shape: tuple[int, ...], n: int | None, seed: int) -> pd.DataFrame | None:
    """``n`` distinct random cells of the result as a TransformerLens ``index_df`` (None: all cells)."""
    axes = list(patching.COMPONENTS[key].axes)
    total = 1
    for size in shape:
        total *= size
    if n is None or n >= total:
        return None
    flat = random.Random(f"{key}-{seed}").sample(range(total), n)
    rows = [list(torch.unravel_index(torch.tensor(i), shape)) for i in flat]
    return pd.DataFrame([[int(v) for v in row] for row in rows], columns=axes)


def bench_component(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: NormalisedLogitDiff,
    key: str,
    *,
    model_label: str,
    tl_cells: int | None,
    throughput: float,
    seed: int = 0,
    batch_size: int = patching.DEFAULT_BATCH_SIZE,
) -> BenchRow:
    """Time TransformerLens and mechfin on one sweep and compare their numbers."""
    import transformer_lens.patching as tl_patching

    # 1. The sweep's shape.
    spec = patching.COMPONENTS[key]
    bridge = model.bridge
    cfg = bridge.cfg
    batch, n_pos = corrupted_tokens.shape
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    shape = patching.result_shape(spec, cfg.n_layers, n_pos, cfg.n_heads, n_kv)
    n_cells = 1
    for size in shape:
        n_cells *= size

    # 2. mechfin, every cell.
    ours, ours_s, ours_peak = timed(
        lambda: patching.activation_patch(
            model, clean_tokens, corrupted_tokens, metric, key, batch_size=batch_size, progress=False
        )
    )

    # 3. TransformerLens, on a sample of cells (or all), from a cache of the clean run.
    index_df = _sample_cells(key, shape, tl_cells, seed)
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean_tokens)
    tl_fn = getattr(tl_patching, f"get_act_patch_{key}")
    tl_df = (
        None
        if index_df is None
        else (index_df.rename(columns={"head": "head_index"}) if spec.site == "pattern" else index_df)
    )

    def run_tl() -> torch.Tensor:
        with torch.no_grad():
            if tl_df is None:
                return tl_fn(bridge, corrupted_tokens, clean_cache, metric)
            return tl_fn(bridge, corrupted_tokens, clean_cache, metric, index_df=tl_df, index_axis_names=None)

    theirs, tl_s, tl_peak = timed(run_tl)
    clean_cache = None  # free it before the next sweep

    # 4. The difference on the cells both ran, TransformerLens's time scaled to all cells, and the FLOP floor.
    if index_df is None:
        difference = (ours - theirs).abs().max().item()
        tl_run = n_cells
    else:
        picked = ours[tuple(torch.tensor(index_df[a].to_numpy()) for a in spec.axes)]
        difference = (picked - theirs).abs().max().item()
        tl_run = len(index_df)
    tl_total = tl_s * n_cells / tl_run
    fm = functional_model(model)
    floor = floor_flops(fm, key, clean_tokens, corrupted_tokens)
    floor_s = floor / throughput
    mb = lambda value: None if value is None else round(value / 2**20, 1)  # noqa: E731
    return BenchRow(
        model=model_label,
        component=key,
        batch=batch,
        n_pos=n_pos,
        cells=n_cells,
        tl_cells_run=tl_run,
        tl_seconds=tl_total,
        tl_extrapolated=tl_run < n_cells,
        mechfin_seconds=ours_s,
        speedup=tl_total / ours_s,
        max_abs_diff=difference,
        max_abs_diff_logits=difference * abs(float(metric.clean - metric.corrupted)),
        tl_peak_mb=mb(tl_peak),
        mechfin_peak_mb=mb(ours_peak),
        floor_gflop=floor / 1e9,
        floor_seconds=floor_s,
        x_floor=ours_s / floor_s if floor_s > 0 else float("nan"),
    )


def _fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _transformer_lens_seconds(row: BenchRow) -> str:
    return f"{row.tl_seconds:,.0f}" + (f" (est. from {row.tl_cells_run})" if row.tl_extrapolated else "")


PATCHING_COLUMNS = (
    ("model", "{model}"),
    ("component", "{component}"),
    ("prompts x tokens", "{batch} x {n_pos}"),
    ("cells", "{cells:,}"),
    ("TransformerLens s", _transformer_lens_seconds),
    ("mechfin s", "{mechfin_seconds:,.1f}"),
    ("speed-up", "{speedup:,.1f}x"),
    ("max abs diff (normalised / logits)", "{max_abs_diff:.1e} / {max_abs_diff_logits:.1e}"),
    ("peak MB (TL / mechfin)", lambda row: f"{_fmt_mb(row.tl_peak_mb)} / {_fmt_mb(row.mechfin_peak_mb)}"),
    ("FLOP floor s", "{floor_seconds:,.1f}"),
    ("x floor", "{x_floor:.1f}"),
)
"""The columns of the patching table (:func:`mechfin_utils.reporting.tables.markdown_table`)."""


def format_table(rows: list[BenchRow]) -> str:
    """A Markdown table of the results."""
    return markdown_table(rows, PATCHING_COLUMNS)
