"""The figures runner: which folder and which weights a model name means, the manifest, the order of the notebooks,
and that a run stopped part-way changes nothing under the figures folder."""

from __future__ import annotations

import json
import signal

import pytest

from mechfin_utils.tooling import run_figures, staging


@pytest.fixture(autouse=True)
def _executed_copies_in_tmp(tmp_path, monkeypatch):
    """Executed copies go to the test's own folder, not notebooks/_executed."""
    monkeypatch.setenv(run_figures.EXECUTED_DIR_ENV, str(tmp_path / "executed"))


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
    from mechfin_utils.core.models import prepare_smollm2

    identity = run_figures.model_identity("smollm2")
    assert identity["slug"] == "smollm2-135m" and identity["resolved"] == "smollm2-135m"
    assert identity["weights_sha256"] == run_figures.file_sha256(prepare_smollm2(verbose=False) / "model.safetensors")


def test_runner_refuses_missing_notebooks(capsys):
    assert run_figures.main(["notebooks/99_missing.ipynb", "--model", "smollm2-135m"]) == 2
    assert "99_missing" in capsys.readouterr().err


def test_manifest_keeps_times_only_of_figures_that_are_there(tmp_path):
    from mechfin_utils.tooling.run_figures import still_current

    base, screener, other = tmp_path / "base", tmp_path / "base-screener", tmp_path / "another-model"
    for folder in (base, screener, other):
        folder.mkdir()
    (base / "05_results.json").write_text("{}")
    (base / "08_compliance_report.html").write_text("<html></html>")  # 08 writes its other figures elsewhere
    (screener / "12_controls.html").write_text("<html></html>")  # 12, run for the base model, draws the screener
    (other / "04_patching.html").write_text("<html></html>")  # another model's own run of 04
    recorded = {
        "00_task_and_baseline": 30.0,
        "04_activation_patching": 150.0,
        "05_circuit_discovery": 100.0,
        "08_screener_vs_base": 190.0,
        "12_shortcut_and_repair": 700.0,
    }
    where = {"04_activation_patching": ["base"], "08_screener_vs_base": ["base", "base-screener"]}
    kept = still_current(recorded, base, ["notebooks/00_task_and_baseline.ipynb"], where)
    # 00 is about to run (its time will be replaced); 05 (no record: any folder) and 08 have figures there; 12 (no
    # record) has figures in the screener's folder; 04 wrote only to this model's folder, and those were removed
    assert kept == {
        "00_task_and_baseline": 30.0,
        "05_circuit_discovery": 100.0,
        "08_screener_vs_base": 190.0,
        "12_shortcut_and_repair": 700.0,
    }
    (screener / "12_controls.html").unlink()
    assert "12_shortcut_and_repair" not in still_current(recorded, base, [], where)


def test_plan_switches_model_at_each_at_sign():
    plan = run_figures.parse_plan(["a.ipynb", "b.ipynb", "@m2", "c.ipynb", "@empty"], "m1")
    assert plan == [("m1", ["a.ipynb", "b.ipynb"]), ("m2", ["c.ipynb"])]


def _fake_notebooks(monkeypatch, durations: dict[str, float], fail: str | None = None):
    """run_figures.execute_notebook replaced by a sleep that records start order, concurrency and the kernel's thread
    settings (what each notebook's own process would get)."""
    import os
    import threading
    import time

    seen = {"order": [], "running": 0, "most": 0, "threads": set()}
    lock = threading.Lock()

    def execute_notebook(notebook, output, parameters, env, log):
        name = os.path.basename(notebook)
        with lock:
            seen["order"].append(name)
            seen["running"] += 1
            seen["most"] = max(seen["most"], seen["running"])
            seen["threads"].add(env.get("OMP_NUM_THREADS"))
        time.sleep(durations[name])
        with lock:
            seen["running"] -= 1
        if name == fail:
            raise RuntimeError(f"{name} failed")

    monkeypatch.setattr(run_figures, "execute_notebook", execute_notebook)
    monkeypatch.setattr(
        run_figures,
        "model_identity",
        lambda model, path=None: {"slug": model, "resolved": model, "weights_sha256": "0" * 64},
    )
    return seen


