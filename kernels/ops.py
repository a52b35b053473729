"""Registration of ``torch.ops.sparse_compile.condensed_linear`` / ``condensed_conv2d`` / ``csr_mm``.

Design:

* The public ops are ``torch.library.triton_op``s. Eagerly they run the Python body below; under
  ``torch.compile`` AOTAutograd decomposes them into that body, so on CUDA inductor sees the
  ``wrap_triton`` kernel launches (and can autotune / fuse around them) and on CPU it sees one call
  to the C++ op ``sparse_compile::_condensed_linear_cpu`` (an extern kernel, not a decomposition).
  ``torch.export`` keeps the public op as a single node (triton ops are not decomposed on export).
* The body dispatches by device: CUDA -> the Triton launchers in ``triton_linear`` /
  ``triton_conv`` (imported on first CUDA call), CPU -> the C++ ops (JIT-built on first call, see
  ``cpu.py``), anything else or a missing kernel -> the plain-torch reference.
* The private C++ ops' schemas and fake kernels are defined here, in Python, so tracing works
  whether or not the C++ build succeeded; the built library only adds the CPU kernels.
* Gradients (x, values, bias) use plain torch ops through the dense weight, which keeps memory
  at the dense layer's size for any batch.
* ``condensed_linear`` / ``condensed_conv2d`` (the Python wrappers) check arguments and, in plain
  eager inference (no autograd, no tracing, plain tensors), call the C++ op or the Triton
  launcher directly: the triton_op/autograd Python layers (~25 us a call) cost more than a
  batch-1 kernel. Anything else goes through the registered op.
"""
from __future__ import annotations

import importlib
import warnings
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import cpu, validate
from .checks import INDEX_DTYPES, VALUE_DTYPES, check_conv_geometry, check_linear_args, conv_out_hw
from .reference import condensed_conv2d_ref, condensed_linear_ref, dense_weight

__all__ = ["condensed_linear", "condensed_conv2d", "csr_mm", "check_linear_args", "check_conv2d_args"]

# ---------------------------------------------------------------------------------------------
# Private C++ CPU ops: schema + fake here, CPU kernels registered by kernels/csrc/condensed_cpu.cpp
# (linear) and kernels/csrc/condensed_conv_cpu.cpp (conv2d).
# ---------------------------------------------------------------------------------------------
_lib = torch.library.Library("sparse_compile", "FRAGMENT")
_lib.define("_condensed_linear_cpu(Tensor x, Tensor values, Tensor indices, Tensor? bias) -> Tensor")
# The conv, and the same followed by ReLU (condensed_conv2d(..., relu=True)).
_CONV_CPU_OPS = ("_condensed_conv2d_cpu", "_condensed_conv2d_relu_cpu")
for _name in _CONV_CPU_OPS:
    _lib.define(
        f"{_name}(Tensor x, Tensor values, Tensor indices, Tensor? bias, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation) -> Tensor"
    )


@torch.library.register_fake("sparse_compile::_condensed_linear_cpu", lib=_lib)
def _linear_cpu_fake(x, values, indices, bias):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _conv_cpu_fake(x, values, indices, bias, kernel_size, stride, padding, dilation):
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], values.shape[0], ho, wo))


for _name in _CONV_CPU_OPS:
    torch.library.register_fake(f"sparse_compile::{_name}", _conv_cpu_fake, lib=_lib)


# ---------------------------------------------------------------------------------------------
# CSR matmul (the "csr" form's kernel): torch.sparse_csr mm, as an op over the CSR arrays.
# ---------------------------------------------------------------------------------------------
def csr_mm(crow_indices: Tensor, col_indices: Tensor, values: Tensor, n_cols: int, x: Tensor) -> Tensor:
    """``W @ x`` for the CSR matrix ``W [len(crow)-1, n_cols]`` given by its three arrays, ``x [n_cols, m]``."""
    # Invariants were checked when the module was built (and on load): skip re-checking per call.
    w = torch.sparse_csr_tensor(crow_indices, col_indices, values, (crow_indices.numel() - 1, n_cols),
                                dtype=values.dtype, device=values.device, check_invariants=False)
    return torch.mm(w, x)


