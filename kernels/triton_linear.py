"""Triton kernels for the condensed (constant fan-in) linear layer.

``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]`` with ``values``/``indices``
``[n, k]``. Two kernels, picked by the batch size ``B`` (the product of x's leading dims):

* **GEMV** (``B <= GEMV_MAX_BATCH``): reads ``x`` where it is (row-major, any strides). Each
  program owns ``BLOCK_N`` neurons and ``BLOCK_B`` batch rows and walks the fan-in in
  ``BLOCK_K``-wide tiles; an index tile is loaded once and used for every batch row of the
  program. At batch 1 the layer is latency bound (the weights are ~0.15x dense bytes), so the
  configs favour one k-tile per program (no serial chain of dependent loads) and enough programs
  to keep every SM's memory pipe busy.
* **Batched, feature-major** (larger ``B``): ``x`` is first copied to ``xt [in, Bp]`` (a tiled
  transpose, skipped when x is already feature-major), so the row ``xt[idx]`` that one fan-in
  entry needs is a contiguous batch slice: the gather becomes coalesced 128-byte row reads. A
  program owns ``BLOCK_N`` neurons x ``REP_B * SUB_B`` batch columns: because indices are sorted
  per row, all its neurons walk through ``xt`` together, in the same few-hundred-row window, so
  each gathered row is fetched from L2 about once per program and then served ``~BLOCK_N*k/in``
  times from L1. The accumulator keeps the fan-in step axis and is summed over it once, at the
  end (no per-step cross-lane reduction); bias and the store back to row-major ``y`` are fused.
  When the batch alone gives too few programs to fill the GPU, the fan-in is split across
  programs (``SPLIT``, an autotuned config parameter); the last program of each tile to finish
  adds the partial sums in a fixed order (deterministic, one launch).

Both accumulate in fp32 (fp64 for fp64 inputs). Autotuned with ``triton.autotune``, keyed on
``n``, ``k`` and the batch bucket (and the dtypes); each batch / fan-in bucket has its own short
config list. Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) the autotuner cannot benchmark,
so a small fixed config is used unless ``config=`` pins one.

Plain eager calls launch the kernels directly; while tracing or compiling (dynamo, make_fx,
export, fake tensors) launches go through ``torch.library.wrap_triton``, so the kernels are visible
to inductor when this launcher runs inside a ``torch.library.triton_op``.

The config lists live in :mod:`.triton_linear_configs`, the feature-major copy of ``x`` and the
fan-in padding in :mod:`.triton_layout`; this module keeps the two kernels, their launcher, the
torch reference it re-exports and the self-check. Run ``python kernels/triton_linear.py`` for a
correctness check and a small benchmark.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

if __name__ == "__main__" and not torch.cuda.is_available():  # must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sparse_compile.kernels.checks import INT16_MAX_FAN_IN, check_linear_args  # noqa: E402,F401
from sparse_compile.kernels.reference import condensed_linear_ref  # noqa: E402
from sparse_compile.kernels.triton_launch import (  # noqa: E402,F401  (re-exported: older imports)
    _BEST, _TUNERS, _pow2, cdiv, device_guard, interpreting, launch, needs_int64, run_kernel, tracing, tuner,
)
from sparse_compile.kernels.triton_layout import (  # noqa: E402,F401  (_to_feature_major_kernel: see ops._record_kernels)
    _to_feature_major_kernel, pad_fan_in, to_feature_major,
)
from sparse_compile.kernels.triton_linear_configs import (  # noqa: E402
    _FM_DEFAULT, _GEMV_DEFAULT, _LARGE_BATCH, GEMV_MAX_BATCH, _buckets, _fm_configs, _fm_key, _gemv_configs,
    _split_space, _split_space_cached, linear_configs,
)
from sparse_compile.numerics import relative_error  # noqa: E402


__all__ = [
    "condensed_linear_triton",
    "linear_configs",
    "to_feature_major",
    "pad_fan_in",
    "condensed_linear_ref",
    "GEMV_MAX_BATCH",
]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _condensed_gemv_kernel(
    x_ptr, v_ptr, i_ptr, bias_ptr, y_ptr,
    B, n, k,
    s_xb, s_xi, s_vn, s_vk, s_in, s_ik, s_yb, s_yn,
    HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Small-batch kernel: ``y[b, rn] = sum_k v[rn, k] * x[b, idx[rn, k]]`` on row-major x."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(n, BLOCK_N)
    pid_n = pid % num_n
    pid_b = pid // num_n
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    if WIDE:
        rn = rn.to(tl.int64)
        rb = rb.to(tl.int64)
    n_ok = rn < n
    b_ok = rb < B
    if ACC_F64:
        acc = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), dtype=tl.float32)
    v_rows = v_ptr + rn[:, None] * s_vn
    i_rows = i_ptr + rn[:, None] * s_in
    x_rows = x_ptr + rb[:, None, None] * s_xb
    for k0 in range(0, k, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        m = n_ok[:, None] & (rk < k)[None, :]
        idx = tl.load(i_rows + rk[None, :] * s_ik, mask=m, other=0)
        if WIDE:
            idx = idx.to(tl.int64)
        else:
            idx = idx.to(tl.int32)
        w = tl.load(v_rows + rk[None, :] * s_vk, mask=m, other=0.0).to(acc.dtype)
        g = tl.load(x_rows + (idx * s_xi)[None, :, :], mask=b_ok[:, None, None] & m[None, :, :], other=0.0)
        acc += g.to(acc.dtype) * w[None, :, :]
    out = tl.sum(acc, axis=2)  # [BLOCK_B, BLOCK_N]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    y = y_ptr + rb[:, None] * s_yb + rn[None, :] * s_yn
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & n_ok[None, :])


@triton.jit
def _condensed_fm_kernel(
    xt_ptr, v_ptr, i_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    B, Bp, n, k,
    s_xi, s_xb, s_vn, s_vk, s_in, s_ik, s_yb, s_yn,
    B_BUCKET,  # autotune key only: the power-of-two batch bucket
    HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, REP_B: tl.constexpr, SUB_B: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Batched kernel on feature-major ``xt [in, Bp]``: gathers are contiguous batch slices.

    A program covers ``BLOCK_N`` neurons and ``REP_B * SUB_B`` batch columns. The tile is 4-D,
    ``[REP_B, BLOCK_N, BLOCK_J, SUB_B]``: SUB_B columns (one 128-byte line) are spread over the
    lanes of a warp and the REP_B sub-blocks stay in each thread's registers, so one index and one
    weight feed REP_B vector gathers, and triton loads them straight into the registers that
    need them (a 3-D ``[BLOCK_N, BLOCK_J, BLOCK_B]`` tile makes it stage them through shared
    memory behind barriers on every step).

    Columns ``B <= b < Bp`` of ``xt`` exist (padding) but are never stored: loading them keeps the
    gather mask constant over 16 lanes, so the loads stay vectorised. With ``SPLIT > 1`` the
    fan-in is cut into SPLIT chunks (16-aligned), one program each; every program stores its
    partial tile to the fp32 workspace ``ws``, and the last of a tile's programs to arrive (an
    atomic counter per tile) adds the SPLIT partials in split order, adds the bias and writes
    ``y``: deterministic whatever the arrival order, and no second launch. It then resets the
    counter to 0, so the counter buffer can be reused without clearing.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(n, BLOCK_N)
    pid_n = pid % num_n
    pid_s = (pid // num_n) % SPLIT
    pid_b = pid // (num_n * SPLIT)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = pid_b * (REP_B * SUB_B) + tl.arange(0, REP_B)[:, None] * SUB_B + tl.arange(0, SUB_B)[None, :]
    if WIDE:
        rn = rn.to(tl.int64)
        rb = rb.to(tl.int64)
    n_ok = rn < n
    k_per = tl.cdiv(tl.cdiv(k, SPLIT), 16) * 16
    j_lo = pid_s * k_per
    j_hi = tl.minimum(j_lo + k_per, k)
    if ACC_F64:
        acc = tl.zeros((REP_B, BLOCK_N, BLOCK_J, SUB_B), dtype=tl.float64)
    else:
        acc = tl.zeros((REP_B, BLOCK_N, BLOCK_J, SUB_B), dtype=tl.float32)
    v_rows = v_ptr + rn[:, None] * s_vn
    i_rows = i_ptr + rn[:, None] * s_in
    x_cols = xt_ptr + (rb * s_xb)[:, None, None, :]
    b_load = (rb < Bp)[:, None, None, :]
    # Masked (n, j) lanes read index 0 with weight 0: a valid row, so the gather needs no per-lane
    # mask beyond the batch one.
    for j0 in range(j_lo, j_hi, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        m = n_ok[:, None] & (rj < j_hi)[None, :]
        idx = tl.load(i_rows + rj[None, :] * s_ik, mask=m, other=0)
        w = tl.load(v_rows + rj[None, :] * s_vk, mask=m, other=0.0)
        if WIDE:
            off = idx.to(tl.int64) * s_xi
        else:
            off = idx.to(tl.int32) * s_xi
        g = tl.load(x_cols + off[None, :, :, None], mask=b_load, other=0.0)
        acc += g.to(acc.dtype) * w.to(acc.dtype)[None, :, :, None]
    out = tl.sum(acc, axis=2)  # [REP_B, BLOCK_N, SUB_B]
    y_mask = n_ok[None, :, None] & (rb < B)[:, None, :]
    y = y_ptr + rb[:, None, :] * s_yb + rn[None, :, None] * s_yn
    if SPLIT > 1:
        # Workspace: [tiles, SPLIT, REP_B, BLOCK_N, SUB_B], contiguous; tile = pid without split.
        tile = pid_b * num_n + pid_n
        TILE: tl.constexpr = REP_B * BLOCK_N * SUB_B
        t_off = (tl.arange(0, REP_B)[:, None, None] * (BLOCK_N * SUB_B)
                 + tl.arange(0, BLOCK_N)[None, :, None] * SUB_B + tl.arange(0, SUB_B)[None, None, :])
        ws_tile = ws_ptr + tile.to(tl.int64) * (SPLIT * TILE) + t_off
        tl.store(ws_tile + pid_s * TILE, out)
        tl.debug_barrier()  # every thread's partial is stored before the counter is bumped
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.load(ws_tile, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT):
                total += tl.load(ws_tile + s * TILE, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(total.dtype)[None, :, None]
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(acc.dtype)[None, :, None]
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=y_mask)


# ---------------------------------------------------------------------------------------------
# Launch helpers (the generic ones: kernels/triton_launch.py)
# ---------------------------------------------------------------------------------------------
def _runs_here(device: torch.device) -> bool:
    """Whether the launchers can run on ``device``: CUDA, or anything under the interpreter."""
    return device.type == "cuda" or interpreting()


#: Per-device tile counters of the split batched kernel, kept zeroed by the kernel itself.
_COUNTERS: Dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, tiles: int, traced: bool) -> torch.Tensor:
    """At least ``tiles`` zeroed int32 counters on ``device``: a persistent buffer in eager calls
    (each split kernel leaves it zeroed), a fresh one when traced (no hidden state in graphs).
    Launches of split kernels on two streams at once would share the buffer: not supported."""
    if traced:
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        buf = _COUNTERS[device] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return buf


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _check(x, values, indices, bias, out, op="condensed_linear_triton", fan_in=None):
    """The launchers' checks: :func:`.checks.check_linear_args`, plus what only the Triton kernels
    need; errors name the faulty argument.

    ``fan_in``: the size the indices address (default: x's last dimension, which k must not
    exceed). int16 indices are rejected past ``INT16_MAX_FAN_IN``: the kernels sign-extend them."""
    check_linear_args(x, values, indices, bias, op, fan_in=fan_in)
    fan_in = x.shape[-1] if fan_in is None else fan_in
    if indices.dtype == torch.int16 and fan_in > INT16_MAX_FAN_IN:
        raise ValueError(f"{op}: int16 indices cannot address a fan-in of {fan_in} (> {INT16_MAX_FAN_IN}): "
                         "use int32 indices")
    if not _runs_here(x.device):
        raise RuntimeError(f"{op}: needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                           f"imported, for CPU tensors); x is on {x.device}")
    if out is not None:
        want = (*x.shape[:-1], values.shape[0])
        if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(f"{op}: out must be a contiguous {x.dtype} tensor of shape {want} on {x.device}")


def condensed_linear_triton(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    kernel: str = "auto",
    config: Optional[dict] = None,
    split_k: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]`` with Triton.

    ``x [..., in]`` (any leading dims, any strides; fp32/bf16/fp16/fp64), ``values [n, k]`` (float,
    any strides), ``indices [n, k]`` int16/int32 trusted to lie in ``[0, in)`` (the formats module
    validates them), ``bias [n]`` or None. Returns ``[..., n]`` in x's dtype, accumulated in fp32
    (fp64 for fp64 x).

    ``kernel``: "auto" (GEMV up to ``GEMV_MAX_BATCH`` rows, else feature-major), "gemv" or
    "batched". ``config``: a dict from :func:`linear_configs` (or the same keys) to pin instead of
    autotuning. ``split_k``: fan-in chunks for the batched kernel (None: autotuned; partial sums go
    through an fp32 workspace and are added in split order by the tile's last program, so results
    do not depend on scheduling). ``out``: a contiguous output tensor to write into.
    """
    _check(x, values, indices, bias, out)
    if kernel not in ("auto", "gemv", "batched"):
        raise ValueError(f"condensed_linear_triton: kernel must be 'auto', 'gemv' or 'batched', got {kernel!r}")
    if bias is not None:
        bias = bias.contiguous()  # the kernels read bias[i] at unit stride
    with device_guard(x.device):
        return _linear(x, values, indices, bias, kernel, config, split_k, out)


