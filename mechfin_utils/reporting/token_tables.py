"""Tokens in tables, for reading: whitespace made visible, tidy token lists pivoted wide.

The projections to the vocabulary (:mod:`mechfin_utils.methods.readout`) return tidy tables, one row per token.
A token's text often starts with a space or is a newline, which a printed table hides: :func:`readable_token`
shows `` Yes`` as ``␣Yes``, :func:`readable_columns` does so for every token column of a table. :func:`token_table`
pivots a tidy table into one row per layer (or neuron) and one column per rank; :func:`lens_table` is one prompt's
logit lens that way, with each answer's rank beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mechfin_utils.methods.readout.token_lens import LogitLensTokens

_VISIBLE_WHITESPACE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def readable_token(text: str) -> str:
    """A token's text with its whitespace made visible for tables: `` Yes`` -> ``␣Yes``, ``"\\n"`` -> ``\\n``."""
    if not isinstance(text, str):
        raise ValueError(f"token text must be a string; got {type(text).__name__} {text!r}")
    if text == "":
        return "''"
    return "".join(_VISIBLE_WHITESPACE.get(ch, ch) for ch in text)


def readable_columns(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` whose token columns (``token`` and every ``*_token``) show whitespace visibly."""
    columns = [c for c in table.columns if isinstance(c, str) and (c == "token" or c.endswith("_token"))]
    if not columns:
        raise ValueError(f"table has no 'token' or '*_token' column (columns: {list(table.columns)})")
    return table.assign(**{c: table[c].map(readable_token) for c in columns})


def token_table(
    tidy: pd.DataFrame, index: str | Sequence[str], columns: str = "rank", values: str = "token"
) -> pd.DataFrame:
    """A tidy token table (one row per token) as a wide one for reading, with whitespace made visible.

    E.g. :func:`~mechfin_utils.methods.readout.token_lens.logit_lens_tokens`' ``top_tokens`` with
    ``index="layer"`` gives one row per layer and one column per rank. Each (index, column) cell must hold exactly
    one token (else a ValueError naming a duplicate).
    """
    keys = [index] if isinstance(index, str) else list(index)
    missing = set(keys + [columns, values]) - set(tidy.columns)
    if missing:
        raise ValueError(f"table lacks columns {sorted(missing)} (it has {list(tidy.columns)})")
    duplicated = tidy.duplicated(keys + [columns], keep=False)
    if duplicated.any():
        row = tidy[duplicated].iloc[0]
        raise ValueError(f"more than one {values!r} for {dict(row[keys + [columns]])}; give a finer index")
    wide = tidy.assign(**{values: tidy[values].map(readable_token)}).pivot(index=keys, columns=columns, values=values)
    wide.columns.name = columns
    return wide


def lens_table(lens: LogitLensTokens) -> pd.DataFrame:
    """One prompt's logit lens for reading: per layer the top tokens (readable) and each answer's rank."""
    wide = token_table(lens.top_tokens, "layer")
    wide.columns = [f"top {c}" for c in wide.columns]
    for j, answer in enumerate(lens.answers):
        wide[f"rank of {readable_token(answer)}"] = lens.answer_ranks[:, j].tolist()
    return wide