@torch.library.custom_op("sparse_compile::csr_mm", mutates_args=())
def _csr_mm_op(crow_indices: Tensor, col_indices: Tensor, values: Tensor, n_cols: int, x: Tensor) -> Tensor:
    """:func:`csr_mm` as an op over plain tensors, so that ``torch.compile(fullgraph=True)`` and
    ``torch.export`` (which do not take sparse tensors) keep it as one opaque call."""
    # csr_mm skips torch's invariant checks: a direct call must not hand it arbitrary arrays.
    validate.check_csr(crow_indices, col_indices, values, n_cols)
    if x.dim() != 2 or x.shape[0] != n_cols:
        raise ValueError(f"csr_mm: x must be [{n_cols}, m], got shape {tuple(x.shape)}")
    return csr_mm(crow_indices, col_indices, values, n_cols, x)


@_csr_mm_op.register_fake
def _csr_mm_fake(crow_indices, col_indices, values, n_cols, x):
    return x.new_empty((crow_indices.shape[0] - 1, x.shape[1]))


# ---------------------------------------------------------------------------------------------
# Triton launchers (written in triton_linear.py / triton_conv.py), imported on first CUDA use so
# that `import sparse_compile` never imports triton.
# ---------------------------------------------------------------------------------------------
_TRITON = {}
_TRITON_OP = {"triton_linear": "sparse_compile::condensed_linear", "triton_conv": "sparse_compile::condensed_conv2d"}


def _record_kernels(mod, op_name: str) -> None:
    """Tell AOTAutograd's cache which Triton kernels an op runs, so editing them invalidates it."""
    try:
        import torch._library.triton as tl
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        kernels = [v for v in vars(mod).values() if isinstance(v, (JITFunction, Autotuner))]
        tl.triton_ops_to_kernels[op_name] = kernels
    except Exception:  # cache keys are an optimisation; never fail a call over them
        pass


def _triton_fn(module: str, name: str):
    key = (module, name)
    if key not in _TRITON:
        fn = None
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
            fn = getattr(mod, name)
            _record_kernels(mod, _TRITON_OP[module])
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{module}":
                warnings.warn(f"sparse_compile: {module} failed to import ({e}); using the reference on CUDA")
        except (ImportError, AttributeError) as e:
            warnings.warn(f"sparse_compile: {module}.{name} unavailable ({e}); using the reference on CUDA")
        _TRITON[key] = fn
    return _TRITON[key]


# ---------------------------------------------------------------------------------------------
# Argument checks (cheap: shapes, dtypes, devices in checks.py; index values: validate.py, cached
# per tensor).
# ---------------------------------------------------------------------------------------------
def check_conv2d_args(x, values, indices, bias, kernel_size, stride, padding, dilation):
    """Check a condensed conv2d call; returns the four int pairs. Raises naming the faulty argument."""
    op = "condensed_conv2d"
    ks, st, pd, dl, _ = check_conv_geometry(x, kernel_size, stride, padding, dilation, op)
    check_linear_args(x, values, indices, bias, op, fan_in=x.shape[1] * ks[0] * ks[1])
    return ks, st, pd, dl


# ---------------------------------------------------------------------------------------------
# Public ops.
# ---------------------------------------------------------------------------------------------
_CPU_OP = None  # the C++ linear op's OpOverload once the library is loaded (the eager fast path)


def _cpu_ready() -> bool:
    global _CPU_OP
    if cpu.load():
        _CPU_OP = torch.ops.sparse_compile._condensed_linear_cpu.default
        return True
    return False


def _linear_impl(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor]) -> Tensor:
    dev = x.device.type
    if dev == "cpu":
        if _cpu_ready():
            return torch.ops.sparse_compile._condensed_linear_cpu.default(x, values, indices, bias)
    elif dev == "cuda":
        fn = _triton_fn("triton_linear", "condensed_linear_triton")
        if fn is not None:
            return fn(x, values, indices, bias)
    return condensed_linear_ref(x, values, indices, bias)


def _triton_op(name: str):
    """``torch.library.triton_op`` without its import-time source scan.

    triton_op scans the body's source for kernels (for the AOTAutograd cache key), which imports
    inductor and triton: ~2 s at ``import sparse_compile``. Our kernels live in separate modules
    anyway, so the scan would find none; ``_triton_fn`` records them when it imports them.
    """

    def dec(fn):
        import torch._library.triton as tl

        orig = getattr(tl, "get_inner_triton_kernels", None)
        if orig is not None:
            tl.get_inner_triton_kernels = lambda f: []
        try:
            return torch.library.triton_op(name, fn, mutates_args=())
        finally:
            if orig is not None:
                tl.get_inner_triton_kernels = orig

    return dec


