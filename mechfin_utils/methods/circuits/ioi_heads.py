"""Reading the IOI circuit's heads (Wang et al. 2022): name movers and S-inhibition heads, and the paper's table.

The IOI *task* (prompts, batches, the metric ``logit(IO) - logit(S)``) is :mod:`mechfin_utils.tasks.ioi`. This module
reads a model's heads on it, the way Wang et al. told their roles apart:

* :func:`head_roles` measures, per head, the two signatures of a name mover -- its direct effect on the logit
  difference (DLA, :func:`mechfin_utils.methods.readout.dla.head_attribution`) and how much more the end position
  attends to IO than to S -- and, given edge scores (:mod:`mechfin_utils.methods.circuits.edges`), each head's effect
  through the name movers' *queries* (the S-inhibition signature, Wang et al.'s path patching to the name movers'
  queries, read from EAP-IG edge scores).
* :func:`name_movers` and :func:`candidates` pick the top name-mover and S-inhibition candidates from that table.
* :func:`paper_comparison` is the table against Wang et al.'s GPT-2 Small heads
  (:data:`mechfin_utils.tasks.paper_claims.IOI_HEADS`); the notebook shows it only when GPT-2 Small is the model.

Heads are labelled ``"L9H9"`` (:mod:`mechfin_utils.core.head_labels`); Wang et al. write that head 9.9.
"""

from __future__ import annotations

import pandas as pd
import torch

from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.head_labels import head_labels, parse_head
from mechfin_utils.methods.readout import dla
from mechfin_utils.tasks import paper_claims
from mechfin_utils.tasks.ioi import IOITask


def head_roles(model, ioi: IOITask, edge_scores=None) -> pd.DataFrame:
    """One row per head: ``dla`` (mean direct effect on ``logit(IO) - logit(S)``), ``attn_io`` / ``attn_s`` (mean
    attention from the end position to IO and to the first S) and, given EAP-IG ``edge_scores`` on this task,
    ``via_name_mover_queries``: the summed score of the head's edges into the queries of the name-mover candidates
    (negative: patching those edges lowers the logit difference, so the head helps through the name movers'
    queries, as S-inhibition heads do). Name-mover candidates are the heads with positive DLA that attend more to
    IO than to S; the five largest by DLA are used for the query scores."""
    fm = FunctionalTransformer.from_model(model)
    dla_parts, attn_io, attn_s = [], [], []
    offset = 0
    for batch in ioi.answer_batches:
        n = batch.clean_tokens.shape[0]
        dla_parts.append(dla.head_attribution(model, batch.clean_tokens, batch.answer_tokens).heads)
        with torch.no_grad():
            pattern = fm.record(batch.clean_tokens, keep=("pattern",)).kept("pattern")  # [layer, n, head, q, k]
        rows = torch.arange(n)
        io = torch.tensor(ioi.io_positions[offset : offset + n])
        s = torch.tensor(ioi.s_positions[offset : offset + n])
        last = pattern[:, :, :, -1, :].permute(1, 0, 2, 3)  # [n, layer, head, key]: from the end position
        attn_io.append(last[rows, :, :, io])  # [n, layer, head]
        attn_s.append(last[rows, :, :, s])
        offset += n
    values = torch.cat(dla_parts).mean(0)
    io_mean, s_mean = torch.cat(attn_io).mean(0), torch.cat(attn_s).mean(0)
    n_layers, n_heads = values.shape
    table = pd.DataFrame(
        {
            "head": head_labels(n_layers, n_heads),
            "layer": [layer for layer in range(n_layers) for _ in range(n_heads)],
            "dla": values.flatten().tolist(),
            "attn_io": io_mean.flatten().tolist(),
            "attn_s": s_mean.flatten().tolist(),
        }
    )
    table["name_mover_candidate"] = (table["dla"] > 0) & (table["attn_io"] > table["attn_s"])
    movers = name_movers(table, 5)
    if edge_scores is not None:
        graph, mean = edge_scores.graph, edge_scores.mean
        query_receivers = [
            graph.attention_receivers(layer).start + head for layer, head in (parse_head(h) for h in movers)
        ]
        via = [
            float(mean[graph.head_sender(layer, head), query_receivers].sum())
            for layer in range(n_layers)
            for head in range(n_heads)
        ]
        table["via_name_mover_queries"] = via
    table.attrs["name_movers_used"] = movers
    return table


def paper_comparison(roles: pd.DataFrame, logit_diff: float) -> pd.DataFrame:
    """Wang et al.'s GPT-2 Small findings next to this run's: the mean logit difference, then each published head
    with its DLA rank here (1 = largest positive) and whether it is a name-mover candidate. GPT-2 Small only."""
    ranked = roles.sort_values("dla", ascending=False).reset_index(drop=True)
    rank = {head: i + 1 for i, head in enumerate(ranked["head"])}
    rows = [
        {
            "claim": "mean logit(IO) - logit(S)",
            "paper": paper_claims.IOI_LOGIT_DIFF,
            "this run": round(logit_diff, 3),
        }
    ]
    by_head = roles.set_index("head")
    for role, heads in paper_claims.IOI_HEADS.items():
        for head in heads:
            if head not in by_head.index:
                continue
            rows.append(
                {
                    "claim": f"{role} head {head}",
                    "paper": role,
                    "this run": f"DLA {by_head.loc[head, 'dla']:+.3f} (rank {rank[head]} of {len(rank)}), "
                    f"name-mover candidate: {bool(by_head.loc[head, 'name_mover_candidate'])}",
                }
            )
    return pd.DataFrame(rows)


def name_movers(roles: pd.DataFrame, n: int) -> list[str]:
    """The ``n`` name-mover candidates (positive DLA, end position attends more to IO than to S) of largest DLA."""
    return list(roles[roles["name_mover_candidate"]].nlargest(n, "dla")["head"])


def candidates(roles: pd.DataFrame, n: int = 5) -> dict[str, list[str]]:
    """The top name-mover and S-inhibition candidates (by DLA among name-mover-like heads; by the most negative
    score through the name movers' queries, among heads below them)."""
    movers = name_movers(roles, n)
    out = {"name movers": movers}
    if "via_name_mover_queries" in roles:
        first = min(parse_head(h)[0] for h in movers) if movers else len(roles)
        below = roles[(roles["layer"] < first)]
        out["S-inhibition"] = list(below.nsmallest(n, "via_name_mover_queries")["head"])
    return out
