"""``make figures``: run notebooks with papermill, for one or more models, and record a manifest per model.

    python -m mechfin_utils.tooling.run_figures --model smollm2-135m notebooks/00_*.ipynb ... @smollm2-135m-screener notebooks/01_*.ipynb
    python -m mechfin_utils.tooling.run_figures --workers 2 ...

Notebooks after ``@MODEL`` run for that model (those before any ``@`` for ``--model``). Each notebook is executed into
``notebooks/_executed/`` (scratch, never committed) and writes its figures under ``figures/<model>/``.
``figures/<model>/manifest.json`` records what produced them: the model's name and the sha256 of its weights, the
parameters, the package versions, the git commit, the machine, how many notebooks ran side by side, and the wall time
of each notebook (times are recorded, never asserted). A later run with other notebooks updates their entries and
keeps the rest.

**Workers.** With ``--workers 2`` two notebooks run at a time, each kernel with one torch thread, longest first (by
the last recorded times). On two cores that finishes the whole set sooner than one notebook at a time with two
threads, because much of a notebook (many small forward passes, plotting, loading) does not use the second thread
well; each notebook's own time is then longer than it would be alone, and the manifest says it ran beside another.
The screener's training is guarded by a file lock, so two notebooks that need it never train it twice.
The notebooks of one run share the logit differences they compute (``$MECHFIN_SCORE_CACHE``, a folder of this run
that goes when it ends; :mod:`mechfin_utils.screener.score_cache`): notebooks 08 and 12 score the same held-out sets.

**Nothing half-written.** Each notebook runs in a process of its own, writes into a staging folder of its own, and
its outputs move into ``figures/`` (each file with an atomic rename) only once it has finished; a run stopped part-way
or a failing notebook leaves the committed figures as they were. How is :mod:`mechfin_utils.tooling.staging`'s; this
module plans the run (which notebooks, for which model, in which order, how many at a time) and writes the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypedDict

from mechfin_utils.core.models import (
    ALIASES,
    FINE_TUNED,
    GPT2_SPEC,
    SMOLLM2_SPEC,
    cache_dir,
    file_sha256,
    locate_gpt2,
    prepare_smollm2,
    resolve_auto,
)
from mechfin_utils.core.paths import REPO_ROOT, write_atomically
from mechfin_utils.reporting.figures import FIGURES_DIR_ENV, figures_root
from mechfin_utils.screener.fine_tune_cache import read_card
from mechfin_utils.screener.score_cache import SCORE_CACHE_ENV
from mechfin_utils.tooling.staging import (
    STAGING,
    NotebookFailedError,
    allow_notebooks_to_start,
    clean_stale_staging,
    execute_notebook,
    interrupt_on_sigterm,
    job_folder,
    move_file,
    stop_all_notebooks,
    swap_in,
    uninterrupted,
)

PACKAGES = ("torch", "transformers", "transformer-lens", "numpy", "pandas", "plotly", "kaleido", "papermill", "peft")
EXECUTED_DIR_ENV = "MECHFIN_EXECUTED_DIR"
"""Where the executed copies go (default ``notebooks/_executed/``); ``make test``'s notebook run uses it too."""


class ModelIdentity(TypedDict):
    """What a manifest says a model was: its figures folder, the name it resolved to, and its weights' sha256."""

    slug: str
    resolved: str
    weights_sha256: str | None


