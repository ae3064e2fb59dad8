"""The offline site of the fast run, built and opened in headless Chromium inside ``make test``'s pytest session.

``make test`` hands this file to pytest right after the notebooks and before the unit tests. Its one test waits until
every notebook of the session has written its executed copy (``notebooks/conftest.py`` writes each as soon as the
notebook's last cell has run), then builds the site from those copies and the run's figures and opens every page in
headless Chromium: no request may leave the site, no console error, every figure drawn; screenshots of three pages land
in ``<run>/screenshots``. While it does, the other worker goes on with the unit tests. ``make test-site`` does the same
on its own, from the last run's files.

No notebook in the session, or no ``MECHFIN_EXECUTED_DIR`` in ``$MECHFIN_NOTEBOOK_ENV``: skipped, with the reason.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mechfin_utils.tooling import testing

WAIT_S = 40 * 60
"""How long to wait for the notebooks' executed copies: longer than the whole of ``make test``, so that reaching it
means a notebook never finished (its kernel hung), which the message names."""


def _run(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    print(done.stdout, done.stderr, sep="\n")
    assert done.returncode == 0, f"python -m {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def test_the_fast_runs_site_builds_and_every_page_passes_the_browser_check(request):
    environment = testing.notebook_environment()
    executed, figures = environment.get("MECHFIN_EXECUTED_DIR"), environment.get("MECHFIN_FIGURES_DIR")
    if not executed or not figures:
        pytest.skip("$MECHFIN_NOTEBOOK_ENV names no MECHFIN_EXECUTED_DIR and MECHFIN_FIGURES_DIR (make test sets both)")
    notebooks = sorted({Path(str(item.fspath)).name for item in request.session.items if hasattr(item, "cell")})
    if not notebooks:
        pytest.skip("no notebook runs in this session, so there is no site to build")
    # 1. wait for every notebook's executed copy
    waited_from = time.monotonic()
    missing = notebooks
    while missing and time.monotonic() - waited_from < WAIT_S:
        missing = [name for name in notebooks if not (Path(executed) / name).is_file()]
        if missing:
            time.sleep(1.0)
    assert not missing, f"after {WAIT_S} s these notebooks had still not finished: {missing}"
    # 2. build the site, 3. open every page in headless Chromium
    run = Path(executed).parent
    _run("mechfin_utils.reporting.website", "--executed", executed, "--figures", figures, "--out", str(run / "site"))
    _run("mechfin_utils.reporting.website_check", str(run / "site"), "--screenshots", str(run / "screenshots"))
