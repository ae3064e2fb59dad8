"""Figure writing (paths, title rule, offline HTML, static export, results JSON) and the plot builders.

No model is loaded: ``save_figure`` only needs ``.name`` and ``.slug``, so a stand-in names the model.
Static export tests need Chrome/Chromium (``make setup`` installs Debian's); they are skipped without one.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import plotly
import plotly.graph_objects as go
import pytest
import torch

from mechfin_utils.reporting import figures, plots, static_export

MODEL = SimpleNamespace(name="Test-Model 1M", slug="test-model-1m")
OTHER_MODEL = SimpleNamespace(name="Other Model", slug="other-model")
needs_browser = pytest.mark.skipif(static_export.find_browser() is None, reason="no Chrome/Chromium for kaleido")


@pytest.fixture
def figures_dir(tmp_path, monkeypatch) -> Path:
    """Send every figure and results file of a test to its own temporary folder."""
    root = tmp_path / "figures"
    monkeypatch.setenv(figures.FIGURES_DIR_ENV, str(root))
    monkeypatch.delenv(static_export.STATIC_ENV, raising=False)
    return root


def small_heatmap() -> go.Figure:
    values = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.25]])
    return plots.heatmap(
        values,
        model=MODEL,
        title="Head DLA",
        x_labels=["h0", "h1", "h2"],
        y_labels=["L0", "L1"],
        x_title="head",
        y_title="layer",
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------------------
# save_figure
# ---------------------------------------------------------------------------------------------------------


@needs_browser
def test_save_figure_writes_three_files_deterministically(figures_dir):
    fig = small_heatmap()
    paths = figures.save_figure(fig, model=MODEL, notebook="02", name="head_dla")
    folder = figures_dir / "test-model-1m"
    assert paths == {ext: folder / f"02_head_dla.{ext}" for ext in ("png", "svg", "html")}

    width, height = fig.layout.width, fig.layout.height
    assert png_size(paths["png"]) == (width * static_export.PNG_SCALE, height * static_export.PNG_SCALE)
    svg_root = ET.fromstring(paths["svg"].read_text())
    assert svg_root.tag.endswith("svg")
    assert (svg_root.get("width"), svg_root.get("height")) == (str(width), str(height))
    assert "Test-Model 1M" in paths["svg"].read_text()

    first = {ext: path.read_bytes() for ext, path in paths.items()}
    figures.save_figure(fig, model=MODEL, notebook="02", name="head_dla")
    second = {ext: path.read_bytes() for ext, path in paths.items()}
    assert first == second  # same figure, same bytes (fixed size, fixed SVG ids, fixed div id)


@needs_browser
def test_static_size_defaults_and_overrides(figures_dir):
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2])).update_layout(title="Bars — Test-Model 1M")
    paths = figures.save_figure(fig, model=MODEL, notebook="00", name="bars", width=400, height=300)
    assert png_size(paths["png"]) == (800, 600)
    paths = figures.save_figure(fig, model=MODEL, notebook="00", name="bars_default")
    assert png_size(paths["png"]) == (static_export.DEFAULT_WIDTH * 2, static_export.DEFAULT_HEIGHT * 2)


def test_html_renders_offline_with_local_plotlyjs(figures_dir, monkeypatch):
    monkeypatch.setenv(static_export.STATIC_ENV, "0")  # HTML only, deliberately
    paths = figures.save_figure(small_heatmap(), model=MODEL, notebook="02", name="head_dla")
    assert set(paths) == {"html"}
    html = paths["html"].read_text(encoding="utf-8")
    bundle = plotly.offline.get_plotlyjs()
    # plotly.js comes from one local copy beside the page (byte-equal to the installed bundle), not a CDN
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in html
    assert (paths["html"].parent / "plotly.min.js").read_text(encoding="utf-8") == bundle
    assert len(html) < 100_000
    assert "cdn.plot.ly" not in html
    assert figures.remote_references(html) == []
    assert "<title>Head DLA — Test-Model 1M</title>" in html
    assert not (figures_dir / "test-model-1m" / "02_head_dla.png").exists()


def test_title_must_carry_the_model_name(figures_dir):
    fig = go.Figure(go.Bar(x=[1], y=[1])).update_layout(title="Head DLA")
    with pytest.raises(ValueError, match="must contain the display name 'Test-Model 1M'"):
        figures.save_figure(fig, model=MODEL, notebook="01", name="x")
    untitled = go.Figure(go.Bar(x=[1], y=[1]))
    with pytest.raises(ValueError, match="title is ''"):
        figures.save_figure(untitled, model=MODEL, notebook="01", name="x")
    with pytest.raises(ValueError, match="'Other Model'"):
        figures.save_figure(small_heatmap(), model=OTHER_MODEL, notebook="01", name="x")
    assert not figures_dir.exists()  # nothing written for a refused figure


def test_a_figure_of_another_model_names_that_model(figures_dir):
    # notebook 12 writes figures of its first screener into the repaired screener's folder: the title names the
    # model shown (every one of them), and the files go to the notebook model's folder
    with pytest.raises(ValueError, match="'Other Model'"):
        figures.save_figure(small_heatmap(), model=MODEL, notebook="12", name="x", shown=[MODEL, OTHER_MODEL])
    assert not figures_dir.exists()
    fig = small_heatmap().update_layout(title="Head DLA — Other Model")
    paths = figures.save_figure(fig, model=MODEL, notebook="12", name="x", shown=[OTHER_MODEL])
    assert paths["html"].parent == figures_dir / "test-model-1m"


@pytest.mark.parametrize("name", ["Head DLA", "head/dla", "../up", "", "head__dla", "_x", "x.png", "é"])
def test_unsafe_names_are_refused(figures_dir, name):
    with pytest.raises(ValueError, match=f"name must be a safe slug.*got {name!r}"):
        figures.save_figure(small_heatmap(), model=MODEL, notebook="00", name=name)


@pytest.mark.parametrize("notebook", ["0", "000", "00_task_and_baseline", "ab", "", "3b"])
def test_notebook_must_be_its_number(figures_dir, notebook):
    with pytest.raises(ValueError, match="notebook must be the notebook's two-digit number"):
        figures.save_figure(small_heatmap(), model=MODEL, notebook=notebook, name="x")


def test_notebook_hint_names_the_number():
    with pytest.raises(ValueError, match="write '00'"):
        figures.figure_paths(MODEL, "00_task_and_baseline", "x")
    assert figures.figure_paths(MODEL, "03b", "x")["png"].name == "03b_x.png"


def test_figures_root_defaults_to_repo_figures(monkeypatch):
    monkeypatch.delenv(figures.FIGURES_DIR_ENV, raising=False)
    assert figures.figures_root() == Path(__file__).resolve().parent.parent / "figures"  # the checkout's figures/


def test_missing_browser_keeps_html_and_says_how_to_install(figures_dir, monkeypatch):
    monkeypatch.setattr(static_export, "find_browser", lambda: None)
    monkeypatch.setattr(static_export, "_static_state", {"started": False, "broken": None, "atexit": True})
    with pytest.raises(static_export.StaticExportUnavailableError, match=r"apt-get install chromium"):
        figures.save_figure(small_heatmap(), model=MODEL, notebook="02", name="head_dla")
    assert (figures_dir / "test-model-1m" / "02_head_dla.html").is_file()
    assert not (figures_dir / "test-model-1m" / "02_head_dla.png").exists()


def test_browser_that_fails_to_start_is_an_error_not_a_hang(tmp_path):
    """kaleido's sync server would wait forever on a browser that died at start; we fail in seconds."""
    script = textwrap.dedent(f"""
        import os, time, types
        os.environ["{figures.FIGURES_DIR_ENV}"] = {str(tmp_path)!r}
        import plotly.graph_objects as go
        from mechfin_utils.reporting import figures, static_export
        fig = go.Figure(go.Bar(x=[1], y=[1])).update_layout(title="t — M")
        start = time.time()
        try:
            figures.save_figure(fig, model=types.SimpleNamespace(name="M", slug="m"), notebook="00", name="x")
        except static_export.StaticExportUnavailableError as exc:
            print("RAISED", round(time.time() - start), exc)
    """)
    env = {"PATH": "/usr/bin:/bin", "BROWSER_PATH": "/bin/false", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED" in done.stdout, done.stdout + done.stderr
    assert "failed to start, died or hung (browser: /bin/false)" in done.stdout
    assert (tmp_path / "m" / "00_x.html").is_file()


# ---------------------------------------------------------------------------------------------------------
# save_html
# ---------------------------------------------------------------------------------------------------------


def test_save_html_accepts_inlined_circuitsvis_and_refuses_cdn(figures_dir):
    import circuitsvis as cv

    view = cv.attention.attention_patterns(tokens=["a", "b", "c"], attention=np.eye(3)[None].repeat(2, 0))
    with pytest.raises(ValueError, match="ES-module import from the network"):
        figures.save_html(str(view), model=MODEL, notebook="01", name="attention")
    path = figures.save_html(
        view.local_src, model=MODEL, notebook="01", name="attention", title="Attention patterns — Test-Model 1M"
    )
    assert path == figures_dir / "test-model-1m" / "01_attention.html"
    html = path.read_text(encoding="utf-8")
    assert figures.fixed_view_ids(view.local_src, "01-attention") in html  # the view, its random id made fixed
    assert "<title>Attention patterns — Test-Model 1M</title>" in html
    assert figures.remote_references(html) == []
    # the object itself works too (its .local_src is used); the default title names the model
    html = figures.save_html(view, model=MODEL, notebook="01", name="attention2").read_text(encoding="utf-8")
    assert "<title>attention2 — Test-Model 1M</title>" in html


def test_a_view_saved_twice_gives_the_same_bytes(figures_dir):
    """circuitsvis gives every render a random element id; saved, each becomes a fixed one, everywhere it occurs, so an
    unchanged view adds nothing to the repository and the page still finds its element."""
    import circuitsvis as cv

    attention = np.eye(3)[None].repeat(2, 0)
    first, second = (cv.attention.attention_patterns(tokens=["a", "b", "c"], attention=attention) for _ in range(2))
    assert first.local_src != second.local_src  # a fresh random id per render
    random_id = re.search(r"circuits-vis-[0-9a-f]{8}-[0-9a-f]{4}", first.local_src).group(0)
    n_uses = first.local_src.count(random_id)
    saved = [figures.save_html(v, model=MODEL, notebook="01", name="attention").read_bytes() for v in (first, second)]
    assert saved[0] == saved[1]
    html = saved[0].decode("utf-8")
    assert random_id not in html and html.count("circuits-vis-01-attention-0") == n_uses >= 2


@pytest.mark.parametrize(
    ("fragment", "message"),
    [
        ('<script src="https://cdn.example.org/x.js"></script>', "<script src>"),
        ("<script src='//cdn.example.org/x.js'></script>", "<script src>"),
        ('<link rel="stylesheet" href="http://example.org/s.css">', "<link href>"),
        ('<script>import("https://unpkg.com/m.js")</script>', "dynamic import"),
        ("<html><body>x</body></html>", "full document"),
        ("   ", "empty"),
    ],
)
def test_save_html_refuses_network_loads_and_documents(figures_dir, fragment, message):
    with pytest.raises(ValueError, match=message):
        figures.save_html(fragment, model=MODEL, notebook="01", name="x")


def test_save_html_title_must_name_the_model(figures_dir):
    with pytest.raises(ValueError, match="title must contain the model's display name"):
        figures.save_html("<div>x</div>", model=MODEL, notebook="01", name="x", title="Attention")


def test_urls_inside_inlined_code_are_not_loads():
    code = '<script>var a="https://reactjs.org/docs/error"; var ns="http://www.w3.org/2000/svg";</script>'
    assert figures.remote_references(code) == []


# ---------------------------------------------------------------------------------------------------------
# Results JSON
# ---------------------------------------------------------------------------------------------------------


def test_save_results_merges_converts_and_sorts(figures_dir):
    path = figures.save_results(MODEL, "00", "zeta", 1)
    figures.save_results(
        MODEL,
        "00",
        "baseline",
        {
            "numpy_scalar": np.float32(0.5),
            "numpy_int": np.int64(3),
            "flag": np.bool_(True),
            "array": np.arange(3),
            "tensor": torch.tensor([[1.5, -2.0]]),
            "scalar_tensor": torch.tensor(0.25),
            "tuple": (1, 2.5),
            "none": None,
        },
    )
    figures.save_results(MODEL, "00", "zeta", 2)  # same key: replaced
    assert path == figures_dir / "test-model-1m" / "00_results.json"
    text = path.read_text()
    stored = json.loads(text)
    assert stored == {
        "model": {"name": "Test-Model 1M", "slug": "test-model-1m"},
        "notebook": "00",
        "results": {
            "baseline": {
                "numpy_scalar": 0.5,
                "numpy_int": 3,
                "flag": True,
                "array": [0, 1, 2],
                "tensor": [[1.5, -2.0]],
                "scalar_tensor": 0.25,
                "tuple": [1, 2.5],
                "none": None,
            },
            "zeta": 2,
        },
    }
    assert text == json.dumps(stored, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert figures.load_results(MODEL, "00") == stored["results"]
    assert figures.load_results(MODEL, "01") == {}


def test_save_results_converts_dataframes_and_dataclasses(figures_dir):
    import pandas as pd

    from mechfin_utils.core.stats import bootstrap_ci

    table = pd.DataFrame({"basis": ["age", "race"], "estimate": [0.5, 1.25]})
    figures.save_results(MODEL, "03", "per_basis", table)
    figures.save_results(MODEL, "03", "ci", bootstrap_ci([1.0, 2.0, 3.0], n_boot=50))
    stored = figures.load_results(MODEL, "03")
    assert stored["per_basis"] == [{"basis": "age", "estimate": 0.5}, {"basis": "race", "estimate": 1.25}]
    assert stored["ci"]["estimate"] == 2.0 and stored["ci"]["n"] == 3


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (float("nan"), ValueError, r"results\['k'\] is nan"),
        ({"a": [1.0, float("inf")]}, ValueError, r"results\['k'\]\['a'\]\[1\] is inf"),
        (np.array([0.0, np.nan]), ValueError, r"\[1\] is nan"),
        (torch.tensor([1.0, float("nan")]), ValueError, r"\[1\] is nan"),
        ({1: "x"}, TypeError, "non-string key 1"),
        (object(), TypeError, "type object"),
    ],
)
def test_save_results_refuses_what_json_cannot_hold(figures_dir, value, error, message):
    with pytest.raises(error, match=message):
        figures.save_results(MODEL, "00", "k", value)
    assert not (figures_dir / "test-model-1m" / "00_results.json").exists()


