"""sparse_compile.numerics.relative_error: the documented semantics, case by case."""
import math

import pytest
import torch

from sparse_compile.numerics import relative_error


def test_normwise_max_abs_over_max_reference():
    ref = torch.tensor([4.0, -8.0, 0.001])
    y = torch.tensor([4.0, -7.0, 0.002])  # worst |diff| 1 against max |ref| 8, not 0.001/0.001
    assert relative_error(y, ref) == pytest.approx(1 / 8)


def test_zero_reference():
    z = torch.zeros(3)
    assert relative_error(z, z) == 0.0
    assert relative_error(torch.tensor([0.0, 1e-20, 0.0]), z) == math.inf


def test_nan_in_either_side_is_never_close():
    ref = torch.ones(4)
    y = ref.clone()
    y[2] = float("nan")
    assert relative_error(y, ref) == math.inf
    assert relative_error(ref, y) == math.inf


def test_empty_and_nested_outputs():
    assert relative_error(torch.empty(0, 3), torch.empty(0, 3)) == 0.0
    a = (torch.tensor([1.0, 2.0]), {"n": 3, "t": torch.tensor([10.0])})
    b = (torch.tensor([1.0, 2.5]), {"n": 3, "t": torch.tensor([10.0])})
    assert relative_error(a, b) == pytest.approx(0.5 / 2.5)  # the worst leaf
    assert relative_error((torch.ones(1), 3), (torch.ones(1), 4)) == math.inf  # a differing int leaf


def test_float64_whatever_the_input_dtypes():
    ref = torch.tensor([1.0, 3.0], dtype=torch.float64)
    y = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    assert relative_error(y, ref) == 0.0
    assert relative_error(torch.tensor([1, 3]), ref) == 0.0  # integer outputs too


def test_different_outputs_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="structure"):
        relative_error((torch.ones(1),), (torch.ones(1), torch.ones(1)))


def test_every_copy_is_the_shared_function():
    from sparse_compile.benchmark import layer
    from sparse_compile.compiler import verify

    assert verify.relative_error is relative_error
    # the benchmark records a wrongly shaped form output as inf instead of raising
    assert layer.relative_error(torch.ones(2, 3), torch.ones(3, 2)) == math.inf
    assert layer.relative_error(torch.tensor([1.0, 1.5]), torch.tensor([1.0, 2.0])) == pytest.approx(0.25)