def model_identity(name: str, gpt2_path: str | None = None) -> ModelIdentity:
    """``slug`` (the figures folder), ``resolved`` name and the sha256 of the weights, without loading the model."""
    key = ALIASES.get(name.strip().lower(), name.strip())
    if key == "auto":
        key = resolve_auto(gpt2_path)[0]
    if key in FINE_TUNED:
        card = read_card(cache_dir() / key)
        sha = card["weights_sha256"] if card is not None else None
        return {"slug": key, "resolved": key, "weights_sha256": sha}
    if key == "smollm2-135m":
        return {
            "slug": SMOLLM2_SPEC.slug,
            "resolved": key,
            "weights_sha256": file_sha256(prepare_smollm2(verbose=False) / "model.safetensors"),
        }
    if key == "gpt2":
        found = locate_gpt2(gpt2_path)
        sha = None
        if found and found[0] == "folder":
            weights = Path(found[1]) / "model.safetensors"
            sha = file_sha256(weights) if weights.is_file() else None
        return {"slug": GPT2_SPEC.slug, "resolved": key, "weights_sha256": sha}
    return {"slug": key.split("/")[-1].lower(), "resolved": key, "weights_sha256": None}


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # the figures being written are not a change to what writes them
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!figures"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    out = {}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


@dataclass
class _ModelRun:
    """One model's share of a run: its notebooks, identity, manifest and recorded times."""

    model: str
    notebooks: list[str]
    identity: ModelIdentity
    manifest_path: Path
    manifest: dict
    seconds: dict[str, float]
    parameters: dict
    folders: dict[str, list[str]]


def run(notebooks: Sequence[str], model: str, gpt2_path: str = "", seed: int = 0, workers: int = 1) -> Path:
    """Execute ``notebooks`` for ``model`` (see :func:`run_many`); returns the manifest's path."""
    return run_many([(model, list(notebooks))], gpt2_path, seed, workers)[0]


