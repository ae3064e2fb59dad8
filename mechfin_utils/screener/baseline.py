"""Baseline behaviour on a task set: the metric on every prompt, before any interpretability method.

Every later attribution explains *this* number, so it is measured first and shown honestly: per pair, the
logit difference on the clean prompt (expected answer first, e.g. `` Yes``) and on the corrupted prompt, and
per basis their means with bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from mechfin_utils.core.stats import grouped_bootstrap


@torch.no_grad()
def final_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, d_vocab]`` logits at the last position."""
    return model.bridge(tokens)[:, -1, :]


def pair_scores(model, batches: Sequence) -> pd.DataFrame:
    """One row per pair: ids, basis, template, and the logit difference / two-answer probability on both prompts.

    Columns: ``pair_id, basis, template_id, clean_logit_diff, corrupted_logit_diff, gap (clean - corrupted),
    clean_prob_ratio, corrupted_prob_ratio`` (probability of the first answer renormalised over the two answers:
    ``sigmoid(logit difference)``). Works for both task families (for counterfactual pairs "clean" is prompt A and
    "corrupted" prompt B).

    Scored by :class:`~mechfin_utils.screener.behaviour.BridgeScorer` (only the two answers' logits, at the last
    position), so that within one ``make figures`` run a prompt another notebook scored is read, not rerun
    (:mod:`~mechfin_utils.screener.score_cache`).
    """
    from mechfin_utils.screener.behaviour import BridgeScorer

    rows = []
    scorers: dict[tuple[int, int], BridgeScorer] = {}
    for batch in batches:
        # 1. each row's answers: one scorer per answer pair (the task families use one pair throughout)
        rows_by_answers: dict[tuple[int, int], list[int]] = {}
        for i, (first, second) in enumerate(batch.answer_tokens.tolist()):
            if (first, second) not in scorers:
                answers = (model.tokenizer.decode([first]), model.tokenizer.decode([second]))
                if (model.single_token_id(answers[0]), model.single_token_id(answers[1])) != (first, second):
                    raise ValueError(f"answer tokens {first}, {second} of {model.name} do not decode to themselves")
                scorers[(first, second)] = BridgeScorer(model, answers=answers)
            rows_by_answers.setdefault((first, second), []).append(i)
        # 2. both prompts of every row, by their token ids
        ld_clean = torch.empty(batch.batch_size, dtype=torch.float64)
        ld_corrupted = torch.empty(batch.batch_size, dtype=torch.float64)
        for key, index in rows_by_answers.items():
            token_rows = [batch.clean_tokens[i].tolist() for i in index]
            token_rows += [batch.corrupted_tokens[i].tolist() for i in index]
            values = torch.from_numpy(scorers[key].logit_diffs_of_ids(token_rows))
            ld_clean[index], ld_corrupted[index] = values[: len(index)], values[len(index) :]
        for i, pair in enumerate(batch.pairs):
            rows.append(
                {
                    "pair_id": pair.id,
                    "basis": pair.basis,
                    "template_id": pair.template_id,
                    "clean_logit_diff": ld_clean[i].item(),
                    "corrupted_logit_diff": ld_corrupted[i].item(),
                    "gap": (ld_clean[i] - ld_corrupted[i]).item(),
                    "clean_prob_ratio": torch.sigmoid(ld_clean[i]).item(),
                    "corrupted_prob_ratio": torch.sigmoid(ld_corrupted[i]).item(),
                }
            )
    if not rows:
        raise ValueError("batches is empty: no pairs to score")
    return pd.DataFrame(rows)


def per_group_table(scores: pd.DataFrame, by: str = "basis", *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per group (e.g. basis): n, mean clean / corrupted logit difference and gap, each with a bootstrap interval.

    A group with a single pair keeps its row, with its value as the estimate and no interval (NaN low/high):
    one observation has no spread to resample.
    """
    if by not in scores.columns:
        raise ValueError(f"by={by!r} is not a column of scores ({list(scores.columns)})")
    sizes = scores.groupby(by).size()
    resampled = scores[scores[by].isin(sizes[sizes >= 2].index)]
    single = scores[scores[by].isin(sizes[sizes < 2].index)]
    parts = []
    for column, label in (("clean_logit_diff", "clean"), ("corrupted_logit_diff", "corrupted"), ("gap", "gap")):
        if len(resampled):
            table = grouped_bootstrap(resampled, by, column, n_boot=n_boot, seed=seed).set_index(by)
        else:
            table = pd.DataFrame(columns=["n", "estimate", "low", "high"])
        lone = pd.DataFrame(
            {"n": 1, "estimate": single[column].to_numpy(), "low": float("nan"), "high": float("nan")},
            index=pd.Index(single[by].to_numpy(), name=by),
        )
        table = pd.concat([table, lone]).sort_index()
        table = table.rename(columns={"estimate": label, "low": f"{label}_low", "high": f"{label}_high"})
        parts.append(table if label == "clean" else table.drop(columns="n"))
    out = pd.concat(parts, axis=1)
    out["n"] = out["n"].astype(int)
    return out
