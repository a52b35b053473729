"""ViT-B/16, 90% SRigL-sparse MLP and attention-out layers: optimize + compile vs dense compiled the same way.

    python -m bench.model_vit                                  # CPU, batch 1, torch.compile default mode
    python -m bench.model_vit --compile max-autotune           # the issue's setting (compiles for minutes on CPU)
    python -m bench.model_vit --device cuda --batch 1 256 --dtype fp32 bf16 --budget-s 300

The model is torchvision's ViT-B/16 (random weights, no download) at 224x224. Its MLP fc1/fc2 and
attention out-projection layers get constant fan-in masks at ``--sparsity`` (uniform over those
layers, as the paper does for ViT; q/k/v, patch embedding and head stay dense), and
``--ablated-fraction`` of each such layer's neurons are ablated with their budget spread over the
others (so ``k`` grows, as SRigL leaves a trained model). Weights use the sparse init (std
sqrt(2/k)); ablated neurons keep a non-zero bias.

Both sides run the same way: eager, or ``torch.compile`` with the same mode; the optimized model is
checked against the dense one first. Timings are medians of ``--repeats`` forward passes, the two
models interleaved (dense, sparse, dense, ...) so machine noise hits both alike. ``--profile``
adds where the time goes (torch.profiler self time by category) for both. Writes
``bench/out/model_vit-<device>-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn


def sparse_vit(sparsity: float, ablated_fraction: float, seed: int = 0) -> nn.Module:
    """torchvision ViT-B/16 with constant fan-in masks on MLP and attention out-projection weights."""
    import torchvision

    from sparse_compile.benchmark.weights import random_layer

    torch.manual_seed(seed)
    model = torchvision.models.vit_b_16(num_classes=1000).eval()
    with torch.no_grad():
        for i, (name, m) in enumerate(model.named_modules()):
            if not isinstance(m, nn.Linear) or not (name.endswith("out_proj") or ".mlp." in name):
                continue
            lw = random_layer(*m.weight.shape, sparsity, ablated_fraction, seed=seed * 100003 + i, name=name)
            m.weight.copy_(lw.weight)
            m.bias.copy_(lw.bias)
            m.register_buffer("weight_mask", lw.mask)
        # torchvision zero-initialises the head: every output would be 0 and any check vacuous.
        nn.init.normal_(model.heads.head.weight, std=0.02)
        nn.init.normal_(model.heads.head.bias, std=0.02)
    return model


def compiled(model, mode: str):
    """``model`` under ``torch.compile`` in ``mode`` ("none": the model itself)."""
    if mode == "none":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, fullgraph=False)


def interleaved_medians(fns: dict, x, repeats: int, device) -> dict:
    """Median (and quartiles) of one call of each function on ``x``, calls interleaved round-robin."""
    from sparse_compile.timing import interleaved_times

    times = interleaved_times({k: (lambda f=f: f(x)) for k, f in fns.items()}, device, repeats)
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                "q25_ms": statistics.quantiles(v, n=4)[0] * 1e3 if len(v) > 1 else v[0] * 1e3,
                "q75_ms": statistics.quantiles(v, n=4)[2] * 1e3 if len(v) > 1 else v[0] * 1e3}
            for k, v in times.items()}


CATEGORIES = (
    ("condensed (sparse_compile ops)", ("condensed", "sparse_compile", "csr_mm")),
    ("dense matmul (q/k/v, patch, head)", ("addmm", "aten::mm", "linear", "mkldnn", "matmul", "_mkl", "gemm",
                                          "convolution", "conv2d")),
    ("attention (sdpa, bmm, softmax)", ("attention", "bmm", "softmax", "baddbmm")),
    ("layer norm", ("layer_norm",)),
    ("scatter / index (ablation restore)", ("index_copy", "index_put", "scatter", "gather", "index_select")),
    ("elementwise (gelu, add, copy...)", ("gelu", "add", "mul", "copy", "clone", "cat", "contiguous", "fused",
                                          "cpp_fused", "triton")),
)


def profile(fn, x, runs: int) -> dict:
    """Self time per category (ms per forward) and the top ops, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    if not x.is_cuda:  # kineto otherwise logs "ERROR ... gpuGetDeviceCount failed" on a CPU-only machine
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with torch.inference_mode():
        fn(x)
        with tprofile(activities=acts) as prof:
            for _ in range(runs):
                fn(x)
    rows = []
    for e in prof.key_averages():
        t = (e.self_device_time_total if x.is_cuda else e.self_cpu_time_total) / 1e3 / runs
        if t > 0:
            rows.append((e.key, t))
    rows.sort(key=lambda r: -r[1])
    cats: dict = {}
    for key, t in rows:
        low = key.lower()
        cat = next((c for c, keys in CATEGORIES if any(s in low for s in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + t
    return {"total_ms": sum(t for _, t in rows), "categories_ms": cats,
            "top_ops_ms": [(k, round(t, 3)) for k, t in rows[:12]]}


def run_one(args, batch: int, dtype_name: str, argv) -> dict:
    """Build, optimize, compile, check, time (and profile) one batch size and dtype; print a summary."""
    from sparse_compile import optimize
    from sparse_compile.compiler import relative_error

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    dev = torch.device(args.device)
    t0 = time.time()
    model = sparse_vit(args.sparsity, args.ablated_fraction).to(dev, dtype)
    x = torch.randn(batch, 3, 224, 224, device=dev, dtype=dtype)
    opt = optimize(model, (x,), mode=args.mode, repeats=args.autotune_repeats)
    print(opt.sparse_compile_report, flush=True)
    print(f"optimize: {time.time() - t0:.1f}s", flush=True)

    dense_c, sparse_c = compiled(model, args.compile), compiled(opt, args.compile)
    t1 = time.time()
    with torch.inference_mode():
        ref = model(x)
        yd = dense_c(x)
        ys = sparse_c(x)
    compile_s = time.time() - t1
    err = relative_error(ys, ref)
    err_dense_compiled = relative_error(yd, ref)
    print(f"compile ({args.compile}) + first calls: {compile_s:.1f}s; relative error vs eager dense: "
          f"optimized {err:.2e}, dense compiled {err_dense_compiled:.2e}", flush=True)

    res = interleaved_medians({"dense": dense_c, "optimized": sparse_c}, x, args.repeats, dev)
    speedup = res["dense"]["median_ms"] / res["optimized"]["median_ms"]
    result = {
        "command": "python -m bench.model_vit " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
                    or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "args": vars(args), "batch": batch, "dtype": dtype_name, "rel_err": err,
        "rel_err_dense_compiled": err_dense_compiled, "compile_s": compile_s, "timings": res,
        "speedup": speedup, "forms": opt.sparse_compile_report.forms(),
    }
    print(f"\nViT-B/16 batch {batch} {dtype_name} on {result['machine']['device']} "
          f"({torch.get_num_threads()} threads), compile={args.compile}:")
    for k, v in res.items():
        print(f"  {k:10s} median {v['median_ms']:9.2f} ms  (q25 {v['q25_ms']:.2f}, q75 {v['q75_ms']:.2f})")
    print(f"  speedup   {speedup:.2f}x (dense median / optimized median, same run)")
    if args.profile:
        prof = {"dense": profile(dense_c, x, 3), "optimized": profile(sparse_c, x, 3)}
        result["profile"] = prof
        cats = sorted(set(prof["dense"]["categories_ms"]) | set(prof["optimized"]["categories_ms"]))
        print("\nwhere the time goes (profiler self time, ms per forward):")
        print(f"  {'category':38s} {'dense':>9s} {'optimized':>10s}")
        for c in cats:
            print(f"  {c:38s} {prof['dense']['categories_ms'].get(c, 0):9.2f} "
                  f"{prof['optimized']['categories_ms'].get(c, 0):10.2f}")
        print(f"  {'total':38s} {prof['dense']['total_ms']:9.2f} {prof['optimized']['total_ms']:10.2f}")
        print("  top ops, optimized:", prof["optimized"]["top_ops_ms"][:6])
    return result


def main(argv=None) -> int:
    """Run every (batch, dtype) pair asked for, print one summary table, write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--ablated-fraction", type=float, default=0.05)
    p.add_argument("--mode", default="auto", help="optimize mode (auto, condensed, ablated_dense, ...)")
    p.add_argument("--compile", default="default", choices=("none", "default", "max-autotune"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--autotune-repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also report where the time goes")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new (batch, dtype) run after this many seconds (for a time-boxed GPU session)")
    p.add_argument("--out", default="bench/out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    results, skipped = [], []
    for dtype_name in args.dtype:
        for batch in args.batch:
            if args.budget_s is not None and time.time() - start > args.budget_s:
                skipped.append(f"batch {batch} {dtype_name}")
                continue
            try:
                results.append(run_one(args, batch, dtype_name, argv))
            except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
                skipped.append(f"batch {batch} {dtype_name}: {type(e).__name__}: {e}")
                print(f"FAILED batch {batch} {dtype_name}: {type(e).__name__}: {e}", flush=True)
    print(f"\nsummary (compile={args.compile}, medians, same-run ratios):")
    print(f"  {'dtype':5s} {'batch':>5s} {'dense ms':>10s} {'optimized ms':>13s} {'speedup':>8s} {'rel err':>9s}")
    for r in results:
        t = r["timings"]
        print(f"  {r['dtype']:5s} {r['batch']:5d} {t['dense']['median_ms']:10.2f} "
              f"{t['optimized']['median_ms']:13.2f} {r['speedup']:7.2f}x {r['rel_err']:9.1e}")
    for s_ in skipped:
        print(f"  not run: {s_}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_type = torch.device(args.device).type
    path = out / f"model_vit-{dev_type}-{dt.date.today().isoformat()}.json"
    payload = results[0] if len(results) == 1 else {"runs": results, "not_run": skipped}
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return 0 if results and not any(":" in s_ for s_ in skipped) else 1


if __name__ == "__main__":
    sys.exit(main())