def _linear(x, values, indices, bias, kernel, config, split_k, out):
    """:func:`condensed_linear_triton` after its checks, on the tensors' device."""
    n, k = values.shape
    fan_in = x.shape[-1]
    y = out if out is not None else torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, fan_in)
    B = x2.shape[0]
    if B == 0 or n == 0:
        return y
    if k == 0:
        if bias is None:
            y.zero_()
        else:
            y.copy_(bias.to(y.dtype).expand(y.shape))
        return y
    if kernel == "auto":
        kernel = "gemv" if B <= GEMV_MAX_BATCH else "batched"
    meta = dict(HAS_BIAS=bias is not None, ACC_F64=x.dtype == torch.float64)
    b_arg = bias if bias is not None else values  # never read when HAS_BIAS is False
    # y is contiguous, so it is its own [B, n] matrix: the kernels get y itself, not a view of it
    # (a view mutated by a kernel would cost a copy under functionalization).
    common = (values.stride(0), values.stride(1), indices.stride(0), indices.stride(1), n, 1)
    if kernel == "gemv":
        meta["WIDE"] = needs_int64(x2, values, indices, y)
        bb, kb = _buckets(B, k)

        def grid(m):
            return (cdiv(n, m["BLOCK_N"]) * cdiv(B, m["BLOCK_B"]),)

        args = (x2, values, indices, b_arg, y, B, n, k, x2.stride(0), x2.stride(1), *common)
        run_kernel(_condensed_gemv_kernel, grid, args, meta, config, ("gemv", bb, kb),
                   _gemv_configs(bb, kb), ["n", "k"], _GEMV_DEFAULT, "condensed_linear_triton")
    else:
        xt, bp = to_feature_major(x2)
        if split_k is not None and int(split_k) < 1:
            raise ValueError(f"condensed_linear_triton: split_k must be >= 1, got {split_k}")
        sk = None if split_k is None else int(split_k)
        if config is not None and (sk is not None or "SPLIT" not in config):
            config = dict(config, SPLIT=sk or config.get("SPLIT", 1))
        meta["WIDE"] = needs_int64(xt, values, indices, y)
        bucket = _pow2(B)
        large = bucket > _LARGE_BATCH
        esize = x.element_size()
        small_k = k < 64
        configs = _fm_configs(large, esize, sk, small_k)
        traced = tracing(x)
        cands = (tuple(sorted(config.items())),) if config is not None else _fm_key(large, esize, sk, small_k)
        ws_elems, n_cnt = (_split_space if traced else _split_space_cached)(n, B, cands)
        if ws_elems:
            acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            ws = torch.empty(ws_elems, dtype=acc_dtype, device=x.device)
            cnt = _counters(x.device, n_cnt, traced)
        elif traced:  # distinct placeholders: a traced kernel must not get y (mutated) twice
            ws = torch.empty(1, dtype=torch.float32, device=x.device)
            cnt = torch.empty(1, dtype=torch.int32, device=x.device)
        else:
            ws, cnt = y, indices  # never touched when SPLIT == 1

        def grid(m):
            return (cdiv(n, m["BLOCK_N"]) * m["SPLIT"] * cdiv(B, m["REP_B"] * m["SUB_B"]),)

        args = (xt, values, indices, b_arg, y, ws, cnt, B, bp, n, k, xt.stride(0), xt.stride(1), *common[:4], n, 1,
                bucket)
        run_kernel(_condensed_fm_kernel, grid, args, meta, config, ("fm", large, esize, sk, small_k), configs,
                   ["n", "k", "B_BUCKET"], _FM_DEFAULT, "condensed_linear_triton")
    return y


