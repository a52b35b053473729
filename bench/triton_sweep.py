"""Config sweep and launch-cost probe for the condensed Triton linear kernels (needs a CUDA GPU).

    python -m bench.triton_sweep                 # sweep, then the host-cost probe; < 4 minutes
    python -m bench.triton_sweep --budget-s 100  # stop sweeping after 100 s

Sweep: each config pinned in turn (``config=``, ``split_k=``), GPU time per call as in
bench/gpu_check.py (CUDA graph, L2 flushed). The batched kernel is timed on a feature-major x
(no transpose: the kernel alone, plus the split-sum when split), the GEMV kernel at batch 1.
Configs outside the autotune lists are there to find better ones (``maxnreg``, wider fan-in
tiles, other split counts). Probe: where one eager call's host time goes (cProfile of the
launcher), and triton's bare launch of the cached compiled kernel, for comparison.
"""
from __future__ import annotations

import argparse
import itertools
import random
import time

import torch

from bench.gpu_check import kernel_us, make_layer, wall_us
from sparse_compile.kernels import triton_linear as tlin
from sparse_compile.numerics import relative_error

T0 = time.time()


def fm_tiles(sub_b: int, small_k: bool):
    """Candidate batched-kernel tiles: (BLOCK_N, BLOCK_J, REP_B, SUB_B, num_warps), 8..64
    accumulators per thread."""
    out = []
    for bn, bj, rep, nw in itertools.product((16, 32, 64, 128), (1, 2, 4, 8, 16, 32), (1, 2, 4), (4, 8)):
        if bj >= 16 and not small_k:
            continue
        per_thread = bn * bj * rep * sub_b // (32 * nw)
        if 8 <= per_thread <= 64:
            out.append((bn, bj, rep, sub_b, nw))
    return out


def sweep_fm(dtype, sp, batch, budget_s):
    """Time batched-kernel tiles (auto split), then the best few with other splits / maxnreg."""
    vals, idx, _ = make_layer(sp, dtype)
    k = vals.shape[1]
    xt = torch.randn(3072, batch, device="cuda").to(dtype)
    x = xt.t()  # feature-major: the launcher uses it in place
    sub = 64 if dtype == torch.bfloat16 else 32
    res = []
    tiles_until = time.time() + 0.65 * (budget_s - time.time())  # the rest: splits / maxnreg of the best
    shipped = [tuple(c[a] for a in ("BLOCK_N", "BLOCK_J", "REP_B", "SUB_B", "num_warps"))
               for c in tlin.linear_configs("batched", batch, k, dtype)]
    others = [t for t in fm_tiles(sub, k < 64) if t not in shipped]
    random.Random(0).shuffle(others)  # a budget cut then leaves a spread sample, not one corner
    for bn, bj, rep, sb, nw in shipped + others:
        if time.time() > tiles_until:
            break
        cfg = dict(BLOCK_N=bn, BLOCK_J=bj, REP_B=rep, SUB_B=sb, num_warps=nw, num_stages=1)
        try:
            t, _ = kernel_us(lambda: tlin.condensed_linear_triton(x, vals, idx, kernel="batched", config=cfg))
            res.append((t, cfg, None))
        except Exception as e:  # noqa: BLE001
            print(f"    {cfg}: {type(e).__name__}: {str(e)[:80]}")
    res.sort(key=lambda r: r[0])
    extra = []
    for t0, cfg, _ in res[:4]:
        for s in (1, 2, 3, 4, 6, 8):
            if time.time() > budget_s:
                break
            if k // s < 8:
                continue
            try:
                t, _ = kernel_us(lambda: tlin.condensed_linear_triton(x, vals, idx, kernel="batched", config=cfg,
                                                                       split_k=s))
                extra.append((t, cfg, s))
            except Exception as e:  # noqa: BLE001
                print(f"    {cfg} split {s}: {type(e).__name__}: {str(e)[:80]}")
        c2 = dict(cfg, maxnreg=128)
        try:
            t, _ = kernel_us(lambda: tlin.condensed_linear_triton(x, vals, idx, kernel="batched", config=c2))
            extra.append((t, c2, None))
        except Exception as e:  # noqa: BLE001
            print(f"    {c2}: {type(e).__name__}: {str(e)[:80]}")
    allr = sorted(res + extra, key=lambda r: r[0])
    print(f"  batched {str(dtype)[6:]} {sp:.2f} B={batch} k={k}: {len(res)} tiles + {len(extra)} variants; best 8:")
    for t, cfg, s in allr[:8]:
        c = " ".join(f"{a}={b}" for a, b in cfg.items() if a != "num_stages")
        print(f"    {t:7.1f} us  {c}  split={'auto' if s is None else s}")
    return allr