def test_two_workers_run_longest_first_side_by_side_with_one_thread_each(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")  # run_many sets both to 1 for its kernels, not here
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "manifest.json").write_text(json.dumps({"seconds_per_notebook": {"00_a": 1.0, "01_b": 9.0}}))
    (tmp_path / "m1" / "00_x.html").write_text("")
    (tmp_path / "m1" / "01_x.html").write_text("")
    seen = _fake_notebooks(monkeypatch, {"00_a.ipynb": 0.3, "01_b.ipynb": 0.3, "02_c.ipynb": 0.3})
    paths = run_figures.run_many([("m1", ["00_a.ipynb", "01_b.ipynb"]), ("m2", ["02_c.ipynb"])], workers=2)
    # unknown (02_c) and 9 s (01_b) start together on the two workers, in either order; 1 s (00_a) waits
    assert set(seen["order"][:2]) == {"02_c.ipynb", "01_b.ipynb"} and seen["order"][2] == "00_a.ipynb"
    assert seen["most"] == 2 and seen["threads"] == {"1"}
    manifests = [json.loads(p.read_text()) for p in paths]
    assert set(manifests[0]["seconds_per_notebook"]) == {"00_a", "01_b"} and manifests[0]["notebooks_side_by_side"] == 2
    assert manifests[0]["torch_threads_per_notebook"] == 1 and manifests[0]["cpu"] == run_figures.cpu_name()
    assert set(manifests[1]["seconds_per_notebook"]) == {"02_c"}


def test_expected_times_order_a_run_whose_folder_has_no_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(tmp_path))  # a scratch folder, as make verify uses
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    seen = _fake_notebooks(monkeypatch, {"00_a.ipynb": 0.05, "01_b.ipynb": 0.05, "02_c.ipynb": 0.05})
    expected = {"m1": {"00_a": 5.0, "01_b": 50.0, "02_c": 20.0}}
    run_figures.run_many([("m1", ["00_a.ipynb", "01_b.ipynb", "02_c.ipynb"])], workers=2, expected_seconds=expected)
    # two workers: the two longest start together (in either order), the shortest waits for one of them
    assert set(seen["order"][:2]) == {"01_b.ipynb", "02_c.ipynb"} and seen["order"][2] == "00_a.ipynb"


def test_a_failure_stops_the_run_and_keeps_the_times_of_notebooks_that_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(tmp_path))
    seen = _fake_notebooks(monkeypatch, {"00_a.ipynb": 0.05, "01_b.ipynb": 0.05, "02_c.ipynb": 0.05}, fail="01_b.ipynb")
    with pytest.raises(RuntimeError, match="01_b.ipynb failed"):
        run_figures.run_many([("m1", ["00_a.ipynb", "01_b.ipynb", "02_c.ipynb"])], workers=1)
    assert seen["order"] == ["00_a.ipynb", "01_b.ipynb"]
    manifest = json.loads((tmp_path / "m1" / "manifest.json").read_text())
    assert manifest["seconds_per_notebook"].keys() == {"00_a"}


# ---------------------------------------------------------------------------------------------------------
# The manifest names the machine
# ---------------------------------------------------------------------------------------------------------


