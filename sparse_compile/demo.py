"""The end-to-end demo (``sparse-compile demo``, ``make demo``), on data that ships with scikit-learn.

1. Train a 64-1024-1024-10 MLP on the 8x8 digits (the ``digits_mlp`` recipe with its hidden layers
   widened from 300-100, 6 epochs instead of 40) dense, with RigL and with SRigL at 90% sparsity;
   test accuracy. The width is what makes the demo's point: at batch 1 a 90%-sparse 1024x1024 layer
   runs faster condensed than dense, while the recipe's 300x100 layer is too small for that (call
   overhead wins and "auto" keeps it dense; ``hidden=(300, 100)`` shows it).
2. ``inspect`` the SRigL model; ``optimize`` it (mode "auto", timed on this CPU at batch 1), print
   the measured whole-model speedup beside the accuracy, and check that the optimized model computes
   the same outputs on the whole test set.
3. Time one ViT-B/16 MLP layer (768 x 3072 weight, 90% constant fan-in) at batch 1 on this CPU:
   dense, CSR and condensed; medians of interleaved repeats, ratios from the same run.
4. Write ``report.json`` and three PNG plots to the output folder.

Every number printed or written is measured in the run (the "auto" timing cache is bypassed).
"""
from __future__ import annotations

import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

from .benchmark.weights import random_layer
from .numerics import relative_error
from .timing import cpu_model

import torch
import torch.nn.functional as F

__all__ = ["run_demo", "time_forms"]

METHODS = ("dense", "rigl", "srigl")
#: The demo's MLP hidden widths and epochs (see the module docstring for why not the recipe's 300-100).
HIDDEN = (1024, 1024)
EPOCHS = 6
LABELS = {"dense": "dense", "rigl": "RigL", "srigl": "SRigL", "static": "static"}


def _header(log, i: int, text: str) -> None:
    log(f"\n[{i}/4] {text}")


def time_forms(fns: dict, rounds: int = 15, min_seconds: float = 0.02) -> dict:
    """Median microseconds per call of each zero-argument function in ``fns``.

    The forms are timed in interleaved rounds (each round runs every form once, for about
    ``min_seconds``), so slow drifts of a shared machine hit all of them alike.
    """
    inner = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            t0 = time.perf_counter()
            fn()
            inner[name] = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))
        samples: dict = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner[name] * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def _setup_kernels(log) -> dict:
    """Load (building on first use) the C++ CPU kernels; report whether they are in use."""
    from .kernels import cpu

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" chatter
    t0 = time.perf_counter()
    loaded = cpu.load()
    info = cpu.build_info()
    info["load_seconds"] = time.perf_counter() - t0
    if loaded:
        log(f"C++ CPU kernels loaded ({info['load_seconds']:.1f} s, flags {' '.join(info.get('flags') or [])})")
    else:
        log(f"WARNING: C++ CPU kernels unavailable ({info.get('error')}); condensed timings use the plain-torch "
            "reference and do not show sparse speed")
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def _widths(hidden) -> str:
    return "-".join(str(w) for w in (64, *hidden, 10))


def _train_digits(epochs: int, hidden: tuple, sparsity: float, seed: int, progress: bool, log) -> dict:
    from .train.loop import train
    from .train.data import load_digits
    from .models.recipes import get_recipe

    datasets = load_digits(seed=0)
    base = get_recipe("digits_mlp").replace(epochs=epochs)
    runs = {}
    for method in METHODS:
        recipe = base.replace(method=method, sparsity=sparsity if method != "dense" else 0.0)
        t0 = time.perf_counter()
        runs[method] = train(recipe, datasets=datasets, device="cpu", seed=seed, progress=progress,
                             log=lambda *a, **k: None, threads=torch.get_num_threads(),
                             model_kwargs={"hidden": list(hidden)})
        runs[method]["seconds"] = time.perf_counter() - t0
    log(f"{'method':<8}{'test accuracy':>15}{'sparsity':>10}{'ablated':>9}{'train s':>9}")
    for method, r in runs.items():
        rep = r["report"]["sparsifier"]
        sp = rep["sparsity"] if rep else 0.0
        abl = rep["ablated"] if rep else 0
        log(f"{LABELS[method]:<8}{100 * r['test_accuracy']:>14.2f}%{100 * sp:>9.2f}%{abl:>9}{r['seconds']:>9.1f}")
    log(f"(MLP {_widths(hidden)}, {base.epochs} epochs of {len(datasets[0])} training images, batch "
        f"{base.batch_size}; {len(datasets[1])} test images)")
    return {"runs": runs, "test_set": datasets[1], "recipe": base}