# ---------------------------------------------------------------------------------------------
# Self-check and benchmark
# ---------------------------------------------------------------------------------------------
def _random_condensed(n: int, fan_in: int, k: int, dtype, device, index_dtype=torch.int16):
    """Random constant fan-in weights: ``k`` distinct sorted indices per row."""
    idx = torch.rand(n, fan_in, device=device).argsort(dim=1)[:, :k].sort(dim=1).values
    vals = torch.randn(n, k, device=device, dtype=torch.float32).to(dtype)
    return vals, idx.to(index_dtype)


def _main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, fan_in = (768, 3072) if dev == "cuda" else (40, 96)
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (TRITON_INTERPRET=1)'}")
    for sparsity in (0.9, 0.99):
        k = max(1, round(fan_in * (1 - sparsity)))
        vals, idx = _random_condensed(n, fan_in, k, torch.float32, dev)
        bias = torch.randn(n, device=dev)
        for batch in ((1, 7, 256, 2048) if dev == "cuda" else (1, 5, 33)):
            x = torch.randn(batch, fan_in, device=dev)
            y = condensed_linear_triton(x, vals, idx, bias)
            ref = condensed_linear_ref(x.double(), vals.double(), idx, bias.double())
            err = relative_error(y, ref)
            line = f"sparsity {sparsity:.2f} batch {batch:5d}: max rel err {err:.1e}"
            if dev == "cuda":
                w = vals.new_zeros(n, fan_in).scatter_(1, idx.long(), vals)
                t_dense = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w, bias), return_mode="median")
                t_cond = triton.testing.do_bench(lambda: condensed_linear_triton(x, vals, idx, bias),
                                                 return_mode="median")
                line += f"  dense {t_dense * 1e3:8.1f} us  condensed {t_cond * 1e3:8.1f} us  " \
                        f"speed-up {t_dense / t_cond:5.2f}x"
            print(line)


if __name__ == "__main__":
    _main()
