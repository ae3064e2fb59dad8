"""``make bench`` end to end on a tiny model, and its FLOP floor on a case with a known answer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mechfin_utils.core.functional import functional_model
from mechfin_utils.reporting.tables import markdown_table
from mechfin_utils.tasks import screener_sets
from mechfin_utils.tooling.bench import command, flop_floor
from mechfin_utils.tooling.testing import rounding_tolerance


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer GPT-2-shape model with random weights (bench material; never GPT-2's numbers)."""
    import os

    previous = os.environ.get("MECHFIN_CACHE")
    os.environ["MECHFIN_CACHE"] = str(tmp_path_factory.mktemp("mechfin-cache"))
    try:
        yield command.load_bench_model("gpt2-shape", gpt2_layers=2)
    finally:
        if previous is None:
            os.environ.pop("MECHFIN_CACHE", None)
        else:
            os.environ["MECHFIN_CACHE"] = previous


def test_floor_of_a_last_token_difference_is_one_row_per_later_layer(tiny_gpt2):
    """Prompts that differ only in their last token: a resid_pre patch at layer L can change only the last
    row, in layers L..n-1, so the floor is sum over L of (n - L) rows of full block cost at n_pos keys."""
    model, _ = tiny_gpt2
    fm = functional_model(model)
    corrupted = model.to_tokens(["The loan was denied because of bad credit. Illegal?"] * 3)
    clean = corrupted.clone()
    clean[:, -1] = (clean[:, -1] + 1) % model.cfg.d_vocab
    n_layers, n_pos = fm.n_layers, corrupted.shape[1]
    cost = fm.flops_per_row(n_pos)
    per_row = cost["kv"] + cost["rest"]
    expected = 3 * sum(n_layers - layer for layer in range(n_layers)) * per_row
    assert flop_floor.floor_flops(fm, "resid_pre", clean, corrupted) == expected
    assert flop_floor.floor_flops(fm, "resid_pre", corrupted, corrupted) == 0  # nothing differs: nothing to compute


BEHAVIOUR_EVERY_NTH_PAIR = 8
"""The behaviour rows score every 8th pair of their held-out split (11 of 88: still several token lengths, so padded
batches meet prompts of other lengths): the earlier path they are compared with computes full logits at every position
of every prompt, and the whole split took 23 of the test's 35 s."""


