"""``make bench``: mechfin's exact patching against TransformerLens's, and its causal tracing against a
ROME-style tracer, on the same model, prompts and metric.

For every (model, component) pair it reports, from one process:

* **TransformerLens** (``transformer_lens.patching.get_act_patch_<key>``): its time for the whole sweep. It runs
  one full forward pass per cell, so its time is linear in the number of cells: by default it is timed on a
  random sample of cells (``--tl-cells``) and extrapolated, and ``--full-tl`` runs every cell instead (hours
  on two cores for the head-by-position sweeps).
* **mechfin** (:func:`mechfin_utils.methods.patching.activation.activation_patch`): the whole sweep, timed.
* **max |difference|** between the two on the cells TransformerLens ran, on the normalised metric and in
  logits (the normalised metric divides by the clean-corrupted gap, so on a model that barely separates the
  two prompts, float32 rounding of ~1e-6 logits shows up ~1/gap times larger there).
* **peak memory**: the largest growth of the process's resident set while each sweep ran (sampled every
  few milliseconds; the model and the cached runs that existed before are not counted). So that freed
  memory goes back to the system and the resident set follows what is live, the bench pins glibc's
  ``mmap`` threshold at 64 KiB (no effect elsewhere than glibc Linux).
* **the FLOP floor**: the arithmetic that cannot be avoided. For a patch at layer ``L`` and position ``p``
  every layer after ``L`` must be recomputed at every position from ``p`` on (keys and values at all of
  them, because later positions attend to them; queries, attention, output and MLP too except in the last
  layer, where only the final position is read), and the patched layer's MLP on the patched rows. Nothing
  before ``L`` or ``p`` and nothing on prompts whose tokens have not diverged by ``p`` needs computing. The
  floor's *time* is those FLOPs at the matrix-multiply throughput measured on this machine just before, with
  matrices of the model's own sizes; ``x floor`` is mechfin's time over it.

The inputs are the fair-lending task set's prompts: the largest group of pairs that share template and token
length for each model's tokenizer, ``--batch`` pairs of it, with the normalised logit-difference metric.
Models: the embedded SmolLM2-135M-Instruct and a GPT-2 Small-*shape* model with random weights loaded through
the real GPT-2 path (``mechfin_utils.tooling.testing``; its numbers time code, they say nothing about GPT-2).

**Causal tracing** (second table): per model, a few facts and fair-lending prompts are traced (hidden, MLP and
attention states at every layer and every position from the subject on, ``--trace-samples`` noise samples)
twice: by a **ROME-style tracer** -- one forward pass of the bridge per restored state, all noise samples in its
batch, noise and restoration written by hooks (as ROME's ``trace_with_patch``; here
:func:`mechfin_utils.methods.tracing.causal_trace.run_with_restorations` with ``backend="bridge"`` and one state per batch) --
and by **mechfin** on the intervention engine. Same numbers (max |difference| reported), both times, and the
tracing FLOP floor: a restoration at layer ``l`` (hidden: from ``l + 1``; a window: from its first layer) and
position ``p`` must recompute every later layer at positions ``p ...`` (the last layer's queries, attention
and MLP at the last position only).

**Edge-level scoring** (third table, :mod:`mechfin_utils.tooling.bench_edges`): EAP and EAP-IG over every edge of the
computational graph against exact patching of each edge (timed on a sample, scaled to all edges).

Results: tables on stdout, and ``bench/results/latest.md`` + ``latest.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.metrics import NormalisedLogitDiff
from mechfin_utils.core.paths import REPO_ROOT
from mechfin_utils.methods import patching
from mechfin_utils.tooling.bench_edges import EdgeBenchRow, bench_edge_scoring, format_edge_table

DEFAULT_COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos", "attn_head_out_by_pos")
MODELS = ("smollm2-135m", "gpt2-shape")

DEFAULT_OUT = REPO_ROOT / "bench" / "results"


# -----------------------------------------------------------------------------------------------------------
# Measuring
# -----------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager: the largest growth of resident memory (bytes) while the block ran, sampled in a thread.

    ``peak`` is None where the resident set cannot be read (no ``/proc``).
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self._start = _rss_bytes()
        self._max = self._start
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = _rss_bytes()
            if value is not None and value > self._max:
                self._max = value
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        final = _rss_bytes() or self._max
        self.peak = max(self._max, final) - self._start


def pin_malloc_to_mmap(threshold: int = 64 * 1024) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own ``mmap`` (and give it back
    on free), so that the resident set tracks the live tensors. Returns False where that is not possible."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, int | None]:
    """Run ``fn`` once: its result, wall seconds, peak extra resident bytes."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, seconds, memory.peak


