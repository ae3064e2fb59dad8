"""One forward pass that keeps only the final position: what every readout in this subpackage reads.

Every task set in mechfin is answered at the final position of each prompt (the fair-lending metric is
``logit(" Yes") - logit(" No")`` there), so direct logit attribution, the logit lens and the FFN readings need
the activations of *one* position. :func:`run_with_final_position_cache` runs the model once with hooks that
cut each requested activation down to its last position as soon as it is produced: what is stored is
O(batch x layers x d_model), not O(batch x pos x ...) as with a full ``run_with_cache``. It returns a
TransformerLens :class:`ActivationCache` (whose ``apply_ln_to_stack`` DLA uses);
:func:`run_last_position` is the same forward pass as a plain ``{hook name: [batch, ...]}`` dictionary, which
is what the projections to the vocabulary use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

from mechfin_utils.core.inputs import check_tokens
from mechfin_utils.core.models import LoadedModel


def _position_axis(hook_name: str) -> int:
    """Which axis of a hook's activation is the (query) position."""
    if hook_name.endswith("hook_pattern") or hook_name.endswith("hook_attn_scores"):
        return 2  # [batch, head, query_pos, key_pos]
    return 1  # [batch, pos, ...]


def run_with_final_position_cache(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"], hook_names: Sequence[str]
) -> tuple[Float[Tensor, "batch d_vocab"], ActivationCache]:
    """Run the model once and keep only the final position of each named hook.

    This is ``run_with_cache(names_filter=...)`` with the position axis cut down to the last position as
    soon as each activation is produced, so nothing of size ``pos`` is stored. The returned
    :class:`ActivationCache` holds each activation with a position axis of length 1 (``[batch, 1, ...]``;
    ``[batch, head, 1, key_pos]`` for attention patterns), which is what TransformerLens's cache methods
    such as ``apply_ln_to_stack`` expect. Returns the final-position logits too.

    Every name must be a hook of the model (TransformerLens names work: ``blocks.3.hook_attn_out``).
    """
    tokens = check_tokens(tokens, model.cfg.d_vocab, model_name=model.name).to(model.cfg.device)
    hook_dict = model.bridge.hook_dict
    missing = [name for name in hook_names if name not in hook_dict]
    if missing:
        raise KeyError(f"{model.name} has no hook named {missing[0]!r} (asked for {len(missing)} unknown hooks)")
    batch, pos = tokens.shape
    store: dict[str, Tensor] = {}

    def keeper(requested_name: str) -> Callable:
        # The bridge fires aliased hooks under their canonical name, so key by the name we asked for.
        axis = _position_axis(requested_name)

        def keep_final_position(activation: Tensor, hook) -> None:
            if activation.ndim <= axis or activation.shape[axis] != pos:
                raise RuntimeError(
                    f"hook {requested_name!r} gave shape {tuple(activation.shape)}; expected position axis "
                    f"{axis} of length {pos}"
                )
            final = activation.narrow(axis, pos - 1, 1).detach().clone()
            if final.shape[0] != batch:  # e.g. a positional embedding broadcast over the batch
                if final.shape[0] != 1:
                    raise RuntimeError(f"hook {requested_name!r} has batch size {final.shape[0]}, not {batch}")
                final = final.expand(batch, *final.shape[1:]).clone()
            store[requested_name] = final

        return keep_final_position

    with torch.no_grad():
        logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[(name, keeper(name)) for name in hook_names])
    not_fired = [name for name in hook_names if name not in store]
    if not_fired:
        raise RuntimeError(f"hooks {not_fired} did not fire during the forward pass of {model.name}")
    return logits[:, -1, :].detach(), ActivationCache(store, model.bridge)


def run_last_position(model: LoadedModel, tokens: Tensor, hook_names: Sequence[str]) -> dict[str, Tensor]:
    """One forward pass keeping only the last position of each named hook ([batch, ...] each).

    Uses :func:`run_with_final_position_cache`, which never stores other positions.
    """
    check_tokens(tokens, model.cfg.d_vocab, model_name=model.name)
    _, cache = run_with_final_position_cache(model, tokens, list(hook_names))
    return {name: cache[name][:, -1] for name in hook_names}
