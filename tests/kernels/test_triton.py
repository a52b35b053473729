"""Triton launchers (kernels/triton_linear.py, kernels/triton_conv.py) against float64 references.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so every
kernel runs through triton's interpreter on CPU tensors; the interpreter cannot autotune, so the
launchers use a small fixed config there, and the config tests pin each entry of the autotune
lists in turn. Outputs are poisoned with NaN before each call so an unwritten element fails.
Shapes are small: the interpreter runs each program in numpy.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_compile.formats import to_condensed
from sparse_compile.kernels import triton_conv as tconv
from sparse_compile.kernels import triton_linear as tlin
from sparse_compile.kernels.reference import condensed_conv2d_ref

from triton_testlib import (  # noqa: F401  (shared with test_triton_args.py)
    DEV, INTERPRETER_PROBLEM, TOL, check_linear, linear_ref, nan_out, rand_condensed, rel_err,
)

pytestmark = pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM))


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------
LINEAR_CASES = {
    # name: (leading dims, n, fan_in, k)
    "batch1": ((1,), 13, 50, 7),
    "no-leading-dim": ((), 9, 40, 5),
    "batch0": ((0,), 7, 30, 4),
    "odd-batch-gemv": ((5,), 11, 45, 9),
    "leading-dims-batched": ((3, 7), 19, 37, 6),
    "odd-batch-batched": ((33,), 37, 64, 11),
    "k1": ((6,), 10, 20, 1),
    "k1-batched": ((20,), 10, 20, 1),
    "k-equals-fan-in": ((4,), 6, 24, 24),
    "k-equals-fan-in-batched": ((18,), 6, 24, 24),
    "n1": ((17,), 1, 30, 8),
}


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32], ids=["int16", "int32"])
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_matches_reference(case, index_dtype):
    lead, n, fan_in, k = LINEAR_CASES[case]
    vals, idx = rand_condensed(n, fan_in, k, index_dtype=index_dtype)
    x = torch.randn(*lead, fan_in, device=DEV)
    check_linear(x, vals, idx, torch.randn(n, device=DEV))
    check_linear(x, vals, idx, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kernel", ["gemv", "batched"])
def test_linear_dtypes(dtype, kernel):
    vals, idx = rand_condensed(21, 70, 13, dtype=dtype)
    x = torch.randn(5 if kernel == "gemv" else 19, 70, device=DEV).to(dtype)
    check_linear(x, vals, idx, torch.randn(21, device=DEV).to(dtype), kernel=kernel)


@pytest.mark.parametrize("kernel", ["gemv", "batched"])
def test_linear_from_formats_masked_weight(kernel):
    """The kernels agree with F.linear on the masked dense weight that formats condensed."""
    n, fan_in, k = 12, 40, 9
    w = torch.randn(n, fan_in, device=DEV)
    mask = torch.zeros(n, fan_in, dtype=torch.bool, device=DEV)
    mask.scatter_(1, torch.rand(n, fan_in, device=DEV).argsort(1)[:, :k], True)
    mask[3] = False  # an ablated neuron: dropped from the condensed rows
    bias = torch.randn(n, device=DEV)
    c = to_condensed(w, mask, bias)
    x = torch.randn(18, fan_in, device=DEV)
    y = tlin.condensed_linear_triton(x, c.values, c.indices, c.bias[c.active_rows], kernel=kernel)
    ref = F.linear(x.double(), (w * mask).double(), bias.double())[:, c.active_rows]
    assert rel_err(y, ref) < 1e-5


def test_linear_noncontiguous_inputs():
    n, fan_in, k = 17, 48, 10
    vals, idx = rand_condensed(n, fan_in, k)
    bias = torch.randn(n, device=DEV)
    big = torch.randn(22, 2 * fan_in, device=DEV)
    check_linear(big[:, ::2], vals, idx, bias)  # strided fan-in, batched
    check_linear(big[:3, 1::2], vals, idx, bias)  # strided fan-in, GEMV
    xt = torch.randn(fan_in, 25, device=DEV)
    check_linear(xt.t(), vals, idx, bias)  # already feature-major: used in place
    x3 = torch.randn(4, fan_in, 5, device=DEV).permute(0, 2, 1)  # [4, 5, fan_in], not collapsible
    check_linear(x3, vals, idx, bias)
    # Column-major values / indices ([k, n] storage): a layout a caller may pick for coalescing.
    vt, it = vals.t().contiguous().t(), idx.t().contiguous().t()
    check_linear(big[:, ::2], vt, it, bias)
    check_linear(big[:2, ::2], vt, it, bias)


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_linear_split_k(splits):
    vals, idx = rand_condensed(13, 90, 37)
    x = torch.randn(21, 90, device=DEV)
    check_linear(x, vals, idx, torch.randn(13, device=DEV), kernel="batched", split_k=splits)
    check_linear(x, vals, idx, None, kernel="batched", split_k=splits)


def test_linear_k_zero_gives_bias():
    vals, idx = torch.empty(5, 0, device=DEV), torch.empty(5, 0, dtype=torch.int16, device=DEV)
    x = torch.randn(3, 8, device=DEV)
    bias = torch.randn(5, device=DEV)
    assert torch.equal(tlin.condensed_linear_triton(x, vals, idx, bias), bias.expand(3, 5))
    assert not tlin.condensed_linear_triton(x, vals, idx).any()


@pytest.mark.parametrize("kernel,batch,k", [("gemv", 1, 300), ("gemv", 3, 30), ("gemv", 16, 300),
                                            ("batched", 40, 30), ("batched", 1000, 30), ("batched", 40, 70),
                                            ("batched", 1000, 70)])
def test_every_autotune_config_is_correct(kernel, batch, k):
    """Each config of the autotune lists, pinned, gives the right answer (tails included); k = 70
    brings in the fan-in-split entries (in-kernel reduction)."""
    fan_in = 2 * k + 3
    vals, idx = rand_condensed(19, fan_in, k)
    bias = torch.randn(19, device=DEV)
    # The batch bucket picks the list; a smaller batch keeps the interpreter fast and still hits
    # partial tiles in every config.
    x = torch.randn(min(batch, 40), fan_in, device=DEV)
    configs = tlin.linear_configs(kernel, batch, k)
    if kernel == "batched":
        configs += tlin.linear_configs(kernel, batch, k, torch.bfloat16)
    assert configs
    for cfg in configs:
        check_linear(x, vals, idx, bias, kernel=kernel, config=cfg)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(0, 40),
    n=st.integers(1, 20),
    fan_in=st.integers(1, 40),
    k_frac=st.floats(0.0, 1.0),
    int32=st.booleans(),
    has_bias=st.booleans(),
    strided=st.sampled_from(["none", "x", "weights", "all"]),
)
def test_linear_random_shapes(batch, n, fan_in, k_frac, int32, has_bias, strided):
    """Random shapes, contiguous or strided (every-other-element views of x, values, indices and
    bias: no stride may be assumed to be 1)."""
    k = max(1, round(k_frac * fan_in))
    vals, idx = rand_condensed(n, fan_in, k, index_dtype=torch.int32 if int32 else torch.int16)
    x = torch.randn(batch, fan_in, device=DEV)
    bias = torch.randn(n, device=DEV) if has_bias else None
    if strided in ("x", "all"):
        x = torch.randn(batch, 2 * fan_in, device=DEV)[:, ::2]
    if strided in ("weights", "all"):
        vals = torch.stack([vals, torch.randn_like(vals)], -1)[..., 0]
        idx = torch.stack([idx, idx], -1)[..., 1]
        assert vals.stride(1) == 2 and idx.stride(1) == 2
        if has_bias:
            bias = torch.randn(2 * n, device=DEV)[::2]
    check_linear(x, vals, idx, bias)


def test_linear_errors_name_the_argument():
    vals, idx = rand_condensed(4, 10, 3)
    x = torch.randn(2, 10, device=DEV)
    with pytest.raises(ValueError, match="indices"):
        tlin.condensed_linear_triton(x, vals, idx[:, :2])
    with pytest.raises(TypeError, match="indices dtype"):
        tlin.condensed_linear_triton(x, vals, idx.float())
    with pytest.raises(ValueError, match="bias"):
        tlin.condensed_linear_triton(x, vals, idx, torch.randn(5, device=DEV))
    with pytest.raises(ValueError, match="exceeds x's fan-in"):
        tlin.condensed_linear_triton(x[:, :2], vals, idx)
    with pytest.raises(ValueError, match="kernel"):
        tlin.condensed_linear_triton(x, vals, idx, kernel="dense")
    with pytest.raises(ValueError, match="config must set exactly"):
        tlin.condensed_linear_triton(x, vals, idx, kernel="gemv", config={"BLOCK_N": 4})
    with pytest.raises(ValueError, match="out must be"):
        tlin.condensed_linear_triton(x, vals, idx, out=torch.empty(3, 4, device=DEV))
    with pytest.raises(ValueError, match="split_k"):
        tlin.condensed_linear_triton(torch.randn(20, 10, device=DEV), vals, idx, kernel="batched", split_k=0)


# ---------------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------------
CONV_CASES = {
    # name: (N, C, H, W, out, (kh, kw), stride, padding, dilation, k)
    "3x3": (2, 3, 7, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 8),
    "3x3-stride2": (2, 3, 9, 8, 6, (3, 3), (2, 2), (1, 1), (1, 1), 10),
    "3x3-pad2-dil2": (1, 4, 8, 7, 5, (3, 3), (1, 1), (2, 2), (2, 2), 9),
    "1x1": (3, 8, 5, 5, 7, (1, 1), (1, 1), (0, 0), (1, 1), 3),
    "3x2-mixed": (2, 3, 7, 9, 5, (3, 2), (2, 1), (0, 1), (1, 2), 6),
    "k1": (1, 3, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "k-full": (1, 2, 5, 6, 3, (3, 3), (1, 1), (1, 1), (1, 1), 18),
    "batch0": (0, 3, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 5),
}


def masked_conv(o, c, kh, kw, k, device=DEV):
    """A dense conv weight with exactly ``k`` live taps per output channel, and its mask."""
    w = torch.randn(o, c, kh, kw, device=device)
    m = torch.zeros(o, c * kh * kw, dtype=torch.bool, device=device)
    m.scatter_(1, torch.rand(o, c * kh * kw, device=device).argsort(1)[:, :k], True)
    return w, m.reshape(o, c, kh, kw)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_f_conv2d(case):
    nb, c, h, wd, o, ks, stv, pd, dl, k = CONV_CASES[case]
    w, m = masked_conv(o, c, *ks, k)
    bias = torch.randn(o, device=DEV)
    cond = to_condensed(w, m, bias)
    x = torch.randn(nb, c, h, wd, device=DEV)
    ref = F.conv2d(x.double(), (w * m).double(), bias.double(), stv, pd, dl)
    out = nan_out(tuple(ref.shape), x.dtype)
    y = tconv.condensed_conv2d_triton(x, cond.values, cond.indices, bias, ks, stv, pd, dl, out=out)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    assert rel_err(y, ref) < 1e-5
    y0 = tconv.condensed_conv2d_triton(x, cond.values, cond.indices, None, ks, stv, pd, dl)
    assert rel_err(y0, F.conv2d(x.double(), (w * m).double(), None, stv, pd, dl)) < 1e-5


def test_conv_noncontiguous_and_int32_and_ints():
    w, m = masked_conv(6, 4, 3, 3, 7)
    cond = to_condensed(w, m, index_dtype=torch.int32)
    x = torch.randn(2, 4, 7, 8, device=DEV).to(memory_format=torch.channels_last)
    y = tconv.condensed_conv2d_triton(x, cond.values, cond.indices, None, 3, 2, 1, 1)
    assert rel_err(y, F.conv2d(x.double(), (w * m).double(), None, 2, 1, 1)) < 1e-5
    xs = torch.randn(2, 8, 7, 8, device=DEV)[:, ::2]
    y = tconv.condensed_conv2d_triton(xs, cond.values, cond.indices, None, (3, 3), (1, 1), (1, 1), (1, 1))
    assert rel_err(y, F.conv2d(xs.double(), (w * m).double(), None, 1, 1, 1)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_conv_half_precision(dtype):
    vals, idx = rand_condensed(5, 3 * 9, 7, dtype=dtype)
    x = torch.randn(2, 3, 6, 7, device=DEV).to(dtype)
    bias = torch.randn(5, device=DEV).to(dtype)
    y = tconv.condensed_conv2d_triton(x, vals, idx, bias, (3, 3), (1, 1), (1, 1), (1, 1))
    assert y.dtype == dtype
    ref = condensed_conv2d_ref(x.double(), vals.double(), idx, bias.double(), (3, 3), (1, 1), (1, 1), (1, 1))
    assert rel_err(y, ref) < 1e-2


def test_every_conv_config_is_correct():
    w, m = masked_conv(19, 3, 3, 3, 7)
    cond = to_condensed(w, m)
    x = torch.randn(1, 3, 5, 7, device=DEV)
    ref = F.conv2d(x.double(), (w * m).double(), None, 1, 1, 1)
    for cfg in tconv.conv_configs():
        y = tconv.condensed_conv2d_triton(x, cond.values, cond.indices, None, 3, 1, 1, 1, config=cfg)
        assert rel_err(y, ref) < 1e-5, cfg


def test_conv_errors_name_the_argument():
    vals, idx = rand_condensed(4, 27, 5)
    x = torch.randn(1, 3, 6, 6, device=DEV)
    with pytest.raises(ValueError, match="4-D"):
        tconv.condensed_conv2d_triton(x[0], vals, idx, None, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        tconv.condensed_conv2d_triton(x, vals, idx, None, (3, 3, 3))
    with pytest.raises(ValueError, match="exceeds the fan-in"):
        tconv.condensed_conv2d_triton(x, vals, idx, None, 1)
    with pytest.raises(ValueError, match="too small"):
        tconv.condensed_conv2d_triton(x[:, :, :2, :2], vals, idx, None, 3)
    with pytest.raises(ValueError, match="stride"):
        tconv.condensed_conv2d_triton(x, vals, idx, None, 3, 0)


# ---------------------------------------------------------------------------------------------
# GPU only: the autotuned paths on real shapes (the interpreter cannot autotune).
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: autotuned compiled kernels")
class TestAutotunedOnGPU:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("batch", [1, 7, 16, 17, 256, 300, 2048])
    @pytest.mark.parametrize("sparsity", [0.9, 0.99])
    def test_vit_fc2(self, sparsity, batch, dtype):
        n, fan_in = 768, 3072
        k = round(fan_in * (1 - sparsity))
        vals, idx = rand_condensed(n, fan_in, k, dtype=dtype, device="cuda")
        bias = torch.randn(n, device="cuda").to(dtype)
        check_linear(torch.randn(batch, fan_in, device="cuda").to(dtype), vals, idx, bias)

    def test_leading_dims_and_views(self):
        vals, idx = rand_condensed(768, 3072, 307, device="cuda")
        check_linear(torch.randn(4, 197, 3072, device="cuda"), vals, idx, None)
        check_linear(torch.randn(3072, 300, device="cuda").t(), vals, idx, None)
        check_linear(torch.randn(5, 6144, device="cuda")[:, ::2], vals, idx, None)

    def test_conv(self):
        w, m = masked_conv(128, 64, 3, 3, 58, device="cuda")
        cond = to_condensed(w, m)
        x = torch.randn(4, 64, 28, 28, device="cuda")
        for stv in (1, 2):
            y = tconv.condensed_conv2d_triton(x, cond.values, cond.indices, None, 3, stv, 1, 1)
            assert rel_err(y, F.conv2d(x.double(), (w * m).double(), None, stv, 1, 1)) < 1e-5
