"""The notebooks' side of ``make test``: each notebook's kernel gets an environment of its own, and its executed copy
is written where the site is built from.

**An environment of its own.** ``make test`` runs the unit tests and the notebooks in one pytest session, so that the
two workers share out all of the work and neither idles while the other finishes. The notebooks need fast mode and
scratch folders (``MECHFIN_FAST=1``, ``MECHFIN_FIGURES_DIR``, ``MECHFIN_EXECUTED_DIR``), which the unit tests must not
see. ``$MECHFIN_NOTEBOOK_ENV`` (``NAME=value`` words separated by spaces) holds them: they are set only while nbval
starts a notebook's kernel (in its first cell's setup), so the kernel inherits them and the test process gets its own
environment back. Without it, a notebook's kernel inherits the environment as it is (``make test-notebooks``).

**The executed copy.** When ``MECHFIN_EXECUTED_DIR`` is set (in ``$MECHFIN_NOTEBOOK_ENV`` or the environment), each
notebook's executed copy is written there: nbval runs every cell in a real kernel and keeps each cell's outputs
(``item.test_outputs``); the hooks below put them back into the notebook and write it once all its cells have run, so
the offline site and its browser check are built from exactly the run the tests checked, at no extra cost. Each copy
is written as soon as its notebook's last cell has run, so that the site check
(``notebooks/test_fast_run_site.py``, in the same session) can start while the other worker runs unit tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from mechfin_utils.tooling import testing

_notebooks: dict[str, object] = {}


def notebook_environment() -> dict[str, str]:
    try:
        return testing.notebook_environment()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def _executed_folder() -> str | None:
    return notebook_environment().get("MECHFIN_EXECUTED_DIR") or os.environ.get("MECHFIN_EXECUTED_DIR")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    extra = notebook_environment() if hasattr(item, "cell") else {}
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    folder = _executed_folder()
    if not folder or call.when != "call" or not hasattr(item, "test_outputs") or item.test_outputs is None:
        return
    item.cell.outputs = list(item.test_outputs)
    if item.cell.get("cell_type") == "code":
        item.cell.execution_count = getattr(item, "cell_num", None)
    _notebooks[str(item.parent.fspath)] = item.parent


def _write_executed(folder: str, path: str) -> None:
    """The executed copy of notebook ``path``, written whole (a reader polling the folder never sees half a file)."""
    target = Path(folder) / Path(path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    nbformat.write(_notebooks.pop(path).nb, partial)
    partial.replace(target)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """A notebook's last cell has run (the next item is another file's, or none): write its executed copy now."""
    folder = _executed_folder()
    path = str(item.parent.fspath) if hasattr(item, "cell") else None
    if folder and path in _notebooks and (nextitem is None or nextitem.parent is not item.parent):
        _write_executed(folder, path)


def pytest_sessionfinish(session, exitstatus):
    folder = _executed_folder()
    if not folder:
        return
    for path in list(_notebooks):  # a notebook whose run was cut short: what it ran
        _write_executed(folder, path)
