"""The FLOP floor of ``make bench``: the arithmetic no exact method can avoid, so that a time can be judged against
what the machine could do at best.

**Patching.** For a patch at layer ``L`` and position ``p`` every layer after ``L`` must be recomputed at every
position from ``p`` on (keys and values at all of them, because later positions attend to them; queries, attention,
output and MLP too except in the last layer, where only the final position is read), and the patched layer's MLP on
the patched rows. Nothing before ``L`` or ``p`` and nothing on prompts whose tokens have not diverged by ``p`` needs
computing (:func:`floor_flops`).

**Causal tracing.** A restoration at layer ``l`` (hidden: from ``l + 1``; a window: from its first layer) and position
``p`` must recompute every later layer at positions ``p ...`` (the last layer's queries, attention and MLP at the last
position only), once per noise sample (:func:`trace_floor_flops`).

Both add up :func:`continuation_flops`, the cost of one sequence recomputed from a layer and a position, from the
model's own cost per row (:meth:`mechfin_utils.core.functional.FunctionalTransformer.flops_per_row`). The floor's
*time* is those FLOPs at the matrix-multiply throughput measured on this machine
(:func:`mechfin_utils.tooling.bench.machine.matmul_throughput`); ``x floor`` in the tables is a method's time over it.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Int
from torch import Tensor

from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.methods import patching


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


def floor_flops(
    fm: FunctionalTransformer,
    key: str,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
) -> int:
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


def trace_floor_flops(
    fm: FunctionalTransformer, n_pos: int, restorations: Sequence[tuple[int, int]], n_samples: int
) -> int:
    """The FLOPs no exact tracer can avoid for ``restorations`` given as ``(first layer that must be recomputed,
    first position that differs)``, per noise sample (see the module docstring)."""
    return n_samples * sum(continuation_flops(fm, start, first, n_pos) for start, first in restorations)
