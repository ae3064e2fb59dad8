"""Base model vs fine-tuned model: where did fine-tuning change the weights, and which components carry the change?

Prakash et al. (2024, "Fine-tuning enhances existing mechanisms") compare a model with its fine-tuned version
component by component. Two measurements here:

**Weight change per component.** For every weight matrix of the plain checkpoints (never the bridge's processed
weights, which fold norms into their neighbours), the relative Frobenius change
``||W_tuned - W_base|| / ||W_base||``, grouped by layer and module (attention q/k/v/o, MLP, norms, embedding).

**Cross-model activation patching.** Run the *base* model, but replace one component's output (attention or MLP of
one layer, at every position) with the value the *fine-tuned* model computes on the same prompt. If the component's
change is what makes the screener decide, the base model's decision moves toward the screener's. On a batch of
pairs the decision is the paired gap ``LD(clean) - LD(corrupted)``, and each component scores

    recovery = (gap_patched - gap_base) / (gap_tuned - gap_base)

(0: the component's fine-tuned output changes nothing by itself; 1: it alone carries the screener's gap). Both
models must share an architecture and tokenizer. This is a one-component-at-a-time sweep: recoveries do not add
up to 1, because later components in the base model react to the patched one differently than in the screener.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core import engine
from mechfin_utils.core.functional import FunctionalTransformer, functional_model
from mechfin_utils.core.stats import normalised_ci
from mechfin_utils.tasks.circuit_tasks import CircuitTask

_LAYER = re.compile(r"(?:layers|h)\.(\d+)\.")
_MODULES = (
    ("attn_q", ("q_proj",)),
    ("attn_k", ("k_proj",)),
    ("attn_v", ("v_proj",)),
    ("attn_qkv", ("c_attn",)),
    ("attn_o", ("o_proj", "attn.c_proj")),
    ("mlp_in", ("gate_proj", "up_proj", "c_fc")),
    ("mlp_out", ("down_proj", "mlp.c_proj")),
    ("norm", ("norm", "ln_")),
    ("embedding", ("embed_tokens", "wte", "wpe")),
)


def module_of(parameter_name: str) -> tuple[int | None, str]:
    """``(layer or None, module group)`` of a Llama or GPT-2 parameter name, e.g. ``(3, "attn_q")``."""
    match = _LAYER.search(parameter_name)
    layer = int(match.group(1)) if match else None
    for group, keys in _MODULES:
        if any(key in parameter_name for key in keys):
            return layer, group
    return layer, "other"


def load_state(folder_or_hub_id: str | Path) -> dict[str, Tensor]:
    """The float32 tensors of a plain checkpoint: a folder's ``model.safetensors``, or a Hugging Face id whose
    ``model.safetensors`` is in the local cache (GPT-2 found in the cache)."""
    from safetensors.torch import load_file

    path = Path(folder_or_hub_id) / "model.safetensors"
    if not path.is_file() and not Path(folder_or_hub_id).is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(folder_or_hub_id), "model.safetensors")
        except ValueError:  # not a valid hub id either (e.g. a path that does not exist)
            cached = None
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors for {folder_or_hub_id}: weight_change needs plain checkpoints")
    return {name: tensor.float() for name, tensor in load_file(str(path)).items()}


def weight_change(base_state: dict[str, Tensor], tuned_state: dict[str, Tensor]) -> pd.DataFrame:
    """Relative Frobenius change per parameter, with its layer and module group.

    Columns: ``parameter, layer, module, base_norm, change_norm, relative_change``. Parameters must match by name
    and shape; a mismatch is an error naming them.
    """
    missing = sorted(set(base_state) ^ set(tuned_state))
    if missing:
        raise ValueError(f"the checkpoints hold different parameters: {missing[:5]}")
    rows = []
    for name, base in base_state.items():
        tuned = tuned_state[name]
        if tuned.shape != base.shape:
            raise ValueError(f"{name}: shape {tuple(base.shape)} in the base, {tuple(tuned.shape)} fine-tuned")
        layer, module = module_of(name)
        base_norm = float(base.norm())
        change = float((tuned - base).norm())
        rows.append(
            {
                "parameter": name,
                "layer": layer,
                "module": module,
                "base_norm": base_norm,
                "change_norm": change,
                "relative_change": change / base_norm if base_norm > 0 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def change_by_layer_and_module(changes: pd.DataFrame) -> pd.DataFrame:
    """``[layer x module]`` relative change of each group (sum of squared changes over sum of squared norms)."""
    layered = changes.dropna(subset=["layer"]).copy()
    layered["layer"] = layered["layer"].astype(int)
    grouped = layered.groupby(["layer", "module"]).agg(
        change=("change_norm", lambda x: float((x**2).sum() ** 0.5)),
        norm=("base_norm", lambda x: float((x**2).sum() ** 0.5)),
    )
    grouped["relative_change"] = grouped["change"] / grouped["norm"]
    return grouped["relative_change"].unstack("module")


# ---------------------------------------------------------------------------------------------------------
# Cross-model activation patching
# ---------------------------------------------------------------------------------------------------------

Component = Literal["attn_out", "mlp_out"]
COMPONENTS: tuple[Component, ...] = ("attn_out", "mlp_out")


def _check_compatible(base, tuned) -> None:
    for attribute in ("n_layers", "d_model", "n_heads", "d_vocab"):
        if getattr(base.cfg, attribute) != getattr(tuned.cfg, attribute):
            raise ValueError(
                f"{base.name} and {tuned.name} differ in {attribute}: cross-model patching needs one architecture"
            )
    if base.prepend_bos != tuned.prepend_bos:
        raise ValueError(f"{base.name} and {tuned.name} make different BOS decisions")


def _functional(model) -> FunctionalTransformer:
    """A model's functional forward pass (a ``LoadedModel``, bridge or Hugging Face model; or one already built)."""
    return model if isinstance(model, FunctionalTransformer) else functional_model(model)