def test_save_results_refuses_another_models_file(figures_dir):
    figures.save_results(MODEL, "00", "a", 1)
    renamed = SimpleNamespace(name="Renamed", slug=MODEL.slug)
    with pytest.raises(ValueError, match="holds results of model"):
        figures.save_results(renamed, "00", "a", 1)


def test_save_figure_results_argument_goes_to_the_json(figures_dir, monkeypatch):
    monkeypatch.setenv(static_export.STATIC_ENV, "off")
    figures.save_figure(
        small_heatmap(),
        model=MODEL,
        notebook="02",
        name="head_dla",
        results={"top_head": "L1H0", "top_value": np.float64(1.5)},
    )
    assert figures.load_results(MODEL, "02") == {"top_head": "L1H0", "top_value": 1.5}


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------


def test_model_title():
    assert plots.model_title("Head DLA", MODEL) == "Head DLA — Test-Model 1M"
    assert plots.model_title("Test-Model 1M: heads", MODEL) == "Test-Model 1M: heads"


def test_heatmap_values_scale_labels_and_hover():
    values = torch.tensor([[0.5, -3.0, 1.0], [2.0, 0.0, float("nan")]])
    fig = plots.heatmap(
        values,
        model=MODEL,
        title="Logit lens",
        x_labels=["the", "loan", "the"],
        y_labels=["L0", "L1"],
        x_title="position",
        y_title="layer",
        show_values=True,
    )
    trace = fig.data[0]
    np.testing.assert_array_equal(np.asarray(trace.z, dtype=float), values.double().numpy())
    assert (trace.zmid, trace.zmin, trace.zmax) == (0.0, -3.0, 3.0)  # symmetric: |-3| is the largest
    assert list(fig.layout.xaxis.ticktext) == ["the", "loan", "the"]  # repeated token stays two columns
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2]
    assert trace.customdata[1][2].tolist() == ["L1", "the"]
    assert "%{z:.3f}" in trace.hovertemplate and "position" in trace.hovertemplate
    assert trace.texttemplate == "%{z:.3f}"
    assert fig.layout.title.text == "Logit lens — Test-Model 1M"
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.width and fig.layout.height


