"""Staging for ``make figures``: each notebook runs in a process of its own and writes into a folder of its own, and
its outputs reach the figures folder whole, only once it has finished.

**Nothing half-written.** A notebook never writes into ``figures/`` itself. Each one runs in a papermill process of its
own (:func:`execute_notebook`) whose kernel sees ``$MECHFIN_FIGURES_DIR`` = ``figures/.staging/<job>/figures/`` (a
folder of its own, :func:`job_folder`), and its executed copy is written beside it. Only when the notebook finished
without error are its outputs moved into ``figures/`` (:func:`swap_in`): for each model folder it wrote into, its
files replace the folder's files of the same notebook number one by one with ``os.replace`` (atomic: a file is either
the old one or the new one, never half written), then that notebook's older files the new run did not write are
removed.

**Stopping.** A run stopped by Ctrl-C (or ``kill``: :func:`interrupt_on_sigterm`), a closed laptop or a failing cell
leaves the committed figures as they were. Ctrl-C stops every running papermill process (:func:`stop_all_notebooks`:
SIGTERM, which papermill takes as its own Ctrl-C and shuts its kernel down, SIGKILL after a grace period) and lets no
new one start. Only the run decides: a terminal's Ctrl-C reaches the whole process group, and a papermill process
that took it itself could finish cleanly before the run had marked itself stopped, and move its outputs in after the
stop; so papermill runs with Ctrl-C ignored (:data:`PAPERMILL_WITHOUT_CTRL_C`). A notebook whose
outputs are moving in right then finishes moving in first (:func:`uninterrupted`). The stopped notebooks' staging
folders are removed (a failed notebook's is kept, with its executed copy and output, for a look), and any left over
by a run that was killed outright is removed when the next run starts (:func:`clean_stale_staging`: a job folder
names its owner process, and a live owner's folder stays). ``figures/.staging/`` is ignored by git, the site and
``make verify``.

:mod:`mechfin_utils.tooling.run_figures` plans the run and writes the manifest; this module is how one notebook runs
and lands.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from mechfin_utils.core.paths import REPO_ROOT
from mechfin_utils.reporting.figures import PLOTLYJS_NAME

STAGING = ".staging"
"""The folder under the figures root where each notebook of a run writes, until it has finished (see the docstring)."""
ERROR_TAIL_LINES = 40
"""How many of a failed notebook's last output lines its error message quotes."""
_NOTEBOOK_NUMBER_RE = re.compile(r"^([0-9]{2}[a-z]?)_")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookFailedError(RuntimeError):
    """A notebook ended with an error (or its process was stopped); the message names it and quotes its output."""


# ---------------------------------------------------------------------------------------------------------
# One notebook in a process of its own
# ---------------------------------------------------------------------------------------------------------

_running: set[subprocess.Popen] = set()
PAPERMILL_WITHOUT_CTRL_C = "; ".join(
    [
        "import signal",
        "from papermill.cli import papermill",
        "signal.signal(signal.SIGINT, signal.SIG_IGN)",  # a terminal's Ctrl-C: the run stops its notebooks itself
        "signal.signal(signal.SIGTERM, signal.default_int_handler)",  # how the run stops one: as papermill's Ctrl-C
        "papermill(prog_name='papermill')",
    ]
)
"""papermill's command line (``python -c`` this, then papermill's arguments), with Ctrl-C ignored and SIGTERM taken as
Ctrl-C, so that a notebook stops only when the run stops it (see the module docstring)."""
_running_lock = threading.Lock()
_stopping = threading.Event()  # set by stop_all_notebooks: no notebook starts after it (cleared when a run starts)


def execute_notebook(notebook: Path, output: Path, parameters: dict, env: dict[str, str], log: Path) -> None:
    """Run ``notebook`` with papermill in a process of its own, with the environment ``env`` (its own
    ``$MECHFIN_FIGURES_DIR`` and thread settings: two notebooks run at once cannot share one process's environment),
    writing the executed copy to ``output`` and papermill's output to ``log``.

    The command is papermill's own command line (started through :data:`PAPERMILL_WITHOUT_CTRL_C`): parameters as
    JSON (which is YAML), the notebooks' folder as working directory, the ``python3`` kernel (this environment's), no
    progress bar, and log level ERROR, which hides papermill's 'Unable to parse line' warnings about comments in
    parameters cells. A non-zero exit raises :class:`NotebookFailedError` quoting the last :data:`ERROR_TAIL_LINES`
    lines of the output; an interrupt while it runs stops the process (see :func:`_stop`) before it propagates."""
    command = [
        sys.executable, "-c", PAPERMILL_WITHOUT_CTRL_C, str(notebook), str(output),
        "-y", json.dumps(parameters),
        "--cwd", str(REPO_ROOT / "notebooks"),
        "-k", "python3",
        "--no-progress-bar",
        "--log-level", "ERROR",
    ]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        with _running_lock:
            if _stopping.is_set():
                raise NotebookFailedError(f"{notebook.name} was not started: the run is being stopped")
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env
            )
            _running.add(process)
        try:
            code = process.wait()
        except BaseException:
            _stop(process)
            raise
        finally:
            with _running_lock:
                _running.discard(process)
    if code != 0:
        raise NotebookFailedError(
            f"{notebook.name} failed (papermill exit status {code}); the last lines of its output:\n{_tail(log)}"
        )


