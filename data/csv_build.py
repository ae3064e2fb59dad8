"""The command line every deterministic CSV builder in ``data/`` shares: write the file, or ``--check`` that the
committed file is byte for byte what the builder writes.

Imported by the builders as a sibling module (``python data/build_*.py`` puts ``data/`` on the import path).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def render_csv(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    """``rows`` as CSV text with a header, ``\\n`` line ends."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(description: str, render: Callable[[], str], output: Path, script: str, argv: list[str] | None = None) -> int:
    """Parse ``--check`` / ``--output``, then write ``render()`` to the output, or compare it with the file there."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="only verify that the committed file is up to date")
    parser.add_argument("--output", type=Path, default=output)
    args = parser.parse_args(argv)
    text = render()
    rows = text.count("\n") - 1
    if args.check:
        current = args.output.read_text() if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is out of date: run python {script}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({rows} rows)")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output} ({rows} rows)")
    return 0