def test_heatmap_centre_and_errors():
    fig = plots.heatmap([[1.5, 2.0], [0.0, 1.0]], model=MODEL, title="t", zmid=1.0)
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0.0, 2.0)
    fig = plots.heatmap([[1.5, 2.0]], model=MODEL, title="t", zmax=10)
    assert (fig.data[0].zmin, fig.data[0].zmax) == (-10.0, 10.0)
    with pytest.raises(ValueError, match="x_labels has 2 labels for 3 entries"):
        plots.heatmap(np.zeros((2, 3)), model=MODEL, title="t", x_labels=["a", "b"])
    with pytest.raises(ValueError, match="values must have 2 dimension"):
        plots.heatmap(np.zeros(3), model=MODEL, title="t")
    with pytest.raises(ValueError, match=r"values has a non-finite value \(inf\) at index \(0, 1\)"):
        plots.heatmap([[0.0, np.inf]], model=MODEL, title="t")


def test_bar_with_ci():
    fig = plots.bar_with_ci(
        ["race", "age"],
        [1.0, -0.5],
        [0.5, -1.0],
        [1.25, 0.25],
        model=MODEL,
        title="Logit diff per basis",
        y_title="logit diff",
    )
    bar = fig.data[0]
    assert list(bar.y) == [1.0, -0.5]
    assert list(bar.error_y.array) == [0.25, 0.75]
    assert list(bar.error_y.arrayminus) == [0.5, 0.5]
    assert list(fig.layout.xaxis.ticktext) == ["race", "age"]
    assert fig.layout.title.text == "Logit diff per basis — Test-Model 1M"
    with pytest.raises(ValueError, match=r"bar 'age': mean -0.5 is outside its interval \[0, 1\]"):
        plots.bar_with_ci(["race", "age"], [1.0, -0.5], [0.5, 0.0], [1.25, 1.0], model=MODEL, title="t")
    with pytest.raises(ValueError, match="repeats the label 'race'"):
        plots.bar_with_ci(["race", "race"], [1.0, 1.0], [0.0, 0.0], [2.0, 2.0], model=MODEL, title="t")
    with pytest.raises(ValueError, match="highs has 1 entries, means has 2"):
        plots.bar_with_ci(["a", "b"], [1.0, 1.0], [0.0, 0.0], [2.0], model=MODEL, title="t")


