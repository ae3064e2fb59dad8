"""Writing figures and numbers to disk: the one place every notebook saves its output through.

Layout (``<root>`` is ``figures/`` at the repo root, or ``$MECHFIN_FIGURES_DIR`` when set)::

    <root>/<model-slug>/<notebook>_<name>.png    static, for papers and the README (kaleido + Chromium)
    <root>/<model-slug>/<notebook>_<name>.svg    static, vector
    <root>/<model-slug>/<notebook>_<name>.html   interactive: loads plotly.js from plotly.min.js in the same
                                                 folder, so it opens offline and never fetches from a CDN
    <root>/<model-slug>/plotly.min.js            one local copy of the installed plotly.js bundle
    <root>/<model-slug>/<notebook>_results.json  the numbers behind the notebook's figures

Decisions, made once here so notebooks do not each make them:

``notebook``
    The notebook's two-digit number, as in its file name: ``"00"`` for ``00_task_and_baseline.ipynb``
    (optionally one lowercase letter after it, ``"03b"``). Only the number, so renaming a notebook does not
    orphan its figures, and every figure of a notebook sorts together. Anything else is a ValueError.
``name``
    A safe slug: lowercase letters and digits, words joined by ``_`` or ``-`` (``"head_dla"``).
Titles
    :func:`save_figure` refuses a figure whose title does not contain the model's display name, so no
    figure can be separated from the model that produced it.
Static export
    PNG and SVG come from :mod:`mechfin_utils.reporting.static_export` (kaleido and a headless Chromium, one per
    process; fixed sizes and ids, so saving the same figure twice gives the same bytes).
No Chromium
    The HTML file is still written, then :class:`~mechfin_utils.reporting.static_export.StaticExportUnavailableError`
    says how to install one. To write HTML only, on purpose, set ``MECHFIN_STATIC_FIGURES=0``.
Results JSON
    Keys merge into the notebook's file (later values replace earlier ones under the same key); the file is
    written with sorted keys and indentation so diffs stay readable. numpy and torch scalars and arrays
    become plain numbers and lists. NaN and infinity are refused (a ValueError naming where they are): JSON
    has no such values, and a null would hide a result that went wrong. Store ``None`` deliberately if a
    value is genuinely missing.
Which models a results file depends on
    ``load_model`` notes every model it loads (``core.models.note_model_loaded``); the results file of a model loaded so
    carries ``"models_loaded"``: the figures-folder names (slugs) of every model its process loaded, sorted. A
    notebook runs in a kernel of its own, so that is what the notebook used: notebook 08's screener results list
    the base model too, notebook 10's base results the screener. ``make verify`` reads it to know which numbers
    were computed with weights that differ from the committed run's. A stand-in model (tests) that ``load_model``
    never loaded writes no such key, and files written before the key existed lack it (``make verify`` then
    takes the file's own folder model alone).
"""

from __future__ import annotations

import dataclasses
import html as html_lib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mechfin_utils.core.models import models_loaded
from mechfin_utils.core.paths import REPO_ROOT, write_atomically
from mechfin_utils.reporting.static_export import static_export_enabled, static_figure

FIGURES_DIR_ENV = "MECHFIN_FIGURES_DIR"
_NOTEBOOK_RE = re.compile(r"^[0-9]{2}[a-z]?$")
_NAME_RE = re.compile(r"^[a-z0-9]+(?:[_-][a-z0-9]+)*$")
_MODEL_SLUG_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
RESULTS_SCHEMA_KEYS = ("model", "notebook", "results")
RESULTS_OPTIONAL_KEYS = ("models_loaded",)
"""Keys a results file may have besides :data:`RESULTS_SCHEMA_KEYS` (see "Which models a results file depends on")."""


class ModelLike(Protocol):
    """Anything that names a model: a :class:`~mechfin_utils.core.models.LoadedModel`, or a stand-in in tests."""

    @property
    def name(self) -> str: ...

    @property
    def slug(self) -> str: ...


# ---------------------------------------------------------------------------------------------------------
# Paths and validation
# ---------------------------------------------------------------------------------------------------------


