"""The figures runner's manifest: which folder and which weights a model name means, without loading it."""

from __future__ import annotations

import json

from mechfin_utils import run_figures


def test_model_identity_of_a_screener_reads_its_card(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_CACHE", str(tmp_path))
    assert run_figures.model_identity("smollm2-135m-screener") == {
        "slug": "smollm2-135m-screener",
        "resolved": "smollm2-135m-screener",
        "weights_sha256": None,
    }
    (tmp_path / "smollm2-135m-screener").mkdir()
    (tmp_path / "smollm2-135m-screener" / "screener-card.json").write_text(json.dumps({"weights_sha256": "ab" * 32}))
    assert run_figures.model_identity("smollm2-135m-screener")["weights_sha256"] == "ab" * 32


def test_model_identity_of_the_embedded_model_hashes_its_converted_weights():
    from mechfin_utils.models import prepare_smollm2

    identity = run_figures.model_identity("smollm2")
    assert identity["slug"] == "smollm2-135m" and identity["resolved"] == "smollm2-135m"
    assert identity["weights_sha256"] == run_figures.file_sha256(prepare_smollm2(verbose=False) / "model.safetensors")


def test_runner_refuses_missing_notebooks(capsys):
    assert run_figures.main(["notebooks/99_missing.ipynb", "--model", "smollm2-135m"]) == 2
    assert "99_missing" in capsys.readouterr().err


def test_manifest_keeps_times_only_of_figures_that_are_there(tmp_path):
    from mechfin_utils.run_figures import still_current

    (tmp_path / "05_results.json").write_text("{}")
    (tmp_path / "08_compliance_report.html").write_text("<html></html>")  # 08 writes its other figures elsewhere
    recorded = {
        "00_task_and_baseline": 30.0,
        "04_activation_patching": 150.0,
        "05_circuit_discovery": 100.0,
        "08_screener_vs_base": 190.0,
    }
    kept = still_current(recorded, tmp_path, ["notebooks/00_task_and_baseline.ipynb"])
    # 00 is about to run (its time will be replaced), 05 and 08 have figures there, 04's figures were removed
    assert kept == {"00_task_and_baseline": 30.0, "05_circuit_discovery": 100.0, "08_screener_vs_base": 190.0}