def matmul_throughput(d_model: int, d_mlp: int, rows: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of this machine on ``[rows, d_model] @ [d_model, d_mlp]`` float32 (best of ``repeats``)."""
    x, w = torch.randn(rows, d_model), torch.randn(d_model, d_mlp)
    x @ w  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - start)
    return 2 * rows * d_model * d_mlp / best


# -----------------------------------------------------------------------------------------------------------
# The FLOP floor
# -----------------------------------------------------------------------------------------------------------


def _mlp_flops(fm: FunctionalTransformer) -> int:
    w = fm.layers[0]
    return 2 * (w.W_in.numel() + w.W_out.numel() + (0 if w.W_gate is None else w.W_gate.numel()))


def continuation_flops(fm: FunctionalTransformer, start_layer: int, first_pos: int, n_pos: int) -> int:
    """The FLOPs of one sequence recomputed from ``start_layer`` at positions ``first_pos ...``: every position in
    every layer but the last, whose queries, attention and MLP run at the final position only."""
    rows, total = n_pos - first_pos, 0
    cost = fm.flops_per_row((first_pos + 1 + n_pos) // 2)  # the mean number of keys a recomputed row attends to
    for layer in range(start_layer, fm.n_layers):
        if layer < fm.n_layers - 1:
            total += rows * (cost["kv"] + cost["rest"])
        else:
            total += rows * cost["kv"] + fm.flops_per_row(n_pos)["rest"]
    return total


def floor_flops(fm: FunctionalTransformer, key: str, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor) -> int:
    """The FLOPs no exact method can avoid for the sweep ``key`` (see the module docstring), summed over cells."""
    spec = patching.COMPONENTS[key]
    batch, n_pos = corrupted_tokens.shape
    n_kv = fm.n_kv_heads
    cells = patching.cells(spec, fm.n_layers, n_pos, fm.n_heads, n_kv)
    divergence = patching.divergence_positions(clean_tokens, corrupted_tokens)
    mlp = _mlp_flops(fm)
    total = 0
    for cell in cells:
        starts = patching.sequence_starts(spec, cell, divergence, n_pos)
        for start in starts.tolist():
            if start >= n_pos:
                continue
            rows = n_pos - start
            if spec.site == "resid_pre":
                first_full = cell.layer
            else:
                first_full = cell.layer + 1
                if spec.site != "mlp_out":  # the patched layer's MLP sees a changed input on the patched rows
                    patched_rows = rows if spec.scope == "all" or spec.site in ("k", "v") else 1
                    total += patched_rows * mlp
            total += continuation_flops(fm, first_full, start, n_pos)
    return total


# -----------------------------------------------------------------------------------------------------------
# One comparison
# -----------------------------------------------------------------------------------------------------------


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
    clean_tokens,
    corrupted_tokens,
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

    spec = patching.COMPONENTS[key]
    bridge = model.bridge
    cfg = bridge.cfg
    batch, n_pos = corrupted_tokens.shape
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    shape = patching.result_shape(spec, cfg.n_layers, n_pos, cfg.n_heads, n_kv)
    n_cells = 1
    for size in shape:
        n_cells *= size

    ours, ours_s, ours_peak = timed(
        lambda: patching.activation_patch(
            model, clean_tokens, corrupted_tokens, metric, key, batch_size=batch_size, progress=False
        )
    )

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
    if index_df is None:
        difference = (ours - theirs).abs().max().item()
        tl_run = n_cells
    else:
        picked = ours[tuple(torch.tensor(index_df[a].to_numpy()) for a in spec.axes)]
        difference = (picked - theirs).abs().max().item()
        tl_run = len(index_df)
    tl_total = tl_s * n_cells / tl_run
    fm = patching.functional_model(model)
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


# -----------------------------------------------------------------------------------------------------------
# Causal tracing: a ROME-style tracer against the engine
# -----------------------------------------------------------------------------------------------------------


@dataclass
class TraceBenchRow:
    model: str
    prompts: str
    n_prompts: int
    mean_tokens: float
    restored_states: int
    n_samples: int
    rome_seconds: float
    mechfin_seconds: float
    speedup: float
    max_abs_diff: float
    floor_gflop: float
    floor_seconds: float
    x_floor: float


def trace_floor_flops(
    fm: FunctionalTransformer, n_pos: int, restorations: Sequence[tuple[int, int]], n_samples: int
) -> int:
    """The FLOPs no exact tracer can avoid for ``restorations`` given as ``(first layer that must be recomputed,
    first position that differs)``, per noise sample (see the module docstring)."""
    return n_samples * sum(continuation_flops(fm, start, first, n_pos) for start, first in restorations)


def trace_inputs(model, n_facts: int, n_pairs: int) -> list:
    """The first ``n_facts`` candidate facts that tokenise for this model (subject found, one-token answer; not
    filtered for being right: the bench times code) and the first ``n_pairs`` fair-lending pairs."""
    from mechfin_utils.methods import tracing as ct
    from mechfin_utils.tasks import facts as trace_data
    from mechfin_utils.tasks.fair_lending import load_fair_lending_pairs

    prepared = []
    for task in trace_data.factual_tasks(trace_data.read_factual_candidates()):
        if len(prepared) >= n_facts:
            break
        try:
            prepared.append(ct.prepare_trace(model, task))
        except ValueError:
            continue
    pairs = load_fair_lending_pairs()
    pairs = pairs[:n_pairs] if isinstance(pairs, list) else pairs.head(n_pairs)
    return (
        prepared + [ct.prepare_trace(model, t) for t in trace_data.fair_lending_tasks(pairs)] if n_pairs else prepared
    )


def bench_causal_trace(
    model, prepared: Sequence, *, model_label: str, what: str, n_samples: int, throughput: float
) -> TraceBenchRow:
    """Trace every prompt with the ROME-style tracer and with mechfin; compare times and numbers."""
    from mechfin_utils.methods import tracing as ct

    fm = patching.functional_model(model)
    noise_std = ct.embedding_noise_std(model)
    window = ct.default_trace_window(fm.n_layers)

    def trace_all(backend: str, batch_size: int) -> list[dict]:
        return [
            ct.causal_trace(model, p, n_samples=n_samples, noise_std=noise_std, backend=backend, batch_size=batch_size)
            for p in prepared
        ]

    rome, rome_s, _ = timed(lambda: trace_all("bridge", n_samples))  # one forward per restored state
    ours, ours_s, _ = timed(lambda: trace_all("engine", 256))
    difference, states, floor = 0.0, 0, 0
    for p, theirs, mine in zip(prepared, rome, ours):
        traced = slice(p.subject_span[0], None)
        for kind in mine:
            difference = max(difference, float(abs(mine[kind].restored[traced] - theirs[kind].restored[traced]).max()))
        starts = []
        for kind in mine:
            for pos in range(p.subject_span[0], p.n_tokens):
                for layer in range(fm.n_layers):
                    first_layer = layer + 1 if kind == "hidden" else ct.layer_window(layer, window, fm.n_layers)[0]
                    starts.append((first_layer, pos))
        states += len(starts)
        floor += trace_floor_flops(fm, p.n_tokens, starts, n_samples)
    floor_s = floor / throughput
    return TraceBenchRow(
        model=model_label,
        prompts=what,
        n_prompts=len(prepared),
        mean_tokens=sum(p.n_tokens for p in prepared) / len(prepared),
        restored_states=states,
        n_samples=n_samples,
        rome_seconds=rome_s,
        mechfin_seconds=ours_s,
        speedup=rome_s / ours_s,
        max_abs_diff=difference,
        floor_gflop=floor / 1e9,
        floor_seconds=floor_s,
        x_floor=ours_s / floor_s if floor_s > 0 else float("nan"),
    )


def format_trace_table(rows: Sequence[TraceBenchRow]) -> str:
    header = (
        "| model | prompts | mean tokens | restored states x samples | ROME-style s | mechfin s | speed-up "
        "| max abs diff | FLOP floor s | x floor |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.prompts} | {r.mean_tokens:.1f} | {r.restored_states:,} x {r.n_samples} | {r.rome_seconds:,.1f} | "
            f"{r.mechfin_seconds:,.1f} | {r.speedup:,.1f}x | {r.max_abs_diff:.1e} | {r.floor_seconds:,.1f} | {r.x_floor:.1f} |"
        )
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# Models and inputs
# -----------------------------------------------------------------------------------------------------------


def gpt2_shape_folder(n_layers: int = 12) -> Path:
    """A random-weight GPT-2 Small-shape checkpoint (made once, in the mechfin cache)."""
    from mechfin_utils.core.models import cache_dir
    from mechfin_utils.tooling.testing import roughen_gpt2_checkpoint, write_gpt2_checkpoint

    folder = cache_dir() / f"bench-gpt2-shape-{n_layers}-layers"
    if not (folder / "model.safetensors").is_file():
        write_gpt2_checkpoint(folder, seed=0, n_layer=n_layers)
        roughen_gpt2_checkpoint(folder, seed=1)
    return folder


def load_bench_model(name: str, gpt2_layers: int = 12):
    """``(LoadedModel, label)`` for a bench model name."""
    from mechfin_utils.core.models import load_model

    if name == "smollm2-135m":
        model = load_model("smollm2-135m", verbose=False)
        return model, model.name
    if name == "gpt2-shape":
        model = load_model("gpt2", gpt2_path=gpt2_shape_folder(gpt2_layers), verbose=False)
        return model, f"GPT-2-shape ({gpt2_layers} layers), random weights"
    raise ValueError(f"unknown bench model {name!r}; choose from {MODELS}")


def task_inputs(model, batch: int):
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


# -----------------------------------------------------------------------------------------------------------
# Reporting
# -----------------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table of the results."""
    header = (
        "| model | component | prompts x tokens | cells | TransformerLens s | mechfin s | speed-up "
        "| max abs diff (normalised / logits) | peak MB (TL / mechfin) | FLOP floor s | x floor |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        tl = f"{r.tl_seconds:,.0f}" + (f" (est. from {r.tl_cells_run})" if r.tl_extrapolated else "")
        peak = f"{_fmt_mb(r.tl_peak_mb)} / {_fmt_mb(r.mechfin_peak_mb)}"
        lines.append(
            f"| {r.model} | {r.component} | {r.batch} x {r.n_pos} | {r.cells:,} | {tl} | {r.mechfin_seconds:,.1f} | "
            f"{r.speedup:,.1f}x | {r.max_abs_diff:.1e} / {r.max_abs_diff_logits:.1e} | {peak} | {r.floor_seconds:,.1f} | {r.x_floor:.1f} |"
        )
    return "\n".join(lines)


def _fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def machine_line(throughput: dict[str, float]) -> str:
    rates = ", ".join(f"{name} {rate / 1e9:,.0f} GFLOP/s" for name, rate in throughput.items())
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; float32 matmul throughput: {rates}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechfin_utils.tooling.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument(
        "--components",
        default=",".join(DEFAULT_COMPONENTS),
        help="comma-separated keys of mechfin_utils.methods.patching.activation.COMPONENTS that TransformerLens also has",
    )
    parser.add_argument("--batch", type=int, default=8, help="prompt pairs (default 8)")
    parser.add_argument(
        "--tl-cells", type=int, default=24, help="cells TransformerLens runs per sweep (time extrapolated)"
    )
    parser.add_argument("--full-tl", action="store_true", help="run TransformerLens on every cell (hours)")
    parser.add_argument("--gpt2-layers", type=int, default=12, help="layers of the GPT-2-shape model (default 12)")
    parser.add_argument("--trace-facts", type=int, default=4, help="facts traced per model (default 4)")
    parser.add_argument("--trace-pairs", type=int, default=1, help="fair-lending prompts traced per model (default 1)")
    parser.add_argument(
        "--trace-samples", type=int, default=5, help="noise samples per prompt (default 5, as notebook 06)"
    )
    parser.add_argument("--edge-steps", type=int, default=5, help="EAP-IG steps in the edge row (default 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for latest.md / latest.json")
    args = parser.parse_args(argv)

    models = [m for m in args.models.split(",") if m]
    components = [c for c in args.components.split(",") if c]
    for key in components:
        spec = patching.COMPONENTS.get(key)
        if spec is None or (key.endswith("_all_pos") and not spec.per_head):
            parser.error(f"--components: {key!r} has no TransformerLens counterpart to compare with")
    for name in models:
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {MODELS}")
    if args.batch < 1 or args.tl_cells < 1 or args.trace_samples < 1:
        parser.error("--batch, --tl-cells and --trace-samples must be positive")
    if args.trace_facts < 0 or args.trace_pairs < 0:
        parser.error("--trace-facts and --trace-pairs must be 0 or more")

    pinned = pin_malloc_to_mmap()
    rows: list[BenchRow] = []
    trace_rows: list[TraceBenchRow] = []
    edge_rows: list[EdgeBenchRow] = []
    throughput: dict[str, float] = {}
    for name in models:
        model, label = load_bench_model(name, args.gpt2_layers)
        clean, corrupted, metric = task_inputs(model, args.batch)
        fm = patching.functional_model(model)
        rate = matmul_throughput(fm.d_model, fm.layers[0].W_out.shape[0])
        throughput[label] = rate
        print(f"== {label}: {clean.shape[0]} prompt pairs x {clean.shape[1]} tokens, {metric!r}", flush=True)
        for key in components:
            row = bench_component(
                model,
                clean,
                corrupted,
                metric,
                key,
                model_label=label,
                tl_cells=None if args.full_tl else args.tl_cells,
                throughput=rate,
            )
            rows.append(row)
            print(
                f"   {key}: TransformerLens {row.tl_seconds:,.0f} s, mechfin {row.mechfin_seconds:,.1f} s "
                f"({row.speedup:,.1f}x), max |diff| {row.max_abs_diff:.1e}, {row.x_floor:.1f}x the FLOP floor",
                flush=True,
            )
        prepared = trace_inputs(model, args.trace_facts, args.trace_pairs)
        n_facts = sum(1 for p in prepared if p.task.contrast is None)
        for what, group in (
            (f"{n_facts} facts", prepared[:n_facts]),
            (f"{len(prepared) - n_facts} fair-lending", prepared[n_facts:]),
        ):
            if group:
                row = bench_causal_trace(
                    model, group, model_label=label, what=what, n_samples=args.trace_samples, throughput=rate
                )
                trace_rows.append(row)
                print(
                    f"   causal tracing, {what}: ROME-style {row.rome_seconds:,.1f} s, mechfin {row.mechfin_seconds:,.1f} s "
                    f"({row.speedup:,.1f}x), max |diff| {row.max_abs_diff:.1e}, {row.x_floor:.1f}x the FLOP floor",
                    flush=True,
                )
        edge_row = bench_edge_scoring(model, model_label=label, n_pairs=args.batch, steps=args.edge_steps)
        edge_rows.append(edge_row)
        print(
            f"   edge scoring: EAP {edge_row.eap_seconds:.1f} s, EAP-IG {edge_row.eap_ig_seconds:.1f} s for "
            f"{edge_row.n_edges:,} edges ({edge_row.speedup:,.0f}x patching every edge)",
            flush=True,
        )
        del model, fm

    table = (
        format_table(rows)
        + "\n\nCausal tracing (hidden, MLP and attention states; every layer, every position from the subject on):\n\n"
        + format_trace_table(trace_rows)
        + "\n\nEdge-level scoring (every edge of the graph; exact per-edge patching timed on 8 edges and scaled):\n\n"
        + format_edge_table(edge_rows)
    )
    machine = machine_line(throughput) + (
        "" if pinned else "; resident-set peaks unreliable (glibc mallopt unavailable)"
    )
    print()
    print(table)
    print(f"\n{machine}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    (args.out / "latest.md").write_text(
        f"# mechfin bench ({stamp})\n\n{table}\n\n{machine}.\n\nTransformerLens times marked 'est.' are measured on that "
        "many random cells and scaled to all cells (it runs one full forward pass per cell). Peak MB: growth of "
        "the process's resident memory during the sweep.\n"
    )
    (args.out / "latest.json").write_text(
        json.dumps(
            {
                "date": stamp,
                "machine": machine,
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": [asdict(r) for r in rows],
                "trace_rows": [asdict(r) for r in trace_rows],
                "edge_rows": [asdict(r) for r in edge_rows],
            },
            indent=2,
        )
    )
    print(f"\nwritten: {args.out / 'latest.md'}, {args.out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
