"""Helpers shared by the Triton launcher tests (tests/kernels/test_triton*.py).

Imported by name (tests/ is on sys.path, see conftest.py), after conftest has set
TRITON_INTERPRET=1 on machines without a GPU.
"""
import torch

from sparse_compile.kernels import triton_linear as tlin
from sparse_compile.kernels.reference import condensed_linear_ref
from sparse_compile.numerics import relative_error as rel_err  # noqa: F401  (the tests' short name)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_problem():
    """Why triton's CPU interpreter cannot run our kernels here, or None if it can.

    A functional probe rather than a version table: triton 3.6's interpreter turns a runtime loop
    bound into a Python int with ``int(array_of_one)``, which numpy >= 2.4 rejects, so every kernel
    with a runtime ``range`` fails there although the kernels are fine (they pass with triton 3.6 +
    numpy 2.3 and with triton 3.8 + numpy 2.4). On a GPU the interpreter is not used.
    """
    if DEV == "cuda":
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def probe(y_ptr, n):
        acc = 0.0
        for _ in range(0, n, 1):
            acc += 1.0
        tl.store(y_ptr, acc)

    y = torch.zeros(1)
    try:
        probe[(1,)](y, 3)
    except Exception as e:  # noqa: BLE001 - any failure means the interpreter is unusable here
        return (f"triton {triton.__version__}'s CPU interpreter fails with numpy {numpy.__version__} "
                f"({type(e).__name__}: {str(e)[:100]}); run with triton >= 3.7 or numpy < 2.4")
    if y.item() != 3.0:
        return f"triton {triton.__version__}'s CPU interpreter computed a wrong probe result ({y.item()})"
    return None


INTERPRETER_PROBLEM = _interpreter_problem()
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rand_condensed(n, fan_in, k, dtype=torch.float32, index_dtype=torch.int16, device=DEV):
    """``k`` distinct sorted indices per row (constant fan-in), standard-normal values."""
    idx = torch.rand(n, fan_in, device=device).argsort(dim=1)[:, :k].sort(dim=1).values
    vals = torch.randn(n, k, device=device).to(dtype)
    return vals, idx.to(index_dtype)


def nan_out(shape, dtype, device=DEV):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def linear_ref(x, vals, idx, bias):
    return condensed_linear_ref(x.double(), vals.double(), idx, None if bias is None else bias.double())


def check_linear(x, vals, idx, bias, dtype=None, **kw):
    dtype = dtype or x.dtype
    out = nan_out((*x.shape[:-1], vals.shape[0]), x.dtype, x.device)
    y = tlin.condensed_linear_triton(x, vals, idx, bias, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    assert y.shape == (*x.shape[:-1], vals.shape[0]) and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) output elements"
    err = rel_err(y, linear_ref(x, vals, idx, bias))
    assert err < TOL[dtype], f"max rel err {err:.2e} >= {TOL[dtype]:.0e}"
    return y
