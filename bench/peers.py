"""Against the runtimes a user would deploy with instead: OpenVINO and ONNX Runtime on the dense model.

    python -m bench.peers                                   # ViT-B/16 + ResNet-50, batch 1 and 8, 2 threads
    python -m bench.peers --models vit_b_16 --batches 1 --compile default
    python -m bench.peers --threads 1 --timer process        # on a busy shared machine
    pip install -e '.[peers]'                               # openvino, onnxruntime, onnx

Models (random weights, no download): torchvision ViT-B/16 at 224 with 90% constant fan-in on
the MLP and attention-out layers and 5% of their neurons ablated (``bench.model_vit.sparse_vit``),
and ResNet-50 with ERK 90% (``bench.model.sparsify``, the same ablated fraction). Runtimes, all
in one process, same ``--threads``, same input, timed interleaved (one call each per round,
medians):

* ``torch dense`` - the masked dense model, eager fp32 (the reference the errors are taken against);
* ``ours fp32`` / ``ours bf16`` - ``sparse_compile.optimize(model, mode="auto")`` of the fp32 model
  and of the model cast to bf16 (bf16 weights and activations; the condensed kernels accumulate in
  fp32), with ``--compile`` also under ``torch.compile``;
* ``OpenVINO f32`` / ``OpenVINO default`` - the dense model exported to ONNX (``torch.onnx.export``,
  TorchScript-based, opset 17: OpenVINO's own TorchScript tracing of torchvision's ViT fails), compiled
  for CPU with ``INFERENCE_PRECISION_HINT=f32`` and with OpenVINO's default, whose precision (bf16 on a
  CPU with AVX512_BF16) is read back and printed;
* ``ONNX Runtime f32`` - the same ONNX file, CPU execution provider, spinning off (so an idle pool does
  not steal the next runtime's cores).

A peer that is not installed is skipped with the reason. Every output is checked against the fp32
torch model: max |y - ref| / max |ref| is printed next to its time. Writes
``bench/out/peers-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.model_vit import compiled, sparse_vit
from sparse_compile.numerics import relative_error

#: wall clock, or CPU time of the whole process (all its threads): on a busy shared machine the
#: latter ignores the time the OS gives to other processes. Only fair with every runtime's pool
#: idle between calls (ONNX Runtime runs with spinning off) and best with --threads 1.
TIMERS = {"wall": time.perf_counter, "process": time.process_time}


def sparse_resnet50(sparsity: float, ablated_fraction: float, seed: int = 0):
    """torchvision ResNet-50 with ERK constant fan-in masks (``bench.model.sparsify``)."""
    import torchvision

    from bench.model import sparsify

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(num_classes=1000).eval()
    sparsify(model, "resnet50", sparsity, ablated_fraction, seed)
    return model


MODELS = {"vit_b_16": sparse_vit, "resnet50": sparse_resnet50}


def interleaved(fns: dict, x, rounds: int, timer) -> dict:
    """Median / quartiles (ms) of one call of each function on ``x``, timed round-robin."""
    import statistics

    ts = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f(x)
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = timer()
                f(x)
                ts[k].append((timer() - t0) * 1e3)
    out = {}
    for k, v in ts.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        out[k] = {"median_ms": statistics.median(v), "q25_ms": q[0], "q75_ms": q[2]}
    return out


def rel_err(y, ref) -> float:
    """:func:`sparse_compile.numerics.relative_error` of a peer's output, which may be a numpy array."""
    return relative_error(torch.as_tensor(y), ref)


def export_onnx(model, x, path: str) -> None:
    """The dense model as ONNX (TorchScript exporter, opset 17, fixed input shape)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"])


def openvino_runners(path: str, threads: int) -> tuple:
    """{name: (callable(np) -> np, precision)} for OpenVINO f32 and its default, or a skip reason."""
    try:
        import openvino as ov
    except ImportError as e:
        return {}, f"OpenVINO not installed ({e}); pip install -e '.[peers]'"
    core = ov.Core()
    out = {}
    for name, cfg in (("OpenVINO f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("OpenVINO default", {})):
        cm = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                             **cfg})
        t = cm.get_property("INFERENCE_PRECISION_HINT")
        prec = t.to_string() if hasattr(t, "to_string") else str(t)  # "f32", not "<Type: 'float32'>"
        req = cm.create_infer_request()
        out[name] = ((lambda a, req=req: req.infer([a])[0]), prec)
    return out, None


def ort_runner(path: str, threads: int) -> tuple:
    """ONNX Runtime (CPU provider, fp32) callable, or a skip reason."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, f"ONNX Runtime not installed ({e}); pip install -e '.[peers]'"
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return (lambda a: sess.run(None, {"x": a})[0]), None


