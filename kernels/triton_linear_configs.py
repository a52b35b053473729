"""The condensed linear kernels' autotune choices: which kernel serves a batch, and the short
config lists each batch / fan-in bucket autotunes over (kernels and launcher: :mod:`.triton_linear`).

Kept apart from the kernels because they are data measured on one GPU (an H200 sweep with
``bench/triton_sweep.py``): retuning for another GPU edits this file only.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from sparse_compile.kernels.triton_launch import _pow2, cdiv

__all__ = ["GEMV_MAX_BATCH", "linear_configs"]

#: Largest batch served by the GEMV kernel; above it the feature-major kernel wins (the copy
#: to feature-major costs one extra pass over x, which small batches cannot amortise).
GEMV_MAX_BATCH = 16
#: Batch buckets above this use the "large" feature-major config list.
_LARGE_BATCH = 512


# ---------------------------------------------------------------------------------------------
# Config lists (kept short: each config costs a compile and a timing on the first call of a key)
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _gemv_configs(b_bucket: int, k_bucket: int) -> List[dict]:
    out, seen = [], set()
    if b_bucket == 1:  # one neuron per program on 4 warps led the H200 sweep at 90% (5.8 us)
        out.append(dict(BLOCK_B=1, BLOCK_N=1, BLOCK_K=k_bucket, num_warps=max(1, min(4, k_bucket // 128)),
                        num_stages=1))
        seen.add((1, 1, k_bucket))
    blocks_b = [b_bucket] if b_bucket < 8 else [b_bucket, b_bucket // 4]
    for bb in blocks_b:
        if bb == 1:  # 8 and 16 neurons per program trailed by >10% in the H200 sweep (k = 307)
            neuron_blocks = (2, 4)
        elif bb == b_bucket:
            neuron_blocks = (2, 4, 8)
        else:  # a quarter of the batch per program: 4x the programs, indices re-read from L2
            neuron_blocks = (2, 4)
        for bn in neuron_blocks:
            # ~4096 accumulators per program: one k-tile covers the ViT fan-ins at batch 1.
            bk = min(k_bucket, max(16, 4096 // (bb * bn)))
            elems = bb * bn * bk
            nw = max(1, min(8, elems // 512))
            key = (bb, bn, bk)
            if key not in seen:
                seen.add(key)
                out.append(dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=1))
    return out


# (BLOCK_N, BLOCK_J, REP_B, SUB_B, num_warps, SPLIT[, maxnreg]). SUB_B columns = one 128-byte line
# per gathered row (32 fp32 / 64 bf16); REP_B such lines per index. More neurons per program =
# more L1 reuse of each gathered row but fewer programs; SPLIT cuts the fan-in across programs
# (reduced in the kernel) where the batch alone gives too few. Picked from a sweep on an H200
# (bench/triton_sweep.py, ViT-B fc2 768 x 3072 at 90/99%, batch 256/2048): 16 x 8 x (1-2 lines)
# tiles on 4 warps led every case; maxnreg=128 helped the bf16 99% tiles (8.0 vs 9.1 us).
# tests/kernels/test_triton_compile.py compiles every entry for sm_90 and checks for spills.
_FM_CONFIGS = {
    (4, False): [(16, 8, 2, 32, 4, 2), (16, 8, 2, 32, 4, 4), (16, 8, 1, 32, 4, 1), (16, 8, 1, 32, 4, 1, 128),
                 (32, 4, 2, 32, 4, 2), (32, 8, 1, 32, 8, 1), (32, 4, 2, 32, 8, 4)],
    (4, True): [(16, 8, 2, 32, 4, 1), (32, 4, 2, 32, 4, 1), (64, 2, 2, 32, 4, 1), (16, 8, 2, 32, 4, 2),
                (64, 1, 4, 32, 4, 1)],
    (2, False): [(32, 8, 1, 64, 8, 1, 128), (16, 8, 1, 64, 4, 1, 128), (16, 8, 1, 64, 4, 2), (32, 4, 1, 64, 4, 2),
                 (16, 8, 1, 64, 4, 4), (32, 4, 1, 64, 4, 6)],
    (2, True): [(16, 8, 1, 64, 4, 1), (32, 4, 1, 64, 4, 1), (32, 8, 1, 64, 8, 1, 128), (64, 4, 1, 64, 8, 1),
                (16, 8, 1, 64, 4, 2)],
}


@functools.lru_cache(maxsize=None)
def _fm_configs(large: bool, elem_size: int = 4, split: Optional[int] = None, small_k: bool = False) -> List[dict]:
    """The batched kernel's candidates; ``split`` pins SPLIT, ``small_k`` (k < 64) drops the split
    entries (chunks of 16 would leave most splits empty, and an H200 run's autotuner, timing
    them noisily, picked one at bf16 99% / batch 256: 13.0 us against 10.9 us unsplit)."""
    table = _FM_CONFIGS[(2 if elem_size == 2 else 4, large)]  # fp64 uses the fp32 tiles
    if small_k and split is None:
        table = [t for t in table if t[5] == 1] or table
    out, seen = [], set()
    for a, b, r, c, w, sp, *reg in table:
        cfg = dict(BLOCK_N=a, BLOCK_J=b, REP_B=r, SUB_B=c, SPLIT=sp if split is None else split, num_warps=w,
                   num_stages=1)
        if reg:
            cfg["maxnreg"] = reg[0]
        key = tuple(cfg.items())
        if key not in seen:  # a pinned split can make two entries equal
            seen.add(key)
            out.append(cfg)
    return out


@functools.lru_cache(maxsize=None)
def _fm_key(large: bool, elem_size: int, split: Optional[int], small_k: bool) -> tuple:
    """The config list of :func:`_fm_configs` as a hashable tuple (for :func:`_split_space`)."""
    return tuple(tuple(sorted(c.items())) for c in _fm_configs(large, elem_size, split, small_k))


def _split_space(n, B, configs: tuple) -> tuple:
    """(workspace elements, counters) that the split batched kernel needs under any of ``configs``
    (sorted item tuples); (0, 0) when none of them splits. Sizes may be symbolic (tracing)."""
    ws = cnt = 0
    for items in configs:
        c = dict(items)
        if c["SPLIT"] > 1:
            tiles = cdiv(n, c["BLOCK_N"]) * cdiv(B, c["REP_B"] * c["SUB_B"])
            ws = max(ws, tiles * c["SPLIT"] * c["REP_B"] * c["BLOCK_N"] * c["SUB_B"])
            cnt = max(cnt, tiles)
    return ws, cnt


_split_space_cached = functools.lru_cache(maxsize=1024)(_split_space)


# Small tiles for the interpreter: several programs and partial tiles even on tiny test shapes.
_GEMV_DEFAULT = dict(BLOCK_B=2, BLOCK_N=4, BLOCK_K=8, num_warps=1, num_stages=1)
_FM_DEFAULT = dict(BLOCK_N=8, BLOCK_J=4, REP_B=2, SUB_B=8, SPLIT=1, num_warps=4, num_stages=1)


def _buckets(B: int, k: int):
    return min(_pow2(B), GEMV_MAX_BATCH), min(max(_pow2(k), 16), 512)


def linear_configs(kernel: str, batch: int, k: int, dtype: torch.dtype = torch.float32) -> List[dict]:
    """The autotune config list (as pinnable dicts) that ``kernel`` ("gemv" or "batched") uses at
    this batch size, fan-in and dtype of x."""
    if kernel == "gemv":
        return [dict(c) for c in _gemv_configs(*_buckets(batch, k))]
    if kernel == "batched":
        return [dict(c) for c in _fm_configs(_pow2(batch) > _LARGE_BATCH, dtype.itemsize, None, k < 64)]
    raise ValueError(f"kernel must be 'gemv' or 'batched', got {kernel!r}")
