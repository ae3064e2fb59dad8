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
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

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


@torch.no_grad()
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

    Stages, on the intervention engine (:mod:`mechfin_utils.core.engine`):
        1. both models' runs recorded on both prompt sets: their logit differences are the endpoints, the tuned
           model's component outputs the values patched in;
        2. per layer and component, the base model continued from that layer with that one output replaced (a
           :class:`~mechfin_utils.core.engine.Replace` at every position), all in one packed run per prompt set.

    Returns one row per (layer, component): ``gap_patched`` (mean over pairs), ``recovery`` as defined in the
    module docstring, and the mean LD shift on clean and on corrupted prompts. The endpoint gaps are in
    ``frame.attrs["gap_base"]`` and ``frame.attrs["gap_tuned"]``.
    """
    from mechfin_utils.core import engine
    from mechfin_utils.core.functional import functional_model

    _check_compatible(base, tuned)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; known: {list(COMPONENTS)}")
    base_fm, tuned_fm = functional_model(base), functional_model(tuned)
    runs = {"clean": clean_tokens, "corrupted": corrupted_tokens}

    # 1. reference runs
    base_ld, tuned_ld, patched = {}, {}, {}
    cells = [(layer, component) for layer in range(base_fm.n_layers) for component in components]
    for run, tokens in runs.items():
        base_record = base_fm.record(tokens, keep=("resid_pre",))
        tuned_record = tuned_fm.record(tokens, keep=components)
        base_ld[run] = base_fm.logit_diff(base_record.final_normed, answer_tokens)
        tuned_ld[run] = tuned_fm.logit_diff(tuned_record.final_normed, answer_tokens)
        # 2. one packed base run: every (layer, component) replaced at every position
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
        patched[run] = [
            base_fm.logit_diff(out[:, -1], answer_tokens) for out in engine.run(base_fm, segments, base_record)
        ]
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


# ---------------------------------------------------------------------------------------------------------
# Side-by-side summaries for notebook 08
# ---------------------------------------------------------------------------------------------------------