def run_model(name: str, batch: int, args) -> dict:
    """Build, optimize, export, check and time every runtime for one model and batch size."""
    from sparse_compile import optimize

    torch.manual_seed(0)
    model = MODELS[name](args.sparsity, args.ablated_fraction)
    x = torch.randn(batch, 3, 224, 224)
    xn = x.numpy()
    with torch.inference_mode():
        ref = model(x)
    fns, info, skipped = {}, {}, []

    def add(key, fn, precision, err):
        fns[key] = fn
        info[key] = {"precision": precision, "rel_err": err}

    add("torch dense", model, "fp32", 0.0)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt32 = optimize(model, (x,), mode="auto")
    print(f"  optimize fp32: {time.time() - t0:.0f}s", flush=True)
    with torch.inference_mode():
        add("ours fp32", opt32, "fp32", rel_err(opt32(x), ref))
    if "bf16" in args.dtypes:
        try:
            t0 = time.time()
            mb = MODELS[name](args.sparsity, args.ablated_fraction).to(torch.bfloat16)
            xb = x.bfloat16()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optb = optimize(mb, (xb,), mode="auto")
            print(f"  optimize bf16: {time.time() - t0:.0f}s", flush=True)
            fb = (lambda _x, optb=optb, xb=xb: optb(xb))
            with torch.inference_mode():
                add("ours bf16", fb, "bf16 (fp32 accumulation)", rel_err(fb(x).float(), ref))
        except Exception as e:  # noqa: BLE001 - report, keep the other runtimes
            skipped.append(f"ours bf16: {type(e).__name__}: {str(e)[:200]}")
    if args.compile != "none":
        for key in [k for k in fns if k.startswith("ours")]:
            c = compiled(opt32 if key == "ours fp32" else optb, args.compile)
            f = c if key == "ours fp32" else (lambda _x, c=c, xb=xb: c(xb))
            t0 = time.time()
            with torch.inference_mode():
                y = f(x)
            print(f"  compile {key}: {time.time() - t0:.0f}s", flush=True)
            add(f"{key} + compile", f, info[key]["precision"], rel_err(torch.as_tensor(y).float(), ref))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.onnx")
        t0 = time.time()
        try:
            export_onnx(model, x, path)
            print(f"  ONNX export: {time.time() - t0:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001
            path = None
            skipped.append(f"ONNX export: {type(e).__name__}: {str(e)[:200]}")
        if path:
            ov_fns, why = openvino_runners(path, args.threads)
            if why:
                skipped.append(why)
            for key, (f, prec) in ov_fns.items():
                add(key, (lambda _x, f=f: f(xn)), prec, rel_err(f(xn), ref))
            f, why = ort_runner(path, args.threads)
            if why:
                skipped.append(why)
            else:
                add("ONNX Runtime f32", (lambda _x, f=f: f(xn)), "f32", rel_err(f(xn), ref))
        res = interleaved(fns, x, args.repeats, TIMERS[args.timer])
    base = res["torch dense"]["median_ms"]
    print(f"\n{name} batch {batch}, {args.threads} threads, {args.repeats} interleaved rounds, {args.timer} time:")
    print(f"  {'runtime':26s} {'precision':26s} {'median ms':>10s} {'q25':>8s} {'q75':>8s} "
          f"{'vs torch':>9s} {'rel err':>9s}")
    for key, r in res.items():
        print(f"  {key:26s} {info[key]['precision']:26s} {r['median_ms']:10.2f} {r['q25_ms']:8.2f} "
              f"{r['q75_ms']:8.2f} {base / r['median_ms']:8.2f}x {info[key]['rel_err']:9.1e}", flush=True)
    for s in skipped:
        print(f"  skipped: {s}")
    return {"model": name, "batch": batch, "timings": res, "info": info, "skipped": skipped}


def main(argv=None) -> int:
    """Run every model and batch size asked for; print a table per pair; write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"),
                   help="our optimized model's precisions (peers always run both of theirs)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--ablated-fraction", type=float, default=0.05)
    p.add_argument("--compile", default="none", choices=("none", "default", "max-autotune"),
                   help="also time our models under torch.compile in this mode")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--timer", choices=sorted(TIMERS), default="wall",
                   help="wall clock (default) or the process's CPU time (see TIMERS)")
    p.add_argument("--out", default="bench/out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sparse_compile.kernels import cpu

    cpu.load()
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"kernels {cpu.build_info()['isa']}, timer {args.timer}, load avg {os.getloadavg()}", flush=True)
    results = []
    for name in args.models:
        for batch in args.batches:
            print(f"{name} batch {batch}:", flush=True)
            results.append(run_model(name, batch, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"peers-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"command": "python -m bench.peers " + " ".join(argv or sys.argv[1:]),
                                "torch": torch.__version__, "runs": results}, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