def test_manifest_names_the_cpu_and_the_torch_threads_of_each_kernel(tmp_path, monkeypatch):
    import platform

    import torch

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert run_figures.cpu_name(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert run_figures.cpu_name(tmp_path / "missing") == "arm"  # no /proc/cpuinfo (macOS): platform's answer
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert run_figures.cpu_name(tmp_path / "missing") == "unknown"
    assert run_figures.torch_threads({"OMP_NUM_THREADS": "1"}) == 1  # what each kernel is given
    assert run_figures.torch_threads({}) == torch.get_num_threads()  # else what torch picks here by itself
    path = tmp_path / "m" / "manifest.json"
    identity = {"slug": "m", "resolved": "m", "weights_sha256": "0" * 64}
    run_figures._write_manifest(path, {}, identity, {"model": "m"}, {"00_a": 1.0}, workers=2, threads=1)
    manifest = json.loads(path.read_text())
    assert manifest["cpu"] == run_figures.cpu_name() and manifest["torch_threads_per_notebook"] == 1
    assert manifest["machine"].endswith("CPUs") and [p.name for p in path.parent.iterdir()] == ["manifest.json"]


# ---------------------------------------------------------------------------------------------------------
# A run stopped part-way loses nothing
# ---------------------------------------------------------------------------------------------------------


def _tree(root) -> dict[str, bytes]:
    """Every file under ``root`` (outside the hidden staging folder) with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
    }


def test_swap_in_replaces_the_notebooks_files_in_every_folder_it_wrote_and_nothing_else(tmp_path):
    root, staged = tmp_path / "figures", tmp_path / "staged"
    for folder, files in {
        root / "base": {"08_report.html": "old", "08_gone.png": "old", "05_kept.png": "05", "manifest.json": "m"},
        root / "screener": {"08_auroc.png": "old", "08_results.json": "old", "plotly.min.js": "js"},
        staged / "base": {"08_report.html": "new"},
        staged / "screener": {"08_auroc.png": "new", "08_results.json": "new", "plotly.min.js": "js"},
        staged / "fresh-model": {"08_x.html": "new", "plotly.min.js": "js"},
    }.items():
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    removed = staging.swap_in(staged, root, "08_screener_vs_base")
    assert [p.name for p in removed] == ["08_gone.png"]  # the new run no longer makes it
    assert {k: v.decode() for k, v in _tree(root).items()} == {
        "base/05_kept.png": "05",  # another notebook's
        "base/08_report.html": "new",
        "base/manifest.json": "m",  # the runner's, not the notebook's
        "fresh-model/08_x.html": "new",
        "fresh-model/plotly.min.js": "js",  # a folder without plotly.js gets it
        "screener/08_auroc.png": "new",
        "screener/08_results.json": "new",
        "screener/plotly.min.js": "js",
    }


def test_stale_staging_folders_are_removed_unless_their_run_is_still_going(tmp_path):
    import os
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging_folder = tmp_path / staging.STAGING
    for owner in (finished.stdout.strip(), str(os.getpid()), str(os.getppid()), "junk"):
        (staging_folder / f"{owner}-00-m-00_a" / "figures").mkdir(parents=True)
    removed = staging.clean_stale_staging(tmp_path)
    # the dead run's, this process's own (its runs have ended) and an unreadable name go; a live parent's stays
    assert sorted(p.name.split("-")[0] for p in removed) == sorted([finished.stdout.strip(), str(os.getpid()), "junk"])
    assert [p.name for p in staging_folder.iterdir()] == [f"{os.getppid()}-00-m-00_a"]


FAKE_NOTEBOOK_CODE = """\
import os
import time
from types import SimpleNamespace

from mechfin_utils.reporting import figures

me = SimpleNamespace(name="Fake model", slug=model)  # no model is loaded: model_identity falls back to the name
figures.clear_notebook_outputs(me, "00")
figures.save_results(me, "00", "answer", {"value": 2.0, "run": os.environ["FAKE_RUN"]})
(figures.model_folder(me) / "00_figure.html").write_text("<html>new " + os.environ["FAKE_RUN"] + "</html>")
(figures.model_folder(me) / "plotly.min.js").write_text("plotly.js")
if os.environ.get("FAKE_FAIL"):
    raise ValueError("the fake notebook failed on purpose")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""


def _fake_notebook_and_committed_figures(tmp_path):
    """A notebook that writes a results file and a figure through mechfin_utils.reporting.figures (then sleeps), and a figures
    folder holding older versions of them, another notebook's figure and a manifest."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell('model = "auto"\ngpt2_path = ""\nseed = 0', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(FAKE_NOTEBOOK_CODE),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "00_fake.ipynb"
    nbformat.write(notebook, path)
    committed = tmp_path / "figures"
    (committed / "fake-model").mkdir(parents=True)
    for name, text in {
        "00_results.json": json.dumps({"model": {"name": "Fake model", "slug": "fake-model"}, "notebook": "00"}),
        "00_figure.html": "<html>old</html>",
        "00_stale.png": "a figure the notebook no longer makes",
        "01_other.html": "another notebook's",
        "manifest.json": json.dumps({"seconds_per_notebook": {"00_fake": 99.0, "01_other": 5.0}}),
    }.items():
        (committed / "fake-model" / name).write_text(text)
    return path, committed


def _fake_run_env(tmp_path, committed, **extra: str) -> dict[str, str]:
    return {
        "MECHFIN_FIGURES_DIR": str(committed),
        "MECHFIN_EXECUTED_DIR": str(tmp_path / "executed"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),  # a killed kernel's connection file stays out of ~
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_run_stopped_part_way_leaves_every_committed_file_as_it_was(tmp_path, signum):
    import os
    import subprocess
    import sys
    import time

    notebook, committed = _fake_notebook_and_committed_figures(tmp_path)
    before = _tree(committed)
    env = {**os.environ, **_fake_run_env(tmp_path, committed, FAKE_RUN="stopped", FAKE_SLEEP="60")}
    command = [sys.executable, "-m", "mechfin_utils.tooling.run_figures", "--model", "fake-model", str(notebook)]
    # started with Ctrl-C ignored, as a script's background job (or a test worker) inherits it: the run must still stop
    runner = subprocess.Popen(
        command,
        cwd=run_figures.REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 120
        while not list(committed.glob(".staging/*/figures/fake-model/00_figure.html")):
            assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()[0]
            time.sleep(0.1)
        # the notebook has written its new figure and results (into its staging folder) and sleeps: stop everything
        os.killpg(runner.pid, signum)
        # a stop takes seconds on an idle machine (13 s for both cases here) but has taken over 60 s on 2 busy cores
        # (the kernel's shutdown waits its turn): the bound only has to tell a stop from a hang
        runner.wait(240)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    assert _tree(committed) == before  # every committed file byte for byte, none deleted, none added
    if signum == signal.SIGINT:  # Ctrl-C: the runner stops its notebook and removes its staging folder itself
        assert runner.returncode == 130 and not (committed / staging.STAGING).exists()
    else:  # killed outright: the folder stays until the next run starts, which removes it
        assert len(staging.clean_stale_staging(committed)) == 1
    assert not (tmp_path / "executed" / "fake-model-00_fake.ipynb").exists()


def test_a_failed_notebook_changes_nothing_and_a_finished_one_replaces_its_files_whole(tmp_path, monkeypatch):
    notebook, committed = _fake_notebook_and_committed_figures(tmp_path)
    before = _tree(committed)
    for name, value in _fake_run_env(tmp_path, committed, FAKE_RUN="failed", FAKE_FAIL="1").items():
        monkeypatch.setenv(name, value)
    # 1. A notebook that fails: its error is quoted, nothing committed changes, its staged outputs stay for a look.
    with pytest.raises(staging.NotebookFailedError, match="00_fake.ipynb failed") as failure:
        run_figures.run_many([("fake-model", [str(notebook)])])
    assert "ValueError: the fake notebook failed on purpose" in str(failure.value)
    assert _tree(committed) == before
    [kept] = (committed / staging.STAGING).iterdir()
    assert (kept / "fake-model-00_fake.ipynb").is_file() and (
        kept / "figures" / "fake-model" / "00_figure.html"
    ).is_file()
    # 2. The next run removes that folder; finished, its notebook's files replace the committed ones.
    monkeypatch.setenv("FAKE_RUN", "finished")
    monkeypatch.delenv("FAKE_FAIL")
    [manifest_path] = run_figures.run_many([("fake-model", [str(notebook)])])
    after = {name: data.decode() for name, data in _tree(committed).items()}
    assert sorted(after) == [
        "fake-model/00_figure.html",
        "fake-model/00_results.json",
        "fake-model/01_other.html",
        "fake-model/manifest.json",
        "fake-model/plotly.min.js",
    ]  # 00_stale.png is gone: the notebook no longer makes it
    assert after["fake-model/00_figure.html"] == "<html>new finished</html>"
    assert json.loads(after["fake-model/00_results.json"])["results"] == {"answer": {"value": 2.0, "run": "finished"}}
    assert after["fake-model/01_other.html"] == "another notebook's"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["seconds_per_notebook"]["00_fake"] < 99.0 and manifest["seconds_per_notebook"]["01_other"] == 5.0
    assert manifest["torch_threads_per_notebook"] == 1
    assert not (committed / staging.STAGING).exists()
    assert (tmp_path / "executed" / "fake-model-00_fake.ipynb").is_file()