@_triton_op("sparse_compile::condensed_linear")
def _condensed_linear_op(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    # A direct torch.ops call reaches the kernels without the Python wrapper: check here too.
    check_linear_args(x, values, indices, bias)
    if not (validate.tracing() or validate.fast_ok(indices, x.shape[-1])):
        validate.check_linear(x, indices)
    return _linear_impl(x, values, indices, bias)


@_triton_op("sparse_compile::condensed_conv2d")
def _condensed_conv2d_op(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    bias: Optional[Tensor],
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    ks = check_conv2d_args(x, values, indices, bias, kernel_size, stride, padding, dilation)[0]
    if not (validate.tracing() or validate.fast_ok(indices, x.shape[1] * ks[0] * ks[1])):
        validate.check_conv2d(x, indices, ks)
    dev = x.device.type
    if dev == "cpu":
        if _cpu_ready():
            return torch.ops.sparse_compile._condensed_conv2d_cpu.default(
                x, values, indices, bias, kernel_size, stride, padding, dilation)
        return condensed_conv2d_ref(x, values, indices, bias, kernel_size, stride, padding, dilation)
    if dev == "cuda":
        fn = _triton_fn("triton_conv", "condensed_conv2d_triton")
        if fn is not None:
            return fn(x, values, indices, bias, kernel_size, stride, padding, dilation)
        # im2col + the condensed linear kernel: [N, L, C*kh*kw] @ condensed -> [N, L, n].
        n_img = x.shape[0]
        ho, wo = conv_out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
        cols = torch.nn.functional.unfold(x, kernel_size, dilation, padding, stride).transpose(1, 2)
        y = _linear_impl(cols, values, indices, bias)
        return y.transpose(1, 2).reshape(n_img, values.shape[0], ho, wo)
    return condensed_conv2d_ref(x, values, indices, bias, kernel_size, stride, padding, dilation)


# --- autograd (plain torch through the dense weight) -------------------------------------------
def _linear_setup(ctx, inputs, output):
    x, values, indices = inputs[:3]
    ctx.save_for_backward(x, values, indices)
    ctx.has_bias = len(inputs) > 3 and inputs[3] is not None


def _linear_backward(ctx, gy):
    x, values, indices = ctx.saved_tensors
    need = ctx.needs_input_grad  # 3 entries when bias was left at its default
    need_x, need_v, need_b = need[0], need[1], len(need) > 3 and need[3]
    gx = gv = gb = None
    n, fan_in = values.shape[0], x.shape[-1]
    if need_x:
        gx = gy.matmul(dense_weight(values, indices, fan_in))
    if need_v:
        g2 = gy.reshape(-1, n)
        gv = g2.t().matmul(x.reshape(-1, fan_in)).gather(1, indices.long())
    if need_b and ctx.has_bias:
        gb = gy.reshape(-1, n).sum(0)
    return (gx, gv, None, gb)[: len(need)]


_condensed_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _conv_setup(ctx, inputs, output):
    x, values, indices, bias, kernel_size, stride, padding, dilation = inputs
    ctx.save_for_backward(x, values, indices)
    ctx.has_bias = bias is not None
    ctx.conf = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))


def _conv_backward(ctx, gy):
    x, values, indices = ctx.saved_tensors
    (kh, kw), stride, padding, dilation = ctx.conf
    need_x, need_v, _, need_b = ctx.needs_input_grad[:4]
    n, c = values.shape[0], x.shape[1]
    w = dense_weight(values, indices, c * kh * kw).reshape(n, c, kh, kw)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        gy, x, w, [n] if ctx.has_bias else None, list(stride), list(padding), list(dilation),
        False, [0, 0], 1, [need_x, need_v, need_b and ctx.has_bias],
    )
    gv = gw.reshape(n, -1).gather(1, indices.long()) if need_v else None
    return gx, gv, None, (gb if need_b and ctx.has_bias else None), None, None, None, None


_condensed_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)


# ---------------------------------------------------------------------------------------------
# Python wrappers.
# ---------------------------------------------------------------------------------------------
#: Tensor types the eager shortcut takes: plain tensors and nn.Parameter (the condensed modules
#: hold their values and bias as parameters; sending those through the public op cost ~80 us per
#: call, measured: 3 ms of a 78 ms bf16 ViT-B/16 forward). Any other subclass (fake, functional,
#: distributed tensors) goes through the op, which dispatches it properly.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _plain_eager(*tensors) -> bool:
    """True when no autograd, tracing, tensor subclass or dispatch mode needs the public op."""
    if _is_compiling() or _dispatch_stack_len():
        return False
    grad = _grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or (grad and t.requires_grad)):
            return False
    return True


