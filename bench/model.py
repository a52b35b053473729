"""Whole models: the sparse model as trained (dense layers with masks) vs ``sparse_compile.optimize``.

    python -m bench.model                                   # CPU default (reduced, see below)
    python -m bench.model --models vit_b_16 --compile max-autotune --batches 1
    python -m bench.model --device cuda                     # GPU: batch 1 latency, batch 256 throughput

Models (torchvision, from ``sparse_compile.models``, random weights: no download): ViT-B/16,
ResNet-50, MobileNet-V3-Large. Each is sparsified the way training starts (``StaticSparse``: random
constant fan-in masks, sparse Kaiming init; uniform layer sparsity for ViT as in the paper, ERK for
the CNNs; ViT q/k/v stay dense) and ``--ablated-fraction`` of the neurons of every non-output layer
are ablated, their budget spread over the others, as SRigL leaves a trained model.

Rows: ``original`` (the masked dense model, what a user has before optimizing) and ``optimize`` in
each ``--modes`` (``auto`` is optimized once per batch size: its choice depends on the shapes),
eager and, with ``--compile``, under ``torch.compile`` (same mode for both sides). Latency is the
median time of one forward at batch 1; throughput is ``batch / median`` at the large batch.
``speedup`` = original median / this median, same run, same batch, same variant.

CPU default (reduced; about 15 minutes on 2 cores, 2026-11-27, the ViT rows alone 6 minutes): all three models, 90% sparsity,
batch 1 and 8, fp32, eager only (``--compile max-autotune`` compiles each model and mode, several
minutes each on CPU). GPU default: batch 1 and 256, fp32, eager and max-autotune.
Writes ``bench/out/model-<device>-<date>.json`` / ``.csv``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import warnings

import torch

from sparse_compile.benchmark import (
    machine_info,
    num_threads,
    relative_error,
    time_fn,
    write_results,
)

MODELS = ("vit_b_16", "resnet50", "mobilenet_v3_large")
MODES = ("dense", "ablated_dense", "condensed", "csr", "auto")


def sparsify(model: torch.nn.Module, name: str, sparsity: float, ablated_fraction: float, seed: int = 0):
    """Give ``model`` SRigL-like sparse weights in place (masks as ``weight_mask`` buffers).

    Returns the number of sparse layers. Output layers are never ablated.
    """
    from sparse_compile import StaticSparse
    from sparse_compile.benchmark.weights import n_ablated_for, srigl_like_mask
    from sparse_compile.train.budgets import sparse_init_

    torch.manual_seed(seed)
    dist = "uniform" if name.startswith("vit") else "erk"
    s = StaticSparse(model, None, sparsity=sparsity, distribution=dist)
    s.remove()
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for t in s.discovery.targets:
            mask = getattr(t.module, f"{t.param_name}_mask", None)
            if mask is None:
                continue
            n += 1
            n_abl = n_ablated_for(mask.shape[0], ablated_fraction)
            if t.head or n_abl == 0:
                continue
            # the trainer's budget for this layer (ERK / uniform), spread over the neurons left active
            mask.copy_(srigl_like_mask(mask.shape, int(mask.sum()), n_abl, generator=g))
            sparse_init_(t.param.data, mask, generator=g)
    return n


def _compile(m, mode):
    torch._dynamo.reset()
    return torch.compile(m, mode=None if mode == "default" else mode)


def _optimize(model, mode: str, x, dev) -> tuple:
    """``(optimized model, info)``, or ``(None, info)`` with the error when ``optimize`` fails."""
    import sparse_compile

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = sparse_compile.optimize(model, example_inputs=(x,), mode=mode, device=str(dev))
    except Exception as e:  # report it and go on with the other modes
        return None, {"status": "error", "note": f"optimize: {type(e).__name__}: {str(e)[:300]}"}
    counts: dict = {}
    for lr in getattr(opt, "sparse_compile_report", None) or []:
        counts[lr.form] = counts.get(lr.form, 0) + 1
    return opt, {"optimize_s": round(time.perf_counter() - t0, 2),
                 "forms": " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))}


def run(args) -> dict:
    """Run the model benchmark; return ``{"meta", "rows"}``."""
    from tqdm import tqdm

    from sparse_compile.models import create_model

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batches = args.batches or ([1, 256] if cuda else [1, 8])
    compile_mode = args.compile or ("max-autotune" if cuda else "none")
    variants = ["eager"] + ([compile_mode] if compile_mode != "none" else [])
    rows = []
    total = len(args.models) * (1 + len(args.modes)) * len(batches) * len(variants)
    bar = tqdm(total=total, desc="bench model", unit="cfg", file=sys.stderr, disable=args.no_progress)
    t_start = time.perf_counter()
    with torch.no_grad(), num_threads(args.threads if not cuda else None):
        for name in args.models:
            kw = {"image_size": args.image_size} if name.startswith("vit") else {}
            model = create_model(name, **kw).eval()
            n_sparse = sparsify(model, name, args.sparsity, args.ablated_fraction, args.seed)
            model = model.to(dev, dtype)
            xs = {b: torch.randn(b, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(b))
                  .to(dev, dtype) for b in batches}
            refs = {b: model(xs[b]) for b in batches}
            base = {"model": name, "sparsity": args.sparsity, "ablated_fraction": args.ablated_fraction,
                    "sparse_layers": n_sparse, "image_size": args.image_size, "dtype": args.dtype,
                    "device": dev.type, "threads": args.threads if not cuda else ""}
            for mode in ("original",) + tuple(args.modes):
                optimized: dict = {}  # None (fixed modes: one model for every batch) or batch -> (model, info)
                for b in batches:
                    row = {**base, "mode": mode, "batch": b}
                    if mode == "original":
                        target, info = model, {}
                    else:
                        key = b if mode == "auto" else None
                        if key not in optimized:
                            optimized[key] = _optimize(model, mode, xs[b], dev)
                        target, info = optimized[key]
                        if target is None:
                            for v in variants:
                                bar.update(1)
                                rows.append({**row, "variant": v, **info})
                            continue
                    for v in variants:
                        bar.update(1)
                        r = {**row, "variant": v, **info}
                        try:
                            fn = target if v == "eager" else _compile(target, v)
                            t0 = time.perf_counter()
                            y = fn(xs[b])
                            if v != "eager":
                                r["compile_s"] = round(time.perf_counter() - t0, 2)
                            err = relative_error(y, refs[b].double().cpu())
                            r["rel_err"] = err
                            tol = 1e-3 if dtype == torch.float32 else 5e-2
                            if not err <= tol:
                                rows.append({**r, "status": "wrong"})
                                continue
                            t = time_fn(fn, xs[b], device=dev, threads=args.threads if not cuda else None,
                                        quick=args.quick, min_run_time=args.min_run_time)
                            rows.append({**r, "status": "ok", **t.to_dict(),
                                         "images_per_s": round(b / (t.median_us * 1e-6), 2)})
                        except Exception as e:
                            rows.append({**r, "status": "error", "note": f"{type(e).__name__}: {str(e)[:300]}"})
    bar.close()
    orig = {(r["model"], r["batch"], r["variant"]): r["median_us"] for r in rows
            if r["mode"] == "original" and r.get("status") == "ok"}
    for r in rows:
        o = orig.get((r["model"], r["batch"], r["variant"]))
        r["speedup"] = round(o / r["median_us"], 3) if o and r.get("status") == "ok" else None
    meta = {"benchmark": "model", "machine": machine_info(str(dev)),
            "config": {k: v for k, v in vars(args).items()}, "wall_s": round(time.perf_counter() - t_start, 1),
            "command": "python -m bench.model " + " ".join(sys.argv[1:])}
    return {"meta": meta, "rows": rows}


def markdown(result: dict) -> str:
    """Markdown table: one line per (model, mode, variant), latency / throughput columns per batch."""
    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    head = ["model", "mode", "variant"] + [f"batch {b}" for b in batches] + ["speedup (per batch)", "forms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["model"], r["mode"], r["variant"]) for r in rows))
    for k in keys:
        rs = {r["batch"]: r for r in rows if (r["model"], r["mode"], r["variant"]) == k}
        cells = list(k)
        sp = []
        for b in batches:
            r = rs.get(b)
            if r is None or r.get("status") != "ok":
                cells.append(r.get("status", "-") if r else "-")
                sp.append("-")
                continue
            ms = r["median_us"] / 1e3
            cells.append(f"{ms:.1f} ms" + (f" ({r['images_per_s']:.0f} img/s)" if b > 1 else ""))
            sp.append(f"{r['speedup']:.2f}x" if r.get("speedup") else "-")
        forms = next((r.get("forms") for r in rs.values() if r.get("forms")), "")
        lines.append("| " + " | ".join(cells + [" / ".join(sp), forms]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--ablated-fraction", type=float, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: CPU 1 8; GPU 1 256")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--compile", default=None, choices=["none", "default", "max-autotune"],
                   help="also time under torch.compile (default: CPU none, GPU max-autotune)")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="one short measurement per configuration (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out")
    p.add_argument("--name", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads is None and args.device == "cpu":
        import os

        args.threads = os.cpu_count() or 1
    result = run(args)
    name = args.name or f"model-{torch.device(args.device).type}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    jpath, cpath = write_results(args.out, name, result["meta"], result["rows"])
    m = result["meta"]["machine"]
    print(f"# {m['gpu_name'] or m['cpu_model']}, torch {m['torch']}, {m['date']}, "
          f"{args.sparsity:.0%} sparse, {args.ablated_fraction:.0%} ablated, {args.dtype}\n")
    print(markdown(result))
    for r in result["rows"]:
        if r.get("status") in ("error", "wrong"):
            print(f"- {r['model']} {r['mode']} {r['variant']} batch {r['batch']}: {r['status']} {r.get('note', '')}"
                  f"{' rel err %.3g' % r['rel_err'] if r.get('rel_err') is not None else ''}")
    print(f"wrote {jpath} and {cpath}")
    return 1 if any(r.get("status") == "wrong" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
