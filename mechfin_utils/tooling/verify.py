"""``make verify``: rerun the notebooks and compare every number in their results with the committed ones.

The committed ``figures/<model>/<notebook>_results.json`` hold the numbers behind every figure. ``make verify`` runs
the same notebooks again (as ``make figures`` does, but into a scratch folder, so nothing committed is touched) and
walks both results files side by side (:func:`compare_values`):

* every number must agree within ``1e-4`` (absolute, or relative for numbers larger than 1); flags and list lengths
  exactly; timings (any key with ``seconds`` in it) are not results and are skipped;
* a string without whitespace is a label or an identifier (head ``"26.5"``, node ``"L10H7"``, setting
  ``"tau=0.02"``, pair ``"fl-0003"``) and must be equal exactly: ``"26.5"`` and ``"26.6"`` are two heads, not two
  roundings of one number;
* a string with whitespace is text (``"mean gap 9.21 (95% CI [8.81, 9.57], n=264 pairs)"``): it is split into its
  numbers (those standing alone, not inside a word such as ``L10H7`` or ``fl-0003``) and the text between them. The
  text must be equal exactly, and so must the count of numbers; an integer (``95``, ``264``: a count) agrees within
  the tolerance, a decimal (``8.81``) within the tolerance *or* within one unit of its last printed digit, the
  coarser of the two versions' (``8.81`` and ``8.82`` are two roundings of nearly the same value, ``8.81`` and
  ``8.84`` are not). A sentence that moved is reported with both versions.

Each value that moved is named by its file and its path inside the file, with both values; each file's largest
change on the tolerance's scale (``|now - committed| / max(|committed|, 1)``: relative above 1, absolute below) is
reported with its path whether or not anything moved.

**Weights that differ.** Each run's ``figures/<model>/manifest.json`` records the sha256 of the model's weights.
When the fresh run's differs from the committed run's (a screener trained on another CPU or with another thread
count: training rounds differently and the weights follow), that is reported first, and every results file that
depends on that model is compared with :data:`RETRAINED_TOLERANCE` (relative) instead: a file depends on its own
folder's model and on every model its ``"models_loaded"`` names (in either run's file; written by
``figures.save_results``). A file written before ``"models_loaded"`` existed depends on its folder's model only:
notebook 08's or 10's base-model numbers computed with the screener are then compared strictly until the committed
results are regenerated.

    python -m mechfin_utils.tooling.verify --model auto NOTEBOOK... @smollm2-135m-screener NOTEBOOK...
    python -m mechfin_utils.tooling.verify --fresh DIR    # compare a run already written to DIR instead of rerunning

Exit status 0 when everything agrees, 1 when something moved, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechfin_utils.reporting.figures import FIGURES_DIR_ENV, figures_root

TOLERANCE = 1e-4
RETRAINED_TOLERANCE = 0.05
"""Tolerance (relative above 1, absolute below) for the results of a notebook that loaded a model whose weights differ
from the committed run's: four times the largest change measured when the default screener was retrained with other
CPU kernels. One and two torch threads train bit-identical weights on one machine, so the spread was produced by
retraining with ATen's non-vectorised kernels (``ATEN_CPU_CAPABILITY=default``, another float rounding of every
reduction, as another CPU's kernels give): other weights (sha256 ``e80b4000`` against ``689314af``), and across the
eight results files that depend on the screener (notebooks 00-04, 06, 07 and 08; 28,361 numbers) a largest change of
0.0115 (notebook 04's sign agreement of attribution and patching, 0.9529 -> 0.9414: 10 of 870 cells whose sign flips)
and 1,686 numbers beyond 1e-4. The Intel run of issue 19 moved its largest quoted number by 0.0044. README,
"Reproducibility", gives the measurement."""
_NUMBER_IN_TEXT_RE = re.compile(r"(?<![\w.\-\u2212])[-\u2212]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\w|\.\d)")


@dataclass
class Moved:
    file: str
    path: str
    committed: Any
    fresh: Any

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: committed {self.committed!r}, now {self.fresh!r}"


@dataclass
class WeightsChange:
    """A model whose weights in the fresh run are not the committed run's."""

    slug: str
    committed: str
    fresh: str

    def __str__(self) -> str:
        from mechfin_utils.core.models import FINE_TUNED

        why = (
            "a fine-tuned model trained on another CPU or thread count"
            if self.slug in FINE_TUNED
            else "another checkpoint or conversion of the weights"
        )
        return (
            f"{self.slug}: weights differ from the committed run's (sha256 {self.fresh[:8]}\u2026 now, "
            f"{self.committed[:8]}\u2026 committed): {why}; its dependents are compared with tolerance "
            f"{RETRAINED_TOLERANCE:g} (relative above 1, absolute below)"
        )


@dataclass
class FileReport:
    """One results file compared: the models it depends on, the tolerance used, its largest change."""

    file: str
    models: list[str]
    tolerance: float
    retrained: list[str] = field(default_factory=list)
    largest: tuple[float, str, Any, Any] | None = None  # (change on the tolerance's scale, path, committed, now)
    moved: list[Moved] = field(default_factory=list)

    def __str__(self) -> str:
        header = self.file
        if self.retrained:
            header += f" [tolerance {self.tolerance:g}: depends on {', '.join(self.retrained)}]"
        if self.largest is None:
            return f"{header}: no numbers"
        change, path, committed, fresh = self.largest
        return f"{header}: largest change {change:.2g} at {path or '/'} ({committed!r} -> {fresh!r})"


@dataclass
class Report:
    """What :func:`verify_runs` found: models with other weights, each file compared, everything that moved."""

    weights: list[WeightsChange]
    files: list[FileReport]
    moved: list[Moved]

    @property
    def compared(self) -> int:
        return len(self.files)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _within(committed: float, fresh: float, tolerance: float) -> bool:
    if math.isnan(committed) or math.isnan(fresh):
        return math.isnan(committed) and math.isnan(fresh)
    return abs(committed - fresh) <= tolerance * max(1.0, abs(committed))


def _last_digit_unit(token: str) -> float:
    """One unit of the last printed digit of a number as written: ``"8.81"`` -> 0.01, ``"1.5e-3"`` -> 1e-4."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def split_numbers(text: str) -> tuple[list[str], list[str]]:
    """``text`` as (the text around its numbers, the numbers as written): ``"gap 9.21 (n=264)"`` ->
    ``(["gap ", " (n=", ")"], ["9.21", "264"])``. A number inside a word (``L10H7``, ``fl-0003``) is text."""
    return _NUMBER_IN_TEXT_RE.split(text), _NUMBER_IN_TEXT_RE.findall(text)


def compare_text(
    committed: str, fresh: str, tolerance: float = TOLERANCE, numbers: list | None = None, path: str = ""
) -> bool:
    """Whether two versions of a sentence agree (see the module docstring); each pair of numbers compared is appended
    to ``numbers`` as ``(path, committed, now)``."""
    if committed == fresh:
        return True
    if not (re.search(r"\s", committed) and re.search(r"\s", fresh)):
        return False  # a label or an identifier: exactly, or not at all
    (text_a, tokens_a), (text_b, tokens_b) = split_numbers(committed), split_numbers(fresh)
    if text_a != text_b or len(tokens_a) != len(tokens_b):
        return False
    agree = True
    for token_a, token_b in zip(tokens_a, tokens_b):
        a, b = float(token_a.replace("\u2212", "-")), float(token_b.replace("\u2212", "-"))
        if numbers is not None:
            numbers.append((path, a, b))
        integers = not any(c in token for token in (token_a, token_b) for c in ".eE")
        unit = max(_last_digit_unit(token_a), _last_digit_unit(token_b))
        if not (_within(a, b, tolerance) or (not integers and abs(a - b) <= unit * (1 + 1e-9))):
            agree = False
    return agree


def compare_values(
    committed: Any, fresh: Any, path: str = "", tolerance: float = TOLERANCE, numbers: list | None = None
) -> list[tuple[str, Any, Any]]:
    """Every place where ``fresh`` differs from ``committed`` (numbers within ``tolerance`` agree; strings by the
    rules of the module docstring). Each pair of numbers compared, in text too, is appended to ``numbers`` (when
    given) as ``(path, committed, now)``."""
    if _is_number(committed) and _is_number(fresh):
        if numbers is not None:
            numbers.append((path, committed, fresh))
        return [] if _within(committed, fresh, tolerance) else [(path, committed, fresh)]
    if isinstance(committed, str) and isinstance(fresh, str):
        return [] if compare_text(committed, fresh, tolerance, numbers, path) else [(path or "/", committed, fresh)]
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
                out += compare_values(committed[key], fresh[key], where, tolerance, numbers)
        return out
    if isinstance(committed, list) and isinstance(fresh, list):
        if len(committed) != len(fresh):
            return [(f"{path} (length)", len(committed), len(fresh))]
        out = []
        for i, (a, b) in enumerate(zip(committed, fresh)):
            out += compare_values(a, b, f"{path}[{i}]", tolerance, numbers)
        return out
    return [] if committed == fresh else [(path or "/", committed, fresh)]


def largest_change(numbers: list[tuple[str, Any, Any]]) -> tuple[float, str, Any, Any] | None:
    """The largest change on the tolerance's own scale, ``|now - committed| / max(|committed|, 1)`` (relative above 1,
    absolute below: a value of 1e-8 that becomes 5e-8 is float noise, not a 400% change), among ``numbers`` (pairs of
    numbers, as :func:`compare_values` collects them), with its path and both values; None when there are none. A file
    passes exactly when this is within its tolerance (and its labels and list lengths are equal)."""
    best = None
    for path, a, b in numbers:
        if math.isnan(a) or math.isnan(b):
            continue
        change = abs(b - a) / max(abs(a), 1.0)
        if best is None or change > best[0]:
            best = (change, path, a, b)
    return best


def _folders(root: Path, pattern: str) -> list[Path]:
    """``root.glob(pattern)`` without what lies in hidden folders (``.staging``: a run still being written)."""
    return sorted(p for p in root.glob(pattern) if not p.relative_to(root).parts[0].startswith("."))


def weights_changes(committed_root: Path, fresh_root: Path) -> list[WeightsChange]:
    """The models whose ``weights_sha256`` in the fresh run's manifest differs from the committed run's (both must be
    recorded: a model whose weights were not hashed, GPT-2 from the Hugging Face cache, is not reported)."""
    out = []
    for fresh in _folders(fresh_root, "*/manifest.json"):
        committed = committed_root / fresh.relative_to(fresh_root)
        if not committed.is_file():
            continue
        old = json.loads(committed.read_text()).get("weights_sha256")
        new = json.loads(fresh.read_text()).get("weights_sha256")
        if old and new and old != new:
            out.append(WeightsChange(fresh.parent.name, old, new))
    return out


def verify_runs(committed_root: Path, fresh_root: Path, tolerance: float = TOLERANCE) -> Report:
    """Compare every results file of ``fresh_root`` with the committed one (see the module docstring). A results file
    the fresh run wrote but nobody committed is itself a difference."""
    # 1. Which models' weights changed; the files that depend on one get the looser tolerance.
    weights = weights_changes(committed_root, fresh_root)
    retrained = {change.slug for change in weights}
    files, moved = [], []
    for fresh in _folders(fresh_root, "*/*_results.json"):
        relative = fresh.relative_to(fresh_root)
        committed = committed_root / relative
        if not committed.is_file():
            moved.append(Moved(str(relative), "/", "(no committed file)", "(written by this run)"))
            continue
        # 2. The models this file's numbers depend on, in either run.
        old, new = json.loads(committed.read_text()), json.loads(fresh.read_text())
        models = {fresh.parent.name, *old.get("models_loaded", []), *new.get("models_loaded", [])}
        changed = sorted(models & retrained)
        limit = max(tolerance, RETRAINED_TOLERANCE) if changed else tolerance
        # 3. Every value, side by side.
        numbers: list = []
        differences = compare_values(old.get("results", old), new.get("results", new), "", limit, numbers)
        report = FileReport(str(relative), sorted(models), limit, changed, largest_change(numbers))
        report.moved = [Moved(str(relative), path, a, b) for path, a, b in differences]
        files.append(report)
        moved += report.moved
    return Report(weights, files, moved)


def compare_runs(committed_root: Path, fresh_root: Path, tolerance: float = TOLERANCE) -> tuple[list[Moved], int]:
    """What moved, and how many results files were compared (see :func:`verify_runs`)."""
    report = verify_runs(committed_root, fresh_root, tolerance)
    return report.moved, report.compared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechfin_utils.tooling.verify", description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="*", metavar="NOTEBOOK or @MODEL")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--gpt2-path", default="")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fresh", type=Path, default=None, help="compare this finished run instead of rerunning")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args(argv)
    committed = figures_root()
    if args.fresh is None:
        # Only a rerun needs the runner (papermill, the screener's card reader); --fresh compares files alone.
        from mechfin_utils.tooling import run_figures
        from mechfin_utils.tooling.staging import NotebookFailedError

        plan = run_figures.parse_plan(args.items, args.model)
        if not plan:
            parser.error("give the notebooks to rerun (or --fresh DIR)")
        fresh = Path(tempfile.mkdtemp(prefix="mechfin-verify-"))
        expected = {  # the committed run's times, so that the rerun also starts with the longest notebooks
            path.parent.name: json.loads(path.read_text()).get("seconds_per_notebook", {})
            for path in committed.glob("*/manifest.json")
        }
        previous = os.environ.get(FIGURES_DIR_ENV)
        os.environ[FIGURES_DIR_ENV] = str(fresh)  # the rerun writes here (each notebook into its staging folder)
        try:
            run_figures.run_many(plan, args.gpt2_path, workers=args.workers, expected_seconds=expected)
        except NotebookFailedError as exc:
            print(f"error: the rerun failed, nothing compared: {exc}", file=sys.stderr)
            return 1
        finally:
            if previous is None:
                os.environ.pop(FIGURES_DIR_ENV, None)
            else:
                os.environ[FIGURES_DIR_ENV] = previous
    else:
        fresh = args.fresh
        if not fresh.is_dir():
            parser.error(f"--fresh {fresh}: not a folder")
    report = verify_runs(committed, fresh, args.tolerance)
    for change in report.weights:  # first: it changes what every comparison below means
        print(change)
    looser = f"; {max(args.tolerance, RETRAINED_TOLERANCE):g} for the files of models whose weights differ"
    print(
        f"compared {report.compared} results files of {fresh} with {committed} (tolerance {args.tolerance:g}"
        f"{looser if report.weights else ''})"
    )
    reported = set()
    for item in report.files:
        print(f"  {item}")
        for moved in item.moved:
            print(f"  MOVED {moved}")
            reported.add(id(moved))
    for moved in report.moved:
        if id(moved) not in reported:
            print(f"  MOVED {moved}")
    print("everything agrees" if not report.moved else f"{len(report.moved)} value(s) moved")
    return 0 if not report.moved else 1


if __name__ == "__main__":
    sys.exit(main())