def _tail(log: Path, lines: int = ERROR_TAIL_LINES) -> str:
    text = _ANSI_RE.sub("", log.read_text(errors="replace")) if log.is_file() else ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------
# Stopping: Ctrl-C, SIGTERM
# ---------------------------------------------------------------------------------------------------------


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a papermill process: SIGTERM first, which it takes as Ctrl-C and shuts its kernel down
    (:data:`PAPERMILL_WITHOUT_CTRL_C`), then SIGKILL after ``grace_s``. (A kernel whose papermill died anyway exits by
    itself: ipykernel polls its parent.)"""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_all_notebooks() -> None:
    """Stop every notebook running now, and let none start after (until :func:`allow_notebooks_to_start`)."""
    with _running_lock:
        _stopping.set()
        running = list(_running)
    for process in running:
        _stop(process)


def allow_notebooks_to_start() -> None:
    """Undo an earlier :func:`stop_all_notebooks` (a new run starts)."""
    _stopping.clear()


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold off Ctrl-C during the block (in the main thread; a no-op elsewhere, where it cannot arrive) and deliver it
    after: a notebook's outputs move in completely or not at all, as far as Ctrl-C is concerned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (``kill PID``) raise KeyboardInterrupt, so that it stops a run as cleanly as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _interrupt)


# ---------------------------------------------------------------------------------------------------------
# Staging folders: where a notebook writes until it has finished
# ---------------------------------------------------------------------------------------------------------


def job_folder(root: Path, index: int, slug: str, notebook: Path) -> Path:
    """``<root>/.staging/<pid>-<index>-<model slug>-<notebook stem>/``: one job's folder, named after the process that
    owns it (so that :func:`clean_stale_staging` can tell a live run's folder from a dead one's)."""
    return root / STAGING / f"{os.getpid()}-{index:02d}-{slug}-{notebook.stem}"


def swap_in(staged_root: Path, root: Path, notebook: str) -> list[Path]:
    """Move a finished notebook's outputs from ``staged_root`` into the figures root ``root``; return the files
    removed because the new run no longer writes them.

    ``notebook`` is the notebook's file stem (``"08_screener_vs_base"``); its number (``"08"``) names its files. For
    each model folder under ``staged_root`` (a notebook may write into several: 08 on the screener also writes the
    base model's compliance report):

    1. each staged file replaces the file of the same name with ``os.replace``, which is atomic: a reader (or a run
       stopped right now) sees the old file or the new one, never a half-written one;
    2. then the folder's files of this notebook's number that the new run did not write are removed (a figure the
       notebook no longer makes cannot outlive it);
    3. the shared ``plotly.min.js`` is moved in when the folder lacks it or holds another version (the new pages load
       the version installed here); the manifest is not a notebook's and is written by the runner.

    A notebook whose file name does not start with its number (``NN_``) only adds and replaces files."""
    match = _NOTEBOOK_NUMBER_RE.match(notebook)
    removed = []
    for staged in sorted(p for p in staged_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        target = root / staged.name
        target.mkdir(parents=True, exist_ok=True)
        written = set()
        for path in sorted(p for p in staged.rglob("*") if p.is_file() and not p.name.startswith(".")):
            relative = path.relative_to(staged)
            destination = target / relative
            if relative == Path(PLOTLYJS_NAME):
                if destination.is_file() and destination.read_bytes() == path.read_bytes():
                    continue
            else:
                written.add(relative)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
        if match is not None:
            for old in sorted(target.glob(f"{match.group(1)}_*")):
                if old.is_file() and old.relative_to(target) not in written:
                    old.unlink()
                    removed.append(old)
    return removed


def clean_stale_staging(root: Path) -> list[Path]:
    """Remove the staging folders of runs that are over (stopped, killed or failed: their owner process is gone, or is
    this one, whose earlier runs have ended) and return them; a run still going in another process keeps its own."""
    staging = root / STAGING
    removed = []
    for entry in sorted(staging.iterdir()) if staging.is_dir() else []:
        owner = entry.name.split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and _alive(int(owner)):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def move_file(source: Path, destination: Path) -> None:
    """``os.replace``, or across file systems (``make verify``'s scratch folder is in /tmp) a copy next to the
    destination that then replaces it: either way the destination is never half written."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, temporary)
        os.replace(temporary, destination)
        source.unlink()