def _inspect_and_optimize(model, test_set, log) -> dict:
    from .analysis.inspect import inspect
    from .compiler import optimize

    table = inspect(model)
    log(str(table))
    x_all, y_all = test_set.tensors
    model.eval()
    log("\noptimize(model, mode='auto'), each layer timed on this CPU at batch 1:")
    t0 = time.perf_counter()
    opt = optimize(model, example_inputs=(x_all[:1],), mode="auto", device="cpu", cache=False)
    opt_seconds = time.perf_counter() - t0
    report = opt.sparse_compile_report
    log(str(report))
    with torch.no_grad():
        ref, got = model(x_all), opt(x_all)
    max_abs = float((ref - got).abs().max())
    rel = relative_error(got, ref)
    same_pred = bool(torch.equal(ref.argmax(1), got.argmax(1)))
    acc_ref = float((ref.argmax(1) == y_all).float().mean())
    acc_opt = float((got.argmax(1) == y_all).float().mean())
    speedup = report.speedup()  # auto's whole-model check: original vs kept model, same run
    log(f"auto: outputs on all {len(x_all)} test images: max |difference| {max_abs:.2e} (relative {rel:.2e}); "
        f"identical predictions: {'yes' if same_pred else 'NO'}; accuracy {100 * acc_ref:.2f}% -> {100 * acc_opt:.2f}% "
        + (f"at {speedup:.2f}x the original's speed (whole model, batch 1, measured) " if speedup else "")
        + f"(optimize took {opt_seconds:.2f} s)")
    if not any(f in ("condensed", "csr", "ablated_dense") for f in report.forms().values()):
        log("auto kept every layer dense: at batch 1 on this CPU these layers are too small for a sparse form "
            "to beat dense (the default hidden widths, 1024 1024, are large enough)")
    # What the optimized model really runs (module class per layer): the forms above are the plan.
    modules = {name: type(m).__name__ for name, m in opt.named_modules() if name in report.forms()}
    result = {"inspect": table.to_dict(), "optimize": report.to_dict(), "forms": report.forms(), "modules": modules,
              "max_abs_diff": max_abs, "max_rel_diff": rel, "identical_predictions": same_pred,
              "accuracy_original": acc_ref, "accuracy_optimized": acc_opt, "optimize_seconds": opt_seconds,
              "whole_model_speedup": speedup}

    # The same check with every eligible layer forced into the condensed form, whichever is faster.
    forced = optimize(model, example_inputs=(x_all[:1],), mode="condensed", device="cpu", cache=False)
    with torch.no_grad():
        got_c = forced(x_all)
    c_abs = float((ref - got_c).abs().max())
    c_same = bool(torch.equal(ref.argmax(1), got_c.argmax(1)))
    c_forms = forced.sparse_compile_report.forms()
    log(f"mode='condensed' ({', '.join(f'{k}: {v}' for k, v in c_forms.items())}): max |difference| {c_abs:.2e} "
        f"(relative {relative_error(got_c, ref):.2e}); "
        f"identical predictions: {'yes' if c_same else 'NO'}")
    result.update(condensed_forms=c_forms, condensed_max_abs_diff=c_abs, condensed_identical_predictions=c_same)
    return result