def figures_root() -> Path:
    """``$MECHFIN_FIGURES_DIR`` when set (read at every call, so tests can redirect it), else ``figures/``."""
    override = os.environ.get(FIGURES_DIR_ENV, "").strip()
    return Path(override).expanduser() if override else REPO_ROOT / "figures"


def _model_identity(model: ModelLike) -> tuple[str, str]:
    name = getattr(model, "name", None)
    slug = getattr(model, "slug", None)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model must have a non-empty display name in .name, got {name!r}")
    if not isinstance(slug, str) or not _MODEL_SLUG_RE.fullmatch(slug):
        raise ValueError(
            f"model.slug must be a safe folder name (lowercase letters, digits, '.', '_', '-'), got {slug!r}"
        )
    return name, slug


def _check_notebook(notebook: str) -> str:
    if not isinstance(notebook, str) or not _NOTEBOOK_RE.fullmatch(notebook):
        hint = ""
        if isinstance(notebook, str) and re.match(r"^[0-9]{2}", notebook):
            hint = f" (for {notebook!r}, write {notebook[:2]!r})"
        raise ValueError(
            f"notebook must be the notebook's two-digit number, e.g. '00' or '03b', got {notebook!r}{hint}"
        )
    return notebook


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > 80:
        raise ValueError(
            f"name must be a safe slug (lowercase letters and digits, words joined by '_' or '-', at most 80 "
            f"characters, e.g. 'head_dla'), got {name!r}"
        )
    return name


def model_folder(model: ModelLike) -> Path:
    """``<root>/<model-slug>/`` (not created)."""
    return figures_root() / _model_identity(model)[1]


def figure_paths(model: ModelLike, notebook: str, name: str) -> dict[str, Path]:
    """Where :func:`save_figure` writes: ``{"png": ..., "svg": ..., "html": ...}`` (nothing is created)."""
    stem = f"{_check_notebook(notebook)}_{_check_name(name)}"
    folder = model_folder(model)
    return {ext: folder / f"{stem}.{ext}" for ext in ("png", "svg", "html")}


def results_path(model: ModelLike, notebook: str) -> Path:
    """``<root>/<model-slug>/<notebook>_results.json`` (not created)."""
    return model_folder(model) / f"{_check_notebook(notebook)}_results.json"


def clear_notebook_outputs(model: ModelLike, notebook: str) -> list[Path]:
    """Delete ``<root>/<model-slug>/<notebook>_*`` (figures and results of an earlier run of this notebook on this
    model) and return what was deleted. A run starts from an empty slate, so a figure or result the notebook no longer
    makes (a knockout skipped this time, a renamed figure) cannot outlive it; the manifest and the shared plotly.js
    are not the notebook's and stay.

    Under ``make figures`` the root is the notebook's own staging folder, empty, and the committed files are replaced
    only once the notebook has finished (``mechfin_utils.tooling.staging.swap_in``); run by hand in Jupyter, this
    clears ``figures/``."""
    folder = model_folder(model)
    stale = sorted(folder.glob(f"{_check_notebook(notebook)}_*")) if folder.is_dir() else []
    for path in stale:
        path.unlink()
    return stale


def figure_title(fig) -> str:
    """The text of a plotly figure's title ('' when it has none)."""
    text = fig.layout.title.text
    return text if isinstance(text, str) else ""


# ---------------------------------------------------------------------------------------------------------
# Offline-safety of HTML
# ---------------------------------------------------------------------------------------------------------

