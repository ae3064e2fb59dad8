"""Reading a task table: the checks every task CSV shares, and errors that say exactly where a row is wrong.

Every task set in ``data/`` is a CSV with a fixed header and one id column (``pair_id``, ``cf_id``, ``edit_id``,
``control_id``). Its loader reads it in three stages:

1. :func:`read_task_text` decodes the file as UTF-8 (a byte-order mark is accepted); a byte that is not UTF-8 is
   named with its line and row.
2. :func:`read_task_rows` checks what every table shares (exactly the expected columns, one value per column, no
   empty value, unique ids) and returns the good rows as ``(line, {column: value})``, with a list of
   :data:`Problems` for the bad ones.
3. The loader checks its own rules on each good row, adds what fails to the problems, and calls
   :func:`raise_problems`, which raises one :class:`TaskDataError` listing *every* bad row in file order.

:func:`row_location` writes the ``"file.csv line 7 (pair_id='fl-003')"`` prefix of every message, so a reader can
go straight to the row. Used by :mod:`mechfin_utils.tasks.fair_lending`, :mod:`mechfin_utils.tasks.screener_sets`
and the edit-request loader of :mod:`mechfin_utils.methods.editing.evaluation`.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path


class TaskDataError(ValueError):
    """A task file or pair is malformed; the message names the file, line, row id and field."""


def row_location(path: Path, line: int, id_column: str, row_id: str | None) -> str:
    """Where a row is, for error messages: ``"file.csv line 7 (pair_id='fl-003')"``."""
    shown = repr(row_id) if row_id else "<missing>"
    return f"{path.name} line {line} ({id_column}={shown})"


Problems = list[tuple[int, str]]
"""(line, message) for every bad row found so far; reported together, in file order."""


def read_task_text(path: Path, id_column: str) -> str:
    """The file's text: UTF-8, with or without a byte-order mark; any other byte is named with its line and row."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        text = raw.split(b"\n")[line - 1].decode("utf-8", errors="replace")
        row_id = text.split(",")[0] if line > 1 else None
        where = row_location(path, line, id_column, row_id) if line > 1 else f"{path.name} line 1 (the header)"
        column = error.start - raw.rfind(b"\n", 0, error.start)
        raise TaskDataError(
            f"{where}: byte {raw[error.start]:#04x} at character {column} is not UTF-8; save the file as UTF-8"
        ) from None


def raise_problems(path: Path, problems: Problems) -> None:
    """One problem: its message as it is. Several: all of them, in file order, under a count."""
    if len(problems) == 1:
        raise TaskDataError(problems[0][1])
    if problems:
        listed = "\n  ".join(message for _, message in sorted(problems, key=lambda p: p[0]))
        raise TaskDataError(f"{len(problems)} bad rows in {path.name}:\n  {listed}")


def read_task_rows(
    path: Path, columns: Sequence[str], id_column: str
) -> tuple[list[tuple[int, dict[str, str]]], Problems]:
    """Rows of a task CSV as ``(line, {column: value})`` after the checks every task file shares, and the
    problems of the rows that failed them (those rows are not returned).

    Shared rules: UTF-8 (a byte-order mark is accepted); the header holds exactly ``columns`` (none missing,
    none unknown, none twice); every row has one value per column and no empty (or whitespace-only) value; ids
    are unique. A bad header raises at once; bad rows are collected.
    """
    if not path.is_file():
        raise TaskDataError(f"task file {path} does not exist")
    reader = csv.reader(io.StringIO(read_task_text(path, id_column), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise TaskDataError(f"{path.name} is empty: expected a header with columns {list(columns)}") from None
    repeated = sorted(c for c, n in Counter(header).items() if n > 1)
    if repeated:
        raise TaskDataError(f"{path.name} line 1: column(s) {repeated} appear more than once in the header")
    unknown = [c for c in header if c not in columns]
    if unknown:
        raise TaskDataError(f"{path.name} line 1: unknown column(s) {unknown}; expected exactly {list(columns)}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise TaskDataError(f"{path.name} line 1: missing column(s) {missing}; expected exactly {list(columns)}")

    rows: list[tuple[int, dict[str, str]]] = []
    problems: Problems = []
    first_line_of_id: dict[str, int] = {}
    next_line = reader.line_num + 1
    for values in reader:
        line, next_line = next_line, reader.line_num + 1
        if not values:
            problems.append((line, f"{path.name} line {line}: blank line inside the table"))
            continue
        row_id = values[header.index(id_column)] if len(values) > header.index(id_column) else None
        where = row_location(path, line, id_column, row_id)
        if len(values) != len(header):
            problems.append((line, f"{where}: {len(values)} values for {len(header)} columns"))
            continue
        row = dict(zip(header, values))
        row_id = row[id_column]  # the value read above, now known to be there
        empty = [column for column in columns if not row[column].strip()]
        if empty:
            problems.append((line, f"{where}, field {empty[0]!r}: empty value"))
            continue
        if row_id in first_line_of_id:
            problems.append(
                (line, f"{where}, field {id_column!r}: duplicate id, first used on line {first_line_of_id[row_id]}")
            )
            continue
        first_line_of_id[row_id] = line
        rows.append((line, row))
    if not rows and not problems:
        raise TaskDataError(f"{path.name} has a header but no rows")
    return rows, problems
