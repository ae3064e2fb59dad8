"""Tables written out: one Markdown writer for every table mechfin prints or writes as Markdown (the ``make bench``
tables), and :func:`table_records`, a pandas table as the records a results JSON stores.

A table is rows and columns. Each column is a header and how to write its cell from a row:

* a **format string**, filled from the row's fields with :meth:`str.format`: ``"{cells:,}"``, ``"{batch} x {n_pos}"``,
  ``"{speedup:,.1f}x"`` (a row is a dataclass or a mapping; its fields are the names);
* or a **function** of the row, for a cell that needs a decision (``"n/a"`` for a value that could not be measured).

    >>> print(markdown_table([{"model": "a", "seconds": 1.25}], [("model", "{model}"), ("time s", "{seconds:.1f}")]))
    | model | time s |
    |---|---|
    | a | 1.2 |

The output is plain GitHub Markdown: a header row, a ``|---|`` rule, one line per row, every cell between ``| ``
and `` |``. Cells are not padded to a common width (the tables are read rendered, and diffs stay one line per row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

Cell = str | Callable[[Any], object]
"""How a column writes its cell: a format string over the row's fields, or a function of the row."""


def row_fields(row: Any) -> Mapping[str, Any]:
    """The named fields of a row: a mapping as it is, a dataclass instance as its fields (not copied deeply)."""
    if isinstance(row, Mapping):
        return row
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return {field.name: getattr(row, field.name) for field in dataclasses.fields(row)}
    raise TypeError(f"a table row must be a mapping or a dataclass instance, got {type(row).__name__}")


def markdown_table(rows: Iterable[Any], columns: Sequence[tuple[str, Cell]]) -> str:
    """The Markdown table of ``rows`` with ``columns`` ``(header, cell)`` (see the module docstring); no final
    newline."""
    headers = [header for header, _ in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        fields = row_fields(row)
        cells = [cell.format(**fields) if isinstance(cell, str) else str(cell(row)) for _, cell in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_records(table: pd.DataFrame, *, index: bool = True) -> list[dict[str, Any]]:
    """A table as JSON-ready records: the index as a column (unless ``index`` is False), a missing value (NaN: an
    interval that could not be computed, the head of an MLP row) as None, never NaN."""
    records = (table.reset_index() if index else table).to_dict(orient="records")
    return [{str(k): (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in records]
