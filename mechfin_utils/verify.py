"""``make verify``: rerun the notebooks and compare every number in their results with the committed ones.

The committed ``figures/<model>/<notebook>_results.json`` hold the numbers behind every figure. ``make verify`` runs
the same notebooks again (as ``make figures`` does, but into a scratch folder, so nothing committed is touched) and
walks both results files side by side: every number must agree within ``1e-4`` (absolute, or relative for numbers
larger than 1), every string, flag and list length exactly. Timings (any key with ``seconds`` in it) are not results
and are skipped. Each number that moved is named by its file and its path inside the file, with both values.

    python -m mechfin_utils.verify --model auto NOTEBOOK... @smollm2-135m-screener NOTEBOOK...
    python -m mechfin_utils.verify --fresh DIR    # compare a run already written to DIR instead of rerunning

Exit status 0 when everything agrees, 1 when something moved, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechfin_utils.figures import FIGURES_DIR_ENV, figures_root

TOLERANCE = 1e-4


@dataclass
class Moved:
    file: str
    path: str
    committed: Any
    fresh: Any

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: committed {self.committed!r}, now {self.fresh!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_values(
    committed: Any, fresh: Any, path: str = "", tolerance: float = TOLERANCE
) -> list[tuple[str, Any, Any]]:
    """Every place where ``fresh`` differs from ``committed`` (numbers within ``tolerance`` agree)."""
    if _is_number(committed) and _is_number(fresh):
        if math.isnan(committed) and math.isnan(fresh):
            return []
        return [] if abs(committed - fresh) <= tolerance * max(1.0, abs(committed)) else [(path, committed, fresh)]
    if isinstance(committed, dict) and isinstance(fresh, dict):
        out = []
        for key in sorted(set(committed) | set(fresh)):
            where = f"{path}/{key}"
            if "seconds" in str(key):
                continue
            if key not in fresh:
                out.append((where, committed[key], "(missing)"))
            elif key not in committed:
                out.append((where, "(missing)", fresh[key]))
            else:
                out += compare_values(committed[key], fresh[key], where, tolerance)
        return out
    if isinstance(committed, list) and isinstance(fresh, list):
        if len(committed) != len(fresh):
            return [(f"{path} (length)", len(committed), len(fresh))]
        out = []
        for i, (a, b) in enumerate(zip(committed, fresh)):
            out += compare_values(a, b, f"{path}[{i}]", tolerance)
        return out
    return [] if committed == fresh else [(path or "/", committed, fresh)]


def compare_runs(committed_root: Path, fresh_root: Path, tolerance: float = TOLERANCE) -> tuple[list[Moved], int]:
    """Compare every results file of ``fresh_root`` with the committed one; returns what moved and how many files
    were compared. A results file the fresh run wrote but nobody committed, or the reverse for a notebook that ran,
    is itself a difference."""
    moved, compared = [], 0
    for fresh in sorted(fresh_root.glob("*/*_results.json")):
        relative = fresh.relative_to(fresh_root)
        committed = committed_root / relative
        if not committed.is_file():
            moved.append(Moved(str(relative), "/", "(no committed file)", "(written by this run)"))
            continue
        compared += 1
        old, new = json.loads(committed.read_text()), json.loads(fresh.read_text())
        for path, a, b in compare_values(old.get("results", old), new.get("results", new), "", tolerance):
            moved.append(Moved(str(relative), path, a, b))
    return moved, compared


def main(argv: list[str] | None = None) -> int:
    from mechfin_utils import run_figures

    parser = argparse.ArgumentParser(prog="python -m mechfin_utils.verify", description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="*", metavar="NOTEBOOK or @MODEL")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--gpt2-path", default="")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fresh", type=Path, default=None, help="compare this finished run instead of rerunning")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args(argv)
    committed = figures_root()
    if args.fresh is None:
        plan = run_figures.parse_plan(args.items, args.model)
        if not plan:
            parser.error("give the notebooks to rerun (or --fresh DIR)")
        fresh = Path(tempfile.mkdtemp(prefix="mechfin-verify-"))
        expected = {  # the committed run's times, so that the rerun also starts with the longest notebooks
            path.parent.name: json.loads(path.read_text()).get("seconds_per_notebook", {})
            for path in committed.glob("*/manifest.json")
        }
        previous = os.environ.get(FIGURES_DIR_ENV)
        os.environ[FIGURES_DIR_ENV] = str(fresh)  # the rerun writes here; its kernels inherit it
        try:
            run_figures.run_many(plan, args.gpt2_path, workers=args.workers, expected_seconds=expected)
        finally:
            if previous is None:
                os.environ.pop(FIGURES_DIR_ENV, None)
            else:
                os.environ[FIGURES_DIR_ENV] = previous
    else:
        fresh = args.fresh
        if not fresh.is_dir():
            parser.error(f"--fresh {fresh}: not a folder")
    moved, compared = compare_runs(committed, fresh, args.tolerance)
    print(f"compared {compared} results files of {fresh} with {committed} (tolerance {args.tolerance:g})")
    for item in moved:
        print(f"  MOVED {item}")
    print("everything agrees" if not moved else f"{len(moved)} value(s) moved")
    return 0 if not moved else 1


if __name__ == "__main__":
    sys.exit(main())