_REMOTE_PATTERNS = (
    ("a <script src> loading from the network", re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//", re.I)),
    ("a <link href> loading from the network", re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?\s*(?:https?:)?//", re.I)),
    (
        "an ES-module import from the network",
        re.compile(r"\bimport\s*(?:[\w$*{},\s]+?\s*from\s*)?[\"'](?:https?:)?//", re.I),
    ),
    ("a dynamic import() from the network", re.compile(r"\bimport\s*\(\s*[\"'](?:https?:)?//", re.I)),
)


def remote_references(html: str) -> list[str]:
    """Places where ``html`` would fetch code or styles from the network (empty when it renders offline).

    Plain URLs inside inlined JavaScript (error-message links, XML namespaces) are not loads and are
    ignored; what is reported are ``<script src=...>``, ``<link href=...>`` and ``import`` statements that
    point at ``http(s)://`` or protocol-relative ``//`` addresses.
    """
    found = []
    for what, pattern in _REMOTE_PATTERNS:
        for match in pattern.finditer(html):
            snippet = html[match.start() : match.start() + 120].replace("\n", " ")
            found.append(f"{what}: {snippet!r}")
    return found


# ---------------------------------------------------------------------------------------------------------
# Public: figures
# ---------------------------------------------------------------------------------------------------------


def _html_document_title(document: str, title: str) -> str:
    """Give a full HTML document a ``<title>`` (plotly's ``to_html`` writes none)."""
    tag = f"<title>{html_lib.escape(_plain_text(title))}</title>"
    return re.sub(r"<head>", "<head>" + tag, document, count=1, flags=re.I)


def _plain_text(title: str) -> str:
    return re.sub(r"<[^>]+>", " ", title).strip()


PLOTLYJS_NAME = "plotly.min.js"


def _ensure_local_plotlyjs(folder: Path) -> Path:
    """One local copy of plotly.js per figures folder, which every figure page there loads by relative path.

    Inlining the 4.7 MB bundle into each page would make every figure ~5 MB; a single local copy keeps the
    pages small and still renders offline (open the page from its folder, or copy the folder whole).
    """
    import plotly.offline

    bundle = plotly.offline.get_plotlyjs().encode("utf-8")
    target = folder / PLOTLYJS_NAME
    if not target.is_file() or target.read_bytes() != bundle:
        write_atomically(target, bundle)
    return target


def save_figure(
    fig,
    *,
    model: ModelLike,
    notebook: str,
    name: str,
    results: dict[str, Any] | None = None,
    width: int | None = None,
    height: int | None = None,
    shown: Sequence[ModelLike] = (),
) -> dict[str, Path]:
    """Write a plotly figure as ``.html`` (offline), ``.png`` and ``.svg``; return the three paths.

    The HTML page loads plotly.js from ``plotly.min.js`` in the same folder (written once per folder, the
    version installed here), never from a CDN.

    Args:
        fig: a ``plotly.graph_objects.Figure`` whose title contains the name of every model it shows (else
            ValueError).
        model: the notebook's model (``.name`` and ``.slug``): the figure is written into its folder, and it is the
            model the figure shows unless ``shown`` says otherwise.
        notebook: the notebook's two-digit number, ``"00"``.
        name: a slug naming the figure within the notebook, ``"head_dla"``.
        results: optional numbers behind the figure, merged into the notebook's results JSON
            (see :func:`save_results`), each under its own key.
        width, height: static export size in layout pixels; default the figure's own, else 900 x 550.
        shown: the models whose numbers the figure shows, when they are not ``model`` (notebook 12 writes figures of
            the first screener into its repaired screener's folder): the title must name each of them.

    The HTML is written first, so it exists even when static export is unavailable; in that case
    :class:`~mechfin_utils.reporting.static_export.StaticExportUnavailableError` is raised afterwards (unless
    ``MECHFIN_STATIC_FIGURES=0``, when only ``"html"`` is returned).
    """
    import plotly.graph_objects as go

    if not isinstance(fig, go.Figure):
        raise TypeError(f"fig must be a plotly.graph_objects.Figure, got {type(fig).__name__}")
    paths = figure_paths(model, notebook, name)
    title = figure_title(fig)
    for shown_model in shown or (model,):
        model_name, _ = _model_identity(shown_model)
        if model_name not in title:
            raise ValueError(
                f"figure {notebook}_{name}: its title must contain the display name {model_name!r} of the model it "
                f"shows (title is {title!r}); build it with mechfin_utils.reporting.plots, or add the name to the title"
            )
    if results is not None:
        if not isinstance(results, dict):
            raise TypeError(f"results must be a dict of key -> value, got {type(results).__name__}")
        for key, value in results.items():
            save_results(model, notebook, key, value)

    document = fig.to_html(
        include_plotlyjs="directory", full_html=True, div_id=f"mechfin-{notebook}-{name}", include_mathjax=False
    )
    _ensure_local_plotlyjs(paths["html"].parent)
    document = _html_document_title(document, title)
    problems = remote_references(document)
    if problems:  # would only happen if plotly changed how it inlines itself; never write a CDN-dependent file
        raise RuntimeError(f"plotly produced HTML that loads from the network: {problems[:3]}")
    write_atomically(paths["html"], document.encode("utf-8"))
    written = {"html": paths["html"]}
    if not static_export_enabled():
        return written

    static = static_figure(fig, width=width, height=height)
    write_atomically(paths["png"], static["png"])
    write_atomically(paths["svg"], static["svg"])
    written.update(png=paths["png"], svg=paths["svg"])
    return {ext: written[ext] for ext in ("png", "svg", "html") if ext in written}


def save_html(
    html: Any,
    *,
    model: ModelLike,
    notebook: str,
    name: str,
    title: str | None = None,
) -> Path:
    """Write an interactive non-plotly view (e.g. a circuitsvis figure) as ``<notebook>_<name>.html``.

    ``html`` is an HTML *fragment*: pass circuitsvis's ``obj.local_src`` (JavaScript inlined), or the
    circuitsvis object itself (its ``.local_src`` is used). ``str(obj)`` is refused: it imports the
    JavaScript from a CDN and renders blank offline. Any fragment that loads code or styles from the network
    is refused the same way (see :func:`remote_references`).

    The fragment is wrapped into a page headed by ``title`` (default ``"<name> — <model name>"``); a
    title given explicitly must contain the model's display name.
    """
    model_name, _ = _model_identity(model)
    path = figure_paths(model, notebook, name)["html"]
    if not isinstance(html, str):
        if isinstance(getattr(html, "local_src", None), str):
            html = html.local_src
        else:
            raise TypeError(f"html must be a str (or a circuitsvis object), got {type(html).__name__}")
    if not html.strip():
        raise ValueError(f"html for {notebook}_{name} is empty")
    if re.search(r"<html\b|<!doctype", html, re.I):
        raise ValueError(
            f"html for {notebook}_{name} is a full document; pass the fragment (e.g. circuitsvis .local_src) "
            "and save_html wraps it in a titled page"
        )
    problems = remote_references(html)
    if problems:
        raise ValueError(
            f"html for {notebook}_{name} loads from the network and would be blank offline (circuitsvis: use "
            f"obj.local_src, not str(obj)): {problems[:3]}"
        )
    if title is None:
        title = f"{name} — {model_name}"
    elif model_name not in title:
        raise ValueError(f"title must contain the model's display name {model_name!r}, got {title!r}")
    html = fixed_view_ids(html, f"{notebook}-{name}")
    safe_title = html_lib.escape(title)
    document = (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8" />\n'
        f"<title>{safe_title}</title>\n</head>\n<body>\n"
        f'<h2 style="font-family: sans-serif; font-weight: normal">{safe_title}</h2>\n'
        f"{html}\n</body>\n</html>\n"
    )
    write_atomically(path, document.encode("utf-8"))
    return path


_CIRCUITSVIS_ID = re.compile(r"circuits-vis-[0-9a-f]{8}-[0-9a-f]{4}")


def fixed_view_ids(html: str, stem: str) -> str:
    """circuitsvis names each view's element ``circuits-vis-<random>`` (a fresh uuid on every render), so the same view
    saved twice would differ and every ``make figures`` would rewrite megabytes of unchanged HTML. Each distinct
    random id becomes ``circuits-vis-<stem>-<k>`` (``k`` in order of first appearance), everywhere it occurs, so that
    the page still finds its element."""
    order: dict[str, str] = {}
    safe = re.sub(r"[^0-9A-Za-z_-]", "-", stem)

    def fixed(match: re.Match[str]) -> str:
        return order.setdefault(match.group(0), f"circuits-vis-{safe}-{len(order)}")

    return _CIRCUITSVIS_ID.sub(fixed, html)


# ---------------------------------------------------------------------------------------------------------
# Public: results JSON
# ---------------------------------------------------------------------------------------------------------


def to_jsonable(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON types: numpy/torch scalars and arrays -> numbers and nested lists,
    tuples -> lists, dataclasses -> dicts, pandas DataFrames -> lists of row dicts, Series -> dicts.

    NaN/infinity, non-string dict keys and unknown types raise a ValueError/TypeError naming ``where``
    (the path into the value, e.g. ``value['per_layer'][3]``).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(
                f"{where} is {number}: JSON has no NaN/infinity and mechfin does not turn them into null; "
                "fix the computation, or store None deliberately"
            )
        return number
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}; use str keys (JSON keys are strings)")
            out[key] = to_jsonable(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{where} is a numpy array of dtype {value.dtype}; only bool/int/float arrays are stored")
        return to_jsonable(value.tolist(), where)
    torch_tensor = _torch_tensor_type()
    if torch_tensor is not None and isinstance(value, torch_tensor):
        if value.is_complex():
            raise TypeError(f"{where} is a complex tensor; store real and imaginary parts separately")
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.double()
        return to_jsonable(tensor.tolist(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    pandas = _pandas_module()
    if pandas is not None and isinstance(value, pandas.DataFrame):
        return to_jsonable(
            value.reset_index(drop=all(n is None for n in value.index.names)).to_dict(orient="records"), where
        )
    if pandas is not None and isinstance(value, pandas.Series):
        return to_jsonable({str(k): v for k, v in value.to_dict().items()}, where)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{where} has type {type(value).__name__}, which mechfin does not store in results JSON")


def _torch_tensor_type():
    import sys

    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _pandas_module():
    import sys

    return sys.modules.get("pandas")


def load_results(model: ModelLike, notebook: str) -> dict[str, Any]:
    """The notebook's stored results (``{}`` when none were saved yet), without the model header."""
    path = results_path(model, notebook)
    if not path.is_file():
        return {}
    return dict(_read_results_file(path, model, notebook)["results"])


def _read_results_file(path: Path, model: ModelLike, notebook: str) -> dict[str, Any]:
    model_name, slug = _model_identity(model)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    if (
        not isinstance(stored, dict)
        or not set(RESULTS_SCHEMA_KEYS) <= set(stored)
        or not set(stored) <= {*RESULTS_SCHEMA_KEYS, *RESULTS_OPTIONAL_KEYS}
    ):
        raise ValueError(
            f"{path} is not a mechfin results file (expected keys {RESULTS_SCHEMA_KEYS}, and optionally "
            f"{RESULTS_OPTIONAL_KEYS})"
        )
    if stored["model"] != {"name": model_name, "slug": slug}:
        raise ValueError(
            f"{path} holds results of model {stored['model']}, not {{'name': {model_name!r}, 'slug': {slug!r}}}"
        )
    return stored


def save_results(model: ModelLike, notebook: str, key: str, value: Any) -> Path:
    """Store ``value`` under ``key`` in ``<root>/<model-slug>/<notebook>_results.json``; return its path.

    The file is ``{"model": {"name", "slug"}, "notebook": "00", "results": {key: value, ...}}``, plus
    ``"models_loaded"`` when ``model`` was loaded by ``load_model`` in this process (every model the process loaded,
    rewritten at each save; see the module docstring); keys from earlier calls are kept, the same key is replaced.
    Values go through :func:`to_jsonable` (NaN refused).
    """
    model_name, slug = _model_identity(model)
    _check_notebook(notebook)
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"results key must be a non-empty string, got {key!r}")
    plain = to_jsonable(value, f"results[{key!r}]")
    path = results_path(model, notebook)
    stored: dict[str, Any] = (
        _read_results_file(path, model, notebook)
        if path.is_file()
        else {"model": {"name": model_name, "slug": slug}, "notebook": notebook, "results": {}}
    )
    stored["results"][key] = plain
    loaded = models_loaded()
    if slug in loaded:
        stored["models_loaded"] = loaded
    text = json.dumps(stored, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    write_atomically(path, text.encode("utf-8"))
    return path
