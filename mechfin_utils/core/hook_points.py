"""Where in a Hugging Face model an analysis reads or writes, and how its weights are saved and put back bit for bit.

Most of mechfin runs the functional forward pass (:mod:`mechfin_utils.core.functional`) through the intervention
engine. Knowledge editing and neuron ablation instead run the **Hugging Face model itself** and reach into it at a
few named places. The TransformerLens bridge wraps the Hugging Face layers *in place*, so its hook points fire on a
forward of ``model.hf_model`` too, and the bridge, the functional forward and the Hugging Face model all read the
same parameters: a weight written here is seen by every analysis until it is restored.

1. **Hook points** (PyTorch modules to hang a forward hook on), per block ``layer``:

   * :func:`key_point` — the input of the MLP's output projection: the MLP's hidden activations, ``[batch, pos,
     d_mlp]``. ROME and MEMIT read their *keys* here; arithmetic neurons are read and zeroed here.
   * :func:`mlp_output_point` — the MLP's output, ``[batch, pos, d_model]`` (what ROME's value replaces).
   * :func:`block_output_point` — the block's output, the residual stream after it (what MEMIT's targets are).
   * :func:`edit_site` — all of a linear map an edit rewrites (:class:`EditSite`: key point, value point, the module
     holding ``W``): a transformer MLP's output projection, or a Mamba mixer's ``out_proj``.

2. **The matrix an edit writes**: :func:`output_projection` is the Hugging Face module of the MLP's output
   projection (Llama ``down_proj``, GPT-2 ``c_proj``) and :func:`output_matrix` its weight as ``W`` with ``mlp_out
   = W @ key (+ bias)``: a *view* of the parameter, so writing it edits the model.

3. **Saving and restoring**: :func:`snapshot` copies the output matrices of some layers; :meth:`WeightSnapshot.
   restore` writes the copies back (``copy_``: the same bits, not a recomputation), and ``with restoring(model,
   layers):`` does both around a block, errors included; ``with restoring_site(site):`` the same for any
   :class:`EditSite`.

4. **Running the Hugging Face model on ragged prompts**: :func:`padded_logits` right-pads rows of different lengths
   and masks the pads (a pad is never read, so each row's logits are those of its own forward);
   :func:`next_token_logits` reads one prompt's next-token logits, and :func:`target_token_ids` tokenises a
   continuation (no BOS: it follows a prompt).

5. **Reading and adding at a hook point**: :func:`reading_keys` collects the keys on every forward (optionally
   stopping the forward there, :class:`KeysRead`, so the layers above are never run), and :func:`adding_at` adds a
   vector to a module's output at given (row, position) pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.core.functional import ModuleTree, unwrap
from mechfin_utils.core.models import LoadedModel

# ---------------------------------------------------------------------------------------------------------
# 1. Hook points
# ---------------------------------------------------------------------------------------------------------


def _blocks(model: LoadedModel) -> Sequence[ModuleTree]:
    """The bridge's blocks. They *are* the Hugging Face model's layers (the bridge wraps them in place), so a
    forward of ``model.hf_model`` runs through their hook points too."""
    blocks: Sequence[ModuleTree] = model.bridge.blocks
    return blocks


def check_layer(model: LoadedModel, layer: int) -> None:
    """A ValueError naming the model unless ``layer`` is an integer block index."""
    n_layers = len(_blocks(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an integer in [0, {n_layers}) for {model.name}, got {layer!r}")


def mlp_output_point(model: LoadedModel, layer: int) -> torch.nn.Module:
    """The hook point on block ``layer``'s MLP output (what ROME's value vector replaces)."""
    check_layer(model, layer)
    point: torch.nn.Module = _blocks(model)[layer].mlp.hook_out
    return point


def block_output_point(model: LoadedModel, layer: int) -> torch.nn.Module:
    """The hook point on block ``layer``'s output: the residual stream after it (what MEMIT's targets are)."""
    check_layer(model, layer)
    point: torch.nn.Module = _blocks(model)[layer].hook_out
    return point


def key_point(model: LoadedModel, layer: int) -> torch.nn.Module:
    """The hook point on the input of the MLP's output projection: the keys."""
    check_layer(model, layer)
    point: torch.nn.Module = _blocks(model)[layer].mlp.out.hook_in
    return point


EDIT_SITES = ("mlp", "mamba_out_proj")
"""The linear maps :func:`edit_site` knows: a transformer MLP's output projection (ROME's ``W_out``), and a Mamba
mixer's output projection ``W_o`` (``out_proj``, the matrix Sharma et al. 2024 edited)."""


@dataclass(frozen=True)
class EditSite:
    """A linear map an edit rewrites, ``value = W @ key (+ bias)``, in block ``layer``: the hook point whose output is
    the key, the hook point whose output is the value, and the Hugging Face module that holds ``W``."""

    name: str
    layer: int
    key_point: torch.nn.Module
    value_point: torch.nn.Module
    projection: ModuleTree

    @property
    def weight(self) -> Float[Tensor, "d_out d_key"]:
        """``W`` as a view of the parameter (``[d_out, d_key]``; GPT-2's ``Conv1D`` stores it transposed)."""
        weight: Tensor = self.projection.weight
        return weight if isinstance(self.projection, torch.nn.Linear) else weight.T

    @property
    def bias(self) -> Tensor | None:
        bias: Tensor | None = getattr(self.projection, "bias", None)
        return bias


