"""Where the project's files are, and the one way they are written: the repository root, its data folder, the model
cache, and :func:`write_atomically`.

One module computes the paths, so that moving a module into another folder cannot change where it looks. And one
function replaces a file's bytes atomically (figures, results JSON, the figures manifest), so that a reader, or a run
stopped right then, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout's root folder (the one with the Makefile)."""
DATA_DIR = REPO_ROOT / "data"
"""The task sets and their data card (``data/README.md``)."""
CACHE_ENV = "MECHFIN_CACHE"


def cache_dir() -> Path:
    """``$MECHFIN_CACHE`` when set (read at every call), else ``~/.cache/mechfin``: converted models, screeners,
    generated corpora."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mechfin").expanduser()


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (creating its folder): first to a hidden temporary file beside it, named after this
    process, then ``os.replace`` onto ``path``, which is atomic on one file system."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
