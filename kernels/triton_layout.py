"""Layout helpers of the condensed linear kernels: ``x`` copied to feature-major (a Triton
transpose kernel and its launcher) and the fan-in padded to a vector-load multiple.

Run ``python kernels/triton_layout.py`` for a correctness check against ``x.t()``.
"""
from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():  # must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sparse_compile.kernels.triton_launch import cdiv, interpreting, launch, needs_int64  # noqa: E402

__all__ = ["to_feature_major", "pad_fan_in"]


@triton.jit
def _to_feature_major_kernel(
    x_ptr, xt_ptr, B, IN, s_xb, s_xi, s_ti,
    WIDE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """``xt[i, b] = x[b, i]``; triton stages the tile through shared memory so that both the
    load (along i) and the store (along b) are coalesced."""
    pid = tl.program_id(0)
    num_b = tl.cdiv(B, BLOCK_B)
    pid_b = pid % num_b
    pid_i = pid // num_b
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    if WIDE:
        rb = rb.to(tl.int64)
        ri = ri.to(tl.int64)
    m = (rb < B)[:, None] & (ri < IN)[None, :]
    t = tl.load(x_ptr + rb[:, None] * s_xb + ri[None, :] * s_xi, mask=m)
    tl.store(xt_ptr + ri[None, :] * s_ti + rb[:, None], t, mask=m)


def pad_fan_in(values: torch.Tensor, indices: torch.Tensor, multiple: int = 16):
    """``(values, indices)`` with k padded to a multiple of ``multiple`` by (weight 0, index 0)
    entries, contiguous: same results, and rows start 16-element aligned, so triton loads the
    weights and indices of a row with vector loads (ld.global.v4 / v2 instead of scalar ones).
    Meant for conversion time (a copy per call would cost more than it saves)."""
    n, k = values.shape
    kp = -(-k // multiple) * multiple
    if kp == k and values.is_contiguous() and indices.is_contiguous():
        return values, indices
    v = values.new_zeros((n, kp))
    i = indices.new_zeros((n, kp))
    v[:, :k] = values
    i[:, :k] = indices
    return v, i


def to_feature_major(x2: torch.Tensor):
    """``(xt, Bp)``: a view or copy of ``x2 [B, in]`` as ``xt [in, >=B]`` with unit batch stride.

    A copy pads the batch to ``Bp``, a multiple of 16, so every row of ``xt`` is aligned (triton
    specialises strides divisible by 16, which lets it vectorise the gathers); the pad columns are
    left uninitialised and never reach the output.
    """
    B, fan_in = x2.shape
    if x2.stride(0) == 1 and B > 1:
        return x2.t(), B
    bp = (B + 15) // 16 * 16
    xt = torch.empty((fan_in, bp), dtype=x2.dtype, device=x2.device)
    if interpreting() and bp > B:
        xt[:, B:].zero_()  # only silences numpy overflow warnings on garbage pads; a launch on GPU
    bb, bi = 64, 64
    grid = (cdiv(B, bb) * cdiv(fan_in, bi),)
    launch(_to_feature_major_kernel, grid, x2, xt, B, fan_in, x2.stride(0), x2.stride(1), xt.stride(0),
           WIDE=needs_int64(x2, xt), BLOCK_B=bb, BLOCK_I=bi, num_warps=4)
    return xt, bp


def _main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in ((1, 70), (5, 96), (33, 130), (200, 64)):
        x = torch.randn(*shape, device=dev)
        xt, bp = to_feature_major(x)
        ok = torch.equal(xt[:, : shape[0]], x.t()) and bp >= shape[0] and xt.stride(1) == 1
        v, i = pad_fan_in(torch.randn(4, 5, device=dev), torch.zeros(4, 5, dtype=torch.int16, device=dev))
        print(f"x {shape}: feature-major {'OK' if ok else 'WRONG'}, padded k {v.shape[1]} (index pad {i[0, -1].item()})")


if __name__ == "__main__":
    _main()
