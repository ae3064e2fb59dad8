"""Causal tracing over a model's own modules, with forward hooks: one tracer for transformers and for Mamba.

The project's tracer (:mod:`mechfin_utils.methods.tracing.causal_trace`) restores the states a transformer has
(residual stream, attention output, MLP output) through TransformerLens hook names or the functional engine. A Mamba
block has no attention and no MLP: a block is ``h + W_o((conv+SSM)(W_a x) ⊙ SiLU(W_g x))`` with ``x`` the normed
residual. Sharma, Atkinson & Bau (2024) traced its residual stream, the mixer's output and, inside the mixer, the
SSM path and the gate. This module traces any of those with the same noise, restorations and score as ROME's
tracing, by hanging hooks on the Hugging Face modules that compute them, named by a **component map** per
architecture (:data:`COMPONENT_MAPS`, keyed by the Hugging Face ``config.model_type``):

============  =======================================  ==========================================================
architecture  component                                the module, and what of it is restored
============  =======================================  ==========================================================
llama         ``hidden``: residual after block *l*     the decoder layer's output
llama         ``mlp``: MLP output                      ``mlp``'s output
llama         ``attn``: attention output               ``self_attn``'s output
mamba         ``hidden``: residual after block *l*     the Mamba block's output
mamba         ``mixer``: mixer output ``W_o(s ⊙ g)``    ``mixer``'s output (Sharma et al.'s *o*)
mamba         ``gated``: ``s ⊙ g``, the input of W_o   ``mixer.out_proj``'s input: what a ROME edit of W_o reads
mamba         ``gate``: ``W_g x`` (g = SiLU of it)      the second half of ``mixer.in_proj``'s output
mamba         ``ssm_in``: ``W_a x``, the SSM path's     the first half of ``mixer.in_proj``'s output
              input before the convolution
============  =======================================  ==========================================================

Restoring ``gate`` at position *p* restores Sharma et al.'s *g* there exactly (the SiLU acts position by position).
Their *s* -- the convolution and SSM output before gating -- is not the output or input of any Hugging Face module
(``MambaMixer`` computes it inline and multiplies it by the gate before ``out_proj``), and recovering it as
``(s ⊙ g) / g`` divides by gates near zero; so *s* alone is not traced here, ``gated`` (``s ⊙ g``) is.

Stages (:func:`trace_components`): (1) one clean forward records every component named, at every layer and position;
(2) every (noise sample, restoration) pair is a row of a batch: the same seeded Gaussian noise as the project's tracer
(:func:`~mechfin_utils.methods.tracing.noise.sample_subject_noise`) is added to the subject's input embeddings, and
each restoration's (component, layer, position) sites are overwritten with their clean values by hooks;
(3) the score is the answer's probability at the last position
(:func:`~mechfin_utils.methods.tracing.prepared.score_final_logits`), averaged over noise samples, as a
:class:`~mechfin_utils.methods.tracing.causal_trace.TraceResult` per component, so the category averages, intervals
and figures of the project apply unchanged. Windows and positions follow the project's tracer: hidden states one
layer at a time, the other components in :func:`~mechfin_utils.methods.tracing.prepared.default_trace_window`
layers; positions from the first subject token on.

The tracer reads modules through ``model.hf_model``: on a TransformerLens bridge those are the bridge's wrappers,
whose outputs are the Hugging Face modules' outputs (tested against the project's functional engine on a Llama and
against known answers on a Mamba).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.methods.tracing.category_averages import CategoryAverage, average_by_position_category
from mechfin_utils.methods.tracing.causal_trace import TraceResult, trace_results
from mechfin_utils.methods.tracing.noise import (
    DEFAULT_NOISE_MULTIPLIER,
    DEFAULT_SEED,
    embedding_noise_std,
    sample_subject_noise,
)
from mechfin_utils.methods.tracing.prepared import (
    PreparedTrace,
    default_trace_window,
    layer_window,
    prepare_trace,
    score_final_logits,
)
from mechfin_utils.tasks.facts import TraceTask

if TYPE_CHECKING:  # pragma: no cover
    from mechfin_utils.core.models import LoadedModel

# ---------------------------------------------------------------------------------------------------------
# The component maps
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """A state of block ``l``: the module at ``path`` inside the block (``""``: the block itself), its output or its
    input, all of its last dimension or one half of it."""

    name: str
    label: str
    path: str
    read: Literal["output", "input"] = "output"
    channels: Literal["all", "first_half", "second_half"] = "all"

    def part(self, value: Tensor) -> Tensor:
        """The restored part of the module's tensor ``[..., width]``: all of it, or one half of its last dim."""
        if self.channels == "all":
            return value
        half = value.shape[-1] // 2
        return value[..., :half] if self.channels == "first_half" else value[..., half:]


