"""core.arrays: every kind of input becomes the same float64 array, and every bad one is named in its error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechfin_utils.core.arrays import as_checked_array, as_checked_tensor


def test_tensors_arrays_and_lists_give_the_same_float64_array():
    expected = np.array([[1.0, 2.5], [-3.0, 0.125]])
    for values in (expected.tolist(), expected.astype(np.float32), torch.tensor(expected, requires_grad=True)):
        array = as_checked_array(values, "values", ndim=2)
        assert array.dtype == np.float64
        np.testing.assert_array_equal(array, expected)
    tensor = as_checked_tensor(torch.tensor(expected, dtype=torch.bfloat16), "values")
    assert tensor.dtype == torch.float64 and tensor.device.type == "cpu" and not tensor.requires_grad


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        (["a", "b"], {}, "labels must be numeric, got list"),
        ([1.0, 2.0], {"ndim": 2}, r"labels must have 2 dimension\(s\), got shape \(2,\)"),
        (3.0, {"min_rows": 2}, "labels must be an array of values"),
        ([], {}, "labels is empty"),
        ([[1.0, 2.0]], {"min_rows": 2}, r"labels has only 1 value\(s\) \(rows\): at least 2"),
        ([1.0, float("inf")], {"allow_nan": True}, r"labels has a non-finite value \(inf\) at index \(1,\)$"),
        (
            [[0.0, float("nan")], [float("nan"), 1.0]],
            {},
            r"labels has a non-finite value \(nan\) at index \(0, 1\) \(2 non-finite values in all\)",
        ),
    ],
)
def test_each_bad_input_is_named(values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        as_checked_array(values, "labels", **kwargs)


def test_nan_passes_only_when_allowed():
    array = as_checked_array([1.0, float("nan")], "z", allow_nan=True)
    assert np.isnan(array[1])
    with pytest.raises(ValueError, match="z has a non-finite value"):
        as_checked_array([1.0, float("nan")], "z")
