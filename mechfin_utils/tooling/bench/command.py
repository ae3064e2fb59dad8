"""``python -m mechfin_utils.tooling.bench`` (``make bench``): the command line, in five stages.

1. the arguments, checked (which models, which patching components, how many prompts, cells, facts and samples);
2. glibc pinned to ``mmap`` for large blocks, so that peak memory can be measured
   (:func:`~mechfin_utils.tooling.bench.machine.pin_malloc_to_mmap`);
3. for every model (:func:`bench_model`): its inputs and its matrix-multiply throughput, then one row per patching
   component (:mod:`~mechfin_utils.tooling.bench.patching_vs_transformer_lens`), one per group of traced prompts
   (:mod:`~mechfin_utils.tooling.bench.tracing_vs_rome`) and one for edge scoring
   (:mod:`~mechfin_utils.tooling.bench.edge_scoring`), one for node pruning
   (:mod:`~mechfin_utils.tooling.bench.node_pruning`), each printed as it finishes;
4. the three tables and the machine line, printed;
5. both written to ``bench/results/latest.md`` and ``latest.json`` (:func:`write_results`).

Models: the embedded SmolLM2-135M-Instruct and a GPT-2 Small-*shape* model with random weights loaded through the real
GPT-2 path (:func:`load_bench_model`; its numbers time code, they say nothing about GPT-2).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mechfin_utils.core.functional import functional_model
from mechfin_utils.core.paths import REPO_ROOT, cache_dir
from mechfin_utils.methods import patching
from mechfin_utils.tooling.bench.behaviour_scoring import (
    BehaviourBenchRow,
    bench_behaviour_scoring,
    format_behaviour_table,
)
from mechfin_utils.tooling.bench.edge_scoring import EdgeBenchRow, bench_edge_scoring, format_edge_table
from mechfin_utils.tooling.bench.machine import machine_line, matmul_throughput, pin_malloc_to_mmap
from mechfin_utils.tooling.bench.node_pruning import NodeBenchRow, bench_node_pruning, format_node_table
from mechfin_utils.tooling.bench.patching_vs_transformer_lens import (
    BenchRow,
    bench_component,
    format_table,
    task_inputs,
)
from mechfin_utils.tooling.bench.tracing_vs_rome import (
    TraceBenchRow,
    bench_causal_trace,
    format_trace_table,
    trace_inputs,
)

DESCRIPTION = (
    "``make bench``: mechfin's exact patching against TransformerLens's, and its causal tracing against a\n"
    "ROME-style tracer, on the same model, prompts and metric."
)
DEFAULT_COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos", "attn_head_out_by_pos")
MODELS = ("smollm2-135m", "gpt2-shape")

DEFAULT_OUT = REPO_ROOT / "bench" / "results"


@dataclass
class BenchResults:
    """Every row of a bench run, and each model's measured matrix-multiply throughput (FLOP/s) by label."""

    rows: list[BenchRow] = field(default_factory=list)
    trace_rows: list[TraceBenchRow] = field(default_factory=list)
    edge_rows: list[EdgeBenchRow] = field(default_factory=list)
    behaviour_rows: list[BehaviourBenchRow] = field(default_factory=list)
    node_rows: list[NodeBenchRow] = field(default_factory=list)
    throughput: dict[str, float] = field(default_factory=dict)


# -----------------------------------------------------------------------------------------------------------
# Models
# -----------------------------------------------------------------------------------------------------------


def gpt2_shape_folder(n_layers: int = 12) -> Path:
    """A random-weight GPT-2 Small-shape checkpoint (made once, in the mechfin cache)."""
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


# -----------------------------------------------------------------------------------------------------------
# The stages
# -----------------------------------------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str], list[str]]:
    """The parsed arguments, the models and the components; a usage error (exit status 2) for any that is wrong."""
    parser = argparse.ArgumentParser(prog="python -m mechfin_utils.tooling.bench", description=DESCRIPTION)
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
    parser.add_argument(
        "--node-prompts", type=int, default=8, help="greater-than prompts of the node-pruning row (default 8; 0: none)"
    )
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
    if args.trace_facts < 0 or args.trace_pairs < 0 or args.node_prompts < 0:
        parser.error("--trace-facts, --trace-pairs and --node-prompts must be 0 or more")
    return args, models, components


