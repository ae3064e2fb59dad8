"""``make figures``: run notebooks top to bottom with papermill for one model and record a manifest.

    python -m mechfin_utils.run_figures --model smollm2-135m notebooks/00_*.ipynb ...

Each notebook is executed into ``notebooks/_executed/`` (scratch, never committed) and writes its figures under
``figures/<model>/``. Afterwards ``figures/<model>/manifest.json`` records what produced them: the model's name
and the sha256 of its weights, the parameters, the package versions, the git commit, the machine, and the wall
time of each notebook (times are recorded, never asserted). A later run with other notebooks updates their entries
and keeps the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from .figures import REPO_ROOT, figures_root
from .models import (
    ALIASES,
    GPT2_SPEC,
    SCREENERS,
    SMOLLM2_SPEC,
    cache_dir,
    file_sha256,
    locate_gpt2,
    prepare_smollm2,
    resolve_auto,
)
from .screener import read_card

PACKAGES = ("torch", "transformers", "transformer-lens", "numpy", "pandas", "plotly", "kaleido", "papermill", "peft")


def model_identity(name: str, gpt2_path: str | None = None) -> dict[str, str | None]:
    """``slug`` (the figures folder), ``resolved`` name and the sha256 of the weights, without loading the model."""
    key = ALIASES.get(name.strip().lower(), name.strip())
    if key == "auto":
        key = resolve_auto(gpt2_path)[0]
    if key in SCREENERS:
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


def run(notebooks: Sequence[str], model: str, gpt2_path: str = "", seed: int = 0) -> Path:
    """Execute ``notebooks`` for ``model`` in order, stopping at the first failure; the manifest is written after
    each notebook, so a failure keeps the times of those that ran."""
    import papermill

    identity = model_identity(model, gpt2_path or None)
    executed = REPO_ROOT / "notebooks" / "_executed"
    executed.mkdir(parents=True, exist_ok=True)
    manifest_path = figures_root() / identity["slug"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    seconds = still_current(manifest.get("seconds_per_notebook", {}), manifest_path.parent, notebooks)
    parameters = {"model": model, "gpt2_path": gpt2_path, "seed": seed}
    for notebook in notebooks:
        path = Path(notebook)
        print(f"== {path.name} (model={model})", flush=True)
        start = time.perf_counter()
        papermill.execute_notebook(
            str(path),
            str(executed / f"{identity['slug']}-{path.name}"),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(REPO_ROOT / "notebooks"),
            log_output=False,
            progress_bar=False,
        )
        seconds[path.stem] = round(time.perf_counter() - start, 1)
        print(f"   {seconds[path.stem]} s", flush=True)
        if identity["weights_sha256"] is None:  # a screener trained during this run has a card now
            identity = model_identity(model, gpt2_path or None)
        _write_manifest(manifest_path, manifest, identity, parameters, seconds)  # after each: a failure keeps the rest
    return manifest_path


def still_current(seconds: dict[str, float], folder: Path, notebooks: Sequence[str]) -> dict[str, float]:
    """The recorded times worth keeping: those of notebooks about to run (they are replaced) and of notebooks that
    still have figures in the folder (run earlier on their own). A notebook no longer run for this model, whose
    figures were removed, loses its time: a manifest never adds up times of figures that are not there."""
    about_to_run = {Path(n).stem for n in notebooks}
    return {
        stem: value
        for stem, value in seconds.items()
        if stem in about_to_run or any(folder.glob(f"{stem.split('_')[0]}_*"))
    }


def _write_manifest(path: Path, manifest: dict, identity: dict, parameters: dict, seconds: dict) -> None:
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
            "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds_per_notebook": dict(sorted(seconds.items())),
            "seconds_total": round(sum(seconds.values()), 1),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechfin_utils.run_figures", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--gpt2-path", default="")
    args = parser.parse_args(argv)
    missing = [n for n in args.notebooks if not Path(n).is_file()]
    if missing:
        print(f"error: no such notebook(s): {missing}", file=sys.stderr)
        return 2
    print(f"manifest: {run(args.notebooks, args.model, args.gpt2_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
