"""Causal tracing (Meng et al. 2022, "ROME"): where in the network, and at which token, an answer is carried.

Three runs of the same prompt are compared:

1. **clean**: the ordinary forward pass; it gives the answer with high probability;
2. **corrupted**: Gaussian noise is added to the input embeddings of the *subject* tokens (e.g. "Eiffel
   Tower" in "The Eiffel Tower is located in the city of"), which usually destroys the answer;
3. **corrupted-with-restoration**: the corrupted run again, except that one internal state (the residual
   stream after layer ``l`` at token ``t``; or the MLP output; or the attention output; for MLP and
   attention usually a *window* of layers around ``l``) is overwritten with its value from the clean run.

The *indirect effect* of the restored state is ``score(restored) - score(corrupted)``: how much of the
answer that single state brings back. Averaged over noise samples and over a set of facts, ROME found a
peak at the last subject token in early-middle MLP layers, and a second one at the last token in late
layers.

This module holds :func:`causal_trace`, one prompt's ``[pos, layer]`` heat map per kind of state
(:class:`TraceResult`). The rest of tracing is one module per stage, imports pointing one way:

* :mod:`~mechfin_utils.tasks.facts`: what to trace (:class:`~mechfin_utils.tasks.facts.TraceTask`,
  :func:`~mechfin_utils.tasks.facts.locate_subject`) and the factual and fair-lending prompts;
* :mod:`~mechfin_utils.methods.tracing.prepared`: the task tokenised for a model
  (:func:`~mechfin_utils.methods.tracing.prepared.prepare_trace`), its score, the states restored, windows,
  the backend (engine or bridge hooks);
* :mod:`~mechfin_utils.methods.tracing.noise`: the subject noise (its scale, seeded draws);
* :mod:`~mechfin_utils.methods.tracing.restoration`: the generic run,
  :func:`~mechfin_utils.methods.tracing.restoration.run_with_restorations`, which this module wraps;
* :mod:`~mechfin_utils.methods.tracing.category_averages`: ROME's averages by position category;
* :mod:`~mechfin_utils.methods.tracing.knockout`: attention knockout (Geva et al. 2023), how the information
  *moves*;
* :mod:`~mechfin_utils.methods.tracing.dataset_trace`: traces and knockouts of a whole set of prompts;
* plots: :mod:`mechfin_utils.reporting.trace_plots`.

Choices (the noise, states and windows are documented in the modules that define them):

* **Hidden states** are restored one layer at a time (window 1), as in ROME; MLP and attention outputs in a
  window of :func:`~mechfin_utils.methods.tracing.prepared.default_trace_window` layers.
* **Positions**: restorations run from the first subject token on. Earlier positions cannot carry any
  effect -- the noise is added later in the sequence and attention is causal, so their corrupted states
  *equal* their clean ones -- and are left NaN ("not run") unless ``positions="all"`` asks for them.
* All kinds share one corrupted baseline and one set of noise samples and run in the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Float

from mechfin_utils.methods.tracing.noise import (
    DEFAULT_NOISE_MULTIPLIER,
    DEFAULT_SEED,
    embedding_noise_std,
    sample_subject_noise,
)
from mechfin_utils.methods.tracing.prepared import (
    KIND_HOOKS,
    Backend,
    PreparedTrace,
    TraceKind,
    clean_scores,
    default_trace_window,
    layer_window,
    prepare_trace,
)
from mechfin_utils.methods.tracing.restoration import Restoration, run_with_restorations
from mechfin_utils.tasks.facts import TraceTask

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from torch import Tensor

    from mechfin_utils.core.models import LoadedModel


@dataclass
class TraceResult:
    """One prompt's causal trace for one kind of state.

    ``restored[pos, layer]`` is the score with the state(s) restored at that token and layer (window
    around ``layer`` for mlp/attn), averaged over noise samples; NaN where not run (positions before the
    subject by default, see the module docstring). ``indirect_effect`` subtracts the corrupted score.
    """

    label: str
    model_name: str
    kind: str
    window: int
    str_tokens: tuple[str, ...]
    subject_span: tuple[int, int]
    score_name: str
    clean_score: float
    corrupted_score: float
    restored: Float[np.ndarray, "pos layer"]
    n_samples: int
    noise_std: float
    seconds: float = 0.0

    @property
    def indirect_effect(self) -> Float[np.ndarray, "pos layer"]:
        return self.restored - self.corrupted_score

    @property
    def n_layers(self) -> int:
        return self.restored.shape[1]

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (position, layer) with token, restored score and indirect effect."""
        import pandas as pd

        pos, layer = np.meshgrid(np.arange(self.restored.shape[0]), np.arange(self.n_layers), indexing="ij")
        return pd.DataFrame(
            {
                "label": self.label,
                "kind": self.kind,
                "position": pos.ravel(),
                "token": [self.str_tokens[p] for p in pos.ravel()],
                "layer": layer.ravel(),
                "restored": self.restored.ravel(),
                "indirect_effect": self.indirect_effect.ravel(),
            }
        )