def test_bench_runs_and_writes_its_table(tiny_gpt2, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(command, "load_bench_model", lambda name, layers=2: tiny_gpt2)
    whole_split = screener_sets.load_split
    monkeypatch.setattr(screener_sets, "load_split", lambda split: whole_split(split)[::BEHAVIOUR_EVERY_NTH_PAIR])
    code = command.main(
        [
            "--models",
            "gpt2-shape",
            "--components",
            "resid_pre,attn_head_out_by_pos",
            "--batch",
            "2",
            "--tl-cells",
            "3",
            "--trace-facts",
            "2",
            "--trace-pairs",
            "1",
            "--trace-samples",
            "2",
            "--node-prompts",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| GPT-2-shape (2 layers), random weights | attn_head_out_by_pos |" in printed
    result = json.loads((tmp_path / "latest.json").read_text())
    table_rows = [
        line for line in (tmp_path / "latest.md").read_text().splitlines() if line.startswith("| GPT-2-shape")
    ]
    assert len(table_rows) == 8  # two patching sweeps, two tracing rows, one edge row, two behaviour rows, one node row
    rows = {row["component"]: row for row in result["rows"]}
    assert set(rows) == {"resid_pre", "attn_head_out_by_pos"}
    for row in rows.values():
        assert row["tl_cells_run"] == 3 and row["tl_extrapolated"]
        assert row["max_abs_diff"] <= 1e-4  # the same numbers as TransformerLens on the cells it ran
        assert row["mechfin_seconds"] > 0 and row["floor_seconds"] > 0 and row["speedup"] > 0
    assert rows["attn_head_out_by_pos"]["cells"] == 2 * rows["resid_pre"]["n_pos"] * 12
    traces = {row["prompts"]: row for row in result["trace_rows"]}
    assert set(traces) == {"2 facts", "1 fair-lending"}
    for row in traces.values():
        assert row["max_abs_diff"] <= 1e-4  # the ROME-style tracer and the engine give the same numbers
        assert row["rome_seconds"] > 0 and row["mechfin_seconds"] > 0 and row["floor_seconds"] > 0
        assert row["restored_states"] % (3 * 2) == 0  # three kinds x two layers per traced position
    assert "| GPT-2-shape (2 layers), random weights | 1 fair-lending |" in printed
    (edges,) = result["edge_rows"]
    # two layers of 12 heads: 36 q/k/v receivers per layer, then the MLP, then the logits, each reading all senders before it
    assert edges["n_edges"] == 36 * 1 + 13 + 36 * 14 + 26 + 27 and edges["prompts"] == 2
    assert edges["speedup"] == pytest.approx(edges["patch_all_est_seconds"] / edges["eap_ig_seconds"])
    assert edges["eap_seconds"] > 0 and edges["eap_ig_seconds"] > 0 and edges["patch_one_seconds"] > 0
    assert edges["circuit_edges"] == min(1000, edges["n_edges"] // 4)
    assert edges["circuit_seconds"] > 0 and edges["circuit_earlier_seconds"] > 0
    # the two sums give one metric, up to float32 sums taken in another order (relative 1e-4: ~800 float32 steps)
    assert edges["circuit_max_diff"] <= 1e-4 * max(1.0, edges["circuit_metric_scale"])
    # EAP-IG per prompt, each length apart or joined and padded: the same scores up to float rounding at their scale
    assert edges["lengths_prompts"] == 2 and edges["lengths_apart_seconds"] > 0 and edges["lengths_joined_seconds"] > 0
    assert edges["lengths_max_diff"] <= 2 * rounding_tolerance(max(1e-6, edges["lengths_score_scale"]), tiny_gpt2[0])
    plain, held = result["behaviour_rows"]
    assert plain["scoring"] == "plain" and held["scoring"] == "L0H0, L0H1, MLP1 held at their mean"
    for behaviour in (plain, held):
        assert behaviour["prompts"] == 2 * len(whole_split("mention_test_templates")[::BEHAVIOUR_EVERY_NTH_PAIR])
        assert behaviour["length_groups"] > 1  # the split's prompts differ in length: the padding is exercised
        # the same logit differences both ways, up to float rounding of logits of this size (batch shapes differ)
        assert behaviour["max_abs_diff"] <= 2 * rounding_tolerance(behaviour["largest_logit"], tiny_gpt2[0])
        assert behaviour["speedup"] == pytest.approx(behaviour["earlier_seconds"] / behaviour["padded_seconds"])
    (nodes,) = result["node_rows"]
    # two layers of 12 heads and an MLP, each tested at least once, on both backends alike
    assert nodes["n_nodes"] == 2 * 13 and nodes["passes"] >= nodes["n_nodes"] and nodes["prompts"] == 4
    assert nodes["same_circuit"]
    assert nodes["max_abs_diff"] <= 2 * rounding_tolerance(max(1.0, nodes["score_scale"]), tiny_gpt2[0])
    assert nodes["speedup"] == pytest.approx(nodes["bridge_seconds"] / nodes["engine_seconds"])


def test_trace_floor_of_one_restoration_is_counted_by_hand(tiny_gpt2):
    """A restoration that starts at the last layer at the last position: one row of the whole last block."""
    model, _ = tiny_gpt2
    fm = functional_model(model)
    n_pos, last = 9, fm.n_layers - 1
    cost = fm.flops_per_row(n_pos)
    assert flop_floor.trace_floor_flops(fm, n_pos, [(last, n_pos - 1)], n_samples=3) == 3 * (cost["kv"] + cost["rest"])
    # from layer 0 at position 5: 4 rows in every block but the last, which needs the 4 rows' keys and values and
    # one row's query, attention and MLP
    mid = fm.flops_per_row((5 + 1 + n_pos) // 2)
    expected = last * 4 * (mid["kv"] + mid["rest"]) + 4 * cost["kv"] + cost["rest"]
    assert flop_floor.trace_floor_flops(fm, n_pos, [(0, 5)], n_samples=1) == expected


def test_bench_refuses_components_without_a_transformer_lens_twin(capsys):
    with pytest.raises(SystemExit):
        command.main(["--components", "resid_pre_all_pos"])
    assert "no TransformerLens counterpart" in capsys.readouterr().err


def test_peak_memory_sees_a_large_allocation():
    """In a fresh process (as in the bench, the mmap threshold is pinned before anything big is allocated;
    in a long-lived process freed heap chunks are reused without growing the resident set)."""
    script = textwrap.dedent("""
        import time, torch
        from mechfin_utils.tooling.bench import machine
        machine.pin_malloc_to_mmap()
        with machine.PeakMemory() as memory:
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            block.add_(1)
            time.sleep(0.05)  # the sampler runs every 2 ms
            del block
        print(memory.peak)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()[-1]
    if out == "None":
        pytest.skip("no /proc here: resident memory cannot be read")
    assert 48 * 2**20 <= int(out) <= 200 * 2**20


def test_markdown_table_fills_format_strings_and_calls_functions():
    """The one Markdown-table writer every bench table uses: a header, a rule, one line per row."""
    rows = [{"model": "m", "cells": 1234, "seconds": 2.25, "peak": None}]
    columns = [
        ("model", "{model}"),
        ("cells", "{cells:,}"),
        ("seconds", "{seconds:.1f} s"),
        ("peak MB", lambda row: "n/a" if row["peak"] is None else f"{row['peak']:,.0f}"),
    ]
    assert markdown_table(rows, columns).splitlines() == [
        "| model | cells | seconds | peak MB |",
        "|---|---|---|---|",
        "| m | 1,234 | 2.2 s | n/a |",
    ]