def sweep_gemv(dtype, sp, budget_s):
    vals, idx, _ = make_layer(sp, dtype)
    k = vals.shape[1]
    x = torch.randn(1, 3072, device="cuda").to(dtype)
    res = []
    kb = max(16, 1 << (k - 1).bit_length())
    for bn, bk, nw, reg in itertools.product((1, 2, 4, 8), (kb, kb // 2, kb // 4), (1, 2, 4, 8), (None, 128)):
        if time.time() > budget_s or bk < 16:
            continue
        if bn * bk // (32 * nw) > 64 or bn * bk // (32 * nw) < 2:
            continue
        if reg is not None and bn * bk // (32 * nw) < 16:
            continue
        cfg = dict(BLOCK_B=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=1)
        if reg:
            cfg["maxnreg"] = reg
        try:
            t, _ = kernel_us(lambda: tlin.condensed_linear_triton(x, vals, idx, kernel="gemv", config=cfg))
            res.append((t, cfg))
        except Exception as e:  # noqa: BLE001
            print(f"    {cfg}: {type(e).__name__}: {str(e)[:80]}")
    res.sort(key=lambda r: r[0])
    print(f"  gemv {str(dtype)[6:]} {sp:.2f} B=1 k={k}: {len(res)} configs; best 6:")
    for t, cfg in res[:6]:
        print(f"    {t:7.1f} us  " + " ".join(f"{a}={b}" for a, b in cfg.items() if a != "num_stages"))


def probe():
    """Host cost of one eager launcher call at batch 1: cProfile, and triton's bare launch."""
    import cProfile
    import pstats

    vals, idx, _ = make_layer(0.9)
    x = torch.randn(1, 3072, device="cuda")
    f = lambda: tlin.condensed_linear_triton(x, vals, idx)  # noqa: E731
    print(f"  launcher eager wall: {wall_us(f, 500):.1f} us/call")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(500):
        f()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(16)
    # The cached compiled kernel, launched with triton's own runner (no binder, no cache lookup).
    best = next(v for kk, v in tlin._BEST.items() if kk[0][0] == "gemv" and kk[2] == 307)
    y = torch.empty(1, 768, device="cuda")
    args = (x, vals, idx, vals, y, 1, 768, 307, 3072, 1, 307, 1, 307, 1, 768, 1)
    meta = dict(HAS_BIAS=False, ACC_F64=False, WIDE=False)
    grid = (768 // best["BLOCK_N"],)
    ck = tlin._condensed_gemv_kernel[grid](*args, **meta, **best)
    print(f"  JITFunction launch: {wall_us(lambda: tlin._condensed_gemv_kernel[grid](*args, **meta, **best), 500):.1f}"
          " us/call")
    try:
        names = tlin._condensed_gemv_kernel.arg_names
        allv = dict(zip(names, args), **meta, **{a: b for a, b in best.items() if a in names})
        ordered = [allv[a] for a in names]
        stream = torch.cuda.current_stream().cuda_stream
        run = lambda: ck[(grid[0], 1, 1)](*ordered, stream=stream)  # noqa: E731  (runner wants 3-D grid)
        run()
        torch.cuda.synchronize()
        print(f"  CompiledKernel launch (all args): {wall_us(run, 500):.1f} us/call")
    except Exception as e:  # noqa: BLE001
        print(f"  CompiledKernel launch failed: {type(e).__name__}: {str(e)[:200]}")


def compare(old_conv=None):
    """Kernel-time A/B checks of choices made without a GPU: k padded to 16 (pad_fan_in) for the
    GEMV and batched kernels, and, given the pre-offset-table conv module, old vs new conv."""
    from sparse_compile.kernels import triton_conv as tconv

    for dtype, sp, batch in ((torch.float32, 0.9, 1), (torch.float32, 0.9, 256), (torch.bfloat16, 0.99, 256)):
        vals, idx, _ = make_layer(sp, dtype)
        vp, ip = tlin.pad_fan_in(vals, idx)
        x = torch.randn(batch, 3072, device="cuda").to(dtype)
        t0, _ = kernel_us(lambda: tlin.condensed_linear_triton(x, vals, idx))
        t1, _ = kernel_us(lambda: tlin.condensed_linear_triton(x, vp, ip))
        print(f"  pad k {vals.shape[1]}->{vp.shape[1]} {str(dtype)[6:]} {sp:.2f} B={batch}: "
              f"{t0:.1f} -> {t1:.1f} us ({t0 / t1:.2f}x)")
    for nb, c, hw, o, st in ((8, 128, 28, 128, 1), (8, 64, 56, 64, 1), (8, 128, 28, 256, 2)):
        fan = c * 9
        k = fan // 10
        idx = torch.rand(o, fan, device="cuda").argsort(1)[:, :k].sort(1).values.to(torch.int16)
        vals = torch.randn(o, k, device="cuda")
        x = torch.randn(nb, c, hw, hw, device="cuda")
        w = torch.zeros(o, fan, device="cuda").scatter_(1, idx.long(), vals).reshape(o, c, 3, 3)
        ref = torch.nn.functional.conv2d(x, w, None, st, 1)
        line = f"  conv {nb}x{c}x{hw}x{hw} -> {o} s{st} 90%: dense cuDNN {kernel_us(lambda: torch.nn.functional.conv2d(x, w, None, st, 1))[0]:.1f} us"
        for name, mod in (("new", tconv), ("old", old_conv)):
            if mod is None:
                continue
            y = mod.condensed_conv2d_triton(x, vals, idx, None, 3, st, 1, 1)
            err = relative_error(y, ref)
            t, _ = kernel_us(lambda: mod.condensed_conv2d_triton(x, vals, idx, None, 3, st, 1, 1))
            line += f"  {name} {t:.1f} us (err {err:.0e})"
        print(line)


def main(argv=None) -> None:
    """Run the sweeps (until the budget) and the probe."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=170.0, help="seconds for probe + sweeps")
    ap.add_argument("--compare", action="store_true", help="only the A/B checks (pad, conv)")
    ap.add_argument("--old-conv", default="", help="path of a previous triton_conv.py to compare with")
    args = ap.parse_args(argv)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.compare:
        old = None
        if args.old_conv:
            import importlib.util

            spec = importlib.util.spec_from_file_location("old_triton_conv", args.old_conv)
            old = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(old)
        compare(old)
        return
    print("probe (host cost, batch 1):")
    probe()
    print(f"sweeps (GPU us per call, CUDA graph, L2 flushed) [{time.time() - T0:.0f} s]:")
    jobs = [lambda u: sweep_fm(torch.float32, 0.9, 256, u), lambda u: sweep_fm(torch.bfloat16, 0.99, 256, u),
            lambda u: sweep_gemv(torch.float32, 0.9, u), lambda u: sweep_fm(torch.float32, 0.9, 2048, u),
            lambda u: sweep_fm(torch.bfloat16, 0.9, 256, u)]
    for i, job in enumerate(jobs):
        left = args.budget_s - (time.time() - T0)
        job(time.time() + left / (len(jobs) - i))  # an equal share of what is left
        print(f"  [{time.time() - T0:.0f} s]")
    print(f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
