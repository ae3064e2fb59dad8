"""``make site``: the executed notebooks as a static, offline website, one landing page per model, and a gallery.

A reader should not need Python to read mechfin. ``make figures`` executes every notebook (scratch copies in
``notebooks/_executed/``) and ends with ``make site``, which renders them into plain HTML pages that open from disk
with the network off.

**Why nbconvert.** It is Jupyter's own renderer (the same code as "File > Save and export as HTML"), already
installed with the notebook tooling, and renders one notebook at a time with no build system, theme download or
JavaScript framework. jupyter-book and mkdocs-jupyter would add a site generator, themes and their dependencies for
the same pages. mechfin uses nbconvert's ``basic`` template (the cells, no page shell, nothing fetched) inside a
small page of its own.

**Figures inline and interactive, offline.** A notebook's plotly figures are stored as plotly JSON, which static HTML
cannot show; each becomes a ``<div>`` drawn by the one local copy of plotly.js in ``assets/``. CircuitsVis views are
already self-contained HTML (their JavaScript inlined by mechfin's ``local_src``). Every page is checked for anything
that would load from the network (:func:`mechfin_utils.reporting.figures.remote_references`) and refused if it has any.

Layout (``site/`` beside ``figures/``; links between them are relative, so the two folders travel together)::

    site/index.html             entry page: the models, their notebooks, the gallery, how to open
    site/<model>/index.html     a model's landing page: its manifest (what produced the figures, and how long each
                                notebook took), its notebooks, its compliance report
    site/<model>/<notebook>.html   one executed notebook, every figure inline
    site/gallery.html           every figure: notebook, model, caption, links to the figure and to its numbers
    site/assets/                plotly.min.js, site.css

Run ``python -m mechfin_utils.reporting.website`` (defaults: ``notebooks/_executed``, ``figures/``, ``site/``).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from mechfin_utils.reporting.figures import REPO_ROOT, remote_references

PLOTLY_MIME = "application/vnd.plotly.v1+json"
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px; padding: 1.5em;
       color: #1d1d1d; line-height: 1.5; }
nav { font-size: 0.9em; margin-bottom: 1em; } nav a { margin-right: 1em; }
pre, code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; }
.jp-InputArea pre, .input_area pre, .jp-Cell-inputWrapper pre { background: #f5f5f7; padding: 0.6em; overflow-x: auto; }
.jp-OutputArea pre, .output_area pre { background: #fff; border-left: 3px solid #ddd; padding: 0.4em 0.6em; overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 0.25em 0.5em; }
.jp-InputPrompt, .jp-OutputPrompt { display: none; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 1em; }
.gallery figure { margin: 0; border: 1px solid #ddd; padding: 0.5em; } .gallery img { width: 100%; }
.plotly-figure { width: 100%; min-height: 420px; }
"""


@dataclass
class NotebookPage:
    model_slug: str
    stem: str
    title: str
    path: Path


@dataclass
class SiteReport:
    """What was built, and what could not be (named, never skipped silently)."""

    out: Path
    pages: list[NotebookPage] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    figures: int = 0


# ---------------------------------------------------------------------------------------------------------
# 1. Notebooks to HTML
# ---------------------------------------------------------------------------------------------------------


def plotly_outputs_to_html(nb: nbformat.NotebookNode) -> int:
    """Give every plotly output a ``text/html`` version drawn by the page's local plotly.js; returns how many."""
    count = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME not in data:
                continue
            figure = data[PLOTLY_MIME]
            div = f"mechfin-plotly-{count}"
            spec = json.dumps({"data": figure.get("data", []), "layout": figure.get("layout", {})}).replace(
                "</", "<\\/"
            )
            data["text/html"] = (
                f'<div id="{div}" class="plotly-figure"></div>\n'
                f"<script>(function() {{ var f = {spec}; "
                f'Plotly.newPlot("{div}", f.data, f.layout, {{responsive: true, displaylogo: false}}); }})();</script>'
            )
            del data[PLOTLY_MIME]
            count += 1
    return count


def notebook_title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The first markdown heading of the notebook."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, flags=re.M)
            if match:
                return match.group(1).strip()
    return fallback


def _page(title: str, body: str, *, assets: str, nav: str, plotly: bool = False) -> str:
    script = f'<script src="{assets}/plotly.min.js"></script>\n' if plotly else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title>\n<link rel="stylesheet" href="{assets}/site.css">\n{script}</head>\n'
        f"<body>\n<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


