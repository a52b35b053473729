"""CPU benchmark of the condensed matmul (and conv) against dense F.linear and torch CSR.

Layer: ViT-B/16 fc2 (out 768, in 3072), constant fan-in with random sorted indices (int16), fp32.
For each thread count, sparsity and batch it times, in the same run (torch.utils.benchmark,
medians of blocked runs):

* dense    ``F.linear(x, W)`` with the full masked weight (MKL),
* csr      ``W_csr @ x.T`` (torch CSR, active rows), transposed back,
* condensed ``sparse_compile.kernels.condensed_linear`` (the wrapper users call),
* op       ``torch.ops.sparse_compile.condensed_linear`` (the registered op, as a compiled graph
  without autograd would call it in eager mode),

and prints the ratios dense/condensed and csr/condensed. Then ResNet-50's 3x3 convs at 90% (one per
stage; stage 1 only with --quick) against dense F.conv2d, and the per-call overhead of each
dispatch layer on a tiny layer.

    .venv/bin/python bench/kernel_cpu.py                # full table (~2 min on 2 cores)
    .venv/bin/python bench/kernel_cpu.py --quick        # 90% only, batch 1 and 8
    .venv/bin/python bench/kernel_cpu.py --json out.json
    .venv/bin/python bench/kernel_cpu.py --timer cpu     # 1 thread, CPU time: robust on a busy box
    .venv/bin/python bench/kernel_cpu.py --vit --timer cpu --rounds 21   # ViT MLP shapes, 197 rows,
                                                          # fp32 + bf16, GMAC/s next to dense GEMM
    SPARSE_COMPILE_CPU_ISA=avx2 .venv/bin/python bench/kernel_cpu.py --quick   # another ISA variant
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import logging

# torch.utils.benchmark imports cpp_extension, which logs "No CUDA runtime is found" on a CPU-only
# machine: irrelevant to these CPU timings.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import sparse_compile  # noqa: F401  (registers the ops)
from sparse_compile.kernels import condensed_conv2d, condensed_linear, cpu
from sparse_compile.kernels.reference import dense_weight
from sparse_compile.numerics import relative_error

OUT, IN = 768, 3072


def make_layer(sparsity: float, seed: int = 0):
    """Random constant fan-in layer: (values, int16 indices, dense weight, CSR weight)."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, round((1 - sparsity) * IN))
    idx = torch.rand(OUT, IN, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values.to(torch.int16)
    values = torch.randn(OUT, k, generator=g) / k**0.5
    w = dense_weight(values, idx, IN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return values, idx, w, w.to_sparse_csr()


TIMER = {"wall": time.perf_counter, "cpu": time.thread_time}
_timer = TIMER["wall"]


def median_us(stmt: str, env: dict, min_run_time: float) -> float:
    """Median time of ``stmt`` in microseconds."""
    t = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads(), timer=_timer)
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e6


def bench_layer(threads, sparsities, batches, min_run_time):
    """Rows of the main table (one per threads x sparsity x batch)."""
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for s in sparsities:
            values, idx, w, wcsr = make_layer(s)
            for b in batches:
                x = torch.randn(b, IN)
                env = dict(F=F, torch=torch, x=x, w=w, wcsr=wcsr, values=values, idx=idx,
                           condensed_linear=condensed_linear)
                y = condensed_linear(x, values, idx)
                ref = F.linear(x.double(), w.double())
                err = relative_error(y, ref)
                r = dict(threads=nt, sparsity=s, k=values.shape[1], batch=b, rel_err=err)
                r["dense_us"] = median_us("F.linear(x, w)", env, min_run_time)
                r["csr_us"] = median_us("(wcsr @ x.t()).t()", env, min_run_time)
                r["condensed_us"] = median_us("condensed_linear(x, values, idx)", env, min_run_time)
                r["op_us"] = median_us(
                    "torch.ops.sparse_compile.condensed_linear(x, values, idx)", env, min_run_time)
                r["x_dense"] = r["dense_us"] / r["condensed_us"]
                r["x_csr"] = r["csr_us"] / r["condensed_us"]
                rows.append(r)
                print(
                    f"{nt:>3} {s:>5.2f} {r['k']:>5} {b:>5} {r['dense_us']:>9.1f} {r['csr_us']:>9.1f} "
                    f"{r['condensed_us']:>10.1f} {r['op_us']:>9.1f} {r['x_dense']:>8.2f}x "
                    f"{r['x_csr']:>7.2f}x {err:>9.1e}",
                    flush=True,
                )
    return rows


#: ViT-B/16's MLP layers (out, in): fc1 and fc2, at 197 tokens (batch 1 at 224 px).
VIT_SHAPES = ((3072, 768), (768, 3072))


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds of each callable, timed round-robin (one call each per round), so a burst of
    load on a shared machine hits every case alike. ``fns`` maps a name to (threads, callable);
    the thread count is set before the clock starts."""
    ts = {name: [] for name in fns}
    for nt, f in fns.values():
        torch.set_num_threads(nt)
        f()  # warm-up (first-call allocation, lazy build)
    for _ in range(rounds):
        for name, (nt, f) in fns.items():
            torch.set_num_threads(nt)
            t0 = _timer()
            f()
            ts[name].append(_timer() - t0)
    return {name: sorted(v)[len(v) // 2] for name, v in ts.items()}


def bench_vit(threads, rows, sparsity, rounds):
    """ViT-B/16 MLP shapes at `rows` tokens: condensed vs dense F.linear, fp32 and bf16, with GMAC/s.

    GMAC/s counts the multiply-adds each form performs: rows * out * in for dense, rows * out * k
    for condensed. Ratios are dense/condensed time; every form at every thread count is timed in
    the same interleaved rounds, so the speedups over threads (printed after the table) are
    same-run ratios too.
    """
    out_rows = []
    forms = ("dense fp32", "condensed fp32", "dense bf16", "condensed bf16")
    for o, i in VIT_SHAPES:
        k = max(1, round((1 - sparsity) * i))
        g = torch.Generator().manual_seed(1)
        idx = torch.rand(o, i, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values.to(torch.int16)
        values = torch.randn(o, k, generator=g) / k**0.5
        w = dense_weight(values, idx, i)
        x = torch.randn(rows, i, generator=g)
        xb, wb, vb = x.bfloat16(), w.bfloat16(), values.bfloat16()
        ref = F.linear(x.double(), w.double())
        err32 = relative_error(condensed_linear(x, values, idx), ref)
        errbf = relative_error(condensed_linear(xb, vb, idx), ref)
        errdb = relative_error(F.linear(xb, wb), ref)
        calls = {
            "dense fp32": lambda: F.linear(x, w),
            "condensed fp32": lambda: condensed_linear(x, values, idx),
            "dense bf16": lambda: F.linear(xb, wb),
            "condensed bf16": lambda: condensed_linear(xb, vb, idx),
        }
        allmed = _interleaved({(nt, f): (nt, calls[f]) for nt in threads for f in forms}, rounds)
        for nt in threads:
            med = {f: allmed[(nt, f)] for f in forms}
            r = dict(out=o, inp=i, k=k, rows=rows, threads=nt, sparsity=sparsity,
                     rel_err_fp32=err32, rel_err_bf16=errbf, rel_err_dense_bf16=errdb,
                     **{f"{name.replace(' ', '_')}_ms": v * 1e3 for name, v in med.items()})
            r["x_fp32"] = med["dense fp32"] / med["condensed fp32"]
            r["x_bf16"] = med["dense bf16"] / med["condensed bf16"]
            r["over_1_thread"] = {f: allmed[(threads[0], f)] / med[f] for f in forms}
            dm, cm = rows * o * i / 1e9, rows * o * k / 1e9
            gm = {name: (dm if name.startswith("dense") else cm) / v for name, v in med.items()}
            out_rows.append(r)
            print(f"{o:>5}x{i:<5} {nt:>3} " + " ".join(
                f"{med[n] * 1e3:>8.2f} ({gm[n]:>5.1f})" for n in med)
                  + f" {r['x_fp32']:>7.2f}x {r['x_bf16']:>7.2f}x  err {err32:.1e}/{errbf:.1e}", flush=True)
    if len(threads) > 1:
        print(f"speedup of each form over {threads[0]} thread(s), same rounds:")
        for r in out_rows:
            if r["threads"] != threads[0]:
                print(f"{r['out']:>5}x{r['inp']:<5} {r['threads']:>3} " + " ".join(
                    f"{f} {v:.2f}x" for f, v in r["over_1_thread"].items()))
    return out_rows


#: ResNet-50's 3x3 convs, one per stage: (channels, image side), stride 1, padding 1.
CONV_STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))


def bench_conv(threads, stages, min_run_time):
    """ResNet-50 3x3 convs (c -> c, pad 1) at 90%: dense F.conv2d vs condensed, fp32 and bf16, batch 1
    and 8. Errors against fp64 on the fp32 inputs (bf16 includes rounding the inputs to bf16)."""
    rows = []
    for c, hw in stages:
        ks = 3
        fan_in = c * ks * ks
        k = round(0.1 * fan_in)
        g = torch.Generator().manual_seed(0)
        idx = torch.rand(c, fan_in, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values.to(torch.int16)
        values = torch.randn(c, k, generator=g) / k**0.5
        w = dense_weight(values, idx, fan_in).reshape(c, c, ks, ks)
        vb, wb = values.bfloat16(), w.bfloat16()
        for nt in threads:
            torch.set_num_threads(nt)
            for b in (1, 8):
                x = torch.randn(b, c, hw, hw)
                xb = x.bfloat16()
                env = dict(F=F, x=x, w=w, values=values, idx=idx, condensed_conv2d=condensed_conv2d,
                           xb=xb, wb=wb, vb=vb)
                ref = F.conv2d(x.double(), w.double(), None, 1, 1)
                err = relative_error(condensed_conv2d(x, values, idx, None, ks, 1, 1, 1), ref)
                errb = relative_error(condensed_conv2d(xb, vb, idx, None, ks, 1, 1, 1), ref)
                d = median_us("F.conv2d(x, w, None, 1, 1)", env, min_run_time)
                cc = median_us("condensed_conv2d(x, values, idx, None, 3, 1, 1, 1)", env, min_run_time)
                db = median_us("F.conv2d(xb, wb, None, 1, 1)", env, min_run_time)
                cb = median_us("condensed_conv2d(xb, vb, idx, None, 3, 1, 1, 1)", env, min_run_time)
                rows.append(dict(channels=c, side=hw, k=k, threads=nt, batch=b, dense_us=d, condensed_us=cc,
                                 x_dense=d / cc, rel_err=err, dense_bf16_us=db, condensed_bf16_us=cb,
                                 x_dense_bf16=db / cb, rel_err_bf16=errb))
                print(f"{c:>4} {hw:>4} {k:>4} {nt:>3} {b:>5} {d:>9.1f} {cc:>10.1f} {d / cc:>8.2f}x "
                      f"{db:>9.1f} {cb:>10.1f} {db / cb:>8.2f}x {err:>9.1e} {errb:>9.1e}", flush=True)
    return rows


CONV_HEADER = (f"{'c':>4} {'side':>4} {'k':>4} {'thr':>3} {'batch':>5} {'dense':>9} {'condensed':>10} "
               f"{'vs dense':>9} {'dense bf16':>9} {'cond bf16':>10} {'vs dense':>9} {'err fp32':>9} "
               f"{'err bf16':>9}")


def bench_overhead(min_run_time):
    """Per-call cost of each layer of dispatch on a tiny layer (1 thread, batch 1)."""
    torch.set_num_threads(1)
    values = torch.randn(8, 2)
    idx = torch.tensor([[0, 5]] * 8, dtype=torch.int16)
    x = torch.randn(1, 16)
    xg = x.clone().requires_grad_()
    env = dict(torch=torch, x=x, xg=xg, values=values, idx=idx, condensed_linear=condensed_linear,
               F=F, w=dense_weight(values, idx, 16))
    cases = [
        ("F.linear (dense, for scale)", "F.linear(x, w)"),
        ("C++ op torch.ops.sparse_compile._condensed_linear_cpu", "torch.ops.sparse_compile._condensed_linear_cpu(x, values, idx, None)"),
        ("wrapper condensed_linear (no grad)", "condensed_linear(x, values, idx)"),
        ("public op torch.ops.sparse_compile.condensed_linear", "torch.ops.sparse_compile.condensed_linear(x, values, idx)"),
        ("wrapper, x requires grad (autograd path)", "condensed_linear(xg, values, idx)"),
    ]
    out = {}
    for name, stmt in cases:
        out[name] = median_us(stmt, env, min_run_time)
        print(f"  {name:<58} {out[name]:8.2f} us", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="90%% sparsity, batch 1 and 8 only")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--vit", action="store_true",
                   help="only ViT-B/16's MLP shapes at 197 rows (fp32 and bf16, with GMAC/s)")
    p.add_argument("--conv", action="store_true",
                   help="only ResNet-50's 3x3 convs at 90%% (fp32 and bf16, batch 1 and 8)")
    p.add_argument("--rows", type=int, default=197, help="rows (tokens) for --vit")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds for --vit")
    p.add_argument("--timer", choices=sorted(TIMER), default="wall",
                   help="wall clock (default), or this thread's CPU time, which ignores time the OS "
                        "gives to other processes on a shared machine (1 thread only)")
    a = p.parse_args(argv)
    global _timer
    _timer = TIMER[a.timer]
    if a.timer == "cpu":
        a.threads = [1]  # CPU time of the calling thread says nothing about a multi-threaded call
    if a.quick:
        a.sparsity, a.batch = [0.9], [1, 8]
    if not cpu.load():
        print("C++ kernels unavailable: timing the reference fallback, not the kernel:", cpu.build_info()["error"])
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, kernels {cpu.build_info()['isa']}, "
          f"layer {OUT}x{IN} fp32, int16 indices")
    if a.conv:
        print("ResNet-50 3x3 convs, c -> c channels, side x side image, pad 1, 90%, fp32 and bf16 (us):")
        print(CONV_HEADER)
        conv_rows = bench_conv(a.threads, CONV_STAGES, a.min_run_time)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"conv": conv_rows, "torch": torch.__version__, "isa": cpu.build_info()["isa"]}, f,
                          indent=1)
        return 0
    if a.vit:
        print(f"ViT-B/16 MLP layers, {a.rows} rows, 90%: median ms ({a.timer} timer, {a.rounds} interleaved "
              "rounds) and (GMAC/s); ratios dense/condensed")
        print(f"{'layer':<11} {'thr':>3} {'dense fp32':>16} {'condensed fp32':>16} {'dense bf16':>16} "
              f"{'condensed bf16':>16} {'fp32':>8} {'bf16':>8}")
        rows = bench_vit(a.threads, a.rows, 0.9, a.rounds)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"vit": rows, "torch": torch.__version__, "isa": cpu.build_info()["isa"]}, f, indent=1)
        return 0
    print(f"times: median microseconds ({a.timer} timer); ratios are dense/condensed and csr/condensed "
          "from the same run")
    print(f"{'thr':>3} {'spars':>5} {'k':>5} {'batch':>5} {'dense':>9} {'csr':>9} {'condensed':>10} "
          f"{'op':>9} {'vs dense':>9} {'vs csr':>8} {'rel err':>9}")
    rows = bench_layer(a.threads, a.sparsity, a.batch, a.min_run_time)
    print("ResNet-50 3x3 convs, c -> c channels, side x side image, pad 1, 90%, fp32 and bf16 (us):")
    print(CONV_HEADER)
    conv_rows = bench_conv(a.threads, CONV_STAGES[:1] if a.quick else CONV_STAGES, a.min_run_time)
    print("dispatch overhead (tiny layer 8x16, k=2, batch 1, 1 thread):")
    overhead = bench_overhead(a.min_run_time)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "conv": conv_rows, "overhead_us": overhead, "torch": torch.__version__}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
