"""The C++ CPU kernels: correctness against a float64 reference on random shapes, and that they run.

The kernels have several paths (GEMV for 1-3 rows with masked row tails, feature-major blocks of
8/16/32 columns with masked column tails, fp64 loops, conv over stride-phase planes); the shapes below are
drawn to reach each of them, including n * k boundaries where a row tail must not over-read.
In-process tests run the variant this CPU selects (the best it supports); every other supported
ISA variant (avx512bf16, avx512, avx2, generic) runs in a subprocess of its own.
"""
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_compile import formats
from sparse_compile.kernels import condensed_conv2d, condensed_linear, cpu, ops
from sparse_compile.kernels.reference import condensed_conv2d_ref, condensed_linear_ref
from sparse_compile.numerics import relative_error

if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler on this machine: the C++ kernels cannot be built", allow_module_level=True)

# With a compiler present the kernels must build: a silent fallback would make every test below
# test the reference against itself.
assert cpu.load(), f"C++ kernels failed to build: {cpu.build_info()['error']}"

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
HYP = settings(max_examples=60, deadline=None, derandomize=True)


def _layer(n, fan_in, k, dtype, index_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, fan_in, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values.to(index_dtype)
    values = torch.randn(n, k, generator=g).to(dtype)
    return values, idx


def _rel_err(y, ref):
    assert not torch.isnan(y).any(), "NaN in output: an element was left unwritten"
    return relative_error(y, ref)


@pytest.fixture(autouse=True)
def _nan_poisoned_outputs():
    """Make every fresh output (at::empty) start as NaN, so an element a kernel fails to write
    shows up as NaN (torch fills uninitialized memory in deterministic mode)."""
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(3)).all()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _cpp_linear(x, values, idx, bias):
    return torch.ops.sparse_compile._condensed_linear_cpu(x, values, idx, bias)


@HYP
@given(
    lead=st.lists(st.integers(0, 9), min_size=0, max_size=2),
    rows=st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 65]),
    n=st.integers(1, 37),
    fan_in=st.integers(1, 300),
    kfrac=st.floats(0, 1),
    dtype=st.sampled_from(DTYPES),
    index_dtype=st.sampled_from([torch.int16, torch.int32]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_random_shapes(lead, rows, n, fan_in, kfrac, dtype, index_dtype, bias, seed):
    k = max(1, min(fan_in, round(kfrac * fan_in)))
    values, idx = _layer(n, fan_in, k, dtype, index_dtype, seed)
    x = torch.randn(*lead, rows, fan_in).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = _cpp_linear(x, values, idx, b)
    ref = condensed_linear_ref(x.double(), values.double(), idx, None if b is None else b.double())
    assert y.shape == ref.shape and y.dtype == dtype
    assert _rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 13, 17, 40])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 7, 8, 9, 12, 15, 16, 17, 31, 33, 64])
def test_linear_row_tails_and_constant_fan_in_edges(rows, k):
    # k covers every residue path of the GEMV (16-wide body, masked 8-wide tails, the last row's
    # scalar tail) and every k % 8 tail of the avx512 kernel (from 17 rows; 40 rows = two 16-column
    # blocks and a partial one); k = fan-in is the dense edge case.
    for fan_in in (k, 70):
        values, idx = _layer(13, fan_in, k, torch.float32, torch.int16, seed=k)
        x = torch.randn(rows, fan_in)
        b = torch.randn(13)
        y = _cpp_linear(x, values, idx, b)
        ref = condensed_linear_ref(x.double(), values.double(), idx, b.double())
        assert _rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
def test_unreferenced_nonfinite_inputs_do_not_leak(rows):
    # A row's masked tail reads the next row's indices; x there may be inf/NaN and must not reach
    # an output that does not reference it. Only neuron 0 (whose tail is masked) is checked.
    fan_in, k = 64, 13
    values, idx = _layer(9, fan_in, k, torch.float32, torch.int16, seed=3)
    used = torch.zeros(fan_in, dtype=torch.bool)
    used[idx[0].long()] = True
    assert not used[idx[1, :3].long()].all()  # the next row's first indices are unused by row 0
    x = torch.randn(rows, fan_in)
    x[:, ~used] = float("inf")
    x[:, (~used).nonzero()[::2, 0]] = float("nan")
    y0 = _cpp_linear(x, values, idx, None)[:, 0]
    assert torch.isfinite(y0).all()
    ref = (x[:, idx[0].long()].double() * values[0].double()).sum(-1)
    assert _rel_err(y0, ref) < 1e-5


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_linear_non_contiguous_x(layout):
    values, idx = _layer(10, 48, 9, torch.float32, torch.int32, seed=1)
    base = torch.randn(48, 6)
    x = {
        "transposed": base.t(),  # unit stride on the batch, not the features
        "sliced": torch.randn(6, 96)[:, ::2],
        "expanded": torch.randn(1, 48).expand(6, 48),
    }[layout]
    assert not x.is_contiguous()
    y = condensed_linear(x, values, idx)
    ref = condensed_linear_ref(x.double(), values.double(), idx)
    assert _rel_err(y, ref) < 1e-5