def bench_model(name: str, args: argparse.Namespace, components: Sequence[str], results: BenchResults) -> None:
    """Every row for one model, appended to ``results`` and printed as each finishes."""
    # 1. The model, its patching inputs and this machine's throughput at its sizes.
    model, label = load_bench_model(name, args.gpt2_layers)
    clean, corrupted, metric = task_inputs(model, args.batch)
    fm = functional_model(model)
    rate = matmul_throughput(fm.d_model, fm.layers[0].W_out.shape[0])
    results.throughput[label] = rate
    print(f"== {label}: {clean.shape[0]} prompt pairs x {clean.shape[1]} tokens, {metric!r}", flush=True)
    # 2. Patching against TransformerLens, one row per component.
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
        results.rows.append(row)
        print(
            f"   {key}: TransformerLens {row.tl_seconds:,.0f} s, mechfin {row.mechfin_seconds:,.1f} s "
            f"({row.speedup:,.1f}x), max |diff| {row.max_abs_diff:.1e}, {row.x_floor:.1f}x the FLOP floor",
            flush=True,
        )
    # 3. Causal tracing against a ROME-style tracer: one row for the facts, one for the fair-lending prompts.
    prepared = trace_inputs(model, args.trace_facts, args.trace_pairs)
    n_facts = sum(1 for p in prepared if p.task.contrast is None)
    for what, group in (
        (f"{n_facts} facts", prepared[:n_facts]),
        (f"{len(prepared) - n_facts} fair-lending", prepared[n_facts:]),
    ):
        if group:
            trace_row = bench_causal_trace(
                model, group, model_label=label, what=what, n_samples=args.trace_samples, throughput=rate
            )
            results.trace_rows.append(trace_row)
            print(
                f"   causal tracing, {what}: ROME-style {trace_row.rome_seconds:,.1f} s, "
                f"mechfin {trace_row.mechfin_seconds:,.1f} s ({trace_row.speedup:,.1f}x), "
                f"max |diff| {trace_row.max_abs_diff:.1e}, {trace_row.x_floor:.1f}x the FLOP floor",
                flush=True,
            )
    # 4. Edge scoring against exact per-edge patching.
    edge_row = bench_edge_scoring(model, model_label=label, n_pairs=args.batch, steps=args.edge_steps)
    results.edge_rows.append(edge_row)
    print(
        f"   edge scoring: EAP {edge_row.eap_seconds:.1f} s, EAP-IG {edge_row.eap_ig_seconds:.1f} s for "
        f"{edge_row.n_edges:,} edges ({edge_row.speedup:,.0f}x patching every edge)",
        flush=True,
    )

    # 5. Node pruning: the engine against the bridge, one walk each.
    if args.node_prompts:
        node_row = bench_node_pruning(model, model_label=label, n_prompts=args.node_prompts)
        results.node_rows.append(node_row)
        print(
            f"   node pruning: bridge {node_row.bridge_seconds:.1f} s, engine {node_row.engine_seconds:.1f} s "
            f"({node_row.speedup:.1f}x), same circuit {node_row.same_circuit}, max |diff| {node_row.max_abs_diff:.1e}",
            flush=True,
        )

    # 6. Scoring prompts of any length (a screener's held-out split): padded batches against exact-length groups.
    for behaviour_row in bench_behaviour_scoring(model, model_label=label):
        results.behaviour_rows.append(behaviour_row)
        print(
            f"   behaviour scoring ({behaviour_row.scoring}): earlier {behaviour_row.earlier_seconds:.1f} s, mechfin "
            f"{behaviour_row.padded_seconds:.1f} s ({behaviour_row.speedup:.1f}x), max |diff| "
            f"{behaviour_row.max_abs_diff:.1e}",
            flush=True,
        )


def tables(results: BenchResults) -> str:
    """The three Markdown tables, each under a line saying what it holds."""
    return (
        format_table(results.rows)
        + "\n\nCausal tracing (hidden, MLP and attention states; every layer, every position from the subject on):\n\n"
        + format_trace_table(results.trace_rows)
        + "\n\nEdge-level scoring (every edge of the graph; exact per-edge patching timed on 8 edges and scaled):\n\n"
        + format_edge_table(results.edge_rows)
        + "\n\nScoring prompts of any length (a held-out split, both sides of every pair): padded batches against "
        "exact-length groups through the bridge; plain, and with components held at the answer position (the "
        "engine against bridge hooks):\n\n"
        + format_behaviour_table(results.behaviour_rows)
        + "\n\nNode pruning (one ACDC-style walk over every head and MLP, greater-than): the engine against the "
        "bridge with hooks:\n\n" + format_node_table(results.node_rows)
    )


def write_results(out: Path, table: str, machine: str, args: argparse.Namespace, results: BenchResults) -> None:
    """``latest.md`` (the tables, dated, with the machine and how to read them) and ``latest.json`` (every row)."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    (out / "latest.md").write_text(
        f"# mechfin bench ({stamp})\n\n{table}\n\n{machine}.\n\nTransformerLens times marked 'est.' are measured on that "
        "many random cells and scaled to all cells (it runs one full forward pass per cell). Peak MB: growth of "
        "the process's resident memory during the sweep.\n"
    )
    (out / "latest.json").write_text(
        json.dumps(
            {
                "date": stamp,
                "machine": machine,
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": [asdict(r) for r in results.rows],
                "trace_rows": [asdict(r) for r in results.trace_rows],
                "edge_rows": [asdict(r) for r in results.edge_rows],
                "behaviour_rows": [asdict(r) for r in results.behaviour_rows],
                "node_rows": [asdict(r) for r in results.node_rows],
            },
            indent=2,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    # 1. The arguments, checked.
    args, models, components = parse_arguments(argv)
    # 2. Freed memory goes back to the system, so that the resident set follows what is live.
    pinned = pin_malloc_to_mmap()
    # 3. Every model's rows.
    results = BenchResults()
    for name in models:
        bench_model(name, args, components, results)
    # 4. The tables and the machine.
    table = tables(results)
    machine = machine_line(results.throughput) + (
        "" if pinned else "; resident-set peaks unreliable (glibc mallopt unavailable)"
    )
    print()
    print(table)
    print(f"\n{machine}")
    # 5. Written.
    write_results(args.out, table, machine, args, results)
    print(f"\nwritten: {args.out / 'latest.md'}, {args.out / 'latest.json'}")
    return 0
