"""The compliance report: offline, complete, and honest about weak results."""

from __future__ import annotations

import pandas as pd

from mechfin_utils.screener.report import compliance_report


def test_report_is_offline_and_flags_what_it_should(tmp_path):
    held_out = {
        "unseen templates": {
            "n": 10,
            "accuracy": 0.9,
            "accuracy_low": 0.8,
            "accuracy_high": 1.0,
            "auroc": 0.97,
            "auroc_low": 0.9,
            "auroc_high": 1.0,
            "mean_gap": 3.0,
            "accuracy_clean": 0.95,
            "accuracy_clean_low": 0.85,
            "accuracy_clean_high": 1.0,
            "accuracy_corrupted": 0.45,
            "accuracy_corrupted_low": 0.3,
            "accuracy_corrupted_high": 0.6,
        },
        "unseen phrases": {
            "n": 10,
            "accuracy": 0.5,
            "accuracy_low": 0.4,
            "accuracy_high": 0.6,
            "auroc": 0.55,
            "auroc_low": 0.4,
            "auroc_high": 0.7,
            "mean_gap": 0.1,
        },
    }
    by_basis = pd.DataFrame(
        {
            "n": [5, 5],
            "mean_gap": [2.0, 0.2],
            "mean_gap_low": [1.0, -0.3],
            "mean_gap_high": [3.0, 0.6],
            "accuracy": [0.9, 0.5],
        },
        index=["race", "age"],
    )
    components = pd.DataFrame(
        {"label": ["MLP 29", "attn 3"], "mean": [1.5, -0.2], "low": [1.0, -0.4], "high": [2.0, 0.0]}
    )
    controls = pd.DataFrame(
        {
            "control_id": ["c1", "c2"],
            "kind": ["mentioned_legitimate", "unnamed_basis"],
            "basis": ["race", "age"],
            "expected": ["No", "Yes"],
            "ld": [2.0, 1.0],
            "p_yes": [0.88, 0.73],
            "correct": [False, True],
            "prompt": ["Priya, who is <Black>, was denied", "over 62"],
        }
    )
    path = compliance_report(
        tmp_path / "r.html",
        model_name="Model <X>",
        held_out=held_out,
        by_basis=by_basis,
        components=components,
        controls=pd.concat([controls, controls.assign(control_id=["c3", "c4"], correct=[True, True])]),
        context="A test.",
        identity={"name": "screener <s>", "weights_sha256": "ab" * 32, "trained_on": ["train", "mention_train"]},
        n_boot=50,
    )
    text = path.read_text()
    assert "<script" not in text and "http" not in text
    assert "Model &lt;X&gt;" in text and "&lt;Black&gt;" in text  # escaped, never injected
    assert "unseen phrases" in text.split("barely separates")[0]  # the weak set is named in the warning
    age_row = text[text.index("<td>age</td>") :].split("</tr>")[0]
    assert "interval includes 0" in age_row
    assert "1 of 4 control prompts answered wrongly" in text
    # which screener, exactly; each side on its own; the controls kind by kind with intervals
    assert "screener &lt;s&gt;" in text and "ab" * 32 in text and "<code>mention_train</code>" in text
    templates_row = text[text.index("<td>unseen templates</td>") :].split("</tr>")[0]
    assert "0.95 [0.85, 1.00]" in templates_row and "0.45 [0.30, 0.60]" in templates_row
    assert "unseen templates" in text.split("clears fewer than 80%")[0].split("</table>")[-1]
    mentioned_row = text[text.index("<td>mentioned_legitimate</td>") :].split("</tr>")[0]
    assert "0.50 [" in mentioned_row  # one of its two prompts right, with a bootstrap interval
    assert "not legal advice" in text
    assert "1.500 [1.000, 2.000]" in text
