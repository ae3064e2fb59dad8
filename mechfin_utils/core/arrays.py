"""Numbers coming in, checked once: a tensor, a numpy array or nested lists as a float64 array, or an error that names
the argument.

Statistics, tables and figures all take "values" from a notebook: a torch tensor (perhaps on a GPU, perhaps with a
gradient), a numpy array, or a list of numbers. :func:`as_checked_array` is the one place they become a float64
numpy array, in three stages:

1. **converted**: a tensor is detached, moved to the CPU and cast to float64 (neither a device, a gradient nor a
   half-precision dtype leaks into numpy); anything else goes through ``np.asarray(..., dtype=np.float64)``;
2. **shaped**: the number of dimensions (when asked), not empty, at least ``min_rows`` rows (a bootstrap needs 2);
3. **finite**: no infinity, and no NaN unless ``allow_nan`` (a heat map's blank cells).

Every error is a ValueError that starts with the argument's name and says where the first bad value is, e.g.
``values has a non-finite value (nan) at index (1,)``. :func:`as_checked_tensor` is the same check for code that
goes on in torch (a float64 CPU tensor).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = Any
"""A numpy array, a torch tensor, or a (nested) sequence of numbers."""

__all__ = ["ArrayLike", "as_checked_array", "as_checked_tensor"]


def as_checked_array(
    values: ArrayLike,
    argument: str,
    *,
    ndim: int | None = None,
    min_rows: int = 1,
    allow_nan: bool = False,
) -> np.ndarray:
    """``values`` as a float64 numpy array, checked; a ValueError naming ``argument`` otherwise.

    Args:
        values: a torch tensor (any device or dtype), a numpy array, or nested sequences of numbers.
        argument: the name the caller knows the values by (``"values"``, ``"lows"``, ``"exact['attn_out']"``).
        ndim: the exact number of dimensions required (None: any).
        min_rows: the fewest rows (entries along the first axis) accepted; above 1, a scalar is refused too.
        allow_nan: accept NaN (infinities are refused all the same).
    """
    # 1. Converted: float64 on the CPU, nothing attached.
    if isinstance(values, Tensor):
        array = values.detach().cpu().double().numpy()
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{argument} must be numeric, got {type(values).__name__}: {exc}") from exc
    # 2. Shaped.
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{argument} must have {ndim} dimension(s), got shape {array.shape}")
    if min_rows > 1 and array.ndim == 0:
        raise ValueError(f"{argument} must be an array of values [n, ...], got a scalar")
    if array.size == 0:
        raise ValueError(f"{argument} is empty")
    if min_rows > 1 and array.shape[0] < min_rows:
        raise ValueError(f"{argument} has only {array.shape[0]} value(s) (rows): at least {min_rows} are needed")
    # 3. Finite.
    bad = np.isinf(array) if allow_nan else ~np.isfinite(array)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        count = int(bad.sum())
        more = f" ({count} non-finite values in all)" if count > 1 else ""
        raise ValueError(f"{argument} has a non-finite value ({array[where]}) at index {where}{more}")
    return array


def as_checked_tensor(
    values: ArrayLike,
    argument: str,
    *,
    ndim: int | None = None,
    min_rows: int = 1,
    allow_nan: bool = False,
) -> Tensor:
    """:func:`as_checked_array`, as a float64 CPU tensor (sharing memory with it)."""
    return torch.as_tensor(as_checked_array(values, argument, ndim=ndim, min_rows=min_rows, allow_nan=allow_nan))
