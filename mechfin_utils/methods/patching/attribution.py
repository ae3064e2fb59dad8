"""Attribution patching: a gradient-based, one-backward-pass estimate of activation patching.

Context
-------
Activation patching (``mechfin_utils.methods.patching.activation``, TransformerLens's ``patching``) answers, for every component
``c``: *if the corrupted run had component c's clean activation, how far would the metric move?*

    exact(c) = metric(corrupted run with a_c := a_c^clean) - metric(corrupted run)

That costs one forward pass per component. Attribution patching (Nanda, "Attribution patching: activation
patching at industrial scale", 2023; Syed, Rager & Conmy, "AtP", 2023) replaces the patched run by the
first-order Taylor expansion of the metric around the corrupted run:

    attribution(c) = sum over c's features of (a_c^clean - a_c^corrupted) * d metric / d a_c |corrupted run

All components come from one clean forward (its activations), one corrupted forward (its activations) and
one backward pass from the metric (the gradient at every component at once).

Direction and scale
-------------------
The convention is exactly activation patching's: clean values are patched *into the corrupted run*, and the
gradient is taken *on the corrupted run*. The result estimates ``metric(patched) - metric(corrupted)``. With
the paper's metric :class:`mechfin_utils.core.metrics.NormalisedLogitDiff` the corrupted run scores 0, so the
attribution is directly comparable with the normalised exact result (0 = does nothing, 1 = restores the
clean answer). For any other metric, subtract ``result.corrupted_metric`` from exact values before comparing.

When the linearisation holds and when it breaks
-----------------------------------------------
The estimate is exact to first order in the size of the patch (``tests/test_attribution.py`` checks it
against the finite-difference slope of TransformerLens's own patching). It is unreliable where the
metric is strongly curved along ``a_clean - a_corrupted``: saturated attention softmaxes (gradients near 0
although a full patch flips the pattern), large patches early in the residual stream (where a token
swap is a large, non-local change), and MLP 0 in GPT-2 (which acts like an extended embedding). Use
:func:`compare_attribution_with_exact` on a subset of exact results to see where it holds.

Output layout (identical to ``transformer_lens.patching.get_act_patch_<key>``)
------------------------------------------------------------------------------
Each result is keyed by the name of the TransformerLens function it approximates, with that function's
output shape: the same keys, hooks and shapes as exact patching (both use one registry, :data:`COMPONENTS`
of :mod:`mechfin_utils.methods.patching.components`, with the table and the axis names of every key), so an
attribution result and an exact one can be compared cell by cell. The ``*_all_pos`` residual/output keys
have no TransformerLens counterpart; ``resid_pre_all_pos[0]`` estimates clean - corrupted (1 when normalised).

Two conventions to keep in mind:

* The pattern by position is ``[layer, head, dest_pos]``: that is what
  ``get_act_patch_attn_head_pattern_by_pos`` returns (its index axes are ``layer, head_index, dest_pos``).
  Only TransformerLens's stacking helper ``get_act_patch_attn_head_by_pos_every`` rearranges it to
  ``[layer, dest_pos, head]``; :data:`COMPONENTS` records the axis names of every key.
* On grouped-query-attention models (the embedded SmolLM2: 9 query heads, 3 key/value heads) the bridge's
  ``hook_k`` / ``hook_v`` hold the *un-repeated* key/value heads, ``[batch, pos, n_key_value_heads,
  d_head]``; TransformerLens's k/v patching indexes that axis, so k/v results have ``n_key_value_heads``
  entries on their head axis. Patching one key/value head changes every query head of its group, and so
  does its attribution (the gradient accumulates over the group).

resid_mid: two meanings, chosen explicitly
------------------------------------------
In the bridge, ``blocks.L.hook_resid_mid`` is an alias of ``blocks.L.ln2.hook_in``: the hook sits on the
MLP branch's input, and the skip connection carries the *unhooked* tensor past it. TransformerLens's
``get_act_patch_resid_mid`` therefore measures two different things depending on the grad mode: with
gradients enabled (its default) its hook copies the activation before writing, so only what the MLP reads
is patched; under ``torch.no_grad()`` it writes in place into the tensor the skip connection also carries,
so the whole residual stream is patched (HookedTransformer's meaning; patching every position of the last
layer's ``resid_mid`` then restores the clean logits exactly). ``attribution_patch`` makes the choice
explicit with ``resid_mid_semantics``: ``"residual_stream"`` (default; the linear estimate of TransformerLens
under ``torch.no_grad()``; ``mechfin_utils.methods.patching.activation`` computes that meaning too) or ``"mlp_input"`` (of
TransformerLens with gradients). Note that an exact ``"mlp_input"`` patch makes the MLP output its clean
value at that position and nothing else, i.e. it *is* the ``mlp_out`` patch; only the linear estimates of
the two differ. Every other hook here is read by nothing but its own consumers, so the two modes agree for
them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor
from transformer_lens.utilities import get_act_name

from mechfin_utils.core.arrays import as_checked_array
from mechfin_utils.core.inputs import check_token_pairs
from mechfin_utils.methods.patching.bridge_path import bridge_of
from mechfin_utils.methods.patching.components import COMPONENTS
from mechfin_utils.methods.patching.results import Reduce

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor]
ResidMidSemantics = Literal["residual_stream", "mlp_input"]


# -----------------------------------------------------------------------------------------------------------
# Which components exist, and how each sums the per-feature products into its cells
# -----------------------------------------------------------------------------------------------------------


WHOLE_LAYER_KEYS = ("resid_pre_all_pos", "resid_mid_all_pos", "attn_out_all_pos", "mlp_out_all_pos")
"""Keys with no TransformerLens counterpart (one cell per layer: every position patched at once)."""

TRANSFORMER_LENS_KEYS = tuple(k for k in COMPONENTS if k not in WHOLE_LAYER_KEYS)
"""Keys with a ``transformer_lens.patching.get_act_patch_<key>`` counterpart."""


class Attributions(dict):
    """``{component key: attribution tensor}``, plus the two metric values the estimate is anchored on.

    corrupted_metric: the metric on the unpatched corrupted run (the Taylor expansion point; 0 for
                      :class:`~mechfin_utils.core.metrics.NormalisedLogitDiff`). Scalar, or ``[batch]`` under
                      ``reduce="none"``.
    clean_metric:     the metric on the clean run (1 for ``NormalisedLogitDiff``), same shape; None when a
                      ``clean_cache`` was passed in (no clean forward is run then).
    """

    corrupted_metric: Tensor
    clean_metric: Tensor | None


# -----------------------------------------------------------------------------------------------------------
# The generic function
# -----------------------------------------------------------------------------------------------------------


def attribution_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: MetricFn,
    components: Sequence[str] | None = None,
    *,
    reduce: Reduce = "scalar",
    clean_cache: Mapping[str, Tensor] | None = None,
    resid_mid_semantics: ResidMidSemantics = "residual_stream",
) -> Attributions:
    """Attribution-patching estimates for many component types from one forward + backward pass.

    For every requested component (see the module docstring for keys and shapes) and every cell of its
    result, computes ``sum((a_clean - a_corrupted) * d metric / d a)`` over the cell's features, with the
    gradient taken on the corrupted run: the linear estimate of what
    ``transformer_lens.patching.get_act_patch_<key>(model, corrupted_tokens, clean_cache, metric)`` returns,
    minus the corrupted run's metric.

    Args:
        model: a :class:`~mechfin_utils.core.models.LoadedModel` or a TransformerBridge (compatibility mode, eval).
        clean_tokens: ``[batch, pos]`` token ids of the clean prompts.
        corrupted_tokens: ``[batch, pos]`` token ids of the corrupted prompts, same shape.
        metric: maps logits ``[batch, pos, d_vocab]`` to a differentiable scalar (``reduce="scalar"``, e.g.
            :class:`~mechfin_utils.core.metrics.NormalisedLogitDiff`) or to one value per prompt, ``[batch]``
            (``reduce="mean"`` / ``"none"``).
        components: keys of :data:`COMPONENTS` (default: all of them). Each distinct hook is captured once,
            so asking for more components costs memory, not passes.
        reduce: ``"scalar"``: results ``[*axes]``. ``"none"``: per-prompt results ``[*axes, batch]`` (the
            metric's value for prompt ``b`` depends only on prompt ``b``'s forward, so one backward from the
            sum of the per-prompt values gives every prompt's own gradient). ``"mean"``: their batch mean.
        clean_cache: the clean run's activations, when already computed (e.g. for exact patching); it must
            hold every hook the components need, and ``clean_tokens`` is then not run. Default: one clean
            forward here.
        resid_mid_semantics: what patching ``resid_mid`` means (see "resid_mid" in the module docstring).
            ``"residual_stream"`` (default): the residual stream between attention and MLP, read by the MLP
            *and* carried on by the skip connection (HookedTransformer's meaning). ``"mlp_input"``: only
            what the MLP branch reads, which is what TransformerLens's ``get_act_patch_resid_mid`` does on
            a bridge when run with gradients enabled.

    Returns:
        :class:`Attributions`: a dict ``{key: tensor}`` with the metric on the corrupted and clean runs.
    """
    bridge = bridge_of(model)
    check_token_pairs(clean_tokens, corrupted_tokens, model.cfg.d_vocab, model_name=getattr(model, "name", "the model"))
    keys = _check_components(components)
    if reduce not in ("scalar", "mean", "none"):
        raise ValueError(f"reduce must be 'scalar', 'mean' or 'none', got {reduce!r}")
    if resid_mid_semantics not in ("residual_stream", "mlp_input"):
        raise ValueError(f"resid_mid_semantics must be 'residual_stream' or 'mlp_input', got {resid_mid_semantics!r}")
    training = [name for name, module in bridge.named_modules() if module.training]
    if training:
        raise ValueError(
            f"attribution_patch needs the model in eval mode (dropout would make the two runs random); "
            f"{len(training)} modules are training, e.g. {training[0]!r}: call model.eval()"
        )

    n_layers = bridge.cfg.n_layers
    hook_names = list(dict.fromkeys(COMPONENTS[k].hook_name(layer) for k in keys for layer in range(n_layers)))
    batch = corrupted_tokens.shape[0]

    # 1. Clean activations (no gradients needed).
    clean_metric = None
    if clean_cache is None:
        with torch.no_grad():
            clean_logits, clean_cache = bridge.run_with_cache(clean_tokens, names_filter=hook_names)
            clean_metric = _checked_metric(metric, clean_logits, reduce, batch, "clean").detach()
    else:
        missing = [name for name in hook_names if name not in clean_cache]
        if missing:
            raise KeyError(f"clean_cache lacks {len(missing)} hooks the components need, e.g. {missing[:3]}")

    # 2. Corrupted forward with every needed activation captured in the autograd graph, then one backward.
    with torch.enable_grad():
        shared_tensor_hooks = set()
        if resid_mid_semantics == "residual_stream":
            shared_tensor_hooks = {get_act_name("resid_mid", layer) for layer in range(n_layers)}
        captured = _CapturedActivations(hook_names, differentiate_input_of=shared_tensor_hooks)
        corrupted_logits = bridge.run_with_hooks(corrupted_tokens, fwd_hooks=captured.hooks())
        corrupted_metric = _checked_metric(metric, corrupted_logits, reduce, batch, "corrupted")
        if not corrupted_metric.requires_grad:
            raise ValueError(
                "the metric's value does not depend differentiably on the logits (was it detached, "
                "or computed with .item()/numpy?); attribution patching needs its gradient"
            )
        activations = captured.in_order()
        gradients = torch.autograd.grad(corrupted_metric.sum(), activations, allow_unused=True)

    # 3. Per hook: (clean - corrupted) * gradient; per component: sum into cells and stack over layers.
    products: dict[str, Tensor] = {}
    for name, act, grad in zip(hook_names, activations, gradients):
        if grad is None:
            raise RuntimeError(
                f"{name} fired but the metric does not depend on it: this bridge computes that activation "
                "beside the forward pass rather than in it, so neither patching nor attribution can use it"
            )
        clean_act = clean_cache[name].to(act.device)
        if clean_act.shape != act.shape:
            raise ValueError(f"{name}: clean activation {tuple(clean_act.shape)} != corrupted {tuple(act.shape)}")
        products[name] = (clean_act - act.detach()) * grad

    results = Attributions()
    for key in keys:
        component = COMPONENTS[key]
        per_layer = [
            einops.reduce(products[component.hook_name(L)], component.reduction, "sum") for L in range(n_layers)
        ]
        stacked = torch.stack(per_layer, dim=0)  # [layer, batch, *cell axes]
        results[key] = _combine_batch(stacked, reduce)
    results.corrupted_metric = corrupted_metric.detach()
    results.clean_metric = clean_metric
    return results


# -----------------------------------------------------------------------------------------------------------
# Comparing with exact patching
# -----------------------------------------------------------------------------------------------------------


def gather_cells(values: Tensor, index_df: pd.DataFrame) -> Float[Tensor, " n_rows"]:
    """The entries of a full result tensor at the rows of a TransformerLens ``index_df``.

    TransformerLens's ``get_act_patch_*(..., index_df=df, index_axis_names=None)`` patches only the rows of
    ``df`` and returns one value per row. Its columns name the result's axes in order (``layer, pos, head``;
    ``layer, head_index, dest_pos`` for patterns), so row ``i`` of the exact result corresponds to
    ``values[tuple(df.iloc[i])]`` here.
    """
    if index_df.shape[1] != values.ndim:
        raise ValueError(
            f"index_df has {index_df.shape[1]} columns {list(index_df.columns)} but the result has "
            f"{values.ndim} axes (shape {tuple(values.shape)})"
        )
    columns = []
    for axis, (column, size) in enumerate(zip(index_df.columns, values.shape)):
        idx = torch.tensor(index_df[column].to_numpy(dtype=np.int64, copy=True))
        bad = ((idx < 0) | (idx >= size)).nonzero().flatten()
        if len(bad):
            row = int(bad[0])
            raise IndexError(f"index_df row {row}: {column}={int(idx[row])} is outside axis {axis} of size {size}")
        columns.append(idx.to(values.device))
    return values[tuple(columns)]


def compare_attribution_with_exact(
    attribution: Mapping[str, Tensor | np.ndarray],
    exact: Mapping[str, Tensor | np.ndarray],
    top_k: int = 10,
    components: Sequence[str] | None = None,
) -> pd.DataFrame:
    """How well the linear estimate tracks exact patching, one row per component type.

    Both arguments map a component key to values of the same shape (full results, or the same cells
    picked out with :func:`gather_cells`). Exact values must be on the attribution's scale, i.e. with
    the corrupted run's metric subtracted (nothing to subtract for ``NormalisedLogitDiff``).

    Columns:
        component, n_cells
        pearson, spearman:     correlation over all cells (NaN when either side is constant).
        top_k:                 the k used, ``min(top_k, n_cells)``.
        top_k_overlap:         fraction of the k largest-|exact| cells that are also among the k
                               largest-|attribution| cells (ties broken by position, first wins).
        sign_agreement:        fraction of cells where both have the same sign (zero counts as a sign).
        sign_agreement_top_k:  the same over the k largest-|exact| cells, the ones a reader looks at.
        max_abs_error:         max |attribution - exact|.
        mean_abs_error:        mean |attribution - exact|.
        max_abs_exact:         max |exact|, the scale the errors should be read against.

    Args:
        components: keys to compare (default: every key of ``exact``); each must be in both mappings.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    keys = list(exact) if components is None else list(components)
    if not keys:
        raise ValueError("nothing to compare: exact is empty and no components were named")
    rows = []
    for key in keys:
        for side, mapping in (("attribution", attribution), ("exact", exact)):
            if key not in mapping:
                raise KeyError(f"component {key!r} is missing from {side} (it has {sorted(mapping)})")
        a = as_checked_array(attribution[key], f"attribution[{key!r}]").reshape(-1)
        e = as_checked_array(exact[key], f"exact[{key!r}]").reshape(-1)
        a_shape, e_shape = np.shape(attribution[key]), np.shape(exact[key])
        if tuple(a_shape) != tuple(e_shape):
            raise ValueError(f"component {key!r}: attribution shape {tuple(a_shape)} != exact shape {tuple(e_shape)}")
        k = min(top_k, a.size)
        top_exact = _top_k_indices(e, k)
        top_attr = _top_k_indices(a, k)
        rows.append(
            {
                "component": key,
                "n_cells": a.size,
                "pearson": _pearson(a, e),
                "spearman": _spearman(a, e),
                "top_k": k,
                "top_k_overlap": len(set(top_exact) & set(top_attr)) / k,
                "sign_agreement": float(np.mean(np.sign(a) == np.sign(e))),
                "sign_agreement_top_k": float(np.mean(np.sign(a[top_exact]) == np.sign(e[top_exact]))),
                "max_abs_error": float(np.max(np.abs(a - e))),
                "mean_abs_error": float(np.mean(np.abs(a - e))),
                "max_abs_exact": float(np.max(np.abs(e))),
            }
        )
    return pd.DataFrame(rows)


# -----------------------------------------------------------------------------------------------------------
# Helpers
# -----------------------------------------------------------------------------------------------------------


class _CapturedActivations:
    """Forward hooks that keep each hooked activation, as the graph sees it, for ``torch.autograd.grad``.

    By default the gradient is taken with respect to what the hook *returns* (a fresh tensor), which is
    exactly what patching the hook replaces. For the hooks in ``differentiate_input_of`` it is taken with
    respect to the tensor the hook *receives*, so that every reader of that tensor counts, including readers
    that bypass the hook (the residual skip connection around an aliased ``ln2.hook_in``).
    """

    def __init__(self, hook_names: Iterable[str], differentiate_input_of: Iterable[str] = ()):
        self.names = list(hook_names)
        self.differentiate_input_of = set(differentiate_input_of)
        self.values: dict[str, Tensor] = {}

    def hooks(self) -> list[tuple[str, Callable]]:
        return [(name, self._hook_for(name)) for name in self.names]

    def _hook_for(self, name: str) -> Callable:
        def capture(activation: Tensor, hook: object) -> Tensor | None:
            if name in self.values:
                raise RuntimeError(f"{name} fired twice in one forward pass; its activation is ambiguous")
            if not activation.requires_grad:
                raise RuntimeError(
                    f"{name}: the forward pass is not tracking gradients (model parameters frozen with "
                    "requires_grad_(False), or torch.inference_mode()); attribution patching needs them: "
                    "call model.requires_grad_(True) / leave inference mode"
                )
            if name in self.differentiate_input_of:
                self.values[name] = activation
                return None  # the forward pass continues with the received tensor itself
            # A fresh tensor: patching replaces what this hook returns, and only the hook's consumers read
            # it. (In the bridge, ``hook_resid_mid`` is ``ln2.hook_in``, whose input tensor also feeds the
            # residual skip connection; the gradient with respect to that input would count the skip path,
            # which patching the hook leaves untouched.)
            activation = activation.clone()
            self.values[name] = activation
            return activation

        return capture

    def in_order(self) -> list[Tensor]:
        missing = [name for name in self.names if name not in self.values]
        if missing:
            raise RuntimeError(f"{len(missing)} hooks never fired in the forward pass, e.g. {missing[:3]}")
        return [self.values[name] for name in self.names]


def _check_components(components: Sequence[str] | None) -> list[str]:
    if components is None:
        return list(COMPONENTS)
    if isinstance(components, str):
        raise TypeError(f"components must be a sequence of keys, not the string {components!r}; use ({components!r},)")
    keys = list(components)
    if not keys:
        raise ValueError("components is empty")
    unknown = [k for k in keys if k not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown components {unknown}; valid keys: {list(COMPONENTS)}")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"components lists {repeated} more than once")
    return keys


def _checked_metric(metric: MetricFn, logits: Tensor, reduce: Reduce, batch: int, run: str) -> Tensor:
    value = metric(logits)
    if not isinstance(value, Tensor):
        raise TypeError(f"metric returned {type(value).__name__} on the {run} run; it must return a torch tensor")
    if reduce == "scalar" and value.ndim != 0:
        raise ValueError(
            f"metric returned shape {tuple(value.shape)} on the {run} run; reduce='scalar' needs a scalar "
            "(return one value per prompt and pass reduce='mean' or 'none' for per-prompt attributions)"
        )
    if reduce != "scalar" and (value.ndim != 1 or value.shape[0] != batch):
        raise ValueError(
            f"metric returned shape {tuple(value.shape)} on the {run} run; reduce={reduce!r} needs one value "
            f"per prompt, [batch={batch}]"
        )
    return value


def _combine_batch(stacked: Float[Tensor, "layer batch ..."], reduce: Reduce) -> Tensor:
    if reduce == "scalar":
        return stacked.sum(dim=1)  # the metric already weights each prompt (e.g. 1/batch for a mean)
    if reduce == "mean":
        return stacked.mean(dim=1)
    return stacked.movedim(1, -1)  # [layer, *cells, batch], TransformerLens's per-example layout


def _top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-np.abs(values), kind="stable")[:k]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.pearsonr(a, b).statistic)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)