def _time_vit_layer(sparsity: float, rounds: int, log) -> dict:
    from . import formats, kernels

    layer = random_layer(768, 3072, sparsity, ablated_fraction=0.0, name="vit_b_16 mlp fc2")
    weight, mask, bias = layer.weight, layer.mask, layer.bias
    cond = formats.to_condensed(weight, mask, bias=bias)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        csr = formats.to_csr(weight, mask, active_only=False).csr
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(1))
    op = torch.ops.sparse_compile.condensed_linear
    values, indices = cond.values, cond.indices
    fns = {
        "dense": lambda: F.linear(x, weight, bias),
        "csr": lambda: torch.mm(csr, x.t()).t() + bias,
        "condensed": lambda: op(x, values, indices, bias),
        "condensed_wrapper": lambda: kernels.condensed_linear(x, values, indices, bias),
    }
    with torch.inference_mode():
        ref = fns["dense"]()
        errs = {k: relative_error(f(), ref) for k, f in fns.items()}
    us = time_forms(fns, rounds=rounds)
    k = values.shape[1]
    log(f"weight {weight.shape[0]}x{weight.shape[1]}, sparsity {1 - k / weight.shape[1]:.3f} (fan-in k={k}), "
        f"batch 1, fp32, {torch.get_num_threads()} thread(s), median of {rounds} interleaved rounds:")
    names = {"dense": "dense F.linear", "csr": "CSR (torch.sparse_csr mm)",
             "condensed": "condensed (torch.ops.sparse_compile.condensed_linear)",
             "condensed_wrapper": "condensed (sparse_compile.kernels.condensed_linear)"}
    for key, t in us.items():
        ratio = us["dense"] / t
        log(f"  {names[key]:<54}{t:>9.1f} us   {ratio:5.2f}x vs dense   {us['csr'] / t:5.2f}x vs CSR"
            f"   (max rel. error {errs[key]:.1e})")
    return {"shape": list(weight.shape), "k": k, "sparsity": 1 - k / weight.shape[1], "batch": 1,
            "threads": torch.get_num_threads(), "rounds": rounds, "median_us": us, "max_rel_err": errs,
            "speedup_vs_dense": {k2: us["dense"] / t for k2, t in us.items()},
            "speedup_vs_csr": {k2: us["csr"] / t for k2, t in us.items()}, "labels": names}


def _fan_ins(model) -> dict:
    from .formats import analyze, get_mask

    out = {}
    for name, m in model.named_modules():
        mask = get_mask(m)
        if mask is not None:
            out[name] = analyze(m.weight, mask, name).fan_in.tolist()
    return out


