"""Implicit-gather Triton kernel for the condensed Conv2d (groups = 1).

Output channel ``o`` has ``k`` live weights ``values[o, j]`` at fan-in positions
``indices[o, j]`` of ``weight.reshape(out, -1)``, i.e. ``(c, r, s) = (idx // (kh*kw),
(idx // kw) % kh, idx % kw)``. Then

    y[b, o, p, q] = bias[o] + sum_j values[o, j] * x[b, c, p*sh - ph + r*dh, q*sw - pw + s*dw]

with out-of-image taps reading 0 (padding). No im2col buffer is built: a program owns
``BLOCK_N`` output channels and ``BLOCK_M`` output positions (``m = (b, p, q)`` flattened, so
consecutive ``m`` are neighbouring pixels of one row: for stride 1 the gather of one tap is a
contiguous run of an input row, the NCHW analogue of the feature-major layout of the linear
kernel). As in the linear kernel the ``[BLOCK_N, BLOCK_J, BLOCK_M]`` accumulator is reduced over
``J`` once at the end, and the bias is fused. The taps reach the kernel as an offset table (element
offset and row/column shift per (o, j), built once per index tensor and x layout, like the CPU
conv's), so the loop does no index arithmetic beyond one add and two compares per element.
Autotuned on (out channels, k, output-size bucket).

Run ``python kernels/triton_conv.py`` for a correctness check.
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from typing import Optional, Sequence

import torch

if __name__ == "__main__" and not torch.cuda.is_available():  # must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sparse_compile.kernels.checks import check_conv_geometry  # noqa: E402
from sparse_compile.kernels.triton_launch import (  # noqa: E402
    _pow2, cdiv, device_guard, needs_int64, run_kernel, tracing,
)
from sparse_compile.kernels.triton_linear import _check  # noqa: E402
from sparse_compile.numerics import relative_error  # noqa: E402

__all__ = ["condensed_conv2d_triton", "conv_configs"]


@triton.jit
def _condensed_conv2d_kernel(
    x_ptr, v_ptr, t_ptr, r_ptr, bias_ptr, y_ptr,
    H, W, O, HO, WO, k, M,
    s_xn, s_xh, s_xw, s_vn, s_vk, s_tn, s_yn, s_yc, s_yh, s_yw,
    SH, SW, PH, PW,
    M_BUCKET,  # autotune key only: the power-of-two output-size bucket
    HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One ``[BLOCK_N channels, BLOCK_M positions]`` output tile per program.

    The taps come as an offset table (see :func:`tap_tables`): ``t[o, j]`` is the element offset
    of tap j of channel o relative to the window's corner, ``r[o, j] = dr << 16 | ds`` its row and
    column shift (dilation included), so the loop does no index division; a tap is in the image
    when ``h0 + dr`` and ``w0 + ds`` are below H and W as unsigned numbers (one compare each)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(O, BLOCK_N)
    pid_n = pid % num_n
    pid_m = pid // num_n
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:
        rn = rn.to(tl.int64)
        rm = rm.to(tl.int64)
    n_ok = rn < O
    m_ok = rm < M
    q = rm % WO
    t = rm // WO
    p = t % HO
    img = t // HO
    h0 = p * SH - PH
    w0 = q * SW - PW
    x_m = (img * s_xn + h0 * s_xh + w0 * s_xw)[None, None, :]
    h0 = h0[None, None, :]
    w0 = w0[None, None, :]
    m_ok3 = m_ok[None, None, :]
    if ACC_F64:
        acc = tl.zeros((BLOCK_N, BLOCK_J, BLOCK_M), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_J, BLOCK_M), dtype=tl.float32)
    v_rows = v_ptr + rn[:, None] * s_vn
    t_rows = t_ptr + rn[:, None] * s_tn
    r_rows = r_ptr + rn[:, None] * s_tn
    for j0 in range(0, k, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        m = n_ok[:, None] & (rj < k)[None, :]
        tap = tl.load(t_rows + rj[None, :], mask=m, other=0)
        rs = tl.load(r_rows + rj[None, :], mask=m, other=0)
        w = tl.load(v_rows + rj[None, :] * s_vk, mask=m, other=0.0).to(acc.dtype)
        dr = (rs >> 16)[:, :, None]
        ds = (rs & 0xFFFF)[:, :, None]
        if WIDE:
            ok = m_ok3 & ((h0 + dr).to(tl.uint64) < H) & ((w0 + ds).to(tl.uint64) < W)
        else:
            ok = m_ok3 & ((h0 + dr).to(tl.uint32) < H) & ((w0 + ds).to(tl.uint32) < W)
        g = tl.load(x_ptr + (x_m + tap[:, :, None]), mask=ok, other=0.0)
        acc += g.to(acc.dtype) * w[:, :, None]
    out = tl.sum(acc, axis=1)  # [BLOCK_N, BLOCK_M]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(acc.dtype)[:, None]
    y = y_ptr + (img * s_yn + p * s_yh + q * s_yw)[None, :] + rn[:, None] * s_yc
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


# (BLOCK_N, BLOCK_J, BLOCK_M, num_warps, num_stages). With the offset table the loop body is
# ~50 PTX instructions per accumulator at 16 accumulators a thread (the index-division version:
# ~72) and ~34-38 at 32 (8 x 4 x 128, 16 x 2 x 128): more output positions per thread amortise
# the per-tap work. Every gathered element still carries its own address and padding mask (taps
# cross row ends, so nothing vectorises), which is why 32 x 2 x 64 and wider tiles spill.
_CONV = [
    (16, 4, 32, 4, 1),
    (32, 2, 32, 4, 1),
    (16, 2, 64, 4, 1),
    (32, 4, 32, 8, 1),
    (64, 2, 32, 8, 1),
    (16, 4, 64, 8, 1),
    (8, 4, 128, 4, 1),
    (16, 2, 128, 4, 1),
    (16, 1, 128, 4, 1),
]
_CONV_DEFAULT = dict(BLOCK_N=4, BLOCK_J=4, BLOCK_M=16, num_warps=4, num_stages=1)


def conv_configs() -> list:
    """The autotune config list of the conv kernel, as dicts that ``config=`` accepts."""
    return [dict(BLOCK_N=a, BLOCK_J=b, BLOCK_M=c, num_warps=w, num_stages=s) for a, b, c, w, s in _CONV]


def condensed_conv2d_triton(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor],
    kernel_size: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    *,
    config: Optional[dict] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Conv2d (groups = 1) of ``x [N, C, H, W]`` (any strides) with a condensed weight.

    ``values``/``indices [n, k]`` index the fan-in ``C*kh*kw`` in ``weight.reshape(out, -1)`` order
    and are trusted to lie in range. Returns a contiguous ``[N, n, Ho, Wo]`` tensor in x's dtype
    (fp32 accumulation). ``config``: a dict from :func:`conv_configs` to pin instead of
    autotuning; ``out``: a contiguous output tensor to write into.
    """
    op = "condensed_conv2d_triton"
    ks, st, pd, dl, (ho, wo) = check_conv_geometry(x, kernel_size, stride, padding, dilation, op)
    _check(x, values, indices, bias, None, op, fan_in=x.shape[1] * ks[0] * ks[1])
    shape = (x.shape[0], values.shape[0], ho, wo)
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(f"{op}: out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}")
        y = out
    else:
        y = torch.empty(shape, dtype=x.dtype, device=x.device)
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[o] at unit stride
    with device_guard(x.device):
        _conv(x, values, indices, bias, y, ks, st, pd, dl, config)
    return y


