"""Registration of the condensed ops: import, torch.compile, torch.export, autograd, arguments."""
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparse_compile
from sparse_compile import formats
from sparse_compile.kernels import (
    condensed_conv2d,
    condensed_conv2d_ref,
    condensed_linear,
    condensed_linear_ref,
    cpu,
    ops,
)

HAS_COMPILER = cpu.load()  # builds the C++ kernels once per machine (cached afterwards)


def _condensed(out, fan_in, k, dtype=torch.float32, index_dtype=torch.int16, seed=0):
    """A random constant fan-in layer built through the formats module, as users get it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, fan_in, generator=g, dtype=dtype)
    mask = torch.zeros(out, fan_in, dtype=torch.bool)
    for i in range(out):
        mask[i, torch.randperm(fan_in, generator=g)[:k]] = True
    c = formats.to_condensed(w, mask, index_dtype=index_dtype)
    return c.values, c.indices, (w * mask)


def _run_code(fn, *args):
    from torch._inductor.utils import run_and_get_code

    out, codes = run_and_get_code(fn, *args)
    return out, "\n".join(codes)


def test_import_registers_ops_without_compiling_or_triton():
    code = (
        "import sys, torch, sparse_compile\n"
        "assert hasattr(torch.ops.sparse_compile, 'condensed_linear')\n"
        "assert hasattr(torch.ops.sparse_compile, 'condensed_conv2d')\n"
        "from sparse_compile.kernels import cpu\n"
        "assert not cpu.build_info()['tried'], 'C++ build attempted at import'\n"
        "bad = [m for m in ('triton', 'torch._inductor', 'torch._dynamo') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("bias", [True, False])
def test_public_op_matches_masked_dense_linear(bias):
    values, idx, w = _condensed(11, 37, 5)
    x = torch.randn(2, 3, 37)
    b = torch.randn(11) if bias else None
    y = torch.ops.sparse_compile.condensed_linear(x, values, idx, b)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(condensed_linear(x, values, idx, b), y, rtol=0, atol=0)
    torch.testing.assert_close(condensed_linear_ref(x, values, idx, b), y, rtol=1e-5, atol=1e-5)


def test_opcheck_linear_and_conv():
    # Schema, fake kernel, autograd registration and AOT dispatch agree with the real kernel.
    values, idx, _ = _condensed(7, 20, 4, dtype=torch.float64)
    x = torch.randn(3, 5, 20, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.sparse_compile.condensed_linear.default, (x, values.requires_grad_(), idx, b))
    cv, ci, _ = _condensed(6, 27, 5, dtype=torch.float64, index_dtype=torch.int32)
    xc = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.sparse_compile.condensed_conv2d.default,
        (xc, cv.requires_grad_(), ci, None, [3, 3], [2, 2], [1, 1], [1, 1]),
    )


@pytest.mark.skipif(not HAS_COMPILER, reason="C++ kernels could not be built here (no compiler?)")
def test_compile_fullgraph_calls_cpp_kernel():
    values, idx, w = _condensed(9, 40, 6)
    b = torch.randn(9)

    def f(x):
        return condensed_linear(x, values, idx, b).relu()

    x = torch.randn(4, 40)
    y, code = _run_code(torch.compile(f, fullgraph=True), x)
    assert "torch.ops.sparse_compile._condensed_linear_cpu" in code
    # A decomposition would show up as a dense scatter + matmul in the generated code.
    assert "scatter" not in code and "addmm" not in code and "mm(" not in code
    torch.testing.assert_close(y, F.linear(x, w, b).relu(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="C++ kernels could not be built here (no compiler?)")
def test_compile_fullgraph_conv_calls_cpp_kernel():
    values, idx, w = _condensed(6, 3 * 3 * 3, 7)
    x = torch.randn(2, 3, 10, 10)

    def f(x):
        return condensed_conv2d(x, values, idx, None, 3, 2, 1, 1)

    y, code = _run_code(torch.compile(f, fullgraph=True), x)
    assert "torch.ops.sparse_compile._condensed_conv2d_cpu" in code
    torch.testing.assert_close(y, F.conv2d(x, w.reshape(6, 3, 3, 3), None, 2, 1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="needs the C++ kernels (no C++ compiler here)")
def test_conv_relu_wrapper_eager_and_compiled():
    # Eager inference: the fused C++ op. Under torch.compile: the public conv op, then a ReLU that
    # inductor generates (the fused op is an eager shortcut). Same values either way.
    values, idx, w = _condensed(6, 3 * 3 * 3, 7)
    b = torch.randn(6)
    x = torch.randn(2, 3, 10, 10)
    ref = F.relu(F.conv2d(x, w.reshape(6, 3, 3, 3), b, 2, 1, 1))
    with torch.inference_mode():
        torch.testing.assert_close(condensed_conv2d(x, values, idx, b, 3, 2, 1, 1, relu=True), ref, rtol=1e-5,
                                   atol=1e-5)

    def f(x):
        return condensed_conv2d(x, values, idx, b, 3, 2, 1, 1, relu=True)

    y, code = _run_code(torch.compile(f, fullgraph=True), x)
    assert "torch.ops.sparse_compile._condensed_conv2d_cpu" in code
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_export_keeps_one_op_node():
    values, idx, w = _condensed(9, 40, 6)
    cv, ci, cw = _condensed(5, 2 * 3 * 3, 4)

    class M(torch.nn.Module):
        def forward(self, x, img):
            return condensed_linear(x, values, idx), condensed_conv2d(img, cv, ci, None, 3, 1, 1, 1)

    x, img = torch.randn(3, 40), torch.randn(1, 2, 6, 6)
    ep = torch.export.export(M(), (x, img))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.sparse_compile.condensed_linear.default in targets
    assert torch.ops.sparse_compile.condensed_conv2d.default in targets
    assert len(targets) == 2, targets
    buf = io.BytesIO()
    torch.export.save(ep, buf)  # the serialized program refers to the ops by name
    buf.seek(0)
    for prog in (ep, torch.export.load(buf)):
        y, yc = prog.module()(x, img)
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yc, F.conv2d(img, cw.reshape(5, 2, 3, 3), None, 1, 1, 1), rtol=1e-5, atol=1e-5)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.sparse_compile.condensed_linear(
            torch.empty(2, 4, 20), torch.empty(7, 4), torch.empty(7, 4, dtype=torch.int16))
        yc = torch.ops.sparse_compile.condensed_conv2d(
            torch.empty(2, 3, 9, 9), torch.empty(6, 5), torch.empty(6, 5, dtype=torch.int32), None,
            [3, 3], [2, 2], [1, 1], [1, 1])
    assert y.shape == (2, 4, 7)
    assert yc.shape == (2, 6, 5, 5)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_linear(bias):
    values, idx, _ = _condensed(5, 12, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    v = values.clone().requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda x, v, b: condensed_linear(x, v, idx, b), (x, v, b))


def test_gradcheck_op_with_bias_left_at_default():
    values, idx, _ = _condensed(4, 9, 3, dtype=torch.float64, index_dtype=torch.int32)
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    v = values.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v: torch.ops.sparse_compile.condensed_linear(x, v, idx), (x, v))


def test_gradcheck_conv():
    values, idx, _ = _condensed(3, 2 * 2 * 3, 5, dtype=torch.float64, index_dtype=torch.int32)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    v = values.clone().requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, v, b: condensed_conv2d(x, v, idx, b, (2, 3), (2, 1), (1, 0), (1, 2))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, v, b))


def test_grads_match_masked_dense_and_compile():
    values, idx, w = _condensed(8, 30, 5)
    x = torch.randn(4, 30)
    b = torch.randn(8)
    gy = torch.randn(4, 8)

    def grads(fn):
        xx, vv, bb = x.clone().requires_grad_(), values.clone().requires_grad_(), b.clone().requires_grad_()
        fn(xx, vv, bb).backward(gy)
        return xx.grad, vv.grad, bb.grad

    gx, gv, gb = grads(lambda xx, vv, bb: condensed_linear(xx, vv, idx, bb))
    wd = w.clone().requires_grad_()
    xd = x.clone().requires_grad_()
    F.linear(xd, wd, b).backward(gy)
    torch.testing.assert_close(gx, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv, wd.grad.gather(1, idx.long()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gy.sum(0))
    cg = grads(torch.compile(lambda xx, vv, bb: condensed_linear(xx, vv, idx, bb), fullgraph=True))
    for a, e in zip(cg, (gx, gv, gb)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def _bad_linear_cases():
    v = torch.randn(4, 3)
    i = torch.zeros(4, 3, dtype=torch.int16)
    x = torch.randn(2, 10)
    return [
        ("x", dict(x="nope", values=v, indices=i), TypeError),
        ("values", dict(x=x, values=torch.randn(12), indices=i), ValueError),
        ("values dtype", dict(x=x, values=v.double(), indices=i), TypeError),
        ("indices shape", dict(x=x, values=v, indices=i[:, :2]), ValueError),
        ("indices dtype", dict(x=x, values=v, indices=i.long()), TypeError),
        ("bias shape", dict(x=x, values=v, indices=i, bias=torch.randn(5)), ValueError),
        ("bias dtype", dict(x=x, values=v, indices=i, bias=torch.randn(4).half()), TypeError),
        ("exceeds x's fan-in", dict(x=torch.randn(2, 2), values=v, indices=i), ValueError),
        ("x dtype", dict(x=x.int(), values=v, indices=i), TypeError),
    ]


@pytest.mark.parametrize("needle,kwargs,exc", _bad_linear_cases())
def test_linear_bad_arguments_name_the_argument(needle, kwargs, exc):
    with pytest.raises(exc, match=needle):
        condensed_linear(**kwargs)


@pytest.mark.parametrize(
    "needle,kw",
    [
        ("x must be 4-D", dict(x=torch.randn(3, 8, 8))),
        ("kernel_size", dict(kernel_size=(3, 3, 3))),
        ("stride", dict(stride=0)),
        ("exceeds the fan-in", dict(kernel_size=1)),
        ("too small", dict(x=torch.randn(1, 2, 2, 2))),
    ],
)
def test_conv_bad_arguments_name_the_argument(needle, kw):
    args = dict(x=torch.randn(1, 2, 8, 8), values=torch.randn(4, 5),
                indices=torch.zeros(4, 5, dtype=torch.int16), bias=None, kernel_size=3)
    args.update(kw)
    with pytest.raises(ValueError, match=needle):
        condensed_conv2d(**args)


@pytest.mark.skipif(not HAS_COMPILER, reason="needs the C++ kernels (no C++ compiler here)")
def test_condensed_modules_take_the_eager_shortcut_with_parameters(monkeypatch):
    # CondensedLinear holds values and bias as nn.Parameter: in plain eager inference they must go
    # straight to the C++ kernel (the public op's Python layer cost ~80 us per call), and with an
    # input that needs gradients through the public op (its autograd formula).
    from sparse_compile.compiler.modules import CondensedLinear

    values, idx, w = _condensed(24, 40, 6, seed=3)
    b = torch.randn(24)
    mod = CondensedLinear(values, idx, b, in_features=40)
    assert type(mod.values) is torch.nn.Parameter and type(mod.bias) is torch.nn.Parameter
    assert ops._cpu_ready()  # sets the shortcut's op (done on first use otherwise)
    calls = []
    real = ops._CPU_OP
    monkeypatch.setattr(ops, "_CPU_OP", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(5, 40)
    with torch.inference_mode():
        y = mod(x)
    assert calls == [1]
    torch.testing.assert_close(y, F.linear(x, w, b))
    xg = x.clone().requires_grad_()
    yg = mod(xg)
    assert calls == [1]  # the public op, not the shortcut
    yg.sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(5, 40))


def test_fallback_without_cpp_warns_and_is_correct():
    code = (
        "import warnings, torch, torch.nn.functional as F, sparse_compile\n"
        "from sparse_compile.kernels import condensed_linear, cpu\n"
        "from sparse_compile.kernels.reference import dense_weight\n"
        "x = torch.randn(3, 20); v = torch.randn(4, 3); i = torch.tensor([[0, 5, 19]] * 4, dtype=torch.int16)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = condensed_linear(x, v, i)\n"
        "assert any('fall back' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "assert not cpu.is_loaded()\n"
        "torch.testing.assert_close(y, F.linear(x, dense_weight(v, i, 20)))\n"
    )
    env = dict(os.environ, SPARSE_COMPILE_NO_CPP="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cuda_path_falls_back_to_reference_without_triton_module(monkeypatch):
    # Until triton_linear exists (or when it fails to import) CUDA tensors use the reference;
    # the lookup must report "absent" rather than raise. Exercised here on the lookup itself.
    monkeypatch.setattr(ops, "_TRITON", {})
    fn = ops._triton_fn("no_such_triton_module", "condensed_linear_triton")
    assert fn is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
def test_cuda_public_op_matches_reference():
    values, idx, w = _condensed(64, 300, 30)
    x = torch.randn(5, 300)
    b = torch.randn(64)
    args = (x.cuda(), values.cuda(), idx.cuda(), b.cuda())
    for y in (torch.ops.sparse_compile.condensed_linear(*args), condensed_linear(*args)):  # op, eager fast path
        torch.testing.assert_close(y.cpu(), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    cv, ci, cw = _condensed(8, 4 * 9, 7)
    img = torch.randn(2, 4, 9, 9)
    cargs = (img.cuda(), cv.cuda(), ci.cuda(), None, [3, 3], [1, 1], [1, 1], [1, 1])
    for yc in (torch.ops.sparse_compile.condensed_conv2d(*cargs), condensed_conv2d(*cargs)):
        torch.testing.assert_close(yc.cpu(), F.conv2d(img, cw.reshape(8, 4, 3, 3), None, 1, 1, 1),
                                   rtol=1e-4, atol=1e-4)


def test_package_exports():
    assert sparse_compile.kernels.condensed_linear is condensed_linear
    assert sparse_compile.kernels.condensed_conv2d is condensed_conv2d
    assert sparse_compile.kernels.condensed_conv2d_ref is condensed_conv2d_ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
def test_cuda_compile_inlines_triton_kernels():
    # Inductor must see the Triton launches of the triton_op body, not an opaque custom-op call.
    values, idx, w = _condensed(96, 384, 38)
    v, i = values.cuda(), idx.cuda()
    f = torch.compile(lambda x: condensed_linear(x, v, i).relu(), fullgraph=True)
    for batch in (1, 64):
        x = torch.randn(batch, 384)
        y, code = _run_code(f, x.cuda())
        assert "_condensed_gemv_kernel" in code or "_condensed_fm_kernel" in code
        assert "torch.ops.sparse_compile.condensed_linear" not in code
        torch.testing.assert_close(y.cpu(), F.linear(x, w).relu(), rtol=1e-4, atol=1e-4)
