"""Does the edit move when ROME is given more? The two inputs a CPU run keeps small, tested by growing them.

ROME's update ``ΔW = (v* − W k*) uᵀ / (uᵀ k*)`` has two ingredients estimated from samples (Meng et al. 2022):

* the **direction** ``u = C⁻¹ k̄``, from the keys' second moment ``C`` over ordinary text (ROME: 100,000 Wikipedia
  passages; here the model's own text, :mod:`~mechfin_utils.methods.editing.key_statistics`);
* the **value** ``v*`` and the averaged key ``k̄``, fitted over "context templates" (the bare prompt plus short texts
  written before it, :func:`~mechfin_utils.methods.editing.edits.context_prefixes`).

:func:`edit_convergence` measures an edit's sensitivity to each, per request: the reference edit uses the whole corpus
and the most templates; then

1. **corpus**: the same ``v*`` and ``k̄`` with ``C`` from the first fraction of the corpus only (one pass over the
   corpus gives every prefix's ``C``; no value refit, since ``v*`` does not depend on ``C``);
2. **templates**: the whole edit refitted with fewer templates and the full ``C``.

For each it records the cosine between that edit's ``ΔW`` and the reference's and the CounterFact scores it reaches
(efficacy, generalisation, specificity, and the new object's probabilities). An edit has *settled* where halving the
input leaves the scores where they are; a cosine well below 1 with unchanged scores says the direction is not yet
pinned down but the edit's behaviour does not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from mechfin_utils.core.hook_points import output_matrix, output_projection, restoring
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.methods.editing.edits import RomeEdit, ValueParams, rank_one_update, rome
from mechfin_utils.methods.editing.evaluation import evaluate_edit
from mechfin_utils.methods.editing.key_statistics import KeyCovariance, fraction_covariances
from mechfin_utils.tasks.counterfact import CounterfactEdit

SCORES = ("efficacy", "generalisation", "specificity", "p_new", "p_true")


@dataclass
class EditConvergence:
    """:func:`edit_convergence`'s table (one row per request and setting) and its reference edits (whole corpus,
    most templates), kept so that a later section can write the same edit again
    (:func:`~mechfin_utils.methods.editing.edits.reapply`) instead of fitting it a second time."""

    table: pd.DataFrame
    references: dict[str, RomeEdit] = field(default_factory=dict)  # by edit id


def _row(model: LoadedModel, edit: CounterfactEdit, varied: str, tokens: int, templates: int, cosine: float) -> dict:
    """One row of :func:`edit_convergence`: the setting and the scores of the model as it is now (edited)."""
    scores = evaluate_edit(model, edit, n_generated=0)  # fluency is notebook 09's own table; not varied here
    return {
        "edit_id": edit.request.edit_id,
        "varied": varied,
        "corpus_tokens": tokens,
        "templates": templates,
        "cosine_to_reference": cosine,
        **{k: scores[k] for k in SCORES},
    }


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def edit_convergence(
    model: LoadedModel,
    edits: Sequence[CounterfactEdit],
    layer: int,
    corpus: Sequence[Sequence[int]],
    prefixes_by_count: Mapping[int, Sequence[str]],
    *,
    fractions: Sequence[float] = (0.25, 0.5),
    params: ValueParams | None = None,
    covariances: Mapping[int, KeyCovariance | None] | None = None,
) -> EditConvergence:
    """Stages 1-2 of the module docstring for every request in ``edits`` at ``layer``. ``prefixes_by_count``: context
    template sets by the number of generated templates (the largest is the reference); ``fractions``: the shares of
    ``corpus`` the smaller covariances use; ``params``: the value fit (default: ROME's); ``covariances``: this layer's
    ``{n texts: C}`` already computed (:func:`~mechfin_utils.methods.editing.key_statistics.layer_prefix_covariances`),
    else one pass computes them. One row per request and setting, the reference included (cosine 1); the reference
    edits come with the table."""
    params = params if params is not None else ValueParams()
    if not edits:
        raise ValueError("edit_convergence needs at least one edit")
    if not prefixes_by_count:
        raise ValueError("prefixes_by_count is empty: give at least the reference template set")
    bad = [f for f in fractions if not 0 < f < 1]
    if bad:
        raise ValueError(f"fractions must lie strictly between 0 and 1 (the whole corpus is the reference), got {bad}")
    # 1. every covariance from one pass over the corpus (or from the caller's)
    sizes, covariances = fraction_covariances(model, layer, corpus, fractions, covariances, caller="edit_convergence")
    full = covariances[len(corpus)]
    if full is None:
        raise ValueError(f"edit_convergence: the corpus of {len(corpus)} texts is too small for an invertible C")
    most = max(prefixes_by_count)
    weight = output_matrix(model, layer)
    bias = output_projection(model, layer).bias
    rows, references = [], {}
    for edit in edits:
        # 2. the reference edit: whole corpus, most templates
        with restoring(model, [layer]):
            reference = references[edit.request.edit_id] = rome(
                model, edit.request, layer, full, prefixes_by_count[most], params
            )
            rows.append(_row(model, edit, "reference", full.n_tokens, most, 1.0))
        # 3. corpus: the same value and keys, the direction from a smaller C
        target = reference.value.target - (bias.detach() if bias is not None else 0.0)
        for size in sizes.values():
            covariance = covariances[size]
            if covariance is None:
                continue  # too few key vectors for an invertible estimate at this size
            direction = covariance.solve(reference.mean_key[:, None])[:, 0]
            update = rank_one_update(weight.detach() @ reference.key, target, reference.key, direction)
            with restoring(model, [layer]):
                with torch.no_grad():
                    weight.add_(update)
                rows.append(_row(model, edit, "corpus", covariance.n_tokens, most, _cosine(update, reference.update)))
        # 4. templates: the whole edit refitted with fewer
        for count, prefixes in sorted(prefixes_by_count.items()):
            if count == most:
                continue
            with restoring(model, [layer]):
                fewer = rome(model, edit.request, layer, full, prefixes, params)
                rows.append(
                    _row(model, edit, "templates", full.n_tokens, count, _cosine(fewer.update, reference.update))
                )
    return EditConvergence(pd.DataFrame(rows), references)


def convergence_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per setting (mean over requests): the cosine to the reference edit and each score's largest move from the
    reference's, so one row says whether that much less input would have changed the edit's behaviour."""
    reference = table[table["varied"] == "reference"].set_index("edit_id")
    out = []
    for (varied, tokens, templates), group in table[table["varied"] != "reference"].groupby(
        ["varied", "corpus_tokens", "templates"]
    ):
        g = group.set_index("edit_id")
        row = {
            "varied": varied,
            "corpus_tokens": int(tokens),
            "templates": int(templates),
            "n_edits": len(g),
            "mean_cosine_to_reference": float(g["cosine_to_reference"].mean()),
        }
        for score in ("efficacy", "generalisation", "specificity", "p_new"):
            row[f"largest_change_{score}"] = float((g[score] - reference.loc[g.index, score]).abs().max())
        out.append(row)
    return pd.DataFrame(out)