@dataclass(frozen=True)
class ComponentMap:
    """Where an architecture's blocks and input embedding are in its Hugging Face model, and its components."""

    architecture: str
    blocks: str
    embedding: str
    components: tuple[Component, ...]

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise ValueError(
            f"{self.architecture} has no component {name!r}; choose from {[c.name for c in self.components]}"
        )


COMPONENT_MAPS: dict[str, ComponentMap] = {
    "llama": ComponentMap(
        "llama",
        "model.layers",
        "model.embed_tokens",
        (
            Component("hidden", "hidden state (block output)", ""),
            Component("mlp", "MLP output", "mlp"),
            Component("attn", "attention output", "self_attn"),
        ),
    ),
    "mamba": ComponentMap(
        "mamba",
        "backbone.layers",
        "backbone.embeddings",
        (
            Component("hidden", "hidden state (block output)", ""),
            Component("mixer", "mixer output W_o(s*g)", "mixer"),
            Component("gated", "gated SSM output s*g (input of W_o)", "mixer.out_proj", read="input"),
            Component("gate", "gate branch W_g x", "mixer.in_proj", channels="second_half"),
            Component("ssm_in", "SSM-path input W_a x", "mixer.in_proj", channels="first_half"),
        ),
    ),
}
COMPONENT_LABELS: dict[str, str] = {c.name: c.label for m in COMPONENT_MAPS.values() for c in m.components}
"""Component name -> label, for figures (the names are shared across architectures where they mean the same)."""


def component_map(model: LoadedModel) -> ComponentMap:
    """The map of the model's architecture (a ValueError naming the model and the architectures mapped)."""
    model_type = getattr(model.hf_model.config, "model_type", None)
    if model_type not in COMPONENT_MAPS:
        raise ValueError(
            f"{model.name}: no component map for architecture {model_type!r}; mapped: {sorted(COMPONENT_MAPS)}"
        )
    return COMPONENT_MAPS[model_type]


def _get(root: Any, path: str) -> torch.nn.Module:
    module = root
    for name in filter(None, path.split(".")):
        module = module[int(name)] if name.isdigit() else getattr(module, name)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{path!r} is a {type(module).__name__}, not a module")
    return module


def component_module(model: LoadedModel, component: Component, layer: int) -> torch.nn.Module:
    """The module a component of block ``layer`` is read from."""
    mapping = component_map(model)
    blocks = _get(model.hf_model, mapping.blocks)
    if not 0 <= layer < len(blocks):  # type: ignore[arg-type]
        raise ValueError(f"{model.name}: layer {layer} is outside [0, {len(blocks)})")  # type: ignore[arg-type]
    block = blocks[layer]  # type: ignore[index]
    return _get(block, component.path) if component.path else block


def n_blocks(model: LoadedModel) -> int:
    return len(_get(model.hf_model, component_map(model).blocks))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Reading and writing a component with hooks
# ---------------------------------------------------------------------------------------------------------


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value: Any, tensor: Tensor) -> Any:
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


