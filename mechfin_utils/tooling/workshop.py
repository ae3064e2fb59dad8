"""Workshop exercises, ARENA style: the learner writes a function, a checker compares it with mechfin's own.

Exercises live *in the notebooks themselves*, so they can never drift from them:

* a code cell tagged ``exercise`` defines the learner's function, with the solution between ``# BEGIN SOLUTION`` and
  ``# END SOLUTION`` lines;
* the next cell, tagged ``check``, calls :func:`check` with the function, mechfin's own answer on the same inputs,
  the inputs, and a hint.

``python -m mechfin_utils.tooling.workshop`` (``make workshop``) writes ``workshop/<notebook>_exercises.ipynb`` for every
notebook with exercise cells: the same notebook with each solution replaced by ``raise NotImplementedError`` and
every output cleared. Because the exercise copy *is* the notebook minus its solutions (:func:`fill_solutions` puts them
back and gives the notebook again, byte for byte; tested), running the notebooks in ``make test`` runs every exercise
notebook with its solutions filled in, checkers included. ``--check`` fails when a committed copy is out of date.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import torch
from torch import Tensor

from mechfin_utils.core.paths import REPO_ROOT

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = 'raise NotImplementedError("Your code here: see the exercise above.")'
WORKSHOP_DIR = REPO_ROOT / "workshop"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


# ---------------------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------------------


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().float().cpu().numpy()
    return (
        np.asarray(value, dtype=float)
        if not isinstance(value, (list, tuple)) or not value or not isinstance(value[0], str)
        else np.asarray(value)
    )


def check(fn, expected: Any, *args, atol: float = 1e-4, rtol: float = 1e-4, hint: str = "", **kwargs) -> Any:
    """Call ``fn(*args, **kwargs)`` and compare its result with ``expected`` (mechfin's own answer on the same inputs).

    Numbers (tensors, arrays, floats) must agree within ``atol + rtol * |expected|``; anything else (lists of names)
    exactly. On a mismatch an AssertionError says where the largest difference is, both values there, and the hint.
    """
    name = getattr(fn, "__name__", "your function")
    try:
        got = fn(*args, **kwargs)
    except NotImplementedError as error:
        raise AssertionError(
            f"{name} is not written yet ({error}). Write it in the cell above, then run this one again."
        ) from None
    want = _as_array(expected)
    have = _as_array(got)
    if want.dtype.kind in "USO" or have.dtype.kind in "USO":
        if list(have.ravel()) != list(want.ravel()):
            raise AssertionError(
                f"{name} returned {list(have.ravel())[:12]}, mechfin gives {list(want.ravel())[:12]}. Hint: {hint}"
            )
        print(f"✓ {name} matches mechfin ({want.size} items)")
        return got
    if have.shape != want.shape:
        raise AssertionError(
            f"{name} returned shape {have.shape}, mechfin's answer has shape {want.shape}. Hint: {hint}"
        )
    bad = ~np.isclose(have, want, atol=atol, rtol=rtol)
    if bad.any():
        diff = np.abs(have - want)
        where = np.unravel_index(int(np.argmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape)
        raise AssertionError(
            f"{name} differs from mechfin at {int(bad.sum())} of {bad.size} entries; the largest difference is at index "
            f"{tuple(int(i) for i in where)}: yours {have[where]:.6g}, mechfin's {want[where]:.6g}. Hint: {hint}"
        )
    print(f"✓ {name} matches mechfin ({want.size} values, largest difference {float(np.abs(have - want).max()):.1e})")
    return got


# ---------------------------------------------------------------------------------------------------------
# Inputs the exercises start from (what a learner would read off a cache)
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def dla_inputs(model, tokens: Tensor, answer_tokens: Tensor) -> dict[str, Any]:
    """The final position's residual stream, its pieces (the embedding, then each layer's attention and MLP output, as
    :func:`mechfin_utils.methods.readout.dla.layer_decomposition` orders them), per-head outputs ``z`` with each layer's ``W_O``, the
    final norm's weight and epsilon, its kind, and the answer direction ``W_U[first] - W_U[second]``."""
    from mechfin_utils.core.functional import FunctionalTransformer

    fm = FunctionalTransformer.from_model(model)
    record = fm.record(tokens, keep=("resid_pre", "attn_out", "mlp_out", "z"))
    pieces, labels = [fm.embed(tokens)[:, -1]], ["embed"]
    if fm.W_pos is not None:  # GPT-2: token and position embeddings are two pieces, as in TransformerLens
        pieces = [fm.W_E[tokens[:, -1]], fm.W_pos[tokens.shape[1] - 1].expand(tokens.shape[0], -1)]
        labels = ["embed", "pos_embed"]
    for layer in range(fm.n_layers):
        pieces += [record.kept("attn_out")[layer][:, -1], record.kept("mlp_out")[layer][:, -1]]
        labels += [f"{layer}_attn_out", f"{layer}_mlp_out"]
    answers = (
        answer_tokens.expand(tokens.shape[0], 2)
        if answer_tokens.ndim == 2
        else answer_tokens[None].expand(tokens.shape[0], 2)
    )
    return {
        "components": torch.stack(pieces),  # [n_components, batch, d_model]
        "labels": labels,
        "final_resid": record.kept("resid_pre")[fm.n_layers][:, -1],  # [batch, d_model]
        "z": record.kept("z")[:, :, -1],  # [layer, batch, head, d_head]
        "W_O": torch.stack([w.W_O for w in fm.layers]).view(fm.n_layers, fm.n_heads, fm.d_head, fm.d_model),
        "norm_weight": fm.lnf_w,
        "norm_bias": fm.lnf_b,
        "eps": fm.eps,
        "norm": "layernorm" if fm.family == "gpt2" else "rmsnorm",
        "direction": fm.W_U[answers[:, 0]] - fm.W_U[answers[:, 1]],  # [batch, d_model]
    }