def _trace_positions(prepared: PreparedTrace, positions: str | Sequence[int]) -> list[int]:
    if isinstance(positions, str):
        if positions == "from_subject":
            return list(range(prepared.subject_span[0], prepared.n_tokens))
        if positions == "all":
            return list(range(prepared.n_tokens))
        raise ValueError(f"positions must be 'from_subject', 'all' or a list of ints, got {positions!r}")
    out = sorted(set(int(p) for p in positions))
    bad = [p for p in out if not 0 <= p < prepared.n_tokens]
    if bad:
        raise ValueError(f"{prepared.task.label}: positions {bad} are outside [0, {prepared.n_tokens})")
    return out


def causal_trace(
    model: LoadedModel,
    task: TraceTask | PreparedTrace,
    kinds: Sequence[TraceKind] = ("hidden", "mlp", "attn"),
    windows: Mapping[str, int] | None = None,
    n_samples: int = 10,
    noise_std: float | None = None,
    noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
    seed: int = DEFAULT_SEED,
    positions: str | Sequence[int] = "from_subject",
    batch_size: int = 256,
    backend: Backend = "auto",
) -> dict[str, TraceResult]:
    """ROME's causal trace of one prompt: a ``[pos, layer]`` heat map per kind of state.

    All kinds share one corrupted baseline and one set of noise samples and run in the same batches.

    Args:
        kinds: any of ``"hidden"``, ``"mlp"``, ``"attn"``.
        windows: layers restored together per kind; default 1 for hidden, :func:`default_trace_window`
            for mlp and attn.
        n_samples: noise samples averaged (ROME: 10).
        noise_std: the embedding standard deviation (default :func:`embedding_noise_std` of the model);
            the noise is ``noise_multiplier * noise_std``.
        positions: ``"from_subject"`` (default), ``"all"``, or explicit token positions.
        batch_size, backend: see :func:`run_with_restorations`.
    """
    prepared = task if isinstance(task, PreparedTrace) else prepare_trace(model, task)
    n_layers = model.cfg.n_layers
    unknown = [k for k in kinds if k not in KIND_HOOKS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {sorted(KIND_HOOKS)}, got {list(kinds)}")
    win: dict[str, int] = {k: (1 if k == "hidden" else default_trace_window(n_layers)) for k in kinds}
    win.update({k: int(v) for k, v in (windows or {}).items() if k in kinds})
    if noise_std is None:
        noise_std = embedding_noise_std(model)
    run_positions = _trace_positions(prepared, positions)

    t0 = time.perf_counter()
    noise = sample_subject_noise(
        n_samples, len(prepared.subject_positions), model.cfg.d_model, noise_multiplier * noise_std, seed
    )
    restorations = [Restoration(())]
    index: list[tuple[TraceKind, int, int]] = []
    for kind in kinds:
        for pos in run_positions:
            for layer in range(n_layers):
                restorations.append(Restoration.of(kind, layer_window(layer, win[kind], n_layers), [pos]))
                index.append((kind, pos, layer))
    clean_score = float(clean_scores(model, prepared, backend)[0])
    scores = run_with_restorations(model, prepared, noise, restorations, None, batch_size, backend).mean(dim=0)
    seconds = time.perf_counter() - t0

    return trace_results(
        model.name,
        prepared,
        kinds,
        win,
        n_layers,
        index,
        scores,
        clean_score,
        n_samples,
        noise_multiplier * noise_std,
        seconds,
    )


def trace_results(
    model_name: str,
    prepared: PreparedTrace,
    kinds: Sequence[str],
    windows: dict[str, int],
    n_layers: int,
    index: Sequence[tuple[str, int, int]],
    scores: Tensor,
    clean_score: float,
    n_samples: int,
    noise_std: float,
    seconds: float,
) -> dict[str, TraceResult]:
    """One :class:`TraceResult` per kind from a trace's scores averaged over the noise samples: ``scores[0]`` is the
    corrupted run, ``scores[1 + i]`` the restoration ``index[i]`` = (kind, position, layer); cells not restored stay
    NaN. Shared by :func:`causal_trace` and the hook tracer (:mod:`mechfin_utils.methods.tracing.module_trace`)."""
    grids = {k: np.full((prepared.n_tokens, n_layers), np.nan) for k in kinds}
    for (kind, pos, layer), value in zip(index, scores[1:].tolist()):
        grids[kind][pos, layer] = value
    return {
        kind: TraceResult(
            label=prepared.task.label,
            model_name=model_name,
            kind=kind,
            window=windows[kind],
            str_tokens=prepared.str_tokens,
            subject_span=prepared.subject_span,
            score_name=prepared.task.score_name,
            clean_score=clean_score,
            corrupted_score=float(scores[0]),
            restored=grids[kind],
            n_samples=n_samples,
            noise_std=noise_std,
            seconds=seconds,
        )
        for kind in kinds
    }
