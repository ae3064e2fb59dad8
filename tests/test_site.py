"""The offline site: plotly outputs drawn from the local plotly.js, landing pages with their manifest, a gallery whose
links resolve, pages that would load from the network refused; the browser check passes a good page and fails a blank
figure, a script error and a request to the network; make verify names every number that moved."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from mechfin_utils.reporting import website as site
from mechfin_utils.reporting import website_check as site_check
from mechfin_utils.reporting.static_export import find_browser
from mechfin_utils.tooling import verify

FIGURE = {"data": [{"type": "bar", "x": ["a", "b"], "y": [1, 3]}], "layout": {"title": {"text": "Bars — Model X"}}}


def _executed_notebook(path: Path, heading: str, html_output: str | None = None) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {heading}\n\nSome text."), nbformat.v4.new_code_cell("fig")]
    nb.cells[1].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="hello\n"),
        nbformat.v4.new_output("display_data", data={site.PLOTLY_MIME: FIGURE}),
    ]
    if html_output is not None:
        nb.cells[1].outputs.append(nbformat.v4.new_output("display_data", data={"text/html": html_output}))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _layout(tmp_path: Path, with_manifest: bool = True) -> tuple[Path, Path]:
    figures, executed = tmp_path / "figures", tmp_path / "executed"
    folder = figures / "model-x"
    folder.mkdir(parents=True)
    (folder / "00_bars.html").write_text("<html><head><title>Bars — Model X</title></head><body></body></html>")
    (folder / "00_bars.png").write_bytes(b"\x89PNG\r\n")
    (folder / "00_results.json").write_text(json.dumps({"results": {"x": 1}}))
    (folder / "08_compliance_report.html").write_text("<html><body>report</body></html>")
    if with_manifest:
        manifest = {"model": "Model X", "weights_sha256": "ab" * 32, "seconds_per_notebook": {"00_a": 1.5, "01_b": 2.0}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        _executed_notebook(executed / "model-x-00_a.ipynb", "00 · A notebook")
    else:
        _executed_notebook(executed / "00_a.ipynb", "00 · A notebook")
    return executed, figures


def test_plotly_outputs_become_divs_drawn_by_the_local_plotly():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x")]
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data={site.PLOTLY_MIME: FIGURE})]
    assert site.plotly_outputs_to_html(nb) == 1
    data = nb.cells[0].outputs[0]["data"]
    assert site.PLOTLY_MIME not in data and 'Plotly.newPlot("mechfin-plotly-0"' in data["text/html"]


def test_site_has_landing_pages_with_manifest_a_gallery_and_links_that_resolve(tmp_path):
    executed, figures = _layout(tmp_path)
    out = tmp_path / "site"
    report = site.build_site(executed, figures, out)
    assert [p.stem for p in report.pages] == ["00_a"] and report.figures == 1
    assert report.missing == [f"model-x/01_b: {executed / 'model-x-01_b.ipynb'} not found"]  # named, not skipped
    landing = (out / "model-x" / "index.html").read_text()
    assert "ab" * 32 in landing and "01_b" in landing and "08_compliance_report.html" in landing
    gallery = (out / "gallery.html").read_text()
    assert "Bars — Model X" in gallery and "00_results.json" in gallery and "notebook 00" in gallery
    page = (out / "model-x" / "00_a.html").read_text()
    assert "00 · A notebook" in page and "../assets/plotly.min.js" in page and "mechfin-plotly-0" in page
    for html_page in out.rglob("*.html"):
        assert site_check.local_link_problems(html_page, html_page.read_text()) == [], html_page


def test_a_test_run_without_manifests_is_one_group_and_a_page_loading_from_the_network_is_refused(tmp_path):
    executed, figures = _layout(tmp_path, with_manifest=False)
    report = site.build_site(executed, figures, tmp_path / "site")
    assert [(p.model_slug, p.stem) for p in report.pages] == [("fast-run", "00_a")]
    _executed_notebook(
        executed / "01_remote.ipynb", "01 · Remote", '<script src="https://cdn.example.com/x.js"></script>'
    )
    with pytest.raises(ValueError, match="would load from the network"):
        site.build_site(executed, figures, tmp_path / "site2")


def test_site_command_refuses_an_empty_gallery_and_a_missing_run(tmp_path, capsys):
    executed, figures = _layout(tmp_path, with_manifest=False)
    assert (
        site.main(["--executed", str(tmp_path / "nowhere"), "--figures", str(figures), "--out", str(tmp_path / "s")])
        == 2
    )
    assert (
        site.main(["--executed", str(executed), "--figures", str(tmp_path / "empty"), "--out", str(tmp_path / "s")])
        == 1
    )
    assert "the gallery would be empty" in capsys.readouterr().err
    assert site.main(["--executed", str(executed), "--figures", str(figures), "--out", str(tmp_path / "s")]) == 0


@pytest.mark.skipif(find_browser() is None, reason="no Chromium: make setup installs it")
def test_browser_check_passes_a_good_page_and_fails_blank_figures_errors_and_network(tmp_path):
    executed, figures = _layout(tmp_path, with_manifest=False)
    _executed_notebook(executed / "01_blank.ipynb", "01 · Blank", "<script>Plotly.purge('mechfin-plotly-0')</script>")
    _executed_notebook(executed / "02_error.ipynb", "02 · Error", "<script>undefinedFunction()</script>")
    _executed_notebook(executed / "03_fetch.ipynb", "03 · Fetch", "<script>fetch('http://example.com/data')</script>")
    out = tmp_path / "site"
    site.build_site(executed, figures, out)
    browser = find_browser()
    good = site_check.check_page(out / "fast-run" / "00_a.html", browser, tmp_path / "shots" / "good.png")
    assert good.ok, good.problems
    assert good.plotly_figures == 1 and (tmp_path / "shots" / "good.png").stat().st_size > 1000
    blank = site_check.check_page(out / "fast-run" / "01_blank.html", browser)
    assert any("is blank" in p for p in blank.problems), blank.problems
    error = site_check.check_page(out / "fast-run" / "02_error.html", browser)
    assert any("uncaught: ReferenceError: undefinedFunction" in p for p in error.problems), error.problems
    fetch = site_check.check_page(out / "fast-run" / "03_fetch.html", browser)
    assert "request leaves the site: http://example.com/data" in fetch.problems, fetch.problems


def test_verify_names_every_number_that_moved_and_ignores_timings(tmp_path, monkeypatch, capsys):
    committed, fresh = tmp_path / "committed", tmp_path / "fresh"
    for root, value, seconds in ((committed, 0.5, 10.0), (fresh, 0.50001, 99.0)):
        (root / "m").mkdir(parents=True)
        results = {"results": {"a": {"b": [1.0, value]}, "seconds": seconds, "name": "x", "moved": 2.0}}
        (root / "m" / "05_results.json").write_text(json.dumps(results))
    (fresh / "m" / "05_results.json").write_text(
        json.dumps({"results": {"a": {"b": [1.0, 0.50001]}, "seconds": 99.0, "name": "x", "moved": 2.1}})
    )
    moved, compared = verify.compare_runs(committed, fresh)
    assert compared == 1 and [(m.path, m.committed, m.fresh) for m in moved] == [("/moved", 2.0, 2.1)]
    assert verify.compare_values([1, 2], [1, 2, 3]) == [(" (length)", 2, 3)]
    assert verify.compare_values(1000.0, 1000.05) == []  # relative above 1
    monkeypatch.setenv("MECHFIN_FIGURES_DIR", str(committed))
    assert verify.main(["--fresh", str(fresh)]) == 1
    assert "MOVED m/05_results.json: /moved: committed 2.0, now 2.1" in capsys.readouterr().out
