"""MEMIT with many facts at once: CounterFact-style scores for 1, 10 and 50 simultaneous edits (or other sizes).

Notebook 09 shows MEMIT for up to four edits, within `make figures`' time budget; this script measures the larger
batches the survey's question needs ("does writing many facts into the same layers make them interfere?"). It uses
notebook 09's own choices: the layer its causal trace over 12 facts picks, the two layers below it, the
self-generated covariance corpus (512 texts, cached) and its 5 context templates, and one target per fact reused by
every batch size. Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/memit_scaling.py --sizes 1 10 50

It prints the table and writes it to bench/results/memit_scaling.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from mechfin_utils.core import hook_points  # noqa: E402
from mechfin_utils.core.models import load_model  # noqa: E402
from mechfin_utils.methods import tracing as ct  # noqa: E402
from mechfin_utils.methods.editing import edits as editing  # noqa: E402
from mechfin_utils.methods.editing import evaluation as edit_eval  # noqa: E402
from mechfin_utils.methods.editing import key_statistics  # noqa: E402
from mechfin_utils.methods.editing.locate import choose_layer  # noqa: E402
from mechfin_utils.tasks import counterfact  # noqa: E402
from mechfin_utils.tasks import facts as trace_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument(
        "--steps", type=int, default=20, help="value-optimisation steps per fact (ROME and notebook 09: 20)"
    )
    parser.add_argument("--n-locate", type=int, default=12, help="known facts traced to choose the layer (notebook 09)")
    parser.add_argument("--n-corpus", type=int, default=512, help="self-generated covariance texts (notebook 09)")
    parser.add_argument("--n-templates", type=int, default=5, help="generated context templates (notebook 09)")
    parser.add_argument(
        "--prior-weight",
        type=float,
        default=editing.MEMIT_PRIOR_WEIGHT,
        help="MEMIT's prior weight lambda (default: MEMIT's code's GPT-J value, as notebook 09 uses)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.sizes):
        parser.error(f"--sizes must be positive, got {args.sizes}")
    t0 = time.perf_counter()
    model = load_model(args.model, verbose=False)
    known = counterfact.requests_known_to(model, counterfact.load_counterfact())
    if max(args.sizes) > len(known):
        parser.error(f"--sizes asks for {max(args.sizes)} facts; {model.name} knows {len(known)} of the requests")
    # 0. the facts, spread over the relations as in notebook 09 (round robin over categories, in file order)
    queues: dict[str, list] = {}
    for e in known:
        queues.setdefault(e.category, []).append(e)
    spread: list = []
    while any(queues.values()):
        spread += [q.pop(0) for q in queues.values() if q]
    # 1. the layer, as notebook 09 picks it: 12 known facts spread over the categories, MLP states traced, the peak
    #    of the mean indirect effect at the subject's last token (editing.choose_layer)
    facts, _ = trace_data.load_factual_prompts(model, verbose=False)
    per_category = -(-args.n_locate // facts["category"].nunique())
    traced = facts.groupby("category").head(per_category).head(args.n_locate)
    trace = ct.trace_dataset(model, trace_data.factual_tasks(traced), kinds=("mlp",), n_samples=3, knockout=False)
    effects = np.stack([r.indirect_effect[r.subject_span[1] - 1] for r in trace.traces["mlp"]])
    layer = choose_layer(effects, seed=args.seed).layer
    layers = list(range(max(0, layer - 2), layer + 1))
    # 2. covariances from the cached self-generated corpus and the context templates, both as in notebook 09; one
    #    target per fact
    corpus = key_statistics.self_generated_corpus(model, args.n_corpus, 64, seed=args.seed)
    covariances = {l: key_statistics.key_covariance(model, l, corpus) for l in layers}
    prefixes = editing.context_prefixes(model, args.n_templates, seed=args.seed)
    chosen = spread[: max(args.sizes)]
    params = editing.ValueParams(steps=args.steps)
    targets = editing.memit_targets(model, [e.request for e in chosen], layers, prefixes, params)
    # 3. each batch size: edit, score every edited fact, restore
    rows = []
    for size in sorted(set(args.sizes)):
        batch = chosen[:size]
        with hook_points.restoring(model, layers):
            editing.memit(
                model,
                [e.request for e in batch],
                layers,
                covariances,
                prefixes,
                targets=targets[:size],
                prior_weight=args.prior_weight,
            )
            for e in batch:
                # specificity needs neighbours that were not edited themselves and whose answer is not the new object:
                # such facts of the same relation, else (when the batch edits all of them) of another relation
                free = [f for f in known if f not in batch and f.request.target_true != e.request.target_new]
                pool = [f for f in free if f.category == e.category] or free
                neighbours = tuple((f.request.prompt, f.request.target_true) for f in pool[:5])
                scored = dataclasses.replace(e, neighbours=neighbours)
                rows.append({"n_edits": size, **edit_eval.evaluate_edit(model, scored, n_generated=10)})
    results = pd.DataFrame(rows)
    summary = edit_eval.summarise(results, by="n_edits", n_boot=1000, seed=args.seed)
    print(f"{model.name}, MEMIT on layers {layers[0]}-{layers[-1]}, {time.perf_counter() - t0:.0f} s")
    print(summary[[c for c in summary.columns if not c.startswith("fluency")]].round(3).to_string())
    out = REPO_ROOT / "bench" / "results" / "memit_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.name,
        "layers": layers,
        "sizes": sorted(set(args.sizes)),
        "value_steps": args.steps,
        "n_corpus": args.n_corpus,
        "n_templates": args.n_templates,
        "n_locate": args.n_locate,
        "prior_weight": args.prior_weight,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "summary": summary.reset_index().to_dict(orient="records"),
    }
    out.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(f"written: {out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