def _check_same_shape(base_fm: FunctionalTransformer, tuned_fm: FunctionalTransformer) -> None:
    for attribute in ("family", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_vocab"):
        if getattr(base_fm, attribute) != getattr(tuned_fm, attribute):
            raise ValueError(
                f"{base_fm.name} and {tuned_fm.name} differ in {attribute} ({getattr(base_fm, attribute)} vs "
                f"{getattr(tuned_fm, attribute)}): cross-model patching needs one architecture"
            )


@dataclass
class _CrossModelRun:
    """One prompt set run three ways, as final-normed states at the last ``n_read`` positions: the base model, the
    tuned model, and the base model with each cell's component replaced by the tuned model's output."""

    base: Float[Tensor, "batch n_read d_model"]
    tuned: Float[Tensor, "batch n_read d_model"]
    patched: list[Float[Tensor, "batch n_read d_model"]]  # one per cell, in the order of ``cells``


def _cross_model_run(
    base_fm: FunctionalTransformer,
    tuned_fm: FunctionalTransformer,
    tokens: Int[Tensor, "batch pos"],
    cells: Sequence[tuple[int, Component]],
    n_read: int = 1,
) -> _CrossModelRun:
    """Stages, on the intervention engine (:mod:`mechfin_utils.core.engine`):
    1. both models' runs recorded: their final states are the endpoints, the tuned model's component outputs the
       values patched in;
    2. per (layer, component) cell, the base model continued from that layer with that one output replaced (a
       :class:`~mechfin_utils.core.engine.Replace` at every position), all cells in one packed run."""
    components = tuple(sorted({component for _, component in cells}))
    # 1. reference runs
    base_record = base_fm.record(tokens, keep=("resid_pre",))
    tuned_record = tuned_fm.record(tokens, keep=("resid_pre", *components))
    # 2. one packed base run: every cell replaced at every position
    positions = tuple(range(tokens.shape[1]))
    batch = torch.arange(tokens.shape[0])
    segments = [
        engine.Segment(
            layer,
            0,
            base_record.kept("resid_pre")[layer],
            batch,
            [engine.Replace(component, layer, positions, tuned_record.kept(component)[layer])],
        )
        for layer, component in cells
    ]
    return _CrossModelRun(
        base=base_fm.final_norm(base_record.kept("resid_pre")[-1][:, -n_read:]),
        tuned=tuned_fm.final_norm(tuned_record.kept("resid_pre")[-1][:, -n_read:]),
        patched=engine.run(base_fm, segments, base_record, n_read=n_read),
    )


def _cells(n_layers: int, components: Sequence[str]) -> list[tuple[int, Component]]:
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; known: {list(COMPONENTS)}")
    return [(layer, cast(Component, component)) for layer in range(n_layers) for component in components]


@torch.no_grad()
def cross_model_patching(
    base,
    tuned,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"],
    components: tuple[Component, ...] = COMPONENTS,
) -> pd.DataFrame:
    """Patch each layer's component from ``tuned`` into ``base`` (every position), on clean and corrupted prompts.

    Returns one row per (layer, component): ``gap_patched`` (mean over pairs), ``recovery`` as defined in the
    module docstring, and the mean LD shift on clean and on corrupted prompts. The endpoint gaps are in
    ``frame.attrs["gap_base"]`` and ``frame.attrs["gap_tuned"]``. :func:`cross_model_task_patching` does the same for
    any circuit task's score, with intervals over prompts.
    """
    _check_compatible(base, tuned)
    base_fm, tuned_fm = functional_model(base), functional_model(tuned)
    cells = _cells(base_fm.n_layers, components)
    base_ld, tuned_ld, patched = {}, {}, {}
    for run, tokens in {"clean": clean_tokens, "corrupted": corrupted_tokens}.items():
        states = _cross_model_run(base_fm, tuned_fm, tokens, cells)
        base_ld[run] = base_fm.logit_diff(states.base[:, -1], answer_tokens)
        tuned_ld[run] = tuned_fm.logit_diff(states.tuned[:, -1], answer_tokens)
        patched[run] = [base_fm.logit_diff(out[:, -1], answer_tokens) for out in states.patched]
    gap_base = float((base_ld["clean"] - base_ld["corrupted"]).mean())
    gap_tuned = float((tuned_ld["clean"] - tuned_ld["corrupted"]).mean())
    rows = []
    for index, (layer, component) in enumerate(cells):
        clean_ld, corrupted_ld = patched["clean"][index], patched["corrupted"][index]
        gap = float((clean_ld - corrupted_ld).mean())
        rows.append(
            {
                "layer": layer,
                "component": component,
                "gap_patched": gap,
                "recovery": (gap - gap_base) / (gap_tuned - gap_base),
                "clean_shift": float((clean_ld - base_ld["clean"]).mean()),
                "corrupted_shift": float((corrupted_ld - base_ld["corrupted"]).mean()),
            }
        )
    frame = pd.DataFrame(rows)
    frame.attrs.update(gap_base=gap_base, gap_tuned=gap_tuned)
    return frame


Measure = Literal["clean", "gap"]


@dataclass
class TaskCrossModelPatching:
    """Cross-model patching of one circuit task, per prompt: what :func:`cross_model_task_patching` returns.

    ``base`` and ``tuned`` are each prompt's value under the two models, ``patched[i, c]`` the base model's value
    with cell ``cells[c]`` patched from the tuned model; the value is the task's score on the clean prompt
    (``measure="clean"``) or its clean - corrupted difference (``"gap"``: the part that depends on what the
    corruption removes)."""

    task_name: str
    measure: str
    base_name: str
    tuned_name: str
    ids: list[str]
    cells: list[tuple[int, Component]]
    base: Float[Tensor, " n_prompts"]
    tuned: Float[Tensor, " n_prompts"]
    patched: Float[Tensor, "n_prompts n_cells"]

    def table(self, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """One row per cell: ``recovery`` = (patched - base) / (tuned - base) of the means over prompts, with a 95%
        bootstrap interval resampling prompts jointly (``low``, ``high``), and the mean shift it makes."""
        interval = normalised_ci(
            self.patched.double().numpy(),
            self.base.double().numpy(),
            self.tuned.double().numpy(),
            n_boot=n_boot,
            seed=seed,
        )
        shift = (self.patched - self.base[:, None]).mean(0)
        return pd.DataFrame(
            {
                "layer": [layer for layer, _ in self.cells],
                "component": [component for _, component in self.cells],
                "recovery": np.asarray(interval.estimate),
                "low": np.asarray(interval.low),
                "high": np.asarray(interval.high),
                "shift": shift.double().numpy(),
            }
        )

    @property
    def gain(self) -> float:
        """The tuned model's mean value minus the base model's: what a recovery of 1 stands for."""
        return float((self.tuned - self.base).mean())


@torch.no_grad()
def cross_model_task_patching(
    base,
    tuned,
    task: CircuitTask,
    components: Sequence[str] = COMPONENTS,
    measure: Measure = "clean",
) -> TaskCrossModelPatching:
    """Cross-model patching (Prakash et al.) on any circuit task, scored by the task's own metric per prompt: for
    every batch, each (layer, component) of ``tuned`` patched into ``base`` at every position
    (:func:`_cross_model_run`), the task's score read at the batch's last ``read_positions``. ``measure``: the clean
    prompts' score, or the clean - corrupted difference (the corrupted prompts then run too). Models: ``LoadedModel``
    objects, bridges, Hugging Face models or :class:`~mechfin_utils.core.functional.FunctionalTransformer` objects of
    one architecture."""
    if measure not in ("clean", "gap"):
        raise ValueError(f"measure must be 'clean' or 'gap', got {measure!r}")
    if hasattr(base, "spec") and hasattr(tuned, "spec"):
        _check_compatible(base, tuned)
    base_fm, tuned_fm = _functional(base), _functional(tuned)
    _check_same_shape(base_fm, tuned_fm)
    cells = _cells(base_fm.n_layers, components)
    base_values, tuned_values, patched_values = [], [], []
    for batch in task.batches:
        runs = {"clean": batch.clean_tokens} | ({"corrupted": batch.corrupted_tokens} if measure == "gap" else {})
        scored = {}
        for run, tokens in runs.items():
            states = _cross_model_run(base_fm, tuned_fm, tokens, cells, n_read=batch.read_positions)
            scored[run] = (
                batch.score(base_fm.unembed(states.base)),
                batch.score(tuned_fm.unembed(states.tuned)),
                torch.stack([batch.score(base_fm.unembed(out)) for out in states.patched], dim=1),
            )
        values = (
            scored["clean"] if measure == "clean" else [a - b for a, b in zip(scored["clean"], scored["corrupted"])]
        )
        base_values.append(values[0])
        tuned_values.append(values[1])
        patched_values.append(values[2])
    return TaskCrossModelPatching(
        task_name=task.name,
        measure=measure,
        base_name=base_fm.name,
        tuned_name=tuned_fm.name,
        ids=task.ids,
        cells=cells,
        base=torch.cat(base_values).float(),
        tuned=torch.cat(tuned_values).float(),
        patched=torch.cat(patched_values).float(),
    )


# ---------------------------------------------------------------------------------------------------------
# Side-by-side summaries for notebook 08
# ---------------------------------------------------------------------------------------------------------