# ---------------------------------------------------------------------------------------------------------
# Exercise notebooks from the notebooks
# ---------------------------------------------------------------------------------------------------------


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def strip_solution(source: str, where: str) -> str:
    """``source`` with every solution block replaced by a stub at the block's indentation."""
    lines, out, inside, indent = source.split("\n"), [], False, ""
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {number}: {BEGIN} inside another solution block")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}{STUB}")
        elif stripped == END:
            if not inside:
                raise ValueError(f"{where}, line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def make_exercise_notebook(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The exercise copy of a notebook: solutions stubbed, outputs cleared, a note at the top."""
    out = copy.deepcopy(nb)
    exercises = 0
    for index, cell in enumerate(out.cells):
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if "exercise" in _tags(cell):
            if BEGIN not in cell.source:
                raise ValueError(f"{name}, cell {index}: tagged 'exercise' but has no {BEGIN} block")
            cell.source = strip_solution(cell.source, f"{name}, cell {index}")
            exercises += 1
            following = out.cells[index + 1] if index + 1 < len(out.cells) else None
            if following is None or "check" not in _tags(following):
                raise ValueError(f"{name}, cell {index}: an exercise must be followed by a cell tagged 'check'")
    if not exercises:
        raise ValueError(f"{name} has no cell tagged 'exercise'")
    note = nbformat.v4.new_markdown_cell(
        f"**Workshop copy of `{name}`** (generated by `make workshop`; do not edit by hand). Each exercise cell raises "
        "`NotImplementedError` until you write the function; the cell after it checks your answer against mechfin's "
        "own on the same inputs."
    )
    note["id"] = "workshop-note"
    setup = nbformat.v4.new_code_cell(
        "import os, tempfile\n"
        "# Workshop defaults: small samples (every section runs in seconds to a few minutes on a 2-core laptop), and your\n"
        "# figures go to a scratch folder, never over the repository's figures/.\n"
        'os.environ.setdefault("MECHFIN_FAST", "1")\n'
        'os.environ.setdefault("MECHFIN_FIGURES_DIR", tempfile.mkdtemp(prefix="mechfin-workshop-"))'
    )
    setup["id"] = "workshop-setup"
    out.cells[0:0] = [note, setup]
    return out


def fill_solutions(exercise: nbformat.NotebookNode, source: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Put the source notebook's solutions back into an exercise copy (what ``make test`` effectively runs)."""
    out = copy.deepcopy(exercise)
    out.cells = [cell for cell in out.cells if cell.get("id") not in ("workshop-note", "workshop-setup")]
    for cell, original in zip(out.cells, source.cells):
        if "exercise" in _tags(cell):
            cell.source = original.source
    return out


def exercise_sources(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The notebooks that hold at least one exercise cell."""
    found = []
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if any("exercise" in _tags(cell) for cell in nb.cells):
            found.append(path)
    return found


def render(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return nbformat.writes(make_exercise_notebook(nb, path.name)) + "\n"


def section_times(path: Path) -> list[tuple[str, float]]:
    """Seconds per section (``#``/``##`` headings) of an executed notebook, from papermill's per-cell durations."""
    nb = nbformat.read(path, as_version=4)
    sections: list[tuple[str, float]] = []
    for cell in nb.cells:
        heading = re.match(r"^#{1,2}\s+(.+)$", cell.source, flags=re.M) if cell.cell_type == "markdown" else None
        if heading or not sections:
            sections.append((heading.group(1).strip() if heading else "(start)", 0.0))
        duration = cell.get("metadata", {}).get("papermill", {}).get("duration") or 0.0
        sections[-1] = (sections[-1][0], sections[-1][1] + float(duration))
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mechfin_utils.tooling.workshop", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="only verify that workshop/ is up to date")
    parser.add_argument("--out", type=Path, default=WORKSHOP_DIR)
    parser.add_argument(
        "--times", nargs="+", type=Path, default=None, help="print seconds per section of executed notebooks"
    )
    args = parser.parse_args(argv)
    if args.times:
        for path in args.times:
            sections = section_times(path)
            print(f"{path.name}: {sum(t for _, t in sections):.0f} s")
            for title, seconds in sections:
                print(f"  {seconds:6.1f} s  {title}")
        return 0
    stale = []
    for path in exercise_sources():
        target = args.out / re.sub(r"\.ipynb$", "_exercises.ipynb", path.name)
        text = render(path)
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(str(target))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
    if stale:
        print(f"out of date (run make workshop): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