def render_notebook(path: Path, *, assets: str, nav: str) -> tuple[str, str]:
    """``(title, html page)`` of one executed notebook."""
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    plotly_outputs_to_html(nb)
    title = notebook_title(nb, path.stem)
    exporter = HTMLExporter(template_name="basic")
    body, _ = exporter.from_notebook_node(nb)
    return title, _page(title, body, assets=assets, nav=nav, plotly=True)


# ---------------------------------------------------------------------------------------------------------
# 2. Landing pages and gallery
# ---------------------------------------------------------------------------------------------------------


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def figure_caption(path: Path) -> str:
    match = re.search(r"<title>(.*?)</title>", path.read_text(errors="replace")[:4000], flags=re.S)
    return html.unescape(match.group(1)).strip() if match else path.stem


def _manifest_table(manifest: dict) -> str:
    rows = []
    for key in (
        "model",
        "weights_sha256",
        "commit",
        "machine",
        "cpu",
        "torch_threads_per_notebook",
        "notebooks_side_by_side",
        "written_at",
        "python",
    ):
        if key in manifest:
            rows.append(f"<tr><th>{key}</th><td>{html.escape(str(manifest[key]))}</td></tr>")
    packages = ", ".join(f"{k} {v}" for k, v in manifest.get("packages", {}).items())
    rows.append(f"<tr><th>packages</th><td>{html.escape(packages)}</td></tr>")
    times = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>"
        for k, v in manifest.get("seconds_per_notebook", {}).items()
    )
    return (
        f"<table>{''.join(rows)}</table>\n<h3>Seconds per notebook</h3>\n"
        f"<table><tr><th>notebook</th><th>seconds</th></tr>{times}</table>"
    )


@dataclass
class _Group:
    """One landing page: a model (with its manifest) or, for a test run without manifests, the whole run."""

    slug: str
    name: str
    manifest: dict | None
    notebooks: list[tuple[str, Path]]  # (stem, executed copy)
    figure_folders: list[Path]


def _groups(executed: Path, figures: Path) -> list[_Group]:
    """Each model with a ``manifest.json`` and the notebooks it lists (``executed/<model>-<notebook>.ipynb``); with
    no manifest at all (``make test``'s fast run), one group holding every executed copy and every figure folder."""
    # hidden folders are not models: figures/.staging holds notebooks of a run still going (see run_figures)
    manifests = sorted(p for p in figures.glob("*/manifest.json") if not p.parent.name.startswith("."))
    if manifests:
        groups = []
        for path in manifests:
            manifest = json.loads(path.read_text())
            slug = path.parent.name
            stems = sorted(manifest.get("seconds_per_notebook", {}))
            notebooks = [(stem, executed / f"{slug}-{stem}.ipynb") for stem in stems]
            groups.append(_Group(slug, manifest.get("model", slug), manifest, notebooks, [path.parent]))
        return groups
    folders = (
        sorted(p for p in figures.iterdir() if p.is_dir() and not p.name.startswith(".")) if figures.is_dir() else []
    )
    notebooks = [(p.stem, p) for p in sorted(executed.glob("*.ipynb"))]
    return [_Group("fast-run", "fast run (make test; no manifest)", None, notebooks, folders)]