def _plots(out: Path, result: dict) -> list:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched

    files = []
    # accuracy bars
    acc = result["accuracy"]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    names = [LABELS[m] for m in acc]
    vals = [100 * v for v in acc.values()]
    bars = ax.bar(names, vals, color=["#777777", "#4C72B0", "#DD8452"][: len(vals)])
    lo = max(0.0, min(vals) - 10)
    ax.set_ylim(lo, 100)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + (100 - lo) * 0.01, f"{v:.2f}%", ha="center", va="bottom")
    sp = result["training"]["sparsity"]
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits MLP {result['model']}: dense vs {100 * sp:.0f}% sparse")
    fig.tight_layout()
    files.append(out / "accuracy.png")
    fig.savefig(files[-1], dpi=120)

    # layer timing bars
    t = result["vit_layer"]
    us = t["median_us"]
    keys = list(us)
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    labels = [t["labels"][k].replace(" (", "\n(") for k in keys]
    y = range(len(keys))
    colors = {"dense": "#777777", "csr": "#4C72B0", "condensed": "#DD8452", "condensed_wrapper": "#C44E52"}
    ax.barh(list(y), [us[k] for k in keys], color=[colors.get(k, "#55A868") for k in keys])
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    xmax = max(us.values())
    ax.set_xlim(0, xmax * 1.5)
    for i, k in enumerate(keys):
        ax.text(us[k] + xmax * 0.01, i, f"{us[k]:.0f} us ({us['dense'] / us[k]:.2f}x vs dense)",
                va="center", fontsize=8)
    ax.set_xlabel("median time per call (microseconds), lower is better")
    ax.set_title(f"ViT-B/16 MLP layer {t['shape'][0]}x{t['shape'][1]}, {100 * t['sparsity']:.0f}% sparse, "
                 f"batch 1, CPU, {t['threads']} thread(s)", fontsize=10)
    fig.tight_layout()
    files.append(out / "layer_timing.png")
    fig.savefig(files[-1], dpi=120)

    # fan-in histograms: RigL spreads, SRigL is one value per layer (or 0 for ablated neurons)
    fan = result["fan_in"]
    layers = list(next(iter(fan.values())))
    fig = Figure(figsize=(4 * len(layers), 3.4))
    axes = fig.subplots(1, len(layers), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for method, color in (("rigl", "#4C72B0"), ("srigl", "#DD8452")):
            if method in fan and layer in fan[method]:
                v = fan[method][layer]
                ax.hist(v, bins=range(0, max(v) + 2), color=color, alpha=0.65, label=LABELS[method], align="left")
        ax.set_title(f"{layer}", fontsize=10)
        ax.set_xlabel("live weights per neuron (fan-in)")
        ax.set_ylabel("neurons")
        ax.legend(fontsize=8)
    fig.suptitle(f"fan-in per neuron after training at {100 * sp:.0f}% sparsity: SRigL keeps one value per layer "
                 "(0 = ablated), RigL spreads", fontsize=11)
    fig.tight_layout()
    files.append(out / "fan_in_hist.png")
    fig.savefig(files[-1], dpi=120)
    return files


def run_demo(out="demo-out", epochs: int = EPOCHS, sparsity: float = 0.9, rounds: int = 15,
             threads: int = 1, seed: int = 0, progress: bool = True, log=print, hidden=HIDDEN) -> dict:
    """Run the four steps (see the module docstring) and return the report written to ``out/report.json``.

    ``epochs`` and ``hidden`` (the MLP's hidden widths) default to the demo's 6 and (1024, 1024);
    ``threads`` is torch's thread count for the whole demo (1 by default: batch-1 inference, and
    the project's CPU anchors use one thread).
    """
    hidden = tuple(int(h) for h in hidden)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        try:
            return _run(out, epochs, hidden, sparsity, rounds, threads, seed, progress, log)
        finally:
            torch.set_num_threads(prev_threads)


def _run(out: Path, epochs, hidden, sparsity, rounds, threads, seed, progress, log) -> dict:
    """The demo proper (threads and warning filters set by :func:`run_demo`)."""
    log(f"sparse_compile demo: torch {torch.__version__}, {cpu_model()}, {threads} thread(s), output in {out}/")
    kernels_info = _setup_kernels(log)
    t_start = time.perf_counter()

    _header(log, 1, f"train a digits MLP {_widths(hidden)} dense, with RigL and with SRigL at "
                    f"{100 * sparsity:.0f}% sparsity")
    trained = _train_digits(epochs, hidden, sparsity, seed, progress, log)
    runs = trained["runs"]
    srigl_model = runs["srigl"]["model"]

    _header(log, 2, "inspect the SRigL model, optimize it and check the outputs")
    opt = _inspect_and_optimize(srigl_model, trained["test_set"], log)

    _header(log, 3, "time one ViT-B/16 MLP layer (768x3072) at 90% sparsity, batch 1, this CPU")
    vit = _time_vit_layer(0.9, rounds, log)

    _header(log, 4, f"write {out}/report.json and plots")
    result = {
        "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu": cpu_model(), "threads": threads, "seed": seed, "model": _widths(hidden), "hidden": list(hidden),
        "kernels": kernels_info,
        "training": {"recipe": trained["recipe"].to_dict(), "sparsity": sparsity,
                     "runs": {m: {"test_accuracy": r["test_accuracy"], "seconds": r["seconds"],
                                  "history": r["history"], "sparsifier": r["report"]["sparsifier"]}
                              for m, r in runs.items()}},
        "accuracy": {m: r["test_accuracy"] for m, r in runs.items()},
        "fan_in": {m: _fan_ins(runs[m]["model"]) for m in ("rigl", "srigl")},
        "optimize": opt,
        "vit_layer": vit,
    }
    files = _plots(out, result)
    result["seconds_after_setup"] = time.perf_counter() - t_start
    result["plots"] = [f.name for f in files]
    (out / "report.json").write_text(json.dumps(result, indent=1))
    for f in [out / "report.json", *files]:
        log(f"  wrote {f}")
    log(f"\ndone in {result['seconds_after_setup']:.0f} s after set-up "
        f"(SRigL {100 * result['accuracy']['srigl']:.2f}% vs RigL {100 * result['accuracy']['rigl']:.2f}% vs "
        f"dense {100 * result['accuracy']['dense']:.2f}%; optimized SRigL model "
        + (f"{opt['whole_model_speedup']:.2f}x" if opt.get("whole_model_speedup") else "not timed")
        + " the original's speed; condensed ViT layer "
        f"{vit['speedup_vs_dense']['condensed']:.2f}x vs dense, {vit['speedup_vs_csr']['condensed']:.2f}x vs CSR)")
    return result