def _conv(x, values, indices, bias, y, ks, st, pd, dl, config) -> None:
    """Fill ``y`` (the checked launcher's output) on the tensors' device."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = ks, st, pd, dl
    nb, c, h, w = x.shape
    n, k = values.shape
    _, _, ho, wo = y.shape
    shape = y.shape
    op = "condensed_conv2d_triton"
    m_total = nb * ho * wo
    if m_total == 0 or n == 0:
        return
    if k == 0:
        if bias is None:
            y.zero_()
        else:
            y.copy_(bias.to(y.dtype)[None, :, None, None].expand(shape))
        return
    traced = tracing(x)
    taps, shifts = tap_tables(indices, (kh, kw), (dh, dw), x.stride()[1:], traced)
    meta = dict(HAS_BIAS=bias is not None, ACC_F64=x.dtype == torch.float64,
                WIDE=needs_int64(x, values, y) or taps.dtype == torch.int64)
    bucket = min(_pow2(m_total), 1 << 16)

    def grid(m):
        return (cdiv(n, m["BLOCK_N"]) * cdiv(m_total, m["BLOCK_M"]),)

    # taps is listed where run_kernel expects the index tensor (its dtype keys the autotune cache).
    args = (x, values, taps, shifts, bias if bias is not None else values, y,
            h, w, n, ho, wo, k, m_total,
            x.stride(0), x.stride(2), x.stride(3), values.stride(0), values.stride(1), taps.stride(0), *y.stride(),
            sh, sw, ph, pw, bucket)
    run_kernel(_condensed_conv2d_kernel, grid, args, meta, config, ("conv",), conv_configs(),
               ["O", "k", "M_BUCKET"], _CONV_DEFAULT, op)


_TAPS: "OrderedDict[tuple, tuple]" = OrderedDict()
_TAPS_MAX = 64


def tap_tables(indices: torch.Tensor, kernel_size, dilation, x_strides, traced: bool = False):
    """``(taps, shifts)`` for the conv kernel, both ``[n, k]`` contiguous.

    ``taps[o, j] = c*s_xc + r*dh*s_xh + s*dw*s_xw`` (int32, int64 past int32) and
    ``shifts[o, j] = (r*dh) << 16 | s*dw`` for ``(c, r, s)`` = tap ``indices[o, j]`` of a
    ``kernel_size`` window. Cached per (indices tensor, version, geometry, x's strides) in eager
    calls, so a layer pays the few elementwise launches once; recomputed when traced."""
    kh, kw = kernel_size
    dh, dw = dilation
    s_xc, s_xh, s_xw = (int(v) for v in x_strides)
    key = (id(indices), kh, kw, dh, dw, s_xc, s_xh, s_xw)
    if not traced:
        hit = _TAPS.get(key)
        if hit is not None and hit[0]() is indices and hit[1] == indices._version:
            return hit[2]
    idx = indices.long()
    r = (idx // kw) % kh * dh
    s = idx % kw * dw
    taps = (idx // (kh * kw)) * s_xc + r * s_xh + s * s_xw
    if (kh - 1) * dh >= 2**15 or (kw - 1) * dw >= 2**16:
        raise ValueError(f"condensed_conv2d_triton: kernel {kernel_size} x dilation {dilation} too large")
    wide = taps.numel() > 0 and int(taps.abs().max()) >= 2**31 - 1 if not traced else False
    out = (taps.to(torch.int64 if wide else torch.int32).contiguous(), ((r << 16) | s).to(torch.int32).contiguous())
    if not traced:
        _TAPS[key] = (weakref.ref(indices), indices._version, out)
        if len(_TAPS) > _TAPS_MAX:
            _TAPS.popitem(last=False)
    return out


def _main() -> None:
    from sparse_compile.kernels.reference import condensed_conv2d_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    nb, c, hw, o = (8, 64, 56, 128) if dev == "cuda" else (2, 3, 9, 5)
    for ks, st, pd, dl in (((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((1, 1), 1, 0, 1), ((3, 3), 1, 2, 2)):
        fan = c * ks[0] * ks[1]
        k = max(1, fan // 10)
        idx = torch.rand(o, fan, device=dev).argsort(1)[:, :k].sort(1).values.to(torch.int16)
        vals = torch.randn(o, k, device=dev)
        bias = torch.randn(o, device=dev)
        x = torch.randn(nb, c, hw, hw, device=dev)
        y = condensed_conv2d_triton(x, vals, idx, bias, ks, st, pd, dl)
        ref = condensed_conv2d_ref(x.double(), vals.double(), idx, bias.double(), ks, (st, st), (pd, pd), (dl, dl))
        err = relative_error(y, ref)
        print(f"kernel {ks} stride {st} padding {pd} dilation {dl}: max rel err {err:.1e}")


if __name__ == "__main__":
    _main()