_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled


def _linear_args_ok(x, values, indices, bias) -> bool:
    """The common case of check_linear_args in a few attribute reads (no messages built)."""
    try:
        dt = x.dtype
        return (
            dt in VALUE_DTYPES
            and values.dtype is dt
            and indices.dtype in INDEX_DTYPES
            and values.dim() == 2
            and indices.shape == values.shape
            and x.dim() >= 1
            and values.shape[1] <= x.shape[-1]
            and values.device == x.device
            and indices.device == x.device
            and (bias is None or (bias.dtype is dt and bias.shape == values.shape[:1] and bias.device == x.device))
        )
    except (AttributeError, TypeError):
        return False


def condensed_linear(
    x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]``.

    ``x [..., fan_in]`` (any leading dims, any strides), ``values [n, k]`` of x's dtype (fp32, bf16,
    fp16, fp64), ``indices [n, k]`` int16/int32 in ``[0, fan_in)`` (checked: scanned once per
    index tensor and version, then compared with x's width in O(1) per call; int16 only for a
    fan-in up to 32768), ``bias [n]`` or None. Returns ``[..., n]``. Differentiable w.r.t.
    x, values and bias. Calls ``torch.ops.sparse_compile.condensed_linear``.
    """
    if not _linear_args_ok(x, values, indices, bias):
        check_linear_args(x, values, indices, bias)  # raises the precise error
        raise ValueError(
            f"condensed_linear: k = {values.shape[1]} exceeds x's fan-in {x.shape[-1]}"
        )
    # O(1) once the indices were scanned; dynamo must not trace it (values are data-dependent).
    if not (_is_compiling() or validate.fast_ok(indices, x.shape[-1])):
        validate.check_linear(x, indices)
    if _plain_eager(x, values, bias):
        dev = x.device.type
        if dev == "cpu" and _CPU_OP is not None:
            return _CPU_OP(x, values, indices, bias)
        if dev == "cuda":
            fn = _triton_fn("triton_linear", "condensed_linear_triton")
            if fn is not None:
                return fn(x, values, indices, bias)
    return torch.ops.sparse_compile.condensed_linear(x, values, indices, bias)


def condensed_conv2d(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    bias: Optional[Tensor] = None,
    kernel_size: Sequence[int] = (1, 1),
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    *,
    relu: bool = False,
) -> Tensor:
    """Conv2d (groups=1) of ``x [N, C, H, W]`` with a condensed weight.

    ``values``/``indices [n, k]`` index the fan-in ``C*kh*kw`` in ``weight.reshape(out, -1)`` order
    (F.unfold's column order). Ints or pairs for kernel_size/stride/padding/dilation. Returns
    ``[N, n, Ho, Wo]``. Calls ``torch.ops.sparse_compile.condensed_conv2d``. ``relu=True`` returns
    ``relu`` of that: on CPU in plain eager inference one C++ call that applies it as the outputs
    are stored (one pass over the output fewer), elsewhere (autograd, torch.compile, CUDA) a
    ``torch.relu`` after the op.
    """
    ks, st, pd, dl = check_conv2d_args(x, values, indices, bias, kernel_size, stride, padding, dilation)
    if not (_is_compiling() or validate.fast_ok(indices, x.shape[1] * ks[0] * ks[1])):
        validate.check_conv2d(x, indices, ks)
    if _plain_eager(x, values, bias):
        dev = x.device.type
        if dev == "cpu" and _CPU_OP is not None:
            ops = torch.ops.sparse_compile
            op = ops._condensed_conv2d_relu_cpu if relu else ops._condensed_conv2d_cpu
            return op.default(x, values, indices, bias, ks, st, pd, dl)
        if dev == "cuda":
            fn = _triton_fn("triton_conv", "condensed_conv2d_triton")
            if fn is not None:
                y = fn(x, values, indices, bias, ks, st, pd, dl)
                return torch.relu(y) if relu else y
    y = torch.ops.sparse_compile.condensed_conv2d(x, values, indices, bias, ks, st, pd, dl)
    return torch.relu(y) if relu else y