def build_site(executed: Path, figures: Path, out: Path) -> SiteReport:
    """Render the notebooks of every group (see :func:`_groups`), the landing pages and the gallery into ``out``. A
    notebook a manifest lists but ``executed`` lacks is reported in ``missing`` and named on its model's page."""
    import plotly.offline

    report = SiteReport(out=out)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    (out / "assets" / "plotly.min.js").write_text(plotly.offline.get_plotlyjs())
    (out / "assets" / "site.css").write_text(CSS)
    top_nav = '<a href="index.html">mechfin</a><a href="gallery.html">figure gallery</a>'
    gallery_items, model_items = [], []
    for group in _groups(executed, figures):
        # 1. The group's notebooks.
        page_dir = out / group.slug
        page_dir.mkdir(parents=True, exist_ok=True)
        nav = (
            f'<a href="../index.html">mechfin</a><a href="index.html">{html.escape(group.name)}</a>'
            '<a href="../gallery.html">figure gallery</a>'
        )
        links, missing_here = [], []
        for stem, source in group.notebooks:
            if not source.is_file():
                missing_here.append(stem)
                report.missing.append(f"{group.slug}/{stem}: {source} not found")
                continue
            title, page = render_notebook(source, assets="../assets", nav=nav)
            remote = remote_references(page)
            if remote:
                raise ValueError(f"{source}: the rendered page would load from the network: {remote[:3]}")
            target = page_dir / f"{stem}.html"
            target.write_text(page)
            report.pages.append(NotebookPage(group.slug, stem, title, target))
            links.append(f'<li><a href="{stem}.html">{html.escape(title)}</a></li>')
        # 2. Its landing page: notebooks, compliance reports, manifest.
        reports = sorted(p for folder in group.figure_folders for p in folder.glob("*_compliance_report.html"))
        report_links = "".join(
            f'<li><a href="{_rel(p, page_dir)}">{html.escape(p.parent.name)}: {html.escape(p.name)}</a></li>'
            for p in reports
        )
        missing_note = (
            f"<p><strong>Not rendered</strong> (no executed copy; run <code>make figures</code>): "
            f"{', '.join(missing_here)}</p>"
            if missing_here
            else ""
        )
        manifest = (
            _manifest_table(group.manifest)
            if group.manifest
            else "<p>No manifest: this site was built from a test run.</p>"
        )
        body = (
            f"<h1>{html.escape(group.name)}</h1>\n<h2>Notebooks</h2>\n<ul>{''.join(links)}</ul>{missing_note}\n"
            f"<h2>Compliance reports</h2>\n<ul>{report_links or '<li>none for this model</li>'}</ul>\n"
            f"<h2>What produced these figures (manifest)</h2>\n{manifest}"
        )
        (page_dir / "index.html").write_text(_page(group.name, body, assets="../assets", nav=nav))
        model_items.append(
            f'<li><a href="{group.slug}/index.html">{html.escape(group.name)}</a> ({len(links)} notebooks)</li>'
        )
        # 3. Its figures, for the gallery.
        for folder in group.figure_folders:
            gallery_items += _gallery_items(folder, out, report)
    gallery = f'<h1>Figure gallery</h1>\n<p>{report.figures} figures.</p>\n<div class="gallery">{"".join(gallery_items)}</div>'
    (out / "gallery.html").write_text(_page("mechfin figure gallery", gallery, assets="assets", nav=top_nav))
    entry = (
        "<h1>mechfin</h1>\n<p>The executed notebooks of mechfin, a companion to Golgoon, Filom &amp; Kannan (ICAIF '24), "
        "rendered for reading. Every figure is inline and interactive; nothing here loads from the network. Each "
        "model's page says what produced its figures.</p>\n"
        f'<h2>Models</h2>\n<ul>{"".join(model_items)}</ul>\n<p><a href="gallery.html">Figure gallery</a> '
        f"({report.figures} figures, each with its notebook, model, caption and numbers).</p>"
    )
    (out / "index.html").write_text(_page("mechfin", entry, assets="assets", nav=top_nav))
    return report


def _gallery_items(folder: Path, out: Path, report: SiteReport) -> list[str]:
    """One gallery card per figure of ``folder``: thumbnail, caption (the figure's title), notebook, model, links."""
    items = []
    model = folder.name
    for fig in sorted(folder.glob("[0-9][0-9]*_*.html")):
        if fig.name.endswith("_compliance_report.html"):
            continue
        notebook = fig.name.split("_", 1)[0]
        png = fig.with_suffix(".png")
        results = folder / f"{notebook}_results.json"
        image = f'<img src="{_rel(png, out)}" alt="{html.escape(fig.stem)}">' if png.is_file() else ""
        numbers = f' · <a href="{_rel(results, out)}">numbers</a>' if results.is_file() else ""
        items.append(
            f'<figure><a href="{_rel(fig, out)}">{image}</a><figcaption><strong>{html.escape(figure_caption(fig))}'
            f"</strong><br>notebook {notebook} · {html.escape(model)} · "
            f'<a href="{_rel(fig, out)}">interactive</a>{numbers}</figcaption></figure>'
        )
        report.figures += 1
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mechfin_utils.reporting.website", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--executed", type=Path, default=REPO_ROOT / "notebooks" / "_executed")
    parser.add_argument("--figures", type=Path, default=REPO_ROOT / "figures")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "site")
    args = parser.parse_args(argv)
    if not args.executed.is_dir() or not any(args.executed.glob("*.ipynb")):
        print(f"error: no executed notebooks in {args.executed}: run make figures first", file=sys.stderr)
        return 2
    report = build_site(args.executed, args.figures, args.out)
    if report.figures == 0:
        print(
            f"error: no figures under {args.figures}: the gallery would be empty (is that where the run wrote them?)",
            file=sys.stderr,
        )
        return 1
    print(
        f"site: {len(report.pages)} notebook pages, {report.figures} figures in the gallery -> {args.out / 'index.html'}"
    )
    for line in report.missing:
        print(f"  not rendered: {line}")
    return 1 if report.missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