def test_line_with_band():
    layers = np.arange(4)
    mean = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, -1.0, -2.0, -1.0]])
    fig = plots.line_with_band(
        layers,
        mean,
        mean - 0.5,
        mean + 0.25,
        model=MODEL,
        title="Logit lens",
        names=["clean", "corrupted"],
        x_title="layer",
    )
    assert len(fig.data) == 6  # per series: upper edge, lower edge (filled to the upper), mean line
    upper, lower, line = fig.data[3:6]
    np.testing.assert_allclose(upper.y, mean[1] + 0.25)
    np.testing.assert_allclose(lower.y, mean[1] - 0.5)
    assert lower.fill == "tonexty" and line.name == "corrupted"
    np.testing.assert_allclose(line.y, mean[1])
    single = plots.line_with_band(
        ["emb", "L0", "L1"], [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], [1.5, 2.5, 3.5], model=MODEL, title="t"
    )
    assert len(single.data) == 3 and list(single.layout.xaxis.ticktext) == ["emb", "L0", "L1"]
    with pytest.raises(ValueError, match="names is required for 2 series"):
        plots.line_with_band(layers, mean, mean, mean, model=MODEL, title="t")
    with pytest.raises(ValueError, match="same shape"):
        plots.line_with_band(layers, mean, mean[0], mean, model=MODEL, title="t", names=["a", "b"])
    with pytest.raises(ValueError, match="x has 3 points, the series have 4"):
        plots.line_with_band([0, 1, 2], mean[0], mean[0], mean[0], model=MODEL, title="t")