def run_many(
    plan: Sequence[tuple[str, Sequence[str]]],
    gpt2_path: str = "",
    seed: int = 0,
    workers: int = 1,
    expected_seconds: dict[str, dict[str, float]] | None = None,
) -> list[Path]:
    """Execute every ``(model, notebooks)`` of ``plan``, ``workers`` notebooks at a time (one at a time: in order;
    several: longest first, by ``expected_seconds[model folder][notebook]`` or else the manifest's last times),
    stopping at the first failure; each model's manifest is written after each of its notebooks, so a failure keeps
    the times of those that ran.

    Each notebook runs in a process of its own (:func:`execute_notebook`) and writes into its own staging folder;
    its outputs reach the figures root only once it has finished (:func:`swap_in`). A failure, Ctrl-C or a kill
    leaves the figures root as it was (see the module docstring)."""
    # 1. Where things go, and the staging folders a stopped earlier run left behind.
    root = figures_root()
    executed = Path(os.environ.get(EXECUTED_DIR_ENV) or REPO_ROOT / "notebooks" / "_executed")
    executed.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(root)
    allow_notebooks_to_start()
    # 2. Each model's identity, manifest and the times worth keeping.
    runs = []
    for model, notebooks in plan:
        identity = model_identity(model, gpt2_path or None)
        manifest_path = root / identity["slug"] / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        folders = manifest.get("folders_per_notebook", {})
        seconds = still_current(manifest.get("seconds_per_notebook", {}), manifest_path.parent, notebooks, folders)
        folders = {stem: names for stem, names in folders.items() if stem in seconds}
        parameters = {"model": model, "gpt2_path": gpt2_path, "seed": seed}
        runs.append(_ModelRun(model, list(notebooks), identity, manifest_path, manifest, seconds, parameters, folders))
    # 3. The jobs, longest first when several run at once (unknown times first of all: they may be the longest), and
    #    the kernels' environment: one torch thread each when several share the cores.
    jobs = [(r, nb) for r in runs for nb in r.notebooks]
    shared_scores = root / STAGING / f"{os.getpid()}-shared-scores"  # this run's only (score_cache)
    kernel_env = {**os.environ, SCORE_CACHE_ENV: str(shared_scores)}
    if workers > 1:

        def expected(job: tuple[_ModelRun, str]) -> float:
            r, notebook = job
            known = (expected_seconds or {}).get(r.identity["slug"]) or r.seconds
            return known.get(Path(notebook).stem, float("inf"))

        jobs.sort(key=lambda job: -expected(job))
        kernel_env["OMP_NUM_THREADS"] = kernel_env["MKL_NUM_THREADS"] = "1"
    threads = torch_threads(kernel_env)
    lock = threading.Lock()  # held while a notebook's outputs move in and its manifest is written
    interrupted = threading.Event()  # set (under the lock) on Ctrl-C: no notebook moves in after it

    def execute(index: int, job: tuple[_ModelRun, str]) -> None:
        r, notebook = job
        path = Path(notebook)
        slug = r.identity["slug"]
        print(f"== {path.name} (model={r.model})", flush=True)
        job_dir = job_folder(root, index, slug, path)
        staged, staged_copy = job_dir / "figures", job_dir / f"{slug}-{path.name}"
        staged.mkdir(parents=True)
        start = time.perf_counter()
        try:
            execute_notebook(
                path, staged_copy, r.parameters, {**kernel_env, FIGURES_DIR_ENV: str(staged)}, job_dir / "output.log"
            )
        except BaseException as exc:
            if interrupted.is_set() or not isinstance(exc, Exception):
                shutil.rmtree(job_dir, ignore_errors=True)  # stopped part-way: nothing in it is worth a look
            else:
                print(f"   {path.name} failed; its staged outputs and executed copy stay in {job_dir}", flush=True)
            raise
        elapsed = round(time.perf_counter() - start, 1)
        with lock, uninterrupted():
            if interrupted.is_set():
                shutil.rmtree(job_dir, ignore_errors=True)
                return
            r.folders[path.stem] = sorted(p.name for p in staged.iterdir() if p.is_dir())  # where its figures went
            swap_in(staged, root, path.stem)
            if staged_copy.is_file():
                move_file(staged_copy, executed / staged_copy.name)
            shutil.rmtree(job_dir, ignore_errors=True)
            r.seconds[path.stem] = elapsed
            print(f"   {path.name} (model={r.model}): {elapsed} s", flush=True)
            if r.identity["weights_sha256"] is None:  # a screener trained during this run has a card now
                r.identity = model_identity(r.model, gpt2_path or None)
            _write_manifest(
                r.manifest_path, r.manifest, r.identity, r.parameters, r.seconds, workers, threads, r.folders
            )

    # 4. Run: in order with one worker; otherwise a pool that stops taking jobs at the first failure. Ctrl-C (or
    #    SIGTERM, see main) stops every running notebook and moves nothing more in.
    try:
        if workers <= 1:
            for index, job in enumerate(jobs):
                execute(index, job)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(execute, index, job) for index, job in enumerate(jobs)]
                try:
                    for future in as_completed(futures):
                        error = future.exception()
                        if error is not None:
                            for other in futures:
                                other.cancel()
                            raise error
                except KeyboardInterrupt:
                    for other in futures:
                        other.cancel()
                    with lock:  # a notebook moving in right now finishes moving in first
                        interrupted.set()
                    stop_all_notebooks()
                    raise
    except KeyboardInterrupt:
        interrupted.set()
        stop_all_notebooks()
        raise
    finally:
        shutil.rmtree(shared_scores, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / STAGING).rmdir()  # only when empty: a failed notebook's folder stays for a look
    return [r.manifest_path for r in runs]