@contextmanager
def hooked(module: torch.nn.Module, component: Component, edit: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """Call ``edit`` on the component's tensor (the module's output or input, ``[batch, pos, width]``) on every
    forward; a tensor returned replaces it (a view of one half is edited in place on a copy)."""

    def apply(value: Any) -> Any:
        tensor = _first(value)
        if component.channels == "all":
            new = edit(tensor)
            return None if new is None else _replace_first(value, new)
        copy = tensor.clone()
        new = edit(component.part(copy))
        if new is None:
            return None
        component.part(copy).copy_(new)
        return _replace_first(value, copy)

    if component.read == "output":
        handle = module.register_forward_hook(lambda m, args, out: apply(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: apply(args))
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------
# The clean run and the restored runs
# ---------------------------------------------------------------------------------------------------------

Site = tuple[str, int, int]
"""(component name, layer, position)."""


def _last_logits(model: LoadedModel, tokens: Tensor) -> Float[Tensor, "batch d_vocab"]:
    return model.hf_model(input_ids=tokens).logits[:, -1, :]


@torch.no_grad()
def clean_components(
    model: LoadedModel, prepared: PreparedTrace, names: Sequence[str]
) -> tuple[dict[tuple[str, int], Float[Tensor, "pos width"]], Float[Tensor, " d_vocab"]]:
    """One clean forward: every named component at every layer (``[pos, width]``), and the last position's logits."""
    mapping = component_map(model)
    store: dict[tuple[str, int], Tensor] = {}
    with _stack() as stack:
        for name in names:
            component = mapping.component(name)
            for layer in range(n_blocks(model)):

                def keep(value: Tensor, key: tuple[str, int] = (name, layer)) -> None:
                    store[key] = value[0].detach().clone()

                stack(hooked(component_module(model, component, layer), component, keep))
        logits = _last_logits(model, prepared.tokens[None])
    return store, logits[0]


@contextmanager
def _stack() -> Iterator[Callable[[Any], None]]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield stack.enter_context


@torch.no_grad()
def run_component_restorations(
    model: LoadedModel,
    prepared: PreparedTrace,
    noise: Float[Tensor, "sample subject_pos d_model"],
    restorations: Sequence[Sequence[Site]],
    *,
    clean: Mapping[tuple[str, int], Tensor] | None = None,
    batch_size: int = 256,
) -> Float[Tensor, "sample restoration"]:
    """Score every restoration (a set of sites; empty = the corrupted run) under every noise sample.

    Each row of a batch is one (restoration, sample): that sample's noise is added to the subject's input embeddings
    (the embedding module's output) and each site's component is overwritten, at its position, by its clean value.
    """
    # 1. checks, and the clean values of every component restored
    mapping = component_map(model)
    n_subject = prepared.subject_span[1] - prepared.subject_span[0]
    d_model = int(model.hf_model.config.hidden_size)
    if noise.ndim != 3 or tuple(noise.shape[1:]) != (n_subject, d_model):
        raise ValueError(
            f"{prepared.task.label}: noise must be [sample, {n_subject}, {d_model}], got {tuple(noise.shape)}"
        )
    for sites in restorations:
        for name, layer, pos in sites:
            mapping.component(name)
            if not 0 <= pos < prepared.n_tokens or not 0 <= layer < n_blocks(model):
                raise ValueError(f"{prepared.task.label}: site {(name, layer, pos)} is outside the prompt or model")
    names = sorted({name for sites in restorations for name, _, _ in sites})
    if clean is None:
        clean, _ = clean_components(model, prepared, names)
    embedding = _get(model.hf_model, mapping.embedding)
    subject = torch.arange(*prepared.subject_span)
    n_samples = noise.shape[0]
    rows = [(r, s) for r in range(len(restorations)) for s in range(n_samples)]
    scores = torch.empty(n_samples, len(restorations))
    # 2. batches of rows: noise on the embeddings, clean values written site by site
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        row_noise = noise[torch.tensor([s for _, s in chunk])].to(torch.float32)
        by_module: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for row, (r, _) in enumerate(chunk):
            for name, layer, pos in restorations[r]:
                at_rows, at_pos = by_module.setdefault((name, layer), ([], []))
                at_rows.append(row)
                at_pos.append(pos)

        def add_noise(value: Tensor, row_noise: Tensor = row_noise) -> Tensor:
            value = value.clone()
            value[:, subject] += row_noise.to(value.dtype)
            return value

        with _stack() as stack:
            stack(hooked(embedding, Component("embedding", "input embedding", ""), add_noise))
            for (name, layer), (at_rows, at_pos) in by_module.items():
                component = mapping.component(name)
                rows_index, pos_index = torch.tensor(at_rows), torch.tensor(at_pos)
                values = clean[(name, layer)][pos_index]

                def restore(value: Tensor, r: Tensor = rows_index, p: Tensor = pos_index, v: Tensor = values) -> Tensor:
                    value = value.clone()
                    value[r, p] = v.to(value.dtype)
                    return value

                stack(hooked(component_module(model, component, layer), component, restore))
            # 3. the score of each row
            final = _last_logits(model, prepared.tokens[None].expand(len(chunk), -1))
        chunk_scores = score_final_logits(prepared, final).cpu()
        for row, (r, s) in enumerate(chunk):
            scores[s, r] = chunk_scores[row]
    return scores


# ---------------------------------------------------------------------------------------------------------
# One prompt's trace per component
# ---------------------------------------------------------------------------------------------------------


def default_windows(model: LoadedModel, names: Sequence[str]) -> dict[str, int]:
    """Hidden states one layer at a time; every other component in ROME's window scaled to the depth."""
    return {name: 1 if name == "hidden" else default_trace_window(n_blocks(model)) for name in names}


def trace_components(
    model: LoadedModel,
    task: TraceTask | PreparedTrace,
    components: Sequence[str] | None = None,
    *,
    windows: Mapping[str, int] | None = None,
    n_samples: int = 10,
    noise_std: float | None = None,
    noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
    seed: int = DEFAULT_SEED,
    positions: str | Sequence[int] = "from_subject",
    batch_size: int = 256,
) -> dict[str, TraceResult]:
    """A ``[pos, layer]`` trace per component (default: every component of the model's map), all sharing one
    corrupted baseline and one set of noise samples. Arguments as
    :func:`~mechfin_utils.methods.tracing.causal_trace.causal_trace`."""
    prepared = task if isinstance(task, PreparedTrace) else prepare_trace(model, task)
    mapping = component_map(model)
    names = list(components) if components is not None else [c.name for c in mapping.components]
    for name in names:
        mapping.component(name)
    if not names:
        raise ValueError("components must name at least one component")
    n_layers = n_blocks(model)
    win = default_windows(model, names)
    win.update({k: int(v) for k, v in (windows or {}).items() if k in names})
    if noise_std is None:
        noise_std = embedding_noise_std(model)
    if positions == "from_subject":
        run_positions = list(range(prepared.subject_span[0], prepared.n_tokens))
    elif positions == "all":
        run_positions = list(range(prepared.n_tokens))
    elif isinstance(positions, str):
        raise ValueError(f"positions must be 'from_subject', 'all' or a list of ints, got {positions!r}")
    else:
        run_positions = sorted({int(p) for p in positions})

    t0 = time.perf_counter()
    d_model = int(model.hf_model.config.hidden_size)
    noise = sample_subject_noise(
        n_samples, prepared.subject_span[1] - prepared.subject_span[0], d_model, noise_multiplier * noise_std, seed
    )
    restorations: list[list[Site]] = [[]]
    index: list[tuple[str, int, int]] = []
    for name in names:
        for pos in run_positions:
            for layer in range(n_layers):
                restorations.append([(name, l, pos) for l in layer_window(layer, win[name], n_layers)])
                index.append((name, pos, layer))
    clean, clean_logits = clean_components(model, prepared, names)
    clean_score = float(score_final_logits(prepared, clean_logits[None])[0])
    scores = run_component_restorations(model, prepared, noise, restorations, clean=clean, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    return trace_results(
        model.name,
        prepared,
        names,
        win,
        n_layers,
        index,
        scores.mean(dim=0),
        clean_score,
        n_samples,
        noise_multiplier * noise_std,
        seconds,
    )


# ---------------------------------------------------------------------------------------------------------
# A set of prompts
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ComponentTraces:
    """Every prompt's trace per component, the averages by position category, and the seconds spent."""

    model_name: str
    traces: dict[str, list[TraceResult]]
    averages: dict[str, CategoryAverage]
    seconds: float


def trace_dataset_components(
    model: LoadedModel,
    tasks: Sequence[TraceTask | PreparedTrace],
    components: Sequence[str] | None = None,
    *,
    n_samples: int = 10,
    noise_std: float | None = None,
    **trace_kwargs: Any,
) -> ComponentTraces:
    """:func:`trace_components` on every prompt (all prepared first, so a bad row raises before any compute), then
    ROME's averages by position category (:func:`~mechfin_utils.methods.tracing.category_averages.
    average_by_position_category`, which keeps each prompt's own values for intervals over prompts)."""
    prepared = [t if isinstance(t, PreparedTrace) else prepare_trace(model, t) for t in tasks]
    if not prepared:
        raise ValueError(f"{model.name}: no prompts to trace")
    if noise_std is None:
        noise_std = embedding_noise_std(model)
    t0 = time.perf_counter()
    traces: dict[str, list[TraceResult]] = {}
    for p in prepared:
        for name, result in trace_components(
            model, p, components, n_samples=n_samples, noise_std=noise_std, **trace_kwargs
        ).items():
            traces.setdefault(name, []).append(result)
    averages = {name: average_by_position_category(results) for name, results in traces.items()}
    return ComponentTraces(model.name, traces, averages, time.perf_counter() - t0)
