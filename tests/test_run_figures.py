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


def test_plan_switches_model_at_each_at_sign():
    plan = run_figures.parse_plan(["a.ipynb", "b.ipynb", "@m2", "c.ipynb", "@empty"], "m1")
    assert plan == [("m1", ["a.ipynb", "b.ipynb"]), ("m2", ["c.ipynb"])]


def _fake_papermill(monkeypatch, durations: dict[str, float], fail: str | None = None):
    """papermill.execute_notebook replaced by a sleep that records start order, concurrency and thread settings."""
    import os
    import threading
    import time

    import papermill

    seen = {"order": [], "running": 0, "most": 0, "threads": set()}
    lock = threading.Lock()

    def execute_notebook(path, output, **kwargs):
        name = os.path.basename(path)
        with lock:
            seen["order"].append(name)
            seen["running"] += 1
            seen["most"] = max(seen["most"], seen["running"])
            seen["threads"].add(os.environ.get("OMP_NUM_THREADS"))
        time.sleep(durations[name])
        with lock:
            seen["running"] -= 1
        if name == fail:
            raise RuntimeError(f"{name} failed")

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    monkeypatch.setattr(
        run_figures,
        "model_identity",
        lambda model, path=None: {"slug": model, "resolved": model, "weights_sha256": "0" * 64},
    )
    return seen


def test_two_workers_run_longest_first_side_by_side_with_one_thread_each(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")  # run_many sets both for its kernels; restored after the test
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "manifest.json").write_text(json.dumps({"seconds_per_notebook": {"00_a": 1.0, "01_b": 9.0}}))
    (tmp_path / "m1" / "00_x.html").write_text("")
    (tmp_path / "m1" / "01_x.html").write_text("")
    seen = _fake_papermill(monkeypatch, {"00_a.ipynb": 0.3, "01_b.ipynb": 0.3, "02_c.ipynb": 0.3})
    paths = run_figures.run_many([("m1", ["00_a.ipynb", "01_b.ipynb"]), ("m2", ["02_c.ipynb"])], workers=2)
    # unknown (02_c) and 9 s (01_b) start together on the two workers, in either order; 1 s (00_a) waits
    assert set(seen["order"][:2]) == {"02_c.ipynb", "01_b.ipynb"} and seen["order"][2] == "00_a.ipynb"
    assert seen["most"] == 2 and seen["threads"] == {"1"}
    manifests = [json.loads(p.read_text()) for p in paths]
    assert set(manifests[0]["seconds_per_notebook"]) == {"00_a", "01_b"} and manifests[0]["notebooks_side_by_side"] == 2
    assert set(manifests[1]["seconds_per_notebook"]) == {"02_c"}


def test_expected_times_order_a_run_whose_folder_has_no_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(tmp_path))  # a scratch folder, as make verify uses
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    seen = _fake_papermill(monkeypatch, {"00_a.ipynb": 0.05, "01_b.ipynb": 0.05, "02_c.ipynb": 0.05})
    expected = {"m1": {"00_a": 5.0, "01_b": 50.0, "02_c": 20.0}}
    run_figures.run_many([("m1", ["00_a.ipynb", "01_b.ipynb", "02_c.ipynb"])], workers=2, expected_seconds=expected)
    # two workers: the two longest start together (in either order), the shortest waits for one of them
    assert set(seen["order"][:2]) == {"01_b.ipynb", "02_c.ipynb"} and seen["order"][2] == "00_a.ipynb"


def test_a_failure_stops_the_run_and_keeps_the_times_of_notebooks_that_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(tmp_path))
    seen = _fake_papermill(monkeypatch, {"00_a.ipynb": 0.05, "01_b.ipynb": 0.05, "02_c.ipynb": 0.05}, fail="01_b.ipynb")
    import pytest

    with pytest.raises(RuntimeError, match="01_b.ipynb failed"):
        run_figures.run_many([("m1", ["00_a.ipynb", "01_b.ipynb", "02_c.ipynb"])], workers=1)
    assert seen["order"] == ["00_a.ipynb", "01_b.ipynb"]
    manifest = json.loads((tmp_path / "m1" / "manifest.json").read_text())
    assert manifest["seconds_per_notebook"].keys() == {"00_a"}
