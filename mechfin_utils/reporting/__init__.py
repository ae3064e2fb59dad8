"""Reporting: everything a reader sees, made from the methods' results. Above the methods and the screener; below the
tooling.

* ``figures`` -- the one place every notebook saves through: figure paths by model and notebook, offline HTML, the
  results JSON (``static_export`` makes the PNG and SVG copies with kaleido and a headless Chromium);
* ``notebook`` -- what every notebook does first: its parameters turned into a model, a task set and a figure writer;
* ``plots`` (the shared chart helpers), ``circuit_plots`` and ``trace_plots`` -- plotly figures, each titled with its
  model's name;
* ``readout_tables`` and ``token_tables`` -- readout results as tables (means with bootstrap intervals; tokens made
  readable); ``tables`` -- the one Markdown-table writer;
* ``website`` and ``website_check`` (``make site``, ``make test-site``) -- the executed notebooks as an offline site,
  and its check in headless Chromium.

Exported here: what a notebook saves through.
"""

from mechfin_utils.reporting.figures import (
    clear_notebook_outputs,
    figures_root,
    load_results,
    model_folder,
    save_figure,
    save_html,
    save_results,
)
from mechfin_utils.reporting.tables import markdown_table

__all__ = [
    "clear_notebook_outputs",
    "figures_root",
    "load_results",
    "markdown_table",
    "model_folder",
    "save_figure",
    "save_html",
    "save_results",
]