def still_current(
    seconds: dict[str, float],
    folder: Path,
    notebooks: Sequence[str],
    folders_per_notebook: dict[str, list[str]] | None = None,
) -> dict[str, float]:
    """The recorded times worth keeping: those of notebooks about to run (they are replaced) and of notebooks that
    still have figures where their last run wrote them (run earlier on their own). A notebook no longer run for this
    model, whose figures were removed, loses its time: a manifest never adds up times of figures that are not there.

    Where a notebook wrote is the manifest's ``folders_per_notebook`` (a notebook run for one model may write only to
    another's folder: notebook 12, run in the base model's share, draws the screeners). A time recorded before
    manifests kept that counts if any model's folder beside ``folder`` holds the notebook's figures."""
    about_to_run = {Path(n).stem for n in notebooks}
    recorded = folders_per_notebook or {}
    every_folder = [folder, *sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder)]

    def has_figures(stem: str) -> bool:
        places = [folder.parent / name for name in recorded[stem]] if stem in recorded else every_folder
        return any(any(place.glob(f"{stem.split('_')[0]}_*")) for place in places)

    return {stem: value for stem, value in seconds.items() if stem in about_to_run or has_figures(stem)}


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (``/proc/cpuinfo``'s 'model name', else ``platform.processor()``, else 'unknown'): two
    machines with the same architecture and core count can still round floats differently (other SIMD paths)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor().strip() or "unknown"


def torch_threads(kernel_env: dict[str, str]) -> int:
    """torch's intra-op thread count in each kernel: ``OMP_NUM_THREADS`` as given to the kernels, else what torch
    picks here by itself (``torch.get_num_threads()``, which a kernel started here picks too)."""
    value = kernel_env.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    import torch

    return torch.get_num_threads()


def _write_manifest(
    path: Path,
    manifest: dict,
    identity: ModelIdentity,
    parameters: dict,
    seconds: dict,
    workers: int = 1,
    threads: int | None = None,
    folders: dict[str, list[str]] | None = None,
) -> None:
    manifest.update(
        {
            "model": identity["resolved"],
            "figures_folder": f"figures/{identity['slug']}",
            "weights_sha256": identity["weights_sha256"],
            "parameters": parameters,
            "fast": False,
            "packages": _versions(),
            "python": platform.python_version(),
            "commit": _commit(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "cpu": cpu_name(),
            "torch_threads_per_notebook": threads if threads is not None else torch_threads(dict(os.environ)),
            "notebooks_side_by_side": workers,
            "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds_per_notebook": dict(sorted(seconds.items())),
            "seconds_total": round(sum(seconds.values()), 1),
            "folders_per_notebook": dict(sorted((folders or {}).items())),
        }
    )
    write_atomically(path, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def parse_plan(items: Sequence[str], default_model: str) -> list[tuple[str, list[str]]]:
    """``["a.ipynb", "@m2", "b.ipynb"]`` -> ``[(default_model, ["a.ipynb"]), ("m2", ["b.ipynb"])]`` (a model with no
    notebook after it is dropped)."""
    plan: list[tuple[str, list[str]]] = [(default_model, [])]
    for item in items:
        if item.startswith("@"):
            plan.append((item[1:], []))
        else:
            plan[-1][1].append(item)
    return [(model, notebooks) for model, notebooks in plan if model and notebooks]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mechfin_utils.tooling.run_figures", description=__doc__.splitlines()[0]
    )
    parser.add_argument("items", nargs="+", metavar="NOTEBOOK or @MODEL")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--gpt2-path", default="")
    parser.add_argument("--workers", type=int, default=1, help="notebooks run side by side (one torch thread each)")
    args = parser.parse_args(argv)
    plan = parse_plan(args.items, args.model)
    missing = [n for _, notebooks in plan for n in notebooks if not Path(n).is_file()]
    if missing or not plan:
        print(f"error: no such notebook(s): {missing or args.items}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    interrupt_on_sigterm()  # `kill PID` stops the run as cleanly as Ctrl-C does
    # Ctrl-C stops the run even when it was started with Ctrl-C ignored (SIG_IGN is inherited: a background job of a
    # script, a worker of a test runner or of a library that ignores it), which would otherwise run every notebook on
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for path in run_many(plan, args.gpt2_path, workers=args.workers):
            print(f"manifest: {path}")
    except NotebookFailedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: the notebooks that had not finished changed nothing under the figures folder", file=sys.stderr
        )
        return 130
    print(f"wall time: {time.perf_counter() - started:.0f} s ({args.workers} notebook(s) at a time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