def test_public_op_and_wrapper_use_cpp_kernel_not_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the plain-torch reference ran instead of the C++ kernel")

    monkeypatch.setattr(ops, "condensed_linear_ref", boom)
    monkeypatch.setattr(ops, "condensed_conv2d_ref", boom)
    values, idx = _layer(8, 30, 4, torch.float32, torch.int16, seed=0)
    x = torch.randn(3, 30)
    expected = condensed_linear_ref(x, values, idx)
    torch.testing.assert_close(torch.ops.sparse_compile.condensed_linear(x, values, idx), expected)
    torch.testing.assert_close(condensed_linear(x, values, idx), expected)
    cv, ci = _layer(4, 18, 5, torch.float32, torch.int16, seed=1)
    img = torch.randn(1, 2, 5, 5)
    yc = torch.ops.sparse_compile.condensed_conv2d(img, cv, ci, None, [3, 3], [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(yc, condensed_conv2d_ref(img, cv, ci, None, (3, 3), (1, 1), (1, 1), (1, 1)))
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sparse_compile::_condensed_linear_cpu", "CPU")


def test_thread_count_does_not_change_results():
    values, idx = _layer(300, 200, 40, torch.float32, torch.int16, seed=5)
    prev = torch.get_num_threads()
    try:
        outs = []
        for rows in (1, 40):
            x = torch.randn(rows, 200)
            res = []
            for nt in (1, 2):
                torch.set_num_threads(nt)
                res.append(_cpp_linear(x, values, idx, None))
            outs.append(res)
    finally:
        torch.set_num_threads(prev)
    for a, b in outs:
        assert torch.equal(a, b)


def test_per_thread_and_shared_transpose_of_x_agree():
    # The avx512 fp32 kernel (>= 17 rows) transposes x per thread while threads^2 * fan_in * 4 <=
    # n * k, else once for all threads: 64 x 100 with k = 10 takes the first at 1 thread, the second
    # at 2. Same sums in the same order, so the outputs are identical (and right).
    values, idx = _layer(64, 100, 10, torch.float32, torch.int16, seed=7)
    x, b = torch.randn(40, 100), torch.randn(64)
    prev = torch.get_num_threads()
    try:
        res = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            res.append(_cpp_linear(x, values, idx, b))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(res[0], res[1])
    assert _rel_err(res[0], condensed_linear_ref(x.double(), values.double(), idx, b.double())) < 1e-5


@pytest.mark.parametrize("dtype, rows", [(torch.float32, 100), (torch.bfloat16, 150)])
def test_column_split_over_threads_agrees_with_one_thread(dtype, rows):
    # From 2 threads with >= 2 column blocks per thread the avx512 kernels split the column blocks
    # between threads (fp32 always, as it transposes x per thread; bf16 while x outweighs the
    # weights, as here: 200 features x 150 rows against 40 x 20 entries). 40 neurons = 3 tiles of
    # 16, and 7 fp32 / 5 bf16 blocks, so 2 and 3 threads cut through blocks: the pieces at each
    # end of a share are partial blocks. Each neuron's sum is taken in the same order whoever runs
    # it, so the outputs are identical; the reference checks they are right.
    if not cpu.selected_isa().startswith("avx512"):
        pytest.skip(f"the column split is in the avx512 kernels; this CPU runs {cpu.selected_isa()}")
    values, idx = _layer(40, 200, 20, dtype, torch.int16, seed=11)
    x, b = torch.randn(rows, 200).to(dtype), torch.randn(40).to(dtype)
    prev = torch.get_num_threads()
    try:
        res = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            res.append(_cpp_linear(x, values, idx, b))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(res[0], res[1]) and torch.equal(res[0], res[2])
    ref = condensed_linear_ref(x.double(), values.double(), idx, b.double())
    assert _rel_err(res[0].double(), ref) < TOL[dtype]


def test_empty_and_zero_k():
    values, idx = _layer(5, 10, 3, torch.float32, torch.int16, seed=0)
    assert _cpp_linear(torch.randn(0, 10), values, idx, None).shape == (0, 5)
    assert _cpp_linear(torch.randn(2, 0, 10), values, idx, None).shape == (2, 0, 5)
    b = torch.randn(4)
    y = _cpp_linear(torch.randn(3, 10), torch.randn(4, 0), torch.zeros(4, 0, dtype=torch.int16), b)
    torch.testing.assert_close(y, b.expand(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", [(3, 1, 1, 1, 11), (3, 2, 1, 1, 12), (1, 1, 0, 1, 5), (3, 1, 2, 2, 17)])
def test_conv_relu_op_is_relu_of_the_conv(dtype, geom):
    # The fused op applies ReLU as it stores (fp32 AVX2/AVX-512 store, bf16 VDPBF16PS kernel) or
    # afterwards (fp64, portable build): the same values as ReLU of the plain op, NaN kept.
    ks, stride, pad, dil, k = geom
    g = torch.Generator().manual_seed(k)
    cin, cout = 6, 13
    idx = torch.rand(cout, cin * ks * ks, generator=g).argsort(1)[:, :k].sort(1).values.to(torch.int16)
    v = torch.randn(cout, k, generator=g).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype)
    x = torch.randn(2, cin, 15, 9, generator=g).to(dtype)
    x[0, :, 4, 4] = float("nan")
    args = (x, v, idx, b, (ks, ks), (stride, stride), (pad, pad), (dil, dil))
    plain = torch.ops.sparse_compile._condensed_conv2d_cpu(*args)
    fused = torch.ops.sparse_compile._condensed_conv2d_relu_cpu(*args)
    ref = torch.relu(plain) if dtype != torch.bfloat16 else torch.relu(plain.float())
    assert fused.dtype == dtype and fused.shape == plain.shape
    assert torch.isnan(fused).any() and torch.equal(torch.isnan(fused), torch.isnan(plain))
    tol = 0 if dtype != torch.bfloat16 else 1e-2  # bf16: ReLU before rounding, not after
    torch.testing.assert_close(fused.float().nan_to_num(), ref.float().nan_to_num(), rtol=tol, atol=tol)
    assert (fused.nan_to_num() >= 0).all()


@HYP
@given(
    batch=st.integers(0, 3),
    cin=st.integers(1, 5),
    hw=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    cout=st.integers(1, 9),
    ks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    kfrac=st.floats(0, 1),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_matches_masked_dense_conv(batch, cin, hw, cout, ks, stride, padding, dilation, kfrac,
                                        dtype, bias, seed):
    eff = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
    if any(h + 2 * p < e for h, p, e in zip(hw, padding, eff)):
        return  # no output pixel: the wrapper rejects it (tested in test_ops)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, *ks, generator=g, dtype=torch.float64)
    fan_in = cin * ks[0] * ks[1]
    k = max(1, min(fan_in, round(kfrac * fan_in)))
    mask = torch.zeros(cout, fan_in, dtype=torch.bool)
    for i in range(cout):
        mask[i, torch.randperm(fan_in, generator=g)[:k]] = True
    mask = mask.reshape(w.shape)
    c = formats.to_condensed(w, mask)
    x = torch.randn(batch, cin, *hw, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    ref = F.conv2d(x, w * mask, b, stride, padding, dilation)
    y = condensed_conv2d(x.to(dtype), c.values.to(dtype), c.indices, None if b is None else b.to(dtype),
                         ks, stride, padding, dilation)
    assert y.shape == ref.shape and y.dtype == dtype
    assert _rel_err(y, ref) < TOL[dtype]


def test_conv_wide_image_uses_all_column_blocks():
    # L = 23 * 29 = 667 output pixels: 32-wide blocks plus a masked tail, n not a block multiple.
    values, idx = _layer(7, 3 * 9, 10, torch.float32, torch.int16, seed=2)
    x = torch.randn(2, 3, 23, 29)
    y = torch.ops.sparse_compile._condensed_conv2d_cpu(x, values, idx, None, [3, 3], [1, 1], [1, 1], [1, 1])
    ref = condensed_conv2d_ref(x.double(), values.double(), idx, None, (3, 3), (1, 1), (1, 1), (1, 1))
    assert _rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (3, 1, 2)])
def test_conv_channels_last_and_wide_padding(stride, padding, dilation):
    # Non-contiguous (channels_last) input, and a padded row wider than the output row, so the
    # kernel computes and drops virtual columns.
    values, idx = _layer(10, 4 * 9, 11, torch.float32, torch.int32, seed=4)
    x = torch.randn(3, 4, 13, 17).to(memory_format=torch.channels_last)
    b = torch.randn(10)
    y = condensed_conv2d(x, values, idx, b, 3, stride, padding, dilation)
    ref = condensed_conv2d_ref(x.double(), values.double(), idx, b.double(), (3, 3), (stride,) * 2,
                               (padding,) * 2, (dilation,) * 2)
    assert y.shape == ref.shape
    assert _rel_err(y, ref) < 1e-5


_VARIANT_SCRIPT = r"""
import os, sys, torch, torch.nn.functional as F
from sparse_compile.kernels import condensed_conv2d, condensed_linear, cpu
from sparse_compile.kernels.reference import condensed_linear_ref
from sparse_compile.numerics import relative_error
assert cpu.load(), cpu.build_info()["error"]
isa = os.environ["SPARSE_COMPILE_CPU_ISA"]
assert cpu.build_info()["isa"] == isa, cpu.build_info()
assert ("-mavx2" in cpu.build_info()["flags"]) == (isa != "generic"), cpu.build_info()["flags"]
torch.manual_seed(0)
worst = {torch.float32: 0.0, torch.bfloat16: 0.0}
# rows: GEMV (1, 2), the feature-major kernels' column blocks and tails (8 .. 70; the avx512 kernels
# from 17); fan-ins from 64 to 2100; odd and even k (bf16 pairs), k % 8 = 0, 7, 5, 2 (fp32 tails).
for batch, n, fan_in, k in ((1, 37, 150, 15), (2, 9, 64, 13), (8, 37, 150, 15), (40, 37, 150, 16),
                            (70, 19, 2100, 31), (33, 40, 90, 90), (24, 21, 300, 29)):
    idx = torch.rand(n, fan_in).argsort(1)[:, :k].sort(1).values.to(torch.int16 if k % 2 else torch.int32)
    v, x, b = torch.randn(n, k), torch.randn(batch, fan_in), torch.randn(n)
    for dt in worst:
        xd, vd, bd = x.to(dt), v.to(dt), b.to(dt)
        ref = condensed_linear_ref(xd.double(), vd.double(), idx, bd.double())
        y = condensed_linear(xd, vd, idx, bd)
        assert y.dtype == dt and y.shape == ref.shape
        worst[dt] = max(worst[dt], relative_error(y, ref))
# 2 threads, 150 rows: the avx512 kernels split the column blocks between the threads.
torch.set_num_threads(2)
idx = torch.rand(40, 200).argsort(1)[:, :20].sort(1).values.to(torch.int16)
v, x, b = torch.randn(40, 20), torch.randn(150, 200), torch.randn(40)
for dt in worst:
    ref = condensed_linear_ref(x.to(dt).double(), v.to(dt).double(), idx, b.to(dt).double())
    worst[dt] = max(worst[dt], relative_error(condensed_linear(x.to(dt), v.to(dt), idx, b.to(dt)), ref))
for stride, padding, dilation in ((1, 1, 1), (2, 1, 1), (1, 2, 2), (3, 0, 1)):
    cin, cout, k = 5, 9, 12
    idx = torch.rand(cout, cin * 9).argsort(1)[:, :k].sort(1).values.to(torch.int32)
    v, x = torch.randn(cout, k), torch.randn(2, cin, 19, 23)
    w = torch.zeros(cout, cin * 9).scatter(1, idx.long(), v).view(cout, cin, 3, 3)
    ref = F.conv2d(x.double(), w.double(), None, stride, padding, dilation)
    y = condensed_conv2d(x, v, idx, None, 3, stride, padding, dilation)
    worst[torch.float32] = max(worst[torch.float32], relative_error(y, ref))
    # bf16 (the VDPBF16PS conv kernel on avx512bf16), odd k = 11, a bias: against the bf16 weights
    i11 = idx[:, :11].contiguous()
    vb, xb, bb = v[:, :11].bfloat16(), x.bfloat16(), torch.randn(cout).bfloat16()
    wb = torch.zeros(cout, cin * 9, dtype=torch.double).scatter(1, i11.long(), vb.double()).view(cout, cin, 3, 3)
    refb = F.conv2d(xb.double(), wb, bb.double(), stride, padding, dilation)
    yb = condensed_conv2d(xb, vb, i11, bb, 3, stride, padding, dilation)
    assert yb.dtype == torch.bfloat16
    worst[torch.bfloat16] = max(worst[torch.bfloat16], relative_error(yb, refb))
    # the fused conv + ReLU op, both dtypes
    yr = torch.ops.sparse_compile._condensed_conv2d_relu_cpu(xb, vb, i11, bb, (3, 3), (stride, stride),
                                                              (padding, padding), (dilation, dilation))
    worst[torch.bfloat16] = max(worst[torch.bfloat16], relative_error(yr, torch.relu(refb)))
    yr = torch.ops.sparse_compile._condensed_conv2d_relu_cpu(x, v, idx, None, (3, 3), (stride, stride),
                                                              (padding, padding), (dilation, dilation))
    worst[torch.float32] = max(worst[torch.float32], relative_error(yr, torch.relu(ref)))
print(f"variant OK {worst[torch.float32]:.2e} {worst[torch.bfloat16]:.2e}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_every_isa_variant_this_cpu_supports(isa):
    """Each build variant (avx512bf16, avx512, avx2, portable) is correct where the CPU runs it.

    Runs in a subprocess: SPARSE_COMPILE_CPU_ISA=<variant> makes that process build and load that
    library in place of the best one. Variants the CPU lacks are skipped with what it lacks.
    """
    import os
    import subprocess
    import sys

    reason = cpu.isa_unsupported_reason(isa)
    if reason is not None:
        pytest.skip(f"{isa}: {reason}")
    env = dict(os.environ, SPARSE_COMPILE_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    fp32, bf16 = (float(v) for v in r.stdout.split("variant OK")[1].split())
    assert fp32 < 1e-5, r.stdout
    assert bf16 < TOL[torch.bfloat16], r.stdout


def test_forcing_an_unknown_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CPU_ISA", "avx9000")
    with pytest.raises(RuntimeError, match="unknown CPU ISA variant 'avx9000'"):
        cpu.selected_isa()


def test_variant_follows_what_the_cpu_reports(monkeypatch):
    # Selection reads the CPU's flags, it does not assume them: an AVX2-only CPU gets avx2, one
    # without AVX2 the portable build, and AVX512 without BF16 the plain avx512 build.
    monkeypatch.delenv("SPARSE_COMPILE_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for flags, best in (({"avx2", "fma", "f16c", "bmi1", "bmi2"}, "avx2"), ({"sse2"}, "generic"),
                        (cpu._AVX512_NEEDS, "avx512"), (cpu._NEEDS["avx512bf16"], "avx512bf16")):
        monkeypatch.setattr(cpu, "cpu_flags", lambda f=flags: frozenset(f))
        assert cpu.selected_isa() == best
    # torch pinned lower (ATEN_CPU_CAPABILITY=avx2) caps the variant too.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu.selected_isa() == "avx2"
    monkeypatch.setenv("SPARSE_COMPILE_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="SPARSE_COMPILE_CPU_ISA=avx512"):
        cpu.selected_isa()


@pytest.mark.parametrize("rows", [3, 37, 197])
def test_bf16_error_against_fp32_is_bf16_rounding(rows):
    """bf16 condensed (bf16 values and activations, fp32 accumulation) against the fp32 layer: the
    error is that of rounding the inputs and output to bf16, within the suite's bf16 bound and no
    worse than torch's own dense bf16 F.linear on the same inputs (x2 margin)."""
    n, fan_in, k = 48, 384, 38
    values, idx = _layer(n, fan_in, k, torch.float32, torch.int16, seed=rows)
    x, b = torch.randn(rows, fan_in), torch.randn(n)
    ref = condensed_linear_ref(x.double(), values.double(), idx, b.double())
    y = condensed_linear(x.bfloat16(), values.bfloat16(), idx, b.bfloat16())
    assert y.dtype == torch.bfloat16
    err = _rel_err(y, ref)
    w = torch.zeros(n, fan_in).scatter(1, idx.long(), values)
    dense_err = _rel_err(F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()), ref)
    assert err < TOL[torch.bfloat16]
    assert err <= 2 * dense_err + 1e-3, (err, dense_err)
