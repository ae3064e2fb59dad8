"""IOI: the committed prompts are the generator's, bad rows are all named, the task's metric is logit(IO) - logit(S)
by hand, and the head-role readings pick name movers and S-inhibition heads from a hand-built table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mechfin_utils.core.head_labels import head_label
from mechfin_utils.methods.circuits import edges, ioi_heads
from mechfin_utils.tasks import ioi, paper_claims

REPO = Path(__file__).resolve().parent.parent


def test_ioi_csv_is_what_the_generator_writes_and_loads(tmp_path):
    out = tmp_path / "ioi.csv"
    subprocess.run(
        [sys.executable, str(REPO / "data" / "build_ioi.py"), "--output", str(out)], check=True, capture_output=True
    )
    assert out.read_bytes() == ioi.IOI_CSV.read_bytes()
    prompts = ioi.load_ioi()
    assert len(prompts) == 192 and {p.order for p in prompts} == {"ABBA", "BABA"}
    for p in prompts:
        first_clause = p.clean_prompt.split(",")[0].split(".")[0]
        assert p.io in first_clause and p.s in first_clause and p.clean_prompt.count(p.s) == 2


def test_every_bad_ioi_row_is_named_with_its_line(tmp_path):
    header = ",".join(ioi.IOI_COLUMNS)
    good = 'ioi-1,T1,ABBA,Mary,John,store,drink,"When Mary and John went to the store, John gave a drink to","When Tom and Amy went to the store, Kate gave a drink to"'
    bad_order = good.replace("ioi-1,T1,ABBA", "ioi-2,T1,ABAB")
    bad_names = 'ioi-3,T1,ABBA,Mary,John,store,drink,"When Mary and John went to the store, Mary gave a drink to","When Tom and Amy went to the store, Kate gave a drink to"'
    path = tmp_path / "ioi.csv"
    path.write_text("\n".join([header, good, bad_order, bad_names]) + "\n")
    with pytest.raises(ioi.IOIDataError) as error:
        ioi.load_ioi(path)
    message = str(error.value)
    assert (
        "2 bad row(s)" in message
        and f"{path}:3 (ioi-2): order" in message
        and f"{path}:4 (ioi-3): clean_prompt" in message
    )


def test_ioi_task_metric_is_the_logit_difference_of_io_and_s_by_hand(smollm2):
    task = ioi.ioi_task(smollm2, n_prompts=6, seed=2)
    assert task.task.n_prompts == 6 and len(task.prompts) == 6
    table = ioi.logit_differences(smollm2, task).set_index("prompt_id")
    for prompt, io_pos, s_pos in zip(task.prompts, task.io_positions, task.s_positions):
        ids = smollm2.token_ids(prompt.clean_prompt)
        io, s = smollm2.token_ids(" " + prompt.io)[-1], smollm2.token_ids(" " + prompt.s)[-1]
        assert ids[io_pos] == io and ids[s_pos] == s and ids.count(s) == 2
        with torch.no_grad():
            logits = smollm2.hf_model(torch.tensor([ids])).logits[0, -1]
        assert table.loc[prompt.prompt_id, "clean"] == pytest.approx(float(logits[io] - logits[s]), abs=1e-4)
    one_length = ioi.ioi_task(smollm2, n_prompts=4, token_length="most_common")
    assert len(one_length.task.batches) == 1 and "of 16 tokens" in one_length.task.notes
    with pytest.raises(ValueError, match="no usable IOI row has 3 tokens"):
        ioi.ioi_task(smollm2, token_length=3)
    patcher = edges.EdgePatcher(smollm2, task.task)
    assert patcher.clean_metric == pytest.approx(table["clean"].mean(), abs=1e-4)
    assert patcher.corrupted_metric == pytest.approx(table["corrupted"].mean(), abs=1e-4)


def _roles() -> pd.DataFrame:
    """A hand-built 12 x 12 table: L9H9 and L10H0 look like name movers, L11H1 writes IO but looks at S, L7H3 acts
    through the name movers' queries."""
    rows = []
    for layer in range(12):
        for head in range(12):
            name = head_label(layer, head)
            dla = {"L9H9": 2.0, "L10H0": 1.5, "L11H1": 3.0, "L10H7": -1.0}.get(name, 0.0)
            attn_io, attn_s = (0.6, 0.1) if name in ("L9H9", "L10H0") else (0.1, 0.5) if name == "L11H1" else (0.1, 0.1)
            via = {"L7H3": -0.8, "L8H6": -0.5, "L10H1": -2.0}.get(name, 0.0)
            rows.append(
                {
                    "head": name,
                    "layer": layer,
                    "dla": dla,
                    "attn_io": attn_io,
                    "attn_s": attn_s,
                    "via_name_mover_queries": via,
                }
            )
    table = pd.DataFrame(rows)
    table["name_mover_candidate"] = (table["dla"] > 0) & (table["attn_io"] > table["attn_s"])
    return table


def test_candidates_are_name_movers_by_dla_and_s_inhibition_below_them():
    found = ioi_heads.candidates(_roles(), n=2)
    assert found["name movers"] == ["L9H9", "L10H0"]  # L11H1 writes IO but attends to S: not a name mover
    assert found["S-inhibition"] == ["L7H3", "L8H6"]  # L10H1 is not below the name movers


def test_paper_comparison_lists_every_published_head_with_its_rank():
    table = ioi_heads.paper_comparison(_roles(), logit_diff=3.1)
    assert table.iloc[0]["paper"] == paper_claims.IOI_LOGIT_DIFF and table.iloc[0]["this run"] == 3.1
    heads = [h for group in paper_claims.IOI_HEADS.values() for h in group]
    assert len(table) == 1 + len(heads)
    row = table[table["claim"] == "name mover head L9H9"].iloc[0]
    assert "rank 2 of 144" in row["this run"] and "candidate: True" in row["this run"]
