"""How many prompts make an edge circuit stable? Notebook 10's stability curve, taken to larger samples.

Notebook 10 scores 32 prompts for IOI and the screener's fair lending (128 for greater-than) within `make figures`'
time budget, so its stability curves stop at two disjoint samples of 16 (64), where no circuit reaches a Jaccard
overlap of 0.8. This script scores more prompts of a task
with EAP-IG (per prompt, as notebook 10 does) and continues the curve: the circuit is notebook 10's headline size for
that task (read from its committed results), chosen by top-n from each of two disjoint samples of n prompts, for n
doubling up to half the pool. No forward pass beyond the scoring. Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/circuit_stability_n.py --task greater-than --n-prompts 256

``--task "fair lending"`` scores the default screener (``--model``'s screener) on the paper-style pairs, as notebook 10
does (pairs of every token length; the headline size is read from the screener's results).

It prints the curve and writes it to bench/results/circuit_stability_n.json (one entry per task, kept across runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from mechfin_utils.core.models import load_model  # noqa: E402
from mechfin_utils.methods.circuits.edges import edge_scores_in_chunks  # noqa: E402
from mechfin_utils.methods.circuits.stability import stability_curve  # noqa: E402
from mechfin_utils.methods.circuits.task_report import doubling_sizes  # noqa: E402
from mechfin_utils.tasks import circuit_tasks, ioi  # noqa: E402

TASKS = ("greater-than", "IOI", "fair lending")
RESULTS = REPO_ROOT / "figures" / "{model}" / "10_results.json"
OUT = REPO_ROOT / "bench" / "results" / "circuit_stability_n.json"


def headline_edges(model_slug: str, task: str) -> int:
    """Notebook 10's headline circuit size for ``task``: the fewest EAP-IG edges reaching faithfulness 0.8."""
    path = Path(str(RESULTS).format(model=model_slug))
    if not path.is_file():
        raise SystemExit(f"{path.relative_to(REPO_ROOT)} is missing: run `make figures` first (notebook 10)")
    rows = json.loads(path.read_text())["results"]["circuit_summary"]
    sizes = {row["task"].replace("fair-lending", "fair lending"): int(row["circuit_edges"]) for row in rows}
    if task not in sizes:
        raise SystemExit(f"{path.relative_to(REPO_ROOT)} has no circuit for {task!r}; it has {sorted(sizes)}")
    return sizes[task]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", choices=TASKS, default="greater-than")
    parser.add_argument("--n-prompts", type=int, default=256, help="prompts scored (IOI: at most the rows that fit)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps (notebook 10: 5)")
    parser.add_argument("--draws", type=int, default=20, help="disjoint-sample draws per n (notebook 10: 20)")
    parser.add_argument(
        "--chunk",
        type=int,
        default=64,
        help="prompts scored at once (memory: the task's batches are at most this size)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_prompts < 4:
        parser.error(f"--n-prompts must be at least 4 (two disjoint samples of 2), got {args.n_prompts}")
    started = time.perf_counter()
    model = load_model(args.model + ("-screener" if args.task == "fair lending" else ""), verbose=False)
    n_edges = headline_edges(args.model, args.task)  # the closing table is in the base model's results
    # 1. the task's prompts and their EAP-IG scores, per prompt
    if args.task == "greater-than":
        task = circuit_tasks.greater_than_task(model, n_prompts=args.n_prompts, seed=args.seed, max_batch=args.chunk)
    elif args.task == "IOI":
        task = ioi.ioi_task(model, n_prompts=args.n_prompts, seed=args.seed, max_batch=args.chunk).task
    else:
        task = circuit_tasks.fair_lending_task(model, n_pairs=args.n_prompts, seed=args.seed, max_batch=args.chunk)
    #    (in chunks of whole batches, at most --chunk prompts each: a patcher keeps every sender's output of its
    #    prompts, about 25 MB a greater-than prompt, so all of them at once would not fit in memory)
    scores = edge_scores_in_chunks(model, task, ("EAP-IG",), steps=args.steps, max_prompts=args.chunk)["EAP-IG"]
    # 2. the curve: two disjoint samples of n, for n doubling up to half the pool
    curve = stability_curve(scores, n_edges, doubling_sizes(task.n_prompts), n_draws=args.draws, seed=args.seed)
    seconds = time.perf_counter() - started
    print(f"{model.name}, {task}: {n_edges} edges, EAP-IG {scores.seconds:.0f} s, {seconds:.0f} s in all")
    print(curve.table.round(3).to_string(index=False))
    print(curve.summary())
    # 3. kept per task, so that runs for several tasks share one file
    everything = json.loads(OUT.read_text()) if OUT.is_file() else {}
    everything[args.task] = {
        "model": model.name,
        "n_prompts": task.n_prompts,
        "n_edges": n_edges,
        "eap_ig_steps": args.steps,
        "n_draws": args.draws,
        "seed": args.seed,
        "seconds": round(seconds, 1),
        "eap_ig_seconds": round(scores.seconds, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "summary": curve.summary(),
        "curve": curve.table.to_dict(orient="records"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(everything, indent=1, default=float) + "\n")
    print(f"written: {OUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