def test_grouped_bars():
    fig = plots.grouped_bars(
        ["race", "age", "sex"],
        {"clean": [2.0, 1.0, 0.5], "corrupted": [-1.0, -0.5, 0.0]},
        lows={"clean": [1.5, 0.5, 0.0], "corrupted": [-1.5, -1.0, -0.5]},
        highs={"clean": [2.5, 1.5, 1.0], "corrupted": [-0.5, 0.0, 0.5]},
        model=MODEL,
        title="Clean vs corrupted",
    )
    assert fig.layout.barmode == "group"
    assert [trace.name for trace in fig.data] == ["clean", "corrupted"]
    assert list(fig.data[1].y) == [-1.0, -0.5, 0.0]
    assert list(fig.data[0].error_y.arrayminus) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="pass both lows and highs"):
        plots.grouped_bars(["a"], {"clean": [1.0]}, lows={"clean": [0.0]}, model=MODEL, title="t")
    with pytest.raises(ValueError, match=r"values\['corrupted'\] has 1 entries for 2 categories"):
        plots.grouped_bars(["a", "b"], {"clean": [1.0, 2.0], "corrupted": [1.0]}, model=MODEL, title="t")


def test_lines_one_trace_per_series_and_errors():
    from types import SimpleNamespace

    from mechfin_utils.reporting import plots

    model = SimpleNamespace(name="Toy")
    fig = plots.lines(
        [2, 5, 9], {"full": [0.1, 0.5, 0.9], "ablated": [0.0, -0.2, 0.3]}, model=model, title="Score by year"
    )
    assert "Toy" in fig.layout.title.text
    assert [t.name for t in fig.data] == ["full", "ablated"]
    assert list(fig.data[1].y) == [0.0, -0.2, 0.3] and list(fig.data[0].x) == [2, 5, 9]
    with pytest.raises(ValueError, match="series\\['full'\\] has 2 values for 3"):
        plots.lines([2, 5, 9], {"full": [0.1, 0.5]}, model=model, title="t")
    with pytest.raises(ValueError, match="empty"):
        plots.lines([1], {}, model=model, title="t")


def test_a_new_run_clears_only_that_notebooks_earlier_outputs(figures_dir):
    folder = figures.model_folder(MODEL)
    figures.save_results(MODEL, "05", "old_knockout", {"x": 1.0})
    for name in ("05_fair_lending_knockout.html", "06_trace.png", "manifest.json", "plotly.min.js"):
        (folder / name).write_text("x")
    figures.save_results(OTHER_MODEL, "05", "kept", 1.0)
    deleted = figures.clear_notebook_outputs(MODEL, "05")
    assert sorted(p.name for p in deleted) == ["05_fair_lending_knockout.html", "05_results.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["06_trace.png", "manifest.json", "plotly.min.js"]
    assert figures.load_results(OTHER_MODEL, "05") == {"kept": 1.0}  # another model's folder is not touched
    assert figures.clear_notebook_outputs(MODEL, "05") == []
