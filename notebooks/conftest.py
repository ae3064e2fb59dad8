"""When ``$MECHFIN_EXECUTED_DIR`` is set, ``make test``'s notebook run also writes each notebook's executed copy there.

nbval runs every cell in a real kernel and keeps each cell's outputs (``item.test_outputs``); this hook puts them back
into the notebook and writes it once all its cells have run, so the offline site and its browser check
(``make test-site``) are built from exactly the run the tests checked, at no extra cost.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

_notebooks: dict[str, object] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    folder = os.environ.get("MECHFIN_EXECUTED_DIR")
    if not folder or call.when != "call" or not hasattr(item, "test_outputs") or item.test_outputs is None:
        return
    item.cell.outputs = list(item.test_outputs)
    if item.cell.get("cell_type") == "code":
        item.cell.execution_count = getattr(item, "cell_num", None)
    _notebooks[str(item.parent.fspath)] = item.parent


def pytest_sessionfinish(session, exitstatus):
    folder = os.environ.get("MECHFIN_EXECUTED_DIR")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for path, parent in _notebooks.items():
        nbformat.write(parent.nb, Path(folder) / Path(path).name)