def edit_site(model: LoadedModel, layer: int, name: str = "mlp") -> EditSite:
    """Where an edit of ``name`` (one of :data:`EDIT_SITES`) in block ``layer`` reads its keys and writes."""
    check_layer(model, layer)
    block = _blocks(model)[layer]
    if name == "mlp":
        return EditSite(name, layer, key_point(model, layer), mlp_output_point(model, layer), unwrap(block.mlp.out))
    if name == "mamba_out_proj":
        mixer = getattr(block, "mixer", None)
        if mixer is None:
            raise ValueError(f"{model.name}: block {layer} has no Mamba mixer, so no {name!r} edit site")
        return EditSite(name, layer, mixer.out_proj.hook_in, mixer.out_proj.hook_out, unwrap(mixer.out_proj))
    raise ValueError(f"unknown edit site {name!r}; choose from {EDIT_SITES}")


# ---------------------------------------------------------------------------------------------------------
# 2. The matrix an edit writes: the MLP's output projection
# ---------------------------------------------------------------------------------------------------------


def output_projection(model: LoadedModel, layer: int) -> ModuleTree:
    """The Hugging Face module of the MLP's output projection (Llama ``down_proj``, GPT-2 ``c_proj``), whose
    parameters the bridge and the functional forward read."""
    check_layer(model, layer)
    return unwrap(_blocks(model)[layer].mlp.out)


def output_matrix(model: LoadedModel, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """``W`` with ``mlp_out = W @ key (+ bias)``, as a *view* of the parameter: writing it edits the model.

    Llama's ``nn.Linear`` stores ``[d_model, d_mlp]``; GPT-2's ``Conv1D`` stores ``[d_mlp, d_model]`` (transposed).
    """
    module = output_projection(model, layer)
    weight: Tensor = module.weight
    return weight if isinstance(module, torch.nn.Linear) else weight.T


# ---------------------------------------------------------------------------------------------------------
# 3. Saving and restoring the output matrices
# ---------------------------------------------------------------------------------------------------------


@dataclass
class WeightSnapshot:
    """Copies of the output matrices of some layers; :meth:`restore` writes them back bit for bit."""

    saved: dict[int, Tensor]

    def restore(self, model: LoadedModel) -> None:
        with torch.no_grad():
            for layer, weight in self.saved.items():
                output_matrix(model, layer).copy_(weight)


def snapshot(model: LoadedModel, layers: Sequence[int]) -> WeightSnapshot:
    """Save the output matrices of ``layers`` (before an edit)."""
    return WeightSnapshot({layer: output_matrix(model, layer).detach().clone() for layer in sorted(set(layers))})


@contextmanager
def restoring(model: LoadedModel, layers: Sequence[int]) -> Iterator[WeightSnapshot]:
    """``with restoring(model, [l]): rome(...)`` — the weights of ``layers`` are restored on leaving, errors too."""
    saved = snapshot(model, layers)
    try:
        yield saved
    finally:
        saved.restore(model)


@contextmanager
def restoring_site(site: EditSite) -> Iterator[Tensor]:
    """``with restoring_site(site): rome(model, request, site, ...)`` -- the site's matrix is copied back bit for bit
    on leaving, errors too (:func:`restoring` for any edit site, not only MLP output matrices)."""
    saved = site.weight.detach().clone()
    try:
        yield saved
    finally:
        with torch.no_grad():
            site.weight.copy_(saved)


# ---------------------------------------------------------------------------------------------------------
# 4. Running the Hugging Face model on ragged prompts
# ---------------------------------------------------------------------------------------------------------


def _padded(model: LoadedModel, rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ``[batch, pos]`` ids and their attention mask (pads are never read)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def padded_logits(model: LoadedModel, rows: Sequence[Sequence[int]]) -> Float[Tensor, "batch pos d_vocab"]:
    """The Hugging Face model's logits on token-id rows of any lengths (right-padded, pads masked)."""
    ids, mask = _padded(model, rows)
    logits: Tensor = model.hf_model(input_ids=ids, attention_mask=mask).logits
    return logits


@torch.no_grad()
def next_token_logits(model: LoadedModel, prompt: str) -> Float[Tensor, " d_vocab"]:
    """The logits of the token after ``prompt`` (with the model's BOS decision)."""
    return padded_logits(model, [model.token_ids(prompt)])[0, -1]


def target_token_ids(model: LoadedModel, target: str, label: str) -> list[int]:
    """The token ids of ``target`` as a continuation (no BOS); an empty target is a ValueError naming ``label``."""
    ids = list(model.tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"{label}: the target {target!r} is empty")
    return ids


# ---------------------------------------------------------------------------------------------------------
# 5. Reading and adding at a hook point
# ---------------------------------------------------------------------------------------------------------


class KeysRead(Exception):
    """Raised by a key reader with ``stop=True`` once it has the keys: the layers above are never run."""


@contextmanager
def reading_keys(model: LoadedModel, layer: int | EditSite, stop: bool = False) -> Iterator[list[Tensor]]:
    """Collect the input of the layer's output projection (the keys, ``[batch, pos, d_mlp]``) on every forward;
    with ``stop``, end each forward there (the caller catches :class:`KeysRead`). ``layer`` may be an
    :class:`EditSite` (another projection's keys)."""
    seen: list[Tensor] = []

    def read(module: torch.nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        seen.append(out.detach())
        if stop:
            raise KeysRead

    point = layer.key_point if isinstance(layer, EditSite) else key_point(model, layer)
    handle = point.register_forward_hook(read)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def adding_at(module: torch.nn.Module, rows: Tensor, positions: Tensor, delta: Tensor) -> Iterator[None]:
    """Add ``delta`` (``[d_model]``) to ``module``'s output at ``(rows[i], positions[i])`` on every forward."""

    def add(m: torch.nn.Module, args: tuple[Any, ...], output: Tensor | tuple[Any, ...]) -> Tensor | tuple[Any, ...]:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[rows, positions] = hidden[rows, positions] + delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
