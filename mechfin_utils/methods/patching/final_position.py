"""Patching at the answer position, for pairs of any token lengths: which components carry a difference there.

Position-by-position patching needs equal token lengths; the last position exists in every prompt. Reading the
answer is done there, so a component's output *at the last position* is where a difference between two prompts
must pass if it is to move the answer through that component's write to the final position. For each pair
(a *source* prompt and a *target* prompt, any lengths) and each component (every attention head, every MLP), this
module runs the target prompt with that one component's output at the last position replaced by its value in the
source run, and measures how far the logit difference moves towards the source's:

    share(component) = mean over pairs of (LD_patched - LD_target) / mean over pairs of (LD_source - LD_target)

a ratio of means (per-pair ratios explode where a pair's gap is small), with a bootstrap interval that resamples
pairs. 1 means the component alone, at the answer position, carries the whole difference; 0 means none of it.
Earlier positions are never touched, so each run recomputes only the last position from the patched layer on
(the intervention engine, :mod:`mechfin_utils.core.engine`, continues the recorded target run there).

What it cannot see: information a component moves *to earlier positions*, which later layers then read. A
difference carried at the mention's own tokens (segment patching, :mod:`.segments`) and read late by attention
shows here only in the heads that read it.

Used by notebook 12 twice on the screener's mention pairs: source = the prompt whose decision rests on the
attribute, target = the lawful one (which components carry "what the decision rests on"), and source = a lawful
prompt that mentions the attribute, target = the same prompt with neutral words (which components carry the mere
mention: the shortcut).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.core import engine
from mechfin_utils.core.head_labels import Node
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.stats import bootstrap_distribution
from mechfin_utils.methods.patching.activation import functional_model
from mechfin_utils.tasks.fair_lending import FairLendingPair


def every_component(model: LoadedModel) -> list[Node]:
    """Every head and every MLP, layer by layer (heads first within a layer)."""
    cfg = model.cfg
    return [c for layer in range(cfg.n_layers) for c in (*(Node(layer, h) for h in range(cfg.n_heads)), Node(layer))]


def _replacement(source, component: Node, source_last: int, target_last: int) -> engine.Replace:
    """The engine's Replace of ``component``'s output at the target's last position by the source's."""
    if component.head is None:
        return engine.output_replacement(component, target_last, source.mlp_out[component.layer][0, source_last])
    return engine.output_replacement(component, target_last, source.z[component.layer][0, source_last, component.head])


@torch.no_grad()
def patch_at_final_position(
    model: LoadedModel,
    pairs: Sequence[FairLendingPair],
    components: Sequence[Node] | None = None,
    *,
    source_model: LoadedModel | None = None,
    same_prompt: bool = False,
) -> pd.DataFrame:
    """For every pair and component, the target run with that component's last-position output from the source.

    Each pair's *source* is its clean prompt and its *target* its corrupted prompt (token lengths may differ); the
    score is ``logit(clean answer) - logit(corrupted answer)`` at the last position. Across models
    (``source_model``: another model of the same architecture, e.g. a repaired screener written into the first one,
    as Prakash et al.'s cross-model patching does) with ``same_prompt=True`` the source runs the *target's* prompt
    in ``source_model``: which components of one model, written into the other, move its answer to the first's.

    Stages, per pair:
        1. the source run (its head outputs ``z`` and MLP outputs) and the target run (what the engine continues
           from), recorded;
        2. one engine run per component, all packed: the target continued from the component's layer at its last
           position only, with the component's output there replaced by the source's.

    Returns one row per (pair, component): ``pair_id, basis, component, layer, head, ld_source, ld_target,
    ld_patched``.
    """
    fm = functional_model(model)
    source_fm = fm if source_model is None else functional_model(source_model)
    components = list(components) if components is not None else every_component(model)
    rows = []
    for pair in pairs:
        # 1. reference runs
        answers = torch.tensor([[model.single_token_id(a) for a in pair.answers]])
        target_tokens = model.to_tokens(pair.corrupted_prompt)
        source_tokens = target_tokens if same_prompt else model.to_tokens(pair.clean_prompt)
        source = source_fm.record(source_tokens, keep=("z", "mlp_out", "resid_pre"))
        target = fm.record(target_tokens, keep=("resid_pre", "k", "v"))
        ld_source = float(source_fm.logit_diff(source.final_normed, answers)[0])  # final_normed: the last position
        ld_target = float(fm.logit_diff(target.final_normed, answers)[0])
        source_last, target_last = source_tokens.shape[1] - 1, target_tokens.shape[1] - 1
        # 2. one continuation per component, from its layer at the last position
        runs = [
            engine.Segment(
                c.layer,
                target_last,
                target.kept("resid_pre")[c.layer][:, target_last:],
                torch.tensor([0]),
                [_replacement(source, c, source_last, target_last)],
            )
            for c in components
        ]
        patched = fm.logit_diff(torch.cat([out[:, -1] for out in engine.run(fm, runs, target)]), answers)
        for component, value in zip(components, patched.tolist()):
            rows.append(
                {
                    "pair_id": pair.id,
                    "basis": pair.basis,
                    "component": component.name,
                    "layer": component.layer,
                    "head": component.head,
                    "ld_source": ld_source,
                    "ld_target": ld_target,
                    "ld_patched": value,
                }
            )
    return pd.DataFrame(rows)


def component_shares(results: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Per component, the share of the source - target gap its last-position output carries (a ratio of means
    over pairs), with a percentile bootstrap interval that resamples pairs jointly for every component.

    Returns one row per component, in the order of ``results``: ``component, layer, head, share, low, high,
    mean_effect`` (logits), ``mean_gap`` (the mean source - target gap, logits: the share's denominator, the same in
    every row) and ``n_pairs``. A share is only as meaningful as its denominator: where the gap itself is near zero
    (a model that does not tell the two prompts apart), read ``mean_effect`` instead.
    """
    order = list(dict.fromkeys(results["component"]))
    effect = results.assign(effect=results["ld_patched"] - results["ld_target"]).pivot_table(
        index="pair_id", columns="component", values="effect"
    )[order]  # [pair, component]
    gaps = results.groupby("pair_id")[["ld_source", "ld_target"]].first()
    gap: Float[np.ndarray, " pair"] = (gaps["ld_source"] - gaps["ld_target"]).loc[effect.index].to_numpy()
    table: Float[np.ndarray, "pair column"] = np.column_stack([effect.to_numpy(), gap])
    boot = bootstrap_distribution(table, n_boot=n_boot, seed=seed)  # [n_boot, component + 1]: means
    shares = boot[:, :-1] / boot[:, -1:]
    alpha = (1 - ci) / 2
    low, high = np.quantile(shares, [alpha, 1 - alpha], axis=0)
    means = table.mean(axis=0)
    first = results.drop_duplicates("component").set_index("component")
    return pd.DataFrame(
        {
            "component": order,
            "layer": first.loc[order, "layer"].to_numpy(),
            "head": first.loc[order, "head"].to_numpy(),
            "share": means[:-1] / means[-1],
            "low": low,
            "high": high,
            "mean_effect": means[:-1],
            "mean_gap": means[-1],
            "n_pairs": len(effect),
        }
    )


def compare_contrasts(shares: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Two or more :func:`component_shares` tables side by side (``share_<name>``, ``low_<name>``, ``high_<name>``
    and ``effect_<name>``, the mean effect in logits, per contrast), one row per component."""
    merged = None
    for name, table in shares.items():
        part = table.set_index("component")[["layer", "head", "share", "low", "high", "mean_effect"]].rename(
            columns={
                "share": f"share_{name}",
                "low": f"low_{name}",
                "high": f"high_{name}",
                "mean_effect": f"effect_{name}",
            }
        )
        merged = part if merged is None else merged.join(part.drop(columns=["layer", "head"]))
    if merged is None:
        raise ValueError("no contrasts to compare")
    return merged.reset_index()


# ---------------------------------------------------------------------------------------------------------
# Ablation at the answer position (a model that runs with chosen components held at fixed values)
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_outputs_at_final_position(
    model: LoadedModel, prompts: Sequence[str], components: Sequence[Node], *, batch_size: int = 32
) -> dict[Node, Tensor]:
    """Each component's output at the last position, averaged over ``prompts`` (any token lengths): a head's ``z``
    ``[d_head]``, an MLP's output ``[d_model]``. The values a mean ablation writes
    (:class:`~mechfin_utils.screener.behaviour.BridgeScorer`'s ``held_at_last``). Prompts of one token length run
    together, up to ``batch_size`` at a time."""
    if not prompts:
        raise ValueError("mean outputs need at least one prompt")
    fm = functional_model(model)
    by_length: dict[int, list[list[int]]] = {}
    for prompt in prompts:
        ids = model.token_ids(prompt)
        by_length.setdefault(len(ids), []).append(ids)
    sums: dict[Node, Tensor] = {}
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            tokens = torch.tensor(rows[start : start + batch_size], dtype=torch.long, device=model.cfg.device)
            record = fm.record(tokens, keep=("z", "mlp_out"))
            for c in components:
                at_last = (
                    record.kept("mlp_out")[c.layer][:, -1]
                    if c.head is None
                    else record.kept("z")[c.layer][:, -1, c.head]
                )
                sums[c] = sums[c] + at_last.sum(0) if c in sums else at_last.sum(0)
    return {c: total / len(prompts) for c, total in sums.items()}
