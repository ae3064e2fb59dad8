"""The command line every deterministic CSV builder in ``data/`` shares: write the files, or ``--check`` that each
committed file is byte for byte what the builder writes.

A builder renders its files as text (``{path: text}``) and hands them to one of:

* :func:`main` -- one file: ``--check``, and ``--output`` to write it elsewhere;
* :func:`main_many` -- several files: ``--check`` compares them all and names every stale one;
* :func:`write_or_check` -- the loop under both, for a builder with a command line of its own (``--stats``, ...).

Files are written and compared as UTF-8 with ``\\n`` line ends, whatever the platform. Imported by the builders as
a sibling module (``python data/build_*.py`` puts ``data/`` on the import path).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def render_csv(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    """``rows`` as CSV text with a header, ``\\n`` line ends."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _rows(text: str) -> int:
    """Data rows of CSV text (a quoted field may hold a line break, so lines are not rows)."""
    return sum(1 for _ in csv.reader(io.StringIO(text))) - 1


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (``data/ioi.csv``), else as given."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def write_or_check(files: Mapping[Path, str], script: str, *, check: bool) -> int:
    """Write each ``{path: text}``, or with ``check`` compare each with the file there; the exit status.

    A stale or missing file fails the check (status 1) with one line naming every such file and the command that
    rewrites them.
    """
    if check:
        stale = [path for path, text in files.items() if not path.is_file() or path.read_bytes() != text.encode()]
        if stale:
            print(f"out of date: {', '.join(_shown(p) for p in stale)}; run python {script}", file=sys.stderr)
            return 1
        for path, text in files.items():
            print(f"{_shown(path)} is up to date ({_rows(text)} rows)")
        return 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="")
        print(f"wrote {_shown(path)} ({_rows(text)} rows)")
    return 0


def main_many(
    description: str, render_files: Callable[[], Mapping[Path, str]], script: str, argv: Sequence[str] | None = None
) -> int:
    """Parse ``--check``, then write every file ``render_files()`` returns, or compare each with the one there."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="fail if a committed file differs from a rebuild")
    args = parser.parse_args(argv)
    return write_or_check(render_files(), script, check=args.check)


def main(
    description: str, render: Callable[[], str], output: Path, script: str, argv: Sequence[str] | None = None
) -> int:
    """Parse ``--check`` / ``--output``, then write ``render()`` to the output, or compare it with the file there."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="only verify that the committed file is up to date")
    parser.add_argument("--output", type=Path, default=output)
    args = parser.parse_args(argv)
    return write_or_check({args.output: render()}, script, check=args.check)
