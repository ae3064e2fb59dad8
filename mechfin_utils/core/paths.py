"""Where the project's files are: the repository root, its data and figures folders, and the model cache.

One module computes them, so that moving a module into another folder cannot change where it looks.
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
